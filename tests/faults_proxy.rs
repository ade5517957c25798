//! Faults around a real `svidcar proxy` (real agent, real processes, real sockets):
//! - the agent is absent when the proxy starts: not ready (503) and failing closed, then ready
//!   and serving once the agent appears;
//! - the app behind an inbound port is down: the client gets a prompt close, not a hang, and the
//!   reason is logged and counted;
//! - SIGTERM during traffic: in-flight requests complete within the drain window, new
//!   connections are refused, the process exits cleanly; a connection outliving the drain
//!   window is cut at the drain timeout.
//!
//! (Agent restart, SVID rotation and expiry during traffic are in tests/proxy_rotation.rs; CA
//! rotation in tests/agent_ca.rs.)

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::hostile::{
    limits_config, mtls_get, read_until_end, wait_line, AgentCa, Leaf, RawProxy,
};
use common::proxy::{http_get, Mesh, TestApp, TD};
use common::{Agent, TempDir};

#[test]
fn agent_absent_at_start_not_ready_then_ready_when_it_appears() {
    let dir = TempDir::new("faults-noagent");
    let socket = dir.path().join("agent.sock");
    let app = TestApp::start("backend");
    let port = common::free_port();
    let proxy = RawProxy::spawn(
        dir.path(),
        "info,svidcar_proxy=debug",
        &socket,
        &[
            "--inbound".into(),
            format!("127.0.0.1:{port}={}:strict", app.port),
        ],
    );
    assert!(
        proxy.wait_status("/live", 200, Duration::from_secs(20)),
        "admin never came up:\n{}",
        proxy.log_text()
    );
    // Not ready, and it says why.
    for _ in 0..10 {
        assert_eq!(proxy.admin_status("/ready"), 503, "ready without an SVID");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        wait_line(
            || proxy.log_text(),
            &["Workload API stream lost", "retrying"],
            Duration::from_secs(5)
        )
        .is_some(),
        "no log line about the missing agent:\n{}",
        proxy.log_text()
    );
    // Fails closed meanwhile: a TLS client is refused for lack of an identity.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 0, 0, 1, 0])
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 64];
    let r = s.read(&mut buf);
    assert!(
        matches!(r, Ok(0)) || r.is_err(),
        "no identity: connection must be refused, got {r:?}"
    );
    assert!(
        wait_line(
            || proxy.log_text(),
            &["outcome=\"no_identity\"", "no valid SVID held"],
            Duration::from_secs(5)
        )
        .is_some(),
        "refusal without identity not logged:\n{}",
        proxy.log_text()
    );

    // The agent appears: ready within the client's reconnect backoff (at most 5 s) and serving.
    let agent = Agent::start_in(dir.path(), &["--entry", &Agent::self_entry("proxy")]);
    assert!(
        proxy.wait_status("/ready", 200, Duration::from_secs(15)),
        "not ready after the agent appeared:\n{}",
        proxy.log_text()
    );
    let ca = AgentCa::load(&agent.state_dir);
    let (chain, key) = ca.forge(&Leaf::svid(&format!("spiffe://{TD}/client")));
    let r = mtls_get(port, chain, key).expect("served once the agent is there");
    assert!(r.contains("hello from backend"), "{r}");
}

/// Reads until the peer closes; returns (bytes received, time taken), or `None` after `limit`.
fn until_closed(s: &mut TcpStream, limit: Duration) -> Option<(usize, Duration)> {
    read_until_end(s, limit).map(|(got, _, took)| (got, took))
}

#[test]
fn app_down_gives_the_client_a_prompt_close_not_a_hang() {
    let mesh = Mesh::start("faults-appdown", &[]);
    let dead_port = common::free_port(); // nothing listens there
    let (backend, bport) = mesh.backend(dead_port, "strict");
    let (_frontend, fport) = mesh.frontend(bport, &format!("spiffe://{TD}/backend"));

    let mut s = TcpStream::connect(("127.0.0.1", fport)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let (got, took) = until_closed(&mut s, Duration::from_secs(15))
        .expect("the client hangs while the app is down");
    assert_eq!(got, 0, "no response bytes can come from a dead app");
    // Well under the 5 s connect timeout: a refused connect is reported at once.
    assert!(
        took < Duration::from_secs(4),
        "client waited {took:?} for a dead app"
    );
    backend.wait_log(&["outcome=\"upstream_failed\"", "cannot connect to the app"]);
    assert_eq!(
        backend.metric_sum(&[
            "svidcar_proxy_connections_total",
            "direction=\"inbound\"",
            "outcome=\"upstream_failed\""
        ]),
        1.0
    );
}

/// An HTTP app that answers each request after `delay`, counting requests received.
fn slow_app(delay: Duration) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(AtomicUsize::new(0));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let seen = seen2.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line.trim_end().is_empty() {
                        break;
                    }
                }
                seen.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(delay);
                let body = "slow ok\n";
                let _ = write!(
                    r.get_mut(),
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    (port, seen)
}

