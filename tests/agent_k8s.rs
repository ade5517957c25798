//! Kubernetes workload attestation: recorded `/proc/<pid>/cgroup` files of every layout
//! (cgroup v1/v2, cgroupfs/systemd drivers, containerd/CRI-O/Docker, nested), and the real agent
//! against a local HTTPS stand-in for the kubelet serving kubelet-shaped `/pods` JSON: a pod's
//! process gets `spiffe://<td>/ns/<ns>/sa/<sa>` and entries on `k8s:` selectors, a pod unknown
//! to the kubelet gets `PERMISSION_DENIED`, a new pod is found by refreshing the cached list,
//! and a kubelet refusing the token refuses every pod.
mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{Agent, TempDir, BIN};
use svidcar_agent::agent::attest::k8s_cgroup;
use svidcar_agent::client::WorkloadApiClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const UID_WEB: &str = "2c48913c-b29f-11e7-9350-020968147796";
const CID_APP: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
const CID_SIDECAR: &str = "2222222222222222222222222222222222222222222222222222222222222222";
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.agent-token.sig";

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/k8s_data")
        .join(name)
}

#[test]
fn recorded_cgroup_files_of_every_layout() {
    let with_container = [
        "v2-systemd-containerd-burstable",
        "v2-systemd-crio-besteffort",
        "v2-systemd-guaranteed",
        "v2-cgroupfs-burstable",
        "v2-kind-nested",
        "v1-cgroupfs-burstable",
        "v1-cgroupfs-guaranteed",
        "v1-systemd-docker",
        "v1-dind-nested",
    ];
    for name in with_container {
        let text = std::fs::read_to_string(data("cgroup").join(name)).unwrap();
        let r = k8s_cgroup::parse(&text).unwrap_or_else(|| panic!("{name}: no pod found"));
        assert_eq!(r.pod_uid, UID_WEB, "{name}");
        assert_eq!(r.container_id.as_deref(), Some(CID_APP), "{name}");
    }
    let pod_only =
        k8s_cgroup::parse(&std::fs::read_to_string(data("cgroup/pod-only-v2")).unwrap()).unwrap();
    assert_eq!(
        (pod_only.pod_uid.as_str(), pod_only.container_id),
        (UID_WEB, None)
    );
    for name in [
        "none-cgroupns-root",
        "none-host-session",
        "none-system-service",
    ] {
        let text = std::fs::read_to_string(data("cgroup").join(name)).unwrap();
        assert_eq!(k8s_cgroup::parse(&text), None, "{name}");
    }
    // Runtime schemes of containerStatuses[].containerID.
    assert_eq!(k8s_cgroup::strip_runtime_scheme("containerd://abc"), "abc");
    assert_eq!(k8s_cgroup::strip_runtime_scheme("cri-o://abc"), "abc");
    assert_eq!(k8s_cgroup::strip_runtime_scheme("docker://abc"), "abc");
}

/// The kubelet stand-in: HTTPS on 127.0.0.1, `GET /pods` with the right Bearer token answers
/// the current pod list, anything else 401/404.
struct Kubelet {
    addr: SocketAddr,
    pods: Arc<Mutex<serde_json::Value>>,
    hits: Arc<AtomicUsize>,
    ca_file: PathBuf,
}

async fn start_kubelet(dir: &Path) -> Kubelet {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "kubelet CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let ca_file = dir.join("kubelet-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();

    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data("pods.json")).unwrap()).unwrap();
    let pods = Arc::new(Mutex::new(json));
    let hits = Arc::new(AtomicUsize::new(0));
    let (p, h) = (pods.clone(), hits.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, p, h) = (acceptor.clone(), p.clone(), h.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&req).to_string();
                let authorized = head
                    .lines()
                    .any(|l| l.eq_ignore_ascii_case(&format!("authorization: Bearer {TOKEN}")));
                let (status, body) = if !head.starts_with("GET /pods HTTP/1.1\r\n") {
                    ("404 Not Found", "404 page not found\n".to_string())
                } else if !authorized {
                    ("401 Unauthorized", "Unauthorized\n".to_string())
                } else {
                    h.fetch_add(1, Ordering::SeqCst);
                    ("200 OK", p.lock().unwrap().to_string())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    Kubelet {
        addr,
        pods,
        hits,
        ca_file,
    }
}

