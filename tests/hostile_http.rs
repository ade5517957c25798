//! Hostile HTTP on a real `svidcar proxy` inbound HTTP (L7) port, from an authenticated mesh
//! peer (real agent, real mTLS): oversized request headers are answered `431` and never reach
//! the app; a slowloris client (headers dripped one line at a time, never finished) is cut off
//! at the header deadline (`limits.header_timeout`, set to 4 s here; 20 s by default) instead of
//! holding the connection forever. A normal request on the same port works (control).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use common::hostile::{limits_backend, mtls_connect, AgentCa, Leaf};
use common::proxy::{Mesh, Sidecar, TestApp, TD};

fn http_backend(mesh: &Mesh, app_port: u16, limits: &[&str]) -> (Sidecar, u16) {
    limits_backend(mesh, app_port, "strict:http", limits)
}

/// Sends `request` over a fresh mTLS connection and returns the response (until close).
fn exchange(port: u16, ca: &AgentCa, request: &[u8]) -> String {
    let (chain, key) = ca.forge(&Leaf::svid(&format!("spiffe://{TD}/frontend")));
    let mut tls = mtls_connect(port, chain, key).expect("connect");
    // A peer may close before reading everything we send (that is the point of 431).
    let _ = tls.write_all(request);
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn oversized_headers_get_431_and_never_reach_the_app() {
    let mesh = Mesh::start("hostile-http-431", &[]);
    let app = TestApp::start("backend");
    let (backend, port) = http_backend(&mesh, app.port, &[]);
    let ca = AgentCa::load(&mesh.agent.state_dir);

    let ok = exchange(
        port,
        &ca,
        b"GET / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n",
    );
    assert!(ok.starts_with("HTTP/1.1 200"), "control request: {ok}");

    // One 1 MiB header value.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: backend\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let r = exchange(port, &ca, big.as_bytes());
    assert!(r.starts_with("HTTP/1.1 431"), "1 MiB header: {r:?}");

    // Too many headers.
    let mut many = String::from("GET / HTTP/1.1\r\nHost: backend\r\n");
    for i in 0..500 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("Connection: close\r\n\r\n");
    let r = exchange(port, &ca, many.as_bytes());
    assert!(r.starts_with("HTTP/1.1 431"), "500 headers: {r:?}");

    // Only the control request was forwarded to the app.
    let deadline = Instant::now() + Duration::from_secs(5);
    let forwarded = || {
        backend
            .metric_sum(&["svidcar_proxy_decisions_total", "direction=\"inbound\""])
            .round() as u64
    };
    while forwarded() < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(forwarded(), 1, "only the control request was authorized");
}

#[test]
fn slowloris_headers_are_cut_off() {
    let mesh = Mesh::start("hostile-http-slowloris", &[]);
    let app = TestApp::start("backend");
    let (_backend, port) = http_backend(&mesh, app.port, &["header_timeout: 4s"]);
    let ca = AgentCa::load(&mesh.agent.state_dir);
    let (chain, key) = ca.forge(&Leaf::svid(&format!("spiffe://{TD}/frontend")));
    let mut tls = mtls_connect(port, chain, key).expect("connect");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: backend\r\n")
        .expect("request line");
    tls.sock
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let start = Instant::now();
    let mut i = 0;
    let cut = loop {
        // One more header line every 500 ms, never the blank line that ends the headers.
        if tls
            .write_all(format!("X-Slow-{i}: {i}\r\n").as_bytes())
            .is_err()
        {
            break start.elapsed();
        }
        i += 1;
        let mut b = [0u8; 512];
        match tls.read(&mut b) {
            Ok(0) => break start.elapsed(),
            Ok(_) => break start.elapsed(), // a 408 answer also ends it
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break start.elapsed(),
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "slowloris client still connected after {:?} ({i} header lines)",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(450));
    };
    // The configured header deadline (4 s), not the 20 s default, nor an idle timer (a header
    // line arrives every 500 ms).
    assert!(
        cut >= Duration::from_millis(3900) && cut < Duration::from_secs(15),
        "cut at {cut:?}, not at the configured 4 s header deadline"
    );
}
