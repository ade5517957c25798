//! `svidcar inject --webhook`: real HTTPS requests (curl, verifying the server certificate)
//! with AdmissionReview fixtures (`tests/golden/inject-review-*.json`).
#[path = "common/netns.rs"]
mod netns;
#[path = "common/pss.rs"]
mod pss;

use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

const SVIDCAR: &str = env!("CARGO_BIN_EXE_svidcar");

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// The webhook process with its certificate; killed on drop.
struct Webhook {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Webhook {
    fn start(tag: &str) -> Webhook {
        Self::start_with(tag, &[])
    }

    fn start_with(tag: &str, extra: &[&str]) -> Webhook {
        let dir =
            std::env::temp_dir().join(format!("svidcar-webhook-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let certified = rcgen::generate_simple_self_signed(vec![
            "svidcar-webhook.svidcar-system.svc".to_string(),
        ])
        .unwrap();
        std::fs::write(dir.join("tls.crt"), certified.cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), certified.signing_key.serialize_pem()).unwrap();
        let mut child = Command::new(SVIDCAR)
            .args([
                "--log-format",
                "json",
                "inject",
                "--webhook",
                "--listen",
                "127.0.0.1:0",
            ])
            .arg("--tls-cert")
            .arg(dir.join("tls.crt"))
            .arg("--tls-key")
            .arg(dir.join("tls.key"))
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let port = loop {
            let line = lines
                .next()
                .expect("the webhook exited before listening")
                .unwrap();
            let Ok(log) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if let Some(local) = log.pointer("/fields/local").and_then(Value::as_str) {
                break local.rsplit(':').next().unwrap().parse().unwrap();
            }
        };
        // Keep draining the log so the process never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Webhook { child, port, dir }
    }

    /// `curl` over HTTPS, verifying the certificate for the service name; (status, body).
    fn curl(&self, method: &str, path: &str, body: Option<&Path>) -> (u16, String) {
        let host = "svidcar-webhook.svidcar-system.svc";
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ])
        .arg("--cacert")
        .arg(self.dir.join("tls.crt"))
        .args(["--resolve", &format!("{host}:{}:127.0.0.1", self.port)]);
        if let Some(file) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary"])
                .arg(format!("@{}", file.display()));
        }
        let out = cmd
            .arg(format!("https://{host}:{}{path}", self.port))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), body.to_string())
    }

    fn review(&self, fixture: &str) -> Value {
        let (code, body) = self.curl("POST", "/mutate", Some(&golden(fixture)));
        assert_eq!(code, 200, "{body}");
        let review: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(review["kind"], "AdmissionReview");
        let request: Value =
            serde_json::from_str(&std::fs::read_to_string(golden(fixture)).unwrap()).unwrap();
        assert_eq!(
            review["response"]["uid"], request["request"]["uid"],
            "uid must be echoed"
        );
        review
    }
}

fn have_curl() -> bool {
    if netns::which("curl").is_none() || netns::which("base64").is_none() {
        return !netns::skip_or_fail("curl and base64 are needed (apt-get install curl coreutils)");
    }
    true
}

fn base64_decode(text: &str) -> Vec<u8> {
    let mut child = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "patch is not base64");
    out.stdout
}

/// A minimal RFC 6902 `add` (all the webhook emits), to apply the patch like the API server.
fn apply_patch(doc: &mut Value, patch: &[Value]) {
    for op in patch {
        assert_eq!(op["op"], "add", "only add operations are expected: {op}");
        let path = op["path"].as_str().unwrap();
        let (parent, last) = path.rsplit_once('/').unwrap();
        let target = doc
            .pointer_mut(parent)
            .unwrap_or_else(|| panic!("no parent for {path}"));
        match target {
            Value::Object(map) => {
                map.insert(
                    last.replace("~1", "/").replace("~0", "~"),
                    op["value"].clone(),
                );
            }
            Value::Array(items) if last == "-" => items.push(op["value"].clone()),
            Value::Array(items) => items.insert(last.parse().unwrap(), op["value"].clone()),
            other => panic!("cannot add into {other}"),
        }
    }
}