fn sigterm(pid: u32) {
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn sigterm_during_traffic_lets_in_flight_requests_finish() {
    const IN_FLIGHT: usize = 5;
    let mesh = Mesh::start("faults-drain", &[]);
    let (app_port, seen) = slow_app(Duration::from_secs(2));
    let cfg = limits_config(mesh.dir.path(), &["drain_timeout: 10s"]);
    let bport = common::free_port();
    let mut backend = mesh.sidecar(
        "backend",
        &mesh.backend_bin.clone(),
        &[
            "--config".into(),
            cfg.display().to_string(),
            "--inbound".into(),
            format!("127.0.0.1:{bport}={app_port}:strict"),
        ],
    );
    let (_frontend, fport) = mesh.frontend(bport, &format!("spiffe://{TD}/backend"));

    let clients: Vec<_> = (0..IN_FLIGHT)
        .map(|_| std::thread::spawn(move || http_get(([127, 0, 0, 1], fport).into(), "/slow")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.load(Ordering::SeqCst) < IN_FLIGHT {
        assert!(Instant::now() < deadline, "requests never reached the app");
        std::thread::sleep(Duration::from_millis(20));
    }

    // All requests are now inside the app; stop the backend sidecar.
    let mut child = backend.child.take().expect("running");
    let stopped_at = Instant::now();
    sigterm(child.id());
    backend.wait_log(&["draining: no new connections"]);
    // No new connections once draining.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match TcpStream::connect(("127.0.0.1", bport)) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
            _ if Instant::now() > deadline => panic!("still accepting while draining"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    for c in clients {
        let (status, body) = c.join().unwrap().expect("in-flight request failed");
        assert_eq!((status, body.as_str()), (200, "slow ok\n"));
    }
    let st = wait_exit(&mut child, Duration::from_secs(15)).expect("sidecar did not exit");
    assert!(st.success(), "sidecar exit status {st}");
    assert!(
        stopped_at.elapsed() < Duration::from_secs(10),
        "exit must come when the connections are done, within the drain window"
    );
    backend.wait_log(&["drained: all connections finished"]);
}

#[test]
fn a_connection_outliving_the_drain_window_is_cut_at_the_drain_timeout() {
    let mesh = Mesh::start("faults-drain-timeout", &[]);
    let app = TestApp::start("backend");
    let cfg = limits_config(mesh.dir.path(), &["drain_timeout: 2s"]);
    let bport = common::free_port();
    let mut backend = mesh.sidecar(
        "backend",
        &mesh.backend_bin.clone(),
        &[
            "--config".into(),
            cfg.display().to_string(),
            "--inbound".into(),
            format!("127.0.0.1:{bport}={}:strict", app.port),
        ],
    );
    let (_frontend, fport) = mesh.frontend(bport, &format!("spiffe://{TD}/backend"));
    // A keep-alive connection that stays open after its first request.
    let mut ka = common::proxy::KeepAlive::connect(([127, 0, 0, 1], fport).into()).unwrap();
    assert_eq!(ka.get("/").unwrap().0, 200);

    let mut child = backend.child.take().expect("running");
    let stopped_at = Instant::now();
    sigterm(child.id());
    let st = wait_exit(&mut child, Duration::from_secs(15)).expect("sidecar did not exit");
    let took = stopped_at.elapsed();
    assert!(st.success(), "exit status {st}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
        "an open connection must hold the exit until the 2 s drain timeout, exited after {took:?}"
    );
    backend.wait_log(&[
        "drain timeout: closing remaining connections",
        "open_connections=1",
    ]);
    assert!(
        ka.get("/").is_err(),
        "the connection must be closed after the drain"
    );
}
