//! `svidcar inject` on manifests: golden outputs (`tests/golden/inject-*.out.yaml`),
//! idempotency, opt-outs, the restricted Pod Security profile of the result, schema validation.
//! Regenerate after an intended change with `UPDATE_GOLDEN=1 cargo test --test inject_golden`.
#[path = "common/pss.rs"]
mod pss;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

const SVIDCAR: &str = env!("CARGO_BIN_EXE_svidcar");

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// Runs `svidcar inject -f - ARGS` with `input` on stdin; returns (success, stdout, stderr).
fn inject(input: &str, args: &[&str]) -> (bool, String, String) {
    let mut child = Command::new(SVIDCAR)
        .args(["inject", "-f", "-"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Injects `<case>.in.yaml`, compares with `<case>.out.yaml`, checks that injecting the output
/// again changes nothing, and returns the parsed output documents.
fn check_case(case: &str, args: &[&str]) -> Vec<Value> {
    let input = std::fs::read_to_string(golden(&format!("{case}.in.yaml"))).unwrap();
    let (ok, out, err) = inject(&input, args);
    assert!(ok, "svidcar inject failed: {err}");
    let out_path = golden(&format!("{case}.out.yaml"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&out_path, &out).unwrap();
    }
    let expected = std::fs::read_to_string(&out_path)
        .unwrap_or_else(|e| panic!("missing golden file {}: {e}", out_path.display()));
    assert_eq!(out, expected, "output differs from {}", out_path.display());
    let (ok, again, err) = inject(&out, args);
    assert!(ok, "re-injecting failed: {err}");
    assert_eq!(again, out, "injection is not idempotent");
    documents(&out)
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| {
            let v: serde_yaml_ng::Value = serde::Deserialize::deserialize(d).unwrap();
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn init_names(spec: &Value) -> Vec<&str> {
    spec["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

fn injected_exceptions() -> pss::Exceptions<'static> {
    pss::Exceptions {
        net_admin_containers: &["svidcar-init"],
        root_containers: &[],
        host_paths: &["/run/svidcar/sockets"],
        host_pid: false,
    }
}

/// The injected containers themselves always meet the restricted profile (svidcar-init's
/// root + NET_ADMIN/NET_RAW being the documented exception).
fn assert_injected_containers_restricted(spec: &Value) {
    let only_ours: Vec<Value> = spec["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"].as_str().unwrap().starts_with("svidcar-"))
        .cloned()
        .collect();
    let probe = serde_json::json!({"initContainers": only_ours, "volumes": spec["volumes"]});
    let v = pss::violations(&probe, &injected_exceptions());
    assert!(
        v.is_empty(),
        "injected containers violate the restricted profile: {v:?}"
    );
}

fn write_temp(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("svidcar-inject-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn deployment_with_annotations_and_passthrough_documents() {
    let docs = check_case(
        "inject-deployment",
        &["--image", "registry.example/svidcar:0.1.0"],
    );
    assert_eq!(docs.len(), 4);
    let input = std::fs::read_to_string(golden("inject-deployment.in.yaml")).unwrap();
    let output = std::fs::read_to_string(golden("inject-deployment.out.yaml")).unwrap();
    // Other kinds are copied byte for byte, comments included.
    assert!(output.contains("  name: web-config   # trailing comment kept\n"));
    assert!(output.starts_with(&input[..input.find("---").unwrap()]));

    let spec = pss::pod_spec(&docs[1]).unwrap();
    assert_eq!(
        init_names(spec),
        ["svidcar-init", "svidcar-proxy", "migrate"]
    );
    let init = &spec["initContainers"][0];
    let args: Vec<&str> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "init",
            "--backend",
            "iptables",
            "--proxy-uid",
            "1337",
            "--exclude-inbound-ports",
            "9090",
            "--exclude-outbound-ports",
            "5432,6379",
            "--exclude-outbound-cidrs",
            "10.96.0.0/12,169.254.169.254/32"
        ]
    );
    let proxy = &spec["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["image"], "registry.example/svidcar:0.1.0");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 15000);
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    assert_eq!(proxy["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(proxy["volumeMounts"][0]["readOnly"], true);
    assert_eq!(
        proxy["env"][0]["value"],
        "unix:///run/svidcar/sockets/agent.sock"
    );
    let vols: Vec<&str> = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        vols,
        [
            "cache",
            "svidcar-agent-socket",
            "svidcar-init-scratch",
            "svidcar-policy"
        ]
    );
    // svidcar.io/policy-configmap: the ConfigMap mounted read-only and passed as --policy.
    assert_eq!(spec["volumes"][3]["configMap"]["name"], "web-policy");
    assert_eq!(proxy["volumeMounts"][1]["mountPath"], "/etc/svidcar/policy");
    assert_eq!(proxy["volumeMounts"][1]["readOnly"], true);
    let proxy_args: Vec<&str> = proxy["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        proxy_args.ends_with(&["--policy", "/etc/svidcar/policy"]),
        "{proxy_args:?}"
    );
    assert_eq!(
        spec["volumes"][1]["hostPath"]["path"],
        "/run/svidcar/sockets"
    );
    // This app was restricted-compliant: with the sidecar it still is (but for svidcar-init).
    let v = pss::violations(spec, &injected_exceptions());
    assert!(v.is_empty(), "{v:?}");
}

#[test]
fn every_workload_kind_is_injected() {
    let docs = check_case("inject-workloads", &[]);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "Pod",
            "StatefulSet",
            "DaemonSet",
            "Job",
            "CronJob",
            "ReplicaSet"
        ]
    );
    for doc in &docs {
        let spec = pss::pod_spec(doc).unwrap();
        assert_eq!(
            init_names(spec),
            ["svidcar-init", "svidcar-proxy"],
            "{}",
            doc["kind"]
        );
        assert_eq!(
            spec["initContainers"][1]["image"],
            svidcar_proxy::inject::DEFAULT_IMAGE
        );
        assert_injected_containers_restricted(spec);
    }
}

#[test]
fn opted_out_host_network_and_other_kinds_pass_through_unchanged() {
    let input = std::fs::read_to_string(golden("inject-skipped.in.yaml")).unwrap();
    let (ok, out, err) = inject(&input, &[]);
    assert!(ok, "{err}");
    assert_eq!(out, input, "nothing here may change");
    assert!(
        err.contains("hostNetwork pod"),
        "the reason is logged: {err}"
    );
    assert!(
        err.contains("svidcar.io/inject is \\\"false\\\"")
            || err.contains("svidcar.io/inject is \"false\""),
        "{err}"
    );
}

#[test]
fn csi_socket_nft_backend_image_annotation_and_lists() {
    let docs = check_case(
        "inject-csi",
        &["--csi-driver", "csi.spiffe.io", "--init-backend", "nft"],
    );
    let pod = &docs[0]["items"][0];
    let spec = &pod["spec"];
    assert_eq!(
        spec["initContainers"][1]["image"],
        "registry.example/svidcar:0.1.0"
    );
    assert_eq!(spec["initContainers"][0]["args"][2], "nft");
    assert_eq!(spec["volumes"][0]["csi"]["driver"], "csi.spiffe.io");
    assert_eq!(spec["volumes"][0]["csi"]["readOnly"], true);
    assert!(docs[0]["items"][1].get("spec").is_none());
    assert_injected_containers_restricted(spec);
}

#[test]
fn invalid_annotations_are_refused_with_the_reason() {
    for (annotation, value, needle) in [
        (
            "svidcar.io/exclude-inbound-ports",
            "80,http",
            "`http` is not a TCP port",
        ),
        (
            "svidcar.io/exclude-outbound-cidrs",
            "10.0.0.0/99",
            "invalid prefix length",
        ),
        (
            "svidcar.io/inject",
            "maybe",
            "expected \"true\" or \"false\"",
        ),
    ] {
        let input = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    {annotation}: \"{value}\"\nspec:\n  containers:\n  - name: a\n    image: a\n"
        );
        let (ok, out, err) = inject(&input, &[]);
        assert!(!ok, "accepted {annotation}={value}: {out}");
        assert!(err.contains(annotation) && err.contains(needle), "{err}");
    }
    let (ok, _, err) = inject("a: [\n", &[]);
    assert!(!ok);
    assert!(err.contains("YAML document 1"), "{err}");
}

#[test]
fn reads_a_file_argument() {
    let path = golden("inject-workloads.in.yaml");
    let out = Command::new(SVIDCAR)
        .args(["inject", "-f"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let expected = std::fs::read_to_string(golden("inject-workloads.out.yaml")).unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);
}

/// The injected objects are valid Kubernetes (strict schema, unknown fields rejected).
#[test]
fn injected_output_passes_schema_validation() {
    let Some(tool) = pss::kubernetes_validate() else {
        return;
    };
    let mut files = Vec::new();
    for name in [
        "inject-deployment.out.yaml",
        "inject-workloads.out.yaml",
        "inject-skipped.in.yaml",
    ] {
        let text = std::fs::read_to_string(golden(name)).unwrap();
        files.push(write_temp(name, &text));
    }
    // kubernetes-validate does not expand `kind: List`: validate the items one by one.
    let csi = std::fs::read_to_string(golden("inject-csi.out.yaml")).unwrap();
    for (i, item) in documents(&csi)[0]["items"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        files.push(write_temp(&format!("csi-item-{i}.json"), &item.to_string()));
    }
    pss::validate_schemas(&tool, &files);
}
