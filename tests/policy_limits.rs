//! Per-caller limits (docs/policy-limits.md) through real sidecars: two callers with their own
//! SPIFFE IDs (frontend = A, other = B) behind one backend. A's `requestsPerSecond` bucket
//! answers `429` + `retry-after` within the bucket's arithmetic while B is untouched; A's third
//! concurrent connection is reset (pooled `svidcar-mux/1` streams and plain connections), and
//! its slot comes back when a connection closes; gRPC gets `RESOURCE_EXHAUSTED`; a hot reload
//! keeps the counters of an unchanged limit. `policy check`, `lint` and `replay` account for
//! limits.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proxy::{Mesh, Sidecar, TD};
use common::{TempDir, BIN};

/// An HTTP/1.1 keep-alive app that counts the connections and requests it receives.
struct CountingApp {
    port: u16,
    conns: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl CountingApp {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (conns, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (c, r) = (conns.clone(), requests.clone());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                std::thread::spawn(move || {
                    let mut rd = BufReader::new(s);
                    loop {
                        let mut line = String::new();
                        if rd.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        loop {
                            let mut h = String::new();
                            if rd.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                                break;
                            }
                        }
                        r.fetch_add(1, Ordering::SeqCst);
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
                        if rd.get_mut().write_all(ok).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            port,
            conns,
            requests,
        }
    }
}

/// A response: status, lowercase headers, body.
type Resp = (u16, Vec<(String, String)>, String);

/// One GET on a keep-alive connection.
fn get(rd: &mut BufReader<TcpStream>, path: &str) -> std::io::Result<Resp> {
    write!(rd.get_mut(), "GET {path} HTTP/1.1\r\nHost: backend\r\n\r\n")?;
    let mut line = String::new();
    if rd.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        rd.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body)?;
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

fn connect(port: u16) -> BufReader<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(s)
}

fn link(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    if std::fs::hard_link(BIN, &to).is_err() {
        std::fs::copy(BIN, &to).expect("copy binary");
    }
    to
}

/// The mesh plus a second caller identity, `spiffe://svidcar.local/other`.
struct Callers {
    mesh: Mesh,
    other_bin: PathBuf,
    _bins: TempDir,
}

impl Callers {
    fn start(tag: &str) -> Self {
        let bins = TempDir::new(&format!("{tag}-bins"));
        let other_bin = link(bins.path(), "other-proxy");
        let entry = format!("spiffe://{TD}/other=unix:path:{}", other_bin.display());
        let mesh = Mesh::start(tag, &["--entry", &entry]);
        Self {
            mesh,
            other_bin,
            _bins: bins,
        }
    }