#[test]
fn pod_creation_gets_a_json_patch_equal_to_the_cli_injection() {
    if !have_curl() {
        return;
    }
    let webhook = Webhook::start("pod");
    let review = webhook.review("inject-review-pod.json");
    let response = &review["response"];
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch: Vec<Value> =
        serde_json::from_slice(&base64_decode(response["patch"].as_str().unwrap())).unwrap();
    let paths: Vec<&str> = patch
        .iter()
        .map(|op| op["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        ["/spec/initContainers", "/spec/volumes/-", "/spec/volumes/-"]
    );

    let request: Value =
        serde_json::from_str(&std::fs::read_to_string(golden("inject-review-pod.json")).unwrap())
            .unwrap();
    let mut pod = request["request"]["object"].clone();
    apply_patch(&mut pod, &patch);
    let names: Vec<&str> = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["svidcar-init", "svidcar-proxy"]);
    assert_eq!(
        pod["spec"]["initContainers"][0]["args"][6], "9090",
        "annotation honoured"
    );
    let exceptions = pss::Exceptions {
        net_admin_containers: &["svidcar-init"],
        root_containers: &[],
        host_paths: &["/run/svidcar/sockets"],
        host_pid: false,
    };
    let v = pss::violations(&pod["spec"], &exceptions);
    assert!(
        v.is_empty(),
        "the mutated pod violates the restricted profile: {v:?}"
    );

    // The same object through `svidcar inject` (the file path) gives the same pod.
    let mut child = Command::new(SVIDCAR)
        .args(["inject", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request["request"]["object"].to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let cli: serde_yaml_ng::Value = serde_yaml_ng::from_slice(&out.stdout).unwrap();
    assert_eq!(serde_json::to_value(cli).unwrap(), pod);

    // The mutated pod is valid Kubernetes.
    if let Some(tool) = pss::kubernetes_validate() {
        let file = webhook.dir.join("mutated-pod.json");
        std::fs::write(&file, pod.to_string()).unwrap();
        pss::validate_schemas(&tool, &[file]);
    }
}

#[test]
fn opt_out_and_updates_are_allowed_without_a_patch() {
    if !have_curl() {
        return;
    }
    let webhook = Webhook::start("optout");
    for fixture in ["inject-review-optout.json", "inject-review-update.json"] {
        let review = webhook.review(fixture);
        assert_eq!(review["response"]["allowed"], true, "{fixture}");
        assert!(
            review["response"].get("patch").is_none(),
            "{fixture}: {review}"
        );
        assert!(review["response"].get("patchType").is_none(), "{fixture}");
    }
}

#[test]
fn invalid_annotation_is_denied_with_the_reason() {
    if !have_curl() {
        return;
    }
    let webhook = Webhook::start("bad");
    let review = webhook.review("inject-review-bad-annotation.json");
    let response = &review["response"];
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 400);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("svidcar.io/exclude-outbound-ports")
            && message.contains("`https` is not a TCP port"),
        "{message}"
    );
}

#[test]
fn health_and_malformed_requests() {
    if !have_curl() {
        return;
    }
    let webhook = Webhook::start("health");
    assert_eq!(
        webhook.curl("GET", "/healthz", None),
        (200, "ok\n".to_string())
    );
    let junk = webhook.dir.join("junk.json");
    std::fs::write(
        &junk,
        r#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#,
    )
    .unwrap();
    let (code, body) = webhook.curl("POST", "/mutate", Some(&junk));
    assert_eq!(code, 400);
    assert!(body.contains("admission.k8s.io/v1"), "{body}");
    std::fs::write(&junk, "not json").unwrap();
    assert_eq!(webhook.curl("POST", "/mutate", Some(&junk)).0, 400);
}

#[test]
fn refuses_to_start_with_a_missing_key() {
    let out = Command::new(SVIDCAR)
        .args([
            "inject",
            "--webhook",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "/nonexistent/tls.crt",
            "--tls-key",
            "/nonexistent/tls.key",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/tls.crt"), "{err}");
}

#[test]
fn keeps_answering_during_the_sigterm_drain_then_exits() {
    if !have_curl() {
        return;
    }
    let mut webhook = Webhook::start_with("drain", &["--drain-seconds", "2"]);
    let pid = webhook.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        webhook.curl("GET", "/healthz", None),
        (200, "ok\n".to_string())
    );
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = webhook.child.try_wait().unwrap() {
            assert!(status.success(), "exit after drain: {status}");
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "did not exit after the drain"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
