//! From observe to enforce (issue #16), through real sidecars: traffic from two callers is
//! recorded in the JSON access log (`--access-log`), `svidcar policy suggest` turns the log into
//! a least-privilege set, the backend sidecar enforces it (every recorded request still reaches
//! the app; a new path and a new caller do not), and `svidcar policy replay` shows what a
//! tightened set would now deny.
#![forbid(unsafe_code)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proxy::{http_get, Mesh, Sidecar, TD};
use common::{TempDir, BIN};

/// What the app received: `(method, target, lowercase headers)`.
type Seen = Arc<Mutex<Vec<(String, String, Vec<(String, String)>)>>>;

/// An HTTP/1.1 app (keep-alive) that records every request it receives and answers `ok`.
fn recording_app() -> (u16, Seen) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let seen = s2.clone();
            std::thread::spawn(move || serve(conn, &seen));
        }
    });
    (port, seen)
}

fn serve(conn: TcpStream, seen: &Seen) {
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        seen.lock().unwrap().push((method, target, headers));
        let resp = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n";
        if r.get_mut().write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// One request through a frontend sidecar's outbound port (`Connection: close`).
fn call(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = if method == "POST" { "{}" } else { "" };
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: backend\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

fn svidcar(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run svidcar")
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

/// A frontend sidecar from binary `bin` (its identity) routing to the backend, with its own
/// JSON access log; returns it and its outbound port.
fn caller(mesh: &Mesh, name: &str, bin: &Path, in_port: u16, log: &Path) -> (Sidecar, u16) {
    let port = common::free_port();
    let sc = mesh.sidecar(
        name,
        bin,
        &[
            "--outbound".into(),
            format!("127.0.0.1:{port}=127.0.0.1:{in_port},spiffe://{TD}/backend"),
            "--access-log".into(),
            log.display().to_string(),
        ],
    );
    (sc, port)
}

fn link(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    if std::fs::hard_link(BIN, &to).is_err() {
        std::fs::copy(BIN, &to).expect("copy binary");
    }
    to
}

fn records(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

const OBSERVE: &str = r#"apiVersion: svidcar.io/v1alpha1
kind: PolicySet
defaults: {inbound: allow, egress: allow}
policies:
- name: observe-tenants
  direction: inbound
  action: audit
  rules:
  - when: [{key: "request.headers[X-Tenant]", values: ["*"]}]
"#;

#[test]
fn observe_suggest_enforce_and_replay() {
    let bins = TempDir::new("observe-bins");
    let orders_bin = link(bins.path(), "orders-proxy");
    let intruder_bin = link(bins.path(), "intruder-proxy");
    let entry = |id: &str, bin: &Path| format!("spiffe://{TD}/{id}=unix:path:{}", bin.display());
    let (e1, e2) = (
        entry("orders", &orders_bin),
        entry("intruder", &intruder_bin),
    );
    let mesh = Mesh::start("policy-observe", &["--entry", &e1, "--entry", &e2]);
    let dir = mesh.dir.path().to_path_buf();
    let (app_port, seen) = recording_app();

    // Observe: allow everything, record everything (and the header a rule names).
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, OBSERVE).unwrap();
    let backend_log = dir.join("backend-access.jsonl");
    let in_port = common::free_port();
    let backend = mesh.sidecar(
        "backend",
        &mesh.backend_bin.clone(),
        &[
            "--inbound".into(),
            format!("127.0.0.1:{in_port}={app_port}:strict:http"),
            "--policy".into(),
            policy.display().to_string(),
            "--access-log".into(),
            backend_log.display().to_string(),
        ],
    );
    let fe_log = dir.join("frontend-access.jsonl");
    let orders_log = dir.join("orders-access.jsonl");
    let (_fe, fe) = caller(
        &mesh,
        "frontend",
        &mesh.frontend_bin.clone(),
        in_port,
        &fe_log,
    );
    let (_orders, orders) = caller(&mesh, "orders", &orders_bin, in_port, &orders_log);

    let secret = [
        ("x-tenant", "acme"),
        ("authorization", "Bearer s3cret-token"),
        ("cookie", "sid=c00kie"),
    ];
    let recorded: Vec<(u16, &str, &str)> = vec![
        (fe, "GET", "/users/123"),
        (fe, "GET", "/users/456?token=q-secret"),
        (fe, "GET", "/healthz"),
        (orders, "POST", "/orders"),
        (orders, "GET", "/healthz"),
        (
            orders,
            "GET",
            "/orders/7f3e2a1c-9b4d-4e8f-a1b2-c3d4e5f60718",
        ),
    ];
    for &(port, method, path) in &recorded {
        assert_eq!(
            call(port, method, path, &secret),
            (200, "ok\n".into()),
            "{method} {path}"
        );
    }
    assert_eq!(seen.lock().unwrap().len(), recorded.len());

    // The log: one v1 record per request with what policy decides on; named headers only.
    let raw = std::fs::read_to_string(&backend_log).unwrap();
    for leak in ["s3cret-token", "c00kie", "q-secret"] {
        assert!(
            !raw.contains(leak),
            "{leak} leaked into the access log:\n{raw}"
        );
    }
    let recs = records(&backend_log);
    let reqs: Vec<&serde_json::Value> = recs.iter().filter(|r| r["kind"] == "request").collect();
    assert_eq!(reqs.len(), recorded.len(), "{raw}");
    let first = reqs
        .iter()
        .find(|r| r["path"] == "/users/123")
        .expect("GET /users/123");
    for (k, want) in [
        ("schema", serde_json::json!("svidcar.access/v1")),
        ("direction", "inbound".into()),
        ("protocol", "http".into()),
        ("local_id", format!("spiffe://{TD}/backend").into()),
        ("peer_id", format!("spiffe://{TD}/frontend").into()),
        ("dst_port", app_port.into()),
        ("method", "GET".into()),
        ("headers", serde_json::json!({"x-tenant": "acme"})),
        ("decision", "allow".into()),
        ("rule", "default:allow".into()),
        ("outcome", "allowed".into()),
        ("status", 200.into()),
        ("src_ip", "127.0.0.1".into()),
    ] {
        assert_eq!(first[k], want, "{k}: {first}");
    }
    assert!(first["duration_ms"].is_u64() && first["time"].as_str().unwrap().ends_with('Z'));
    assert!(
        reqs.iter().any(|r| r["path"] == "/users/456"),
        "no query in the path: {raw}"
    );
    // The frontends record their mesh egress connections.
    let fe_recs = records(&fe_log);
    assert!(
        fe_recs.iter().any(|r| r["direction"] == "egress"
            && r["mesh"] == true
            && r["dst_spiffe_id"] == format!("spiffe://{TD}/backend").as_str()
            && r["decision"] == "allow"),
        "{fe_recs:?}"
    );
    let observed = dir.join("observed.jsonl");
    std::fs::copy(&backend_log, &observed).unwrap();

    // Suggest from all three logs; the result lints clean.
    let (obs, fel, orl) = (
        observed.display().to_string(),
        fe_log.display().to_string(),
        orders_log.display().to_string(),
    );
    let out = svidcar(&["policy", "suggest", "--from", &obs, &fel, &orl]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    assert!(
        yaml.contains("defaults: {inbound: deny, egress: deny}"),
        "{yaml}"
    );
    assert!(yaml.contains("\"/users/{*}\"  # 2 requests"), "{yaml}");
    assert!(yaml.contains("\"/orders/{*}\"  # 1 request"), "{yaml}");
    assert!(yaml.contains("# rules[0]: "), "{yaml}");
    let suggested = dir.join("suggested.yaml");
    std::fs::write(&suggested, &yaml).unwrap();
    let s = suggested.display().to_string();
    let be_id = format!("spiffe://{TD}/backend");
    let (fe_id, or_id) = (
        format!("spiffe://{TD}/frontend"),
        format!("spiffe://{TD}/orders"),
    );
    let lint = svidcar(&[
        "policy",
        "lint",
        "-f",
        &s,
        "--local-id",
        &be_id,
        "--local-id",
        &fe_id,
        "--local-id",
        &or_id,
    ]);
    assert!(lint.status.success(), "{}{yaml}", text(&lint.stdout));

    // Replayed on its own log, the suggestion changes nothing.
    let same = svidcar(&["policy", "replay", "-f", &s, "--from", &obs, &fel, &orl]);
    assert_eq!(
        same.status.code(),
        Some(0),
        "{}{}",
        text(&same.stdout),
        text(&same.stderr)
    );
    assert!(
        text(&same.stdout).contains("no decision changes"),
        "{}",
        text(&same.stdout)
    );

    // Enforce: hot-reload the backend with the suggestion.
    std::fs::write(&policy, &yaml).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !http_get(backend.admin, "/policy")
        .is_ok_and(|(_, b)| b.contains("backend-from-frontend"))
    {
        assert!(
            Instant::now() < deadline,
            "no reload:\n{}",
            backend.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = seen.lock().unwrap().len();
    for &(port, method, path) in &recorded {
        assert_eq!(
            call(port, method, path, &[]),
            (200, "ok\n".into()),
            "{method} {path} after enforce"
        );
    }
    assert_eq!(
        call(fe, "GET", "/users/789", &[]).0,
        200,
        "a template admits other ids"
    );
    assert_eq!(seen.lock().unwrap().len(), before + recorded.len() + 1);
    let denied = [
        (fe, "GET", "/admin"),
        (fe, "POST", "/orders"),
        (fe, "GET", "/users/1/delete"),
    ];
    for &(port, method, path) in &denied {
        assert_eq!(
            call(port, method, path, &[]),
            (403, "RBAC: access denied".into()),
            "{method} {path}"
        );
    }
    let intruder_log = dir.join("intruder-access.jsonl");
    let (_intruder, intr) = caller(&mesh, "intruder", &intruder_bin, in_port, &intruder_log);
    assert_eq!(
        call(intr, "GET", "/healthz", &[]).0,
        403,
        "a new caller is denied"
    );
    let got = seen.lock().unwrap();
    assert_eq!(
        got.len(),
        before + recorded.len() + 1,
        "the app received a denied request: {:?}",
        &got[before..]
    );
    drop(got);

    // Replay a tightened set (no POST /orders): exactly those requests would now be denied.
    let tight = dir.join("tight.yaml");
    std::fs::write(
        &tight,
        yaml.replace("methods: [\"POST\"]", "methods: [\"PUT\"]"),
    )
    .unwrap();
    let t = tight.display().to_string();
    let bl = backend_log.display().to_string();
    let out = svidcar(&[
        "policy",
        "replay",
        "-f",
        &t,
        "--from",
        &bl,
        "--output",
        "json",
        "--examples",
        "50",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let changed = report["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 1, "{report:#}");
    assert_eq!(
        (changed[0]["old"].as_str(), changed[0]["new"].as_str()),
        (Some("ALLOW"), Some("DENY"))
    );
    assert_eq!(changed[0]["rule"], "default:deny");
    let allowed_posts = records(&backend_log)
        .iter()
        .filter(|r| r["method"] == "POST" && r["path"] == "/orders" && r["decision"] == "allow")
        .count();
    assert_eq!(allowed_posts, 2, "observed + enforced");
    assert_eq!(changed[0]["count"], allowed_posts, "{report:#}");
    for e in changed[0]["examples"].as_array().unwrap() {
        let s = e["summary"].as_str().unwrap();
        assert!(
            s.contains(&format!("spiffe://{TD}/orders")) && s.contains("POST /orders"),
            "{s}"
        );
    }
    // And as text, for a human.
    let out = svidcar(&["policy", "replay", "-f", &t, "--from", &bl]);
    assert_eq!(out.status.code(), Some(2));
    let txt = text(&out.stdout);
    assert!(
        txt.contains("CHANGED ALLOW -> DENY by default:deny: 2"),
        "{txt}"
    );
}

/// Egress through the explicit proxy: plain `http://` requests and a CONNECT tunnel are recorded
/// with their names, `suggest` allows exactly those hosts and ports, and `replay` of a set
/// allowing another host reports them as newly denied.
#[test]
fn egress_requests_are_recorded_suggested_and_replayed() {
    let mesh = Mesh::start("policy-observe-egress", &[]);
    let dir = mesh.dir.path().to_path_buf();
    let (app_port, seen) = recording_app();
    let log = dir.join("egress-access.jsonl");
    let proxy = common::free_port();
    let _fe = mesh.sidecar(
        "frontend",
        &mesh.frontend_bin.clone(),
        &[
            "--egress-proxy".into(),
            format!("127.0.0.1:{proxy}"),
            "--access-log".into(),
            log.display().to_string(),
        ],
    );
    let send = |head: String| -> String {
        let mut s = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp
    };
    let target = format!("localhost:{app_port}");
    let r = send(format!(
        "GET http://{target}/items/42?k=v HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    ));
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = send(format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nGET /items/43 HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    ));
    assert!(r.contains("HTTP/1.1 200 OK\r\ncontent-type"), "{r}");
    assert_eq!(seen.lock().unwrap().len(), 2);

    let deadline = Instant::now() + Duration::from_secs(10);
    let reqs = loop {
        let all = records(&log);
        let reqs: Vec<serde_json::Value> =
            all.into_iter().filter(|r| r["kind"] == "request").collect();
        if reqs.len() >= 2 || Instant::now() > deadline {
            break reqs;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    for r in &reqs {
        assert_eq!(r["direction"], "egress", "{r}");
        assert_eq!(r["protocol"], "http", "{r}");
        assert_eq!(r["host"], "localhost", "{r}");
        assert_eq!(r["dst_port"], app_port, "{r}");
        assert_eq!(r["decision"], "allow", "{r}");
        assert_eq!(
            r["local_id"],
            format!("spiffe://{TD}/frontend").as_str(),
            "{r}"
        );
    }
    assert_eq!(reqs[0]["path"], "/items/42");
    assert_eq!(reqs[1]["connect"], "localhost", "{}", reqs[1]);

    let l = log.display().to_string();
    let out = svidcar(&["policy", "suggest", "--from", &l]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    assert!(
        yaml.contains(&format!("ports: [{app_port}], hosts: [\"localhost\"]")),
        "{yaml}"
    );
    let file = dir.join("egress-suggested.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let f = file.display().to_string();
    let fe_id = format!("spiffe://{TD}/frontend");
    let lint = svidcar(&["policy", "lint", "-f", &f, "--local-id", &fe_id]);
    assert!(lint.status.success(), "{}{yaml}", text(&lint.stdout));
    let same = svidcar(&["policy", "replay", "-f", &f, "--from", &l]);
    assert_eq!(same.status.code(), Some(0), "{}", text(&same.stdout));

    let other = dir.join("egress-other.yaml");
    std::fs::write(&other, yaml.replace("\"localhost\"", "\"other.example\"")).unwrap();
    let o = other.display().to_string();
    let out = svidcar(&[
        "policy", "replay", "-f", &o, "--from", &l, "--output", "json",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let denied: u64 = report["changed"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["old"] == "ALLOW" && g["new"] == "DENY")
        .map(|g| g["count"].as_u64().unwrap())
        .sum();
    assert_eq!(denied, 2, "{report:#}");
}