    /// Caller A (`frontend`) or B (`other`) with an outbound route to `in_port`; `pool: false`
    /// disables the pooled carrier (one mTLS connection per app connection).
    fn caller(&self, b: bool, in_port: u16, pool: bool) -> (Sidecar, u16) {
        let port = common::free_port();
        let (name, bin) = if b {
            ("other", self.other_bin.clone())
        } else {
            ("frontend", self.mesh.frontend_bin.clone())
        };
        let mut args = vec![
            "--outbound".to_string(),
            format!("127.0.0.1:{port}=127.0.0.1:{in_port},spiffe://{TD}/backend"),
        ];
        if !pool {
            let cfg = self.mesh.dir.path().join(format!("{name}-nopool.yaml"));
            std::fs::write(&cfg, "pool:\n  enabled: false\n").unwrap();
            args.extend(["--config".into(), cfg.display().to_string()]);
        }
        (self.mesh.sidecar(name, &bin, &args), port)
    }
}

fn policy(limits: &str) -> String {
    format!(
        "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n- name: mesh\n  direction: inbound\n  action: allow\n  rules: [{{ from: [{{ trustDomains: [\"{TD}\"] }}] }}]\nlimits:\n{limits}"
    )
}

/// 20 quick requests from A on one connection against `requestsPerSecond: 5, burst: 5`: the
/// allowed count is the bucket's (5 plus what refilled in the elapsed time), the rest `429`
/// with `retry-after`, none of them reaches the app; B's 20 all pass; metrics and logs name the
/// limit.
#[test]
fn requests_per_second_limits_one_caller_not_the_other() {
    let c = Callers::start("limits-rps");
    let app = CountingApp::start();
    let limits = format!(
        "- name: frontend-requests\n  from: [{{ spiffeIds: [\"spiffe://{TD}/frontend\"] }}]\n  requestsPerSecond: 5\n  burst: 5\n"
    );
    let (backend, in_port) = c.mesh.l7_backend(&policy(&limits), app.port);
    let (_a, a_port) = c.caller(false, in_port, true);
    let (_b, b_port) = c.caller(true, in_port, true);

    let mut a = connect(a_port);
    let started = Instant::now();
    let mut statuses = Vec::new();
    for i in 0..20 {
        let (status, headers, body) = get(&mut a, &format!("/a/{i}")).unwrap();
        if status == 429 {
            let retry: u64 = headers
                .iter()
                .find(|(k, _)| k == "retry-after")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or_else(|| panic!("429 without retry-after: {headers:?}"));
            assert!((1..=1).contains(&retry), "retry-after {retry}");
            assert_eq!(body, "rate limited\n");
        }
        statuses.push(status);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = statuses.iter().filter(|&&s| s == 200).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!(allowed + limited, 20, "{statuses:?}");
    let most = 5 + (elapsed * 5.0).floor() as usize;
    assert!(
        (5..=most).contains(&allowed),
        "{allowed} allowed in {elapsed:.3}s (bucket: 5 + 5/s): {statuses:?}"
    );
    assert_eq!(&statuses[..5], &[200; 5], "the burst passes first");
    assert_eq!(
        app.requests.load(Ordering::SeqCst),
        allowed,
        "429s never reach the app"
    );

    // B has no limit: all 20 pass, at once, while A's bucket is empty.
    let mut b = connect(b_port);
    for i in 0..20 {
        assert_eq!(get(&mut b, &format!("/b/{i}")).unwrap().0, 200);
    }
    assert_eq!(app.requests.load(Ordering::SeqCst), allowed + 20);
    // A's connection stays open and gets service again after a refill.
    std::thread::sleep(Duration::from_millis(450));
    assert_eq!(get(&mut a, "/a/again").unwrap().0, 200);

    let counted = backend.metric_sum(&[
        "svidcar_limits_exceeded_total",
        "limit=\"frontend-requests\"",
        "kind=\"requestsPerSecond\"",
    ]);
    assert_eq!(counted, limited as f64, "{}", backend.metrics());
    let line = backend.wait_log(&["request limited", "limit=frontend-requests"]);
    assert!(
        line.contains(&format!("peer_id=\"spiffe://{TD}/frontend\"")),
        "{line}"
    );
    assert!(line.contains("status=429"), "{line}");
}

/// `connections: 2` for A: its third concurrent connection is reset before reaching the app;
/// B's three are fine; closing one of A's frees a slot. Once through the pooled carrier (one
/// stream = one logical connection), once with one mTLS connection per app connection.
#[test]
fn concurrent_connections_limit_resets_the_excess_only() {
    let c = Callers::start("limits-conns");
    let app = CountingApp::start();
    let limits = format!(
        "- name: frontend-connections\n  from: [{{ spiffeIds: [\"spiffe://{TD}/frontend\"] }}]\n  connections: 2\n"
    );
    let (backend, in_port) = c.mesh.policy_backend(&policy(&limits), app.port, "strict");
    for pool in [true, false] {
        let (_a, a_port) = c.caller(false, in_port, pool);
        let (_b, b_port) = c.caller(true, in_port, pool);
        let before = app.conns.load(Ordering::SeqCst);
        let mut held: Vec<_> = (0..2).map(|_| connect(a_port)).collect();
        for h in &mut held {
            assert_eq!(get(h, "/held").unwrap().0, 200, "pool={pool}");
        }
        let mut third = connect(a_port);
        let r = get(&mut third, "/third");
        assert!(
            r.is_err(),
            "pool={pool}: the third connection must be reset: {r:?}"
        );
        assert_eq!(app.conns.load(Ordering::SeqCst), before + 2, "pool={pool}");
        let mut bs: Vec<_> = (0..3).map(|_| connect(b_port)).collect();
        for h in &mut bs {
            assert_eq!(get(h, "/b").unwrap().0, 200, "pool={pool}");
        }
        // A slot comes back when one of A's connections ends.
        drop(held.pop());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut again = connect(a_port);
            if let Ok((200, ..)) = get(&mut again, "/again") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "pool={pool}: the slot was not released"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let line = backend.wait_log(&["connection refused", "outcome=\"limited\""]);
    assert!(
        line.contains("limit frontend-connections exceeded (connections"),
        "{line}"
    );
    assert!(
        backend.metric_sum(&[
            "svidcar_limits_exceeded_total",
            "frontend-connections",
            "kind=\"connections\""
        ]) >= 2.0
    );
}

/// A hot reload keeps the counters of a limit whose name, callers and ports are unchanged (its
/// bucket stays empty); a limit with another scope starts afresh.
#[test]
fn reload_keeps_counters_of_an_unchanged_limit() {
    let c = Callers::start("limits-reload");
    let app = CountingApp::start();
    let slow = |name: &str| {
        format!("- name: {name}\n  from: [{{ spiffeIds: [\"spiffe://{TD}/frontend\"] }}]\n  requestsPerSecond: 0.05\n  burst: 2\n")
    };
    let (backend, in_port) = c.mesh.l7_backend(&policy(&slow("slow")), app.port);
    let file = c.mesh.dir.path().join("policy.yaml");
    let (_a, a_port) = c.caller(false, in_port, true);
    let mut a = connect(a_port);
    let codes: Vec<u16> = (0..3).map(|_| get(&mut a, "/x").unwrap().0).collect();
    assert_eq!(codes, [200, 200, 429]);
    // Same limit, another policy text: the bucket is still empty (a token takes 20 s).
    std::fs::write(
        &file,
        policy(&slow("slow")).replace("name: mesh", "name: mesh2"),
    )
    .unwrap();
    backend.wait_log(&["policy reloaded"]);
    assert_eq!(get(&mut a, "/x").unwrap().0, 429, "counters carried over");
    // Renamed: a new limit with a full bucket.
    let before = backend.log_text().matches("policy reloaded").count();
    std::fs::write(&file, policy(&slow("slow-renamed"))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend.log_text().matches("policy reloaded").count() == before {
        assert!(Instant::now() < deadline, "no second reload");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(&mut a, "/x").unwrap().0, 200, "a new limit starts full");
}

/// gRPC over its limit: `grpc-status: 8` (RESOURCE_EXHAUSTED) from the backend sidecar, seen by
/// a real grpcio client; the app sees only the allowed calls.
#[test]
fn grpc_over_its_limit_is_resource_exhausted() {
    let Some(py) = common::venv_python() else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/grpc_authz.py");
    let app_port = common::free_port();
    let mut server = std::process::Command::new(&py)
        .arg(&script)
        .args(["server", &app_port.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the grpcio server");
    let mut ready = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");
    let c = Callers::start("limits-grpc");
    let limits = "- name: grpc-calls\n  requestsPerSecond: 1\n  burst: 3\n";
    let (backend, in_port) = c.mesh.l7_backend(&policy(limits), app_port);
    let (_a, a_port) = c.caller(false, in_port, true);
    let out = std::process::Command::new(&py)
        .arg(&script)
        .args(["burst", &format!("127.0.0.1:{a_port}"), "8"])
        .output()
        .expect("run the grpcio client");
    let _ = server.kill();
    let _ = server.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let count = |what: &str| stdout.lines().filter(|l| l.starts_with(what)).count();
    let (ok, exhausted) = (count("Check OK"), count("Check RESOURCE_EXHAUSTED"));
    assert_eq!(ok + exhausted, 8, "{stdout}");
    assert!((3..=4).contains(&ok), "{stdout}");
    let line = backend.wait_log(&["request limited", "limit=grpc-calls"]);
    assert!(line.contains("status=200"), "{line}");
}

fn svidcar(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(BIN).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// `policy check` lists the limits that apply to the caller and port, `lint` reports a limit
/// shadowed by an earlier catch-all, `replay` plays a recorded burst through the candidate's
/// bucket and exits 2.
#[test]
fn check_lint_and_replay_account_for_limits() {
    let dir = TempDir::new("limits-cli");
    let file = dir.path().join("p.yaml");
    std::fs::write(
        &file,
        policy(&format!("- name: everyone\n  requestsPerSecond: 5\n  burst: 5\n  connections: 10\n- name: web\n  from: [{{ spiffeIds: [\"spiffe://{TD}/web\"] }}]\n  requestsPerSecond: 100\n")),
    )
    .unwrap();
    let f = file.display().to_string();
    let local = format!("spiffe://{TD}/backend");
    let (code, out) = svidcar(&[
        "policy",
        "check",
        "-f",
        &f,
        "--local-id",
        &local,
        "--direction",
        "inbound",
        "--peer",
        &format!("spiffe://{TD}/web"),
        "--port",
        "8080",
        "--method",
        "GET",
        "--path",
        "/",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("connections 10 open at once by everyone"),
        "{out}"
    );
    assert!(
        out.contains("requestsPerSecond 5 per second, burst 5 by everyone"),
        "{out}"
    );
    let (code, out) = svidcar(&["policy", "lint", "-f", &f]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("L012 limits/web"), "{out}");
    let (_, out) = svidcar(&[
        "policy",
        "check",
        "-f",
        &f,
        "--local-id",
        &local,
        "--direction",
        "inbound",
        "--output",
        "json",
        "--peer",
        &format!("spiffe://{TD}/x"),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["limits"][0]["kind"], "connections", "{out}");

    // Ten requests of one caller within 45 ms: the bucket passes 5.
    let log = dir.path().join("access.log");
    let mut text = String::new();
    for i in 0..10 {
        text += &format!(
            "{{\"schema\":\"svidcar.access/v1\",\"time\":\"2025-03-01T10:00:00.{:03}Z\",\"kind\":\"request\",\"direction\":\"inbound\",\"protocol\":\"http\",\"local_id\":\"{local}\",\"peer_id\":\"spiffe://{TD}/api\",\"src_ip\":\"10.0.0.9\",\"dst_port\":8080,\"method\":\"GET\",\"path\":\"/r{i}\",\"decision\":\"allow\",\"rule\":\"mesh/rules[0]\",\"outcome\":\"allowed\",\"status\":200,\"duration_ms\":1}}\n",
            i * 5 + 1
        );
    }
    std::fs::write(&log, text).unwrap();
    let l = log.display().to_string();
    let (code, out) = svidcar(&["policy", "replay", "-f", &f, "--from", &l]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("LIMITED everyone (requestsPerSecond): 5 of 10"),
        "{out}"
    );
    assert!(
        out.contains("5 recorded connections/requests would be refused by a limit"),
        "{out}"
    );
}