/// Records `cgroup` as the cgroup file of `pid` under the agent's `--k8s-cgroup-root`.
fn record_cgroup(root: &Path, pid: u32, pod_uid: &str, container_id: &str) {
    let dir = root.join(pid.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("cgroup"),
        format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{container_id}.scope\n",
            pod_uid.replace('-', "_")
        ),
    )
    .unwrap();
}

/// Runs `svidcar svid show` as a child whose cgroup is recorded (for its own pid) before it
/// connects: `sh` waits for a line, then `exec`s (same pid). Returns (success, stdout+stderr).
fn show_as_pod(socket: &Path, root: &Path, pod_uid: &str, container_id: &str) -> (bool, String) {
    let mut child = Command::new("sh")
        .args(["-c", "read _go; exec \"$0\" svid show --socket \"$1\""])
        .arg(BIN)
        .arg(socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    record_cgroup(root, child.id(), pod_uid, container_id);
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn k8s_agent(dir: &Path, kubelet: &Kubelet, token_file: &Path, extra: &[&str]) -> Agent {
    let url = format!("https://127.0.0.1:{}", kubelet.addr.port());
    let root = dir.join("cgroups");
    std::fs::create_dir_all(&root).unwrap();
    let mut args = vec![
        "--k8s-kubelet-url".to_string(),
        url,
        "--k8s-token-file".into(),
        token_file.display().to_string(),
        "--k8s-kubelet-ca".into(),
        kubelet.ca_file.display().to_string(),
        "--k8s-cgroup-root".into(),
        root.display().to_string(),
        "--k8s-cache-ttl".into(),
        "1h".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start_in(dir, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_attested_through_the_kubelet() {
    let dir = TempDir::new("k8s-e2e");
    let kubelet = start_kubelet(dir.path()).await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let agent = k8s_agent(
        dir.path(),
        &kubelet,
        &token_file,
        &[
            "--k8s-auto-identity",
            "--entry",
            "spiffe://svidcar.local/web-app=k8s:pod-label:app:web,k8s:container-name:app,k8s:node-name:node-a",
            "--entry",
            "spiffe://svidcar.local/sidecar=k8s:ns:shop,k8s:container-name:svidcar",
        ],
    );
    let root = dir.path().join("cgroups");

    // This test process, recorded as the `app` container of pod web in namespace shop.
    record_cgroup(&root, std::process::id(), UID_WEB, CID_APP);
    let mut c = WorkloadApiClient::connect(&agent.socket).await.unwrap();
    let ctx = c.fetch_x509_context().await.unwrap();
    let ids: Vec<&str> = ctx.svids.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "spiffe://svidcar.local/web-app",
            "spiffe://svidcar.local/ns/shop/sa/web"
        ],
        "configured entries first, then the automatic identity:\n{}",
        agent.log_text()
    );
    assert_eq!(kubelet.hits.load(Ordering::SeqCst), 1);

    // The native sidecar (an init container) of the same pod: cached list, its own entry.
    let (ok, out) = show_as_pod(&agent.socket, &root, UID_WEB, CID_SIDECAR);
    assert!(ok, "{out}\n{}", agent.log_text());
    assert!(out.contains("spiffe://svidcar.local/sidecar"), "{out}");
    assert!(
        out.contains("spiffe://svidcar.local/ns/shop/sa/web"),
        "{out}"
    );
    assert!(!out.contains("web-app"), "{out}");
    assert_eq!(kubelet.hits.load(Ordering::SeqCst), 1, "served from cache");

    // A pod the kubelet does not know: refused after one refresh.
    let unknown = "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6";
    let cid = "4444444444444444444444444444444444444444444444444444444444444444";
    let (ok, out) = show_as_pod(&agent.socket, &root, unknown, cid);
    assert!(!ok, "an unknown pod must be refused: {out}");
    assert!(
        out.contains("PermissionDenied") || out.contains("ermission"),
        "{out}"
    );
    assert!(agent.log_text().contains(unknown), "{}", agent.log_text());
    assert_eq!(
        kubelet.hits.load(Ordering::SeqCst),
        2,
        "one refresh on the miss"
    );

    // The pod starts: the next miss refreshes the list and finds it.
    {
        let mut pods = kubelet.pods.lock().unwrap();
        let mut new_pod = pods["items"][1].clone();
        new_pod["metadata"]["name"] = "batch-x".into();
        new_pod["metadata"]["namespace"] = "jobs".into();
        new_pod["metadata"]["uid"] = unknown.into();
        new_pod["spec"]["serviceAccountName"] = "worker".into();
        new_pod["status"]["containerStatuses"][0]["containerID"] =
            format!("containerd://{cid}").into();
        pods["items"].as_array_mut().unwrap().push(new_pod);
    }
    let (ok, out) = show_as_pod(&agent.socket, &root, unknown, cid);
    assert!(ok, "{out}\n{}", agent.log_text());
    assert!(
        out.contains("spiffe://svidcar.local/ns/jobs/sa/worker"),
        "{out}"
    );
    assert_eq!(kubelet.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_refusing_the_token_refuses_pods() {
    let dir = TempDir::new("k8s-token");
    let kubelet = start_kubelet(dir.path()).await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "not-the-token\n").unwrap();
    let agent = k8s_agent(dir.path(), &kubelet, &token_file, &["--k8s-auto-identity"]);
    let root = dir.path().join("cgroups");
    let (ok, out) = show_as_pod(&agent.socket, &root, UID_WEB, CID_APP);
    assert!(!ok, "{out}");
    assert!(
        agent.log_text().contains("401"),
        "the kubelet's answer is logged:\n{}",
        agent.log_text()
    );
    assert_eq!(kubelet.hits.load(Ordering::SeqCst), 0);

    // Without a kubelet CA the agent refuses to talk to it (the stand-in's cert is not in the
    // system roots), unless verification is explicitly skipped.
    let dir2 = TempDir::new("k8s-insecure");
    std::fs::write(dir2.path().join("token"), TOKEN).unwrap();
    let root2 = dir2.path().join("cgroups");
    std::fs::create_dir_all(&root2).unwrap();
    let url = format!("https://127.0.0.1:{}", kubelet.addr.port());
    let token2 = dir2.path().join("token").display().to_string();
    let root2s = root2.display().to_string();
    let agent2 = Agent::start_in(
        dir2.path(),
        &[
            "--k8s-kubelet-url",
            &url,
            "--k8s-token-file",
            &token2,
            "--k8s-kubelet-insecure-skip-verify",
            "--k8s-cgroup-root",
            &root2s,
            "--k8s-auto-identity",
        ],
    );
    let (ok, out) = show_as_pod(&agent2.socket, &root2, UID_WEB, CID_APP);
    assert!(ok, "{out}\n{}", agent2.log_text());
    assert!(
        out.contains("spiffe://svidcar.local/ns/shop/sa/web"),
        "{out}"
    );
    assert!(
        agent2.log_text().contains("NOT verified"),
        "the insecure mode is logged loudly"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_share_one_kubelet_refresh() {
    let dir = TempDir::new("k8s-burst");
    let kubelet = start_kubelet(dir.path()).await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let agent = k8s_agent(dir.path(), &kubelet, &token_file, &["--k8s-auto-identity"]);
    // This process, recorded in a pod the kubelet does not list: every call is a cache miss.
    let unknown = "5a5a5a5a-0000-4000-8000-00000000beef";
    record_cgroup(
        &dir.path().join("cgroups"),
        std::process::id(),
        unknown,
        CID_APP,
    );
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let socket = agent.socket.clone();
            tokio::spawn(async move {
                let mut c = WorkloadApiClient::connect(&socket).await.unwrap();
                c.fetch_x509_context().await
            })
        })
        .collect();
    for call in calls {
        let err = call.await.unwrap().expect_err("an unknown pod is refused");
        assert!(format!("{err:?}").contains("PermissionDenied"), "{err:?}");
    }
    let hits = kubelet.hits.load(Ordering::SeqCst);
    assert!(
        (1..=4).contains(&hits),
        "8 concurrent misses asked the kubelet {hits} times"
    );
}
