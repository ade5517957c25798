//! Identity lifecycle under traffic, with the real agent and real sidecars:
//! - SVID rotation (`--svid-ttl 3s`, ≥ 3 rotations in ~10 s) during continuous requests on new
//!   connections and on one long-lived connection: zero failed requests;
//! - CA rotation (`--ca-ttl 12s`): the agent publishes the next root, then signs with it, while
//!   requests flow through both sidecars: zero failed requests, before and after the switch;
//! - the agent killed and restarted during traffic: zero failed requests while the cached SVID
//!   is valid, and the sidecars pick up the new agent's SVIDs;
//! - fail closed: with the agent gone and the cached SVID expired, `/ready` is 503 and calls fail.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::proxy::{http_get, KeepAlive, Mesh, Sidecar, TestApp, TD};

/// Counters of a traffic generator running until `stop`.
#[derive(Default)]
struct Traffic {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Traffic {
    /// Asserts that no request failed (`what` says when, for the message); the successes.
    fn assert_none_failed(&self, what: &str) -> u64 {
        let (ok, failed) = (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        );
        let errors = self.errors.lock().unwrap().clone();
        assert_eq!(
            failed,
            0,
            "{failed} failed requests of {}{what}: {errors:?}",
            ok + failed
        );
        ok
    }

    fn record(&self, r: std::io::Result<(u16, String)>, what: &str) {
        match r {
            Ok((200, b)) if b == "hello from app\n" => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut e) = self.errors.lock() {
                    e.push(format!("{what}: {other:?}"));
                }
            }
        }
    }
}

/// New connection per request, and one keep-alive connection, until `stop`.
fn run_traffic(port: u16, stop: Arc<AtomicBool>, t: Arc<Traffic>) -> Vec<thread::JoinHandle<()>> {
    let (s1, t1) = (stop.clone(), t.clone());
    let fresh = thread::spawn(move || {
        while !s1.load(Ordering::Relaxed) {
            t1.record(
                http_get(([127, 0, 0, 1], port).into(), "/"),
                "new connection",
            );
            thread::sleep(Duration::from_millis(20));
        }
    });
    let (s2, t2) = (stop, t);
    let long = thread::spawn(move || {
        let mut conn = match KeepAlive::connect(([127, 0, 0, 1], port).into()) {
            Ok(c) => c,
            Err(e) => return t2.record(Err(e), "long-lived connect"),
        };
        while !s2.load(Ordering::Relaxed) {
            t2.record(conn.get("/"), "long-lived connection");
            thread::sleep(Duration::from_millis(20));
        }
    });
    vec![fresh, long]
}

fn installs(s: &Sidecar) -> f64 {
    s.metric_sum(&["svidcar_proxy_svid_installs_total"])
}

fn start(tag: &str, ttl: &str) -> (Mesh, TestApp, Sidecar, Sidecar, u16) {
    let mesh = Mesh::start(tag, &["--svid-ttl", ttl]);
    let app = TestApp::start("app");
    let (backend, in_port) = mesh.backend(app.port, "strict");
    let (frontend, out_port) = mesh.frontend(in_port, &format!("spiffe://{TD}/backend"));
    (mesh, app, backend, frontend, out_port)
}

#[test]
fn rotation_under_traffic_drops_nothing() {
    let (_mesh, _app, backend, frontend, port) = start("proxy-rotation", "3s");
    let (b0, f0) = (installs(&backend), installs(&frontend));
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = Arc::new(Traffic::default());
    let threads = run_traffic(port, stop.clone(), traffic.clone());
    thread::sleep(Duration::from_secs(10));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let ok = traffic.assert_none_failed("");
    assert!(ok >= 50, "too few requests went through: {ok}");
    let (b1, f1) = (installs(&backend), installs(&frontend));
    assert!(b1 - b0 >= 3.0, "backend rotated only {} times", b1 - b0);
    assert!(f1 - f0 >= 3.0, "frontend rotated only {} times", f1 - f0);
}

