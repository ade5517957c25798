//! Policy changes and open connections (POLICY.md §6): with `settings.onPolicyChange:
//! reevaluate` (the default) an open TCP connection that the new policy denies is reset, and
//! one it still allows keeps working; with `keep` nothing open is touched; a broken file keeps
//! the old policy and counts a reload error; dry-run mismatches and audit matches are counted.
//! All through real sidecars: client → frontend (outbound) → mTLS → backend (inbound) → app.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::proxy::{Mesh, Sidecar, TD};

const HEADER: &str = "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\n";

/// Allows the frontend on every port.
fn allow_frontend() -> String {
    format!(
        "- name: allow-frontend\n  direction: inbound\n  action: allow\n  rules: [{{ from: [{{ spiffeIds: [\"spiffe://{TD}/frontend\"] }}] }}]\n"
    )
}

/// Denies the frontend on `app_port`.
fn deny_port(app_port: u16) -> String {
    format!(
        "- name: block-app\n  direction: inbound\n  action: deny\n  rules: [{{ from: [{{ spiffeIds: [\"spiffe://{TD}/frontend\"] }}], to: [{{ ports: [{app_port}] }}] }}]\n"
    )
}

fn set(settings: &str, policies: &[String]) -> String {
    format!("{HEADER}{settings}policies:\n{}", policies.concat())
}

