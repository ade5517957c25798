//! Operations of a real sidecar: graceful drain on SIGTERM (no new connections, open ones
//! finish), the connection limit (refused + counted), the idle timeout, and the admin endpoints.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::proxy::{http_get, KeepAlive, Mesh, TestApp, TD};

#[test]
fn sigterm_drains_open_connections_and_refuses_new_ones() {
    let mesh = Mesh::start("proxy-drain", &[]);
    let app = TestApp::start("app");
    let (_backend, in_port) = mesh.backend(app.port, "strict");
    let (mut frontend, out_port) = mesh.frontend(in_port, &format!("spiffe://{TD}/backend"));
    let addr = ([127, 0, 0, 1], out_port).into();
    let mut open = KeepAlive::connect(addr).unwrap();
    assert_eq!(open.get("/").unwrap().0, 200);

    let pid = frontend.child.as_ref().unwrap().id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    frontend.wait_log(&["draining", "open_connections=1"]);
    // No new connections...
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(addr).is_ok() {
        assert!(
            Instant::now() < deadline,
            "listener still accepting after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // ...but the open one keeps working until the client closes it.
    assert_eq!(
        open.get("/").unwrap(),
        (200, "hello from app\n".to_string())
    );
    drop(open);
    let child = frontend.child.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "proxy did not exit after its last connection closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    frontend.wait_log(&["drained: all connections finished"]);
}

#[test]
fn connection_limit_and_idle_timeout() {
    let mesh = Mesh::start("proxy-limits", &[]);
    let app = TestApp::start("app");
    let cfg = mesh.dir.path().join("limits.yaml");
    std::fs::write(&cfg, "limits:\n  max_connections: 1\n  idle_timeout: 1s\n").unwrap();
    let in_port = common::free_port();
    let backend = mesh.sidecar(
        "backend",
        &mesh.backend_bin.clone(),
        &[
            "--config".into(),
            cfg.display().to_string(),
            "--inbound".into(),
            format!("127.0.0.1:{in_port}={}:permissive", app.port),
        ],
    );
    let addr = ([127, 0, 0, 1], in_port).into();
    // Holds the only slot (permissive plaintext, spliced to the app).
    let mut first = KeepAlive::connect(addr).unwrap();
    assert_eq!(first.get("/").unwrap().0, 200);
    let r = http_get(addr, "/");
    assert!(
        !matches!(r, Ok((200, _))),
        "second connection got through the limit: {r:?}"
    );
    assert!(backend.metric_sum(&["svidcar_proxy_overloaded_total"]) >= 1.0);
    backend.wait_log(&["connection limit reached"]);

    // Idle timeout: the held connection is closed after 1 s of silence.
    std::thread::sleep(Duration::from_millis(1800));
    assert!(first.get("/").is_err(), "idle connection was not closed");
    backend.wait_log(&["end=idle timeout"]);
    // The slot is free again.
    assert_eq!(http_get(addr, "/").unwrap().0, 200);

    // Admin endpoints.
    assert_eq!(http_get(backend.admin, "/live").unwrap().0, 200);
    assert_eq!(http_get(backend.admin, "/nope").unwrap().0, 404);
    let metrics = backend.metrics();
    for name in [
        "svidcar_proxy_connections_total",
        "svidcar_proxy_bytes_total",
        "svidcar_proxy_svid_expiry_seconds",
        "svidcar_proxy_open_connections",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    let mut s = TcpStream::connect(backend.admin).unwrap();
    s.write_all(b"GET /config HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(
        body.contains("\"listeners\"") && body.contains("permissive"),
        "{body}"
    );
}
