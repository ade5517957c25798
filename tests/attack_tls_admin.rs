//! Attacks on the admin listeners with the real binaries: the proxy's admin endpoint and the
//! agent's health endpoint refuse a non-loopback address unless the operator opts in, and a
//! client that sends its request headers slowly (or not at all) is disconnected after the
//! header timeout, while a normal request is still served.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::hostile::{limits_backend, read_until_end};
use common::proxy::{http_get, Mesh, TestApp};
use common::{free_port, svidcar, TempDir, BIN};

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to 30 s until `GET path` on `addr` answers `status`.
fn wait_status(addr: SocketAddr, path: &str, status: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if matches!(http_get(addr, path), Ok((s, _)) if s == status) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// How long `addr` keeps a connection that sends `prefix` and then nothing (None: still open
/// after 30 s), with the bytes it answered.
fn held_for(addr: SocketAddr, prefix: &[u8]) -> Option<(usize, Duration)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(prefix).unwrap();
    read_until_end(&mut s, Duration::from_secs(30)).map(|(n, _, t)| (n, t))
}

#[test]
fn a_remote_proxy_admin_address_needs_the_opt_in() {
    let dir = TempDir::new("attack-admin-remote");
    let inbound = format!("127.0.0.1:{}=8080", free_port());
    for addr in ["0.0.0.0:15999", "[::]:15999", "10.11.12.13:15999"] {
        let (ok, _, err) = svidcar(&["proxy", "--admin-addr", addr, "--inbound", &inbound]);
        assert!(!ok, "{addr} accepted");
        assert!(
            err.contains("admin_addr")
                && err.contains("loopback")
                && err.contains("--admin-allow-remote"),
            "{addr}: {err}"
        );
    }
    // The same from the YAML file; the flag (or the YAML field) allows it.
    let cfg = dir.path().join("proxy.yaml");
    std::fs::write(&cfg, "admin_addr: 0.0.0.0:15999\n").unwrap();
    let cfg = cfg.display().to_string();
    let (ok, _, err) = svidcar(&["proxy", "--config", &cfg, "--print-config"]);
    assert!(!ok && err.contains("admin_allow_remote"), "{err}");
    let (ok, out, err) = svidcar(&[
        "proxy",
        "--config",
        &cfg,
        "--admin-allow-remote",
        "--print-config",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("admin_allow_remote: true"), "{out}");

    // Started for real on all addresses with the opt-in: it serves (here through loopback).
    let mesh = Mesh::start("attack-admin-remote-run", &[]);
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
    let child = Command::new(&mesh.backend_bin)
        .args(["proxy", "--agent-socket"])
        .arg(&mesh.agent.socket)
        .args([
            "--admin-addr",
            &format!("0.0.0.0:{port}"),
            "--admin-allow-remote",
        ])
        .args(["--inbound", &inbound])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _proc = Proc(child);
    assert!(
        wait_status(([127, 0, 0, 1], port).into(), "/ready", 200),
        "{}",
        std::fs::read_to_string(dir.path().join("proxy.log")).unwrap_or_default()
    );
}

#[test]
fn slow_headers_are_cut_off_at_the_proxy_admin_listener() {
    let mesh = Mesh::start("attack-admin-slow", &[]);
    let app = TestApp::start("app");
    let (backend, _) = limits_backend(&mesh, app.port, "strict", &["header_timeout: 2s"]);
    // Headers that never end (slowloris), and a connection that sends nothing at all.
    for prefix in [
        &b"GET /config HTTP/1.1\r\nHost: admin\r\nX-Slow: 1"[..],
        b"",
    ] {
        let held = held_for(backend.admin, prefix);
        let (answered, after) = held.expect("a slow admin client is still connected after 30 s");
        assert_eq!(answered, 0, "answered a request that never finished");
        assert!(
            after >= Duration::from_millis(1500) && after < Duration::from_secs(10),
            "closed after {after:?} (header timeout 2 s)"
        );
    }
    // Normal requests are served as before.
    assert_eq!(backend.admin_get("/live").unwrap().0, 200);
    assert_eq!(backend.admin_get("/ready").unwrap().0, 200);
}

#[test]
fn the_agent_health_listener_is_loopback_only_and_cuts_slow_headers() {
    let dir = TempDir::new("attack-health");
    let sock = dir.path().join("agent.sock").display().to_string();
    let state = dir.path().join("state").display().to_string();
    let port = free_port();
    let remote = format!("0.0.0.0:{port}");
    let agent = |extra: &[&str]| {
        let mut args = vec![
            "agent",
            "--socket",
            &sock,
            "--state-dir",
            &state,
            "--health-addr",
        ];
        args.push(&remote);
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let args = agent(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, err) = svidcar(&args);
    assert!(!ok, "a non-loopback health address was accepted");
    assert!(
        err.contains("loopback") && err.contains("--health-allow-remote"),
        "{err}"
    );

    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let child = Command::new(BIN)
        .args(agent(&["--health-allow-remote"]))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _proc = Proc(child);
    let health: SocketAddr = ([127, 0, 0, 1], port).into();
    assert!(
        wait_status(health, "/live", 200),
        "{}",
        std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
    );
    // The header timeout is 10 s.
    let held = held_for(health, b"GET /metrics HTTP/1.1\r\nHost: a\r\n");
    let (answered, after) = held.expect("a slow health client is still connected after 30 s");
    assert_eq!(answered, 0);
    assert!(
        after >= Duration::from_secs(8) && after < Duration::from_secs(20),
        "closed after {after:?} (header timeout 10 s)"
    );
    assert_eq!(http_get(health, "/live").unwrap().0, 200);
}