/// Replaces the policy file atomically (the watcher never reads a half-written file).
fn replace(file: &Path, text: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// A line echo server (one thread per connection); lives as long as the test.
fn echo_app() -> u16 {
    common::tcp_app(|s| {
        let mut r = BufReader::new(s);
        let mut line = String::new();
        while matches!(r.read_line(&mut line), Ok(n) if n > 0) {
            if r.get_mut().write_all(line.as_bytes()).is_err() {
                return;
            }
            line.clear();
        }
    })
}

/// A long-lived client connection through the mesh.
struct Conn(BufReader<TcpStream>);

impl Conn {
    fn open(port: u16) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Self(BufReader::new(s))
    }

    /// One line there and back: Ok(echo) or the error / "EOF".
    fn ping(&mut self, msg: &str) -> Result<String, String> {
        self.0
            .get_mut()
            .write_all(format!("{msg}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        match self.0.read_line(&mut line) {
            Ok(0) => Err("EOF".into()),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A backend with one inbound `tcp` listener per app port (with `--policy file`) and a
/// frontend with one outbound route to each; returns them and the frontend ports.
fn pair(mesh: &Mesh, file: &Path, apps: &[u16]) -> (Sidecar, Sidecar, Vec<u16>) {
    let mut backend_args = vec!["--policy".to_string(), file.display().to_string()];
    let mut frontend_args = Vec::new();
    let mut out_ports = Vec::new();
    for app in apps {
        let (inp, out) = (common::free_port(), common::free_port());
        backend_args.extend(["--inbound".into(), format!("127.0.0.1:{inp}={app}")]);
        frontend_args.extend([
            "--outbound".into(),
            format!("127.0.0.1:{out}=127.0.0.1:{inp},spiffe://{TD}/backend"),
        ]);
        out_ports.push(out);
    }
    let backend = mesh.sidecar("backend", &mesh.backend_bin.clone(), &backend_args);
    let frontend = mesh.sidecar("frontend", &mesh.frontend_bin.clone(), &frontend_args);
    (backend, frontend, out_ports)
}

/// Waits until a metric (sum of lines containing all `needles`) reaches `want`.
fn wait_metric(sc: &Sidecar, needles: &[&str], want: f64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = sc.metric_sum(needles);
        if v >= want {
            assert_eq!(v, want, "{needles:?}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needles:?} stayed at {v}, want {want}:\n{}\n{}",
            sc.metrics(),
            sc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn new_policy_resets_open_connections_it_denies_and_keeps_the_others() {
    let mesh = Mesh::start("policy-change", &[]);
    let (app1, app2) = (echo_app(), echo_app());
    let file = mesh.dir.path().join("policy.yaml");
    replace(&file, &set("", &[allow_frontend()]));
    let (backend, _frontend, out) = pair(&mesh, &file, &[app1, app2]);

    let mut denied = Conn::open(out[0]);
    let mut kept = Conn::open(out[1]);
    assert_eq!(denied.ping("a1").as_deref(), Ok("a1"));
    assert_eq!(kept.ping("b1").as_deref(), Ok("b1"));

    // B still allows the frontend, but not on app1's port.
    replace(&file, &set("", &[allow_frontend(), deny_port(app1)]));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut i = 0;
    let end = loop {
        i += 1;
        match denied.ping(&format!("a{i}")) {
            Ok(echo) => assert_eq!(echo, format!("a{i}")),
            Err(e) => break e,
        }
        assert!(
            Instant::now() < deadline,
            "the connection to app1 was not reset after the policy change:\n{}",
            backend.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("denied connection ended mid-stream with: {end}");

    let line = backend.wait_log(&["connection_reset", "policy_change"]);
    assert!(line.contains("block-app/rules[0]"), "{line}");
    assert!(line.contains(&format!("spiffe://{TD}/frontend")), "{line}");
    wait_metric(
        &backend,
        &[
            "svidcar_authz_policy_change_resets_total",
            "direction=\"inbound\"",
        ],
        1.0,
    );
    wait_metric(&backend, &["svidcar_policy_reloads_total"], 1.0);

    // The other connection is still allowed: open and working, never reset.
    for j in 2..5 {
        assert_eq!(kept.ping(&format!("b{j}")), Ok(format!("b{j}")));
    }
    // New connections follow B too.
    assert_eq!(Conn::open(out[1]).ping("c").as_deref(), Ok("c"));
    assert!(Conn::open(out[0]).ping("d").is_err());
    assert_eq!(
        backend.metric_sum(&["svidcar_authz_policy_change_resets_total"]),
        1.0
    );
}

#[test]
fn on_policy_change_keep_leaves_open_connections_alone() {
    let mesh = Mesh::start("policy-keep", &[]);
    let app = echo_app();
    let file = mesh.dir.path().join("policy.yaml");
    let keep = "settings:\n  onPolicyChange: keep\n";
    replace(&file, &set(keep, &[allow_frontend()]));
    let (backend, _frontend, out) = pair(&mesh, &file, &[app]);

    let mut conn = Conn::open(out[0]);
    assert_eq!(conn.ping("x1").as_deref(), Ok("x1"));
    replace(&file, &set(keep, &[allow_frontend(), deny_port(app)]));
    wait_metric(&backend, &["svidcar_policy_reloads_total"], 1.0);
    backend.wait_log(&["open connections kept"]);
    // B is in force for new connections...
    assert!(Conn::open(out[0]).ping("new").is_err());
    // ...while the open one keeps working.
    std::thread::sleep(Duration::from_millis(500));
    for i in 2..5 {
        assert_eq!(conn.ping(&format!("x{i}")), Ok(format!("x{i}")));
    }
    assert_eq!(
        backend.metric_sum(&["svidcar_authz_policy_change_resets_total"]),
        0.0
    );
    assert!(!backend.log_text().contains("connection_reset"));
}

#[test]
fn broken_file_keeps_the_old_policy_and_dry_run_and_audit_are_counted() {
    let mesh = Mesh::start("policy-broken", &[]);
    let app = echo_app();
    let file = mesh.dir.path().join("policy.yaml");
    let shadow_deny = format!(
        "- name: would-deny\n  direction: inbound\n  action: deny\n  dryRun: true\n  rules: [{{ from: [{{ spiffeIds: [\"spiffe://{TD}/frontend\"] }}] }}]\n"
    );
    let audit = "- name: audit-all\n  direction: inbound\n  action: audit\n  rules: [{}]\n";
    replace(
        &file,
        &set("", &[allow_frontend(), shadow_deny, audit.to_string()]),
    );
    let (backend, _frontend, out) = pair(&mesh, &file, &[app]);

    let mut conn = Conn::open(out[0]);
    assert_eq!(conn.ping("y1").as_deref(), Ok("y1"));
    // Enforced: allowed; dry run: denied by would-deny.
    wait_metric(
        &backend,
        &[
            "svidcar_authz_dry_run_mismatch_total",
            "direction=\"inbound\"",
            "actual=\"allow\"",
            "shadow=\"deny\"",
            "rule=\"would-deny/rules[0]\"",
        ],
        1.0,
    );
    wait_metric(
        &backend,
        &["svidcar_authz_audit_total", "rule=\"audit-all/rules[0]\""],
        1.0,
    );

    replace(&file, "policies: [ this is { not yaml\n");
    wait_metric(&backend, &["svidcar_policy_reload_errors_total"], 1.0);
    backend.wait_log(&["policy reload rejected"]);
    assert_eq!(backend.metric_sum(&["svidcar_policy_reloads_total"]), 0.0);
    // The old policy stays: the open connection works and new ones are admitted.
    assert_eq!(conn.ping("y2").as_deref(), Ok("y2"));
    assert_eq!(Conn::open(out[0]).ping("z").as_deref(), Ok("z"));
    assert_eq!(
        backend.metric_sum(&["svidcar_authz_policy_change_resets_total"]),
        0.0
    );
    let addr: SocketAddr = backend.admin;
    let (status, _) = common::proxy::http_get(addr, "/ready").unwrap();
    assert_eq!(
        status, 200,
        "a rejected reload does not make the proxy unready"
    );
}

/// The plaintext path (a `permissive` port, spliced in the kernel) is re-evaluated as well.
#[test]
fn permissive_plaintext_connection_is_reset_when_now_denied() {
    let mesh = Mesh::start("policy-plain", &[]);
    let app = echo_app();
    let file = mesh.dir.path().join("policy.yaml");
    replace(
        &file,
        &format!("{HEADER}defaults: {{ inbound: allow }}\npolicies: []\n"),
    );
    let inp = common::free_port();
    let backend = mesh.sidecar(
        "backend",
        &mesh.backend_bin.clone(),
        &[
            "--inbound".into(),
            format!("127.0.0.1:{inp}={app}:permissive"),
            "--policy".into(),
            file.display().to_string(),
        ],
    );
    let mut conn = Conn::open(inp);
    assert_eq!(conn.ping("p1").as_deref(), Ok("p1"));
    backend.wait_log(&["authorization decision", "reason=default:allow", "peer=-"]);
    let deny_plaintext = format!(
        "{HEADER}defaults: {{ inbound: allow }}\npolicies:\n- name: no-plaintext\n  direction: inbound\n  action: deny\n  rules: [{{ to: [{{ ports: [{app}] }}] }}]\n"
    );
    replace(&file, &deny_plaintext);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut i = 1;
    while conn.ping(&format!("p{i}")).is_ok() {
        assert!(
            Instant::now() < deadline,
            "plaintext connection not reset:\n{}",
            backend.log_text()
        );
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let line = backend.wait_log(&["connection_reset", "policy_change"]);
    assert!(line.contains("no-plaintext/rules[0]"), "{line}");
    wait_metric(
        &backend,
        &["svidcar_authz_policy_change_resets_total", "inbound"],
        1.0,
    );
}