/// Total requests a traffic generator has recorded so far.
fn done(t: &Traffic) -> u64 {
    t.ok.load(Ordering::Relaxed) + t.failed.load(Ordering::Relaxed)
}

#[test]
fn ca_rotation_under_traffic_drops_nothing() {
    // A 12 s root: the next root enters the bundle at half life and signs from 1/6 lifetime
    // remaining (~10 s); 2 s SVIDs so both sidecars soon present certificates of the new root.
    let mesh = Mesh::start(
        "proxy-ca-rotation",
        &["--ca-ttl", "12s", "--svid-ttl", "2s"],
    );
    let app = TestApp::start("app");
    let (backend, in_port) = mesh.backend(app.port, "strict");
    let (frontend, port) = mesh.frontend(in_port, &format!("spiffe://{TD}/backend"));
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = Arc::new(Traffic::default());
    let threads = run_traffic(port, stop.clone(), traffic.clone());

    let activated = "activated the next root CA";
    let deadline = Instant::now() + Duration::from_secs(25);
    while !mesh.agent.log_text().contains(activated) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let rotated = mesh.agent.log_text().contains(activated);
    let at_switch = done(&traffic);
    // Two SVID lifetimes more: every SVID in use now chains to the new root.
    thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert!(
        rotated,
        "the agent did not switch to the next root within 25 s:\n{}",
        mesh.agent.log_text()
    );
    let ok = traffic.assert_none_failed(&format!(
        " across the CA rotation\nagent:\n{}\nfrontend:\n{}\nbackend:\n{}",
        mesh.agent.log_text(),
        frontend.log_text(),
        backend.log_text()
    ));
    assert!(
        ok - at_switch.min(ok) >= 50,
        "too few requests after the switch to the new root: {} of {ok}",
        ok - at_switch.min(ok)
    );
}

#[test]
fn agent_restart_during_traffic_drops_nothing() {
    let (mut mesh, _app, backend, frontend, port) = start("proxy-agent-restart", "30s");
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = Arc::new(Traffic::default());
    let threads = run_traffic(port, stop.clone(), traffic.clone());
    thread::sleep(Duration::from_secs(1));
    mesh.agent.kill();
    thread::sleep(Duration::from_secs(3));
    let during = traffic.ok.load(Ordering::Relaxed);
    let (b0, f0) = (installs(&backend), installs(&frontend));
    mesh.agent.restart();
    // Both sidecars reconnect (backoff ≤ 5 s) and install the new agent's SVIDs.
    let deadline = Instant::now() + Duration::from_secs(15);
    while (installs(&backend) <= b0 || installs(&frontend) <= f0) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    traffic.assert_none_failed(" around the agent restart");
    assert!(
        during >= 20,
        "too few requests while the agent was down: {during}"
    );
    assert!(
        installs(&backend) > b0,
        "backend did not pick up the restarted agent:\n{}",
        backend.log_text()
    );
    assert!(
        installs(&frontend) > f0,
        "frontend did not pick up the restarted agent:\n{}",
        frontend.log_text()
    );
}

#[test]
fn expired_svid_without_agent_fails_closed() {
    let (mut mesh, _app, backend, frontend, port) = start("proxy-fail-closed", "3s");
    assert_eq!(http_get(([127, 0, 0, 1], port).into(), "/").unwrap().0, 200);
    mesh.agent.kill();
    // The last SVID was issued at most 1.5 s ago with a 3 s lifetime.
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(frontend.admin, "/ready").map(|r| r.0).ok() == Some(200)
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http_get(frontend.admin, "/ready").unwrap().0, 503);
    assert_eq!(http_get(backend.admin, "/ready").unwrap().0, 503);
    let r = http_get(([127, 0, 0, 1], port).into(), "/");
    assert!(
        !matches!(r, Ok((200, _))),
        "a call succeeded on an expired SVID: {r:?}"
    );
    frontend.wait_log(&["outcome=\"no_identity\""]);
    frontend.wait_log(&["failing closed"]);
}
