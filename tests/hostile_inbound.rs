//! Hostile bytes and hostile load against a real `svidcar proxy` strict inbound port (real
//! agent, real sockets): garbage, a truncated ClientHello, a ClientHello dripped one byte at a
//! time (TLS slowloris), a silent client, and a flood of 10,000 simultaneous connections
//! against a limit of 1,000. Each asserts the outcome: the connection is closed (and when), the app never
//! sees a byte, the log line gives the reason, the metric counts it; under the flood the admin
//! endpoint still answers, memory stays bounded and service resumes afterwards.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::hostile::{limits_backend, mtls_get, read_until_end, AgentCa, Leaf};
use common::proxy::{http_get, Mesh, Sidecar, TestApp, TD};

/// How a connection ended, seen from the client.
#[derive(Debug, PartialEq)]
enum End {
    /// FIN after `n` bytes from the proxy.
    Closed(usize),
    /// RST.
    Reset,
}

/// Reads until the proxy closes the connection (at most `limit`); `None` if it stays open.
fn wait_end(s: &mut TcpStream, limit: Duration) -> Option<(End, Duration)> {
    let (got, end, took) = read_until_end(s, limit)?;
    let end = match end {
        Ok(()) => End::Closed(got),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => End::Reset,
        Err(e) => panic!("unexpected read error {e}"),
    };
    Some((end, took))
}

/// A real TLS 1.3 ClientHello record, as a mesh peer sends it.
fn client_hello() -> Vec<u8> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    config.alpn_protocols = vec![b"svidcar/1".to_vec()];
    let mut c =
        rustls::ClientConnection::new(Arc::new(config), "backend".try_into().unwrap()).unwrap();
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).unwrap();
    }
    assert!(out.len() > 100 && out[0] == 0x16, "a ClientHello record");
    out
}

fn backend_with_limits(mesh: &Mesh, app_port: u16, limits: &[&str]) -> (Sidecar, u16) {
    limits_backend(mesh, app_port, "strict", limits)
}

fn failures(sc: &Sidecar, reason: &str) -> f64 {
    sc.metric_sum(&[
        "svidcar_proxy_handshake_failures",
        "direction=\"inbound\"",
        &format!("reason=\"{reason}\""),
    ])
}

#[test]
fn garbage_partial_dripped_and_silent_handshakes_are_closed_with_a_reason() {
    let mesh = Mesh::start("hostile-bytes", &[]);
    let app = TestApp::start("backend");
    let (backend, port) = backend_with_limits(&mesh, app.port, &["handshake_timeout: 2s"]);
    let hello = client_hello();
    let connect = || TcpStream::connect(("127.0.0.1", port)).expect("connect");

    // 1. A TLS record header followed by garbage: refused at once as a TLS error (not a timeout).
    let mut s = connect();
    let mut junk = vec![0x16, 0x03, 0x01, 0x00, 0x40];
    junk.extend((0u8..0x40).map(|i| i.wrapping_mul(37) ^ 0x5a));
    s.write_all(&junk).unwrap();
    // (The proxy may send a TLS alert before closing: any close will do, as long as it is now.)
    let (_, took) = wait_end(&mut s, Duration::from_secs(10)).expect("garbage closed");
    assert!(
        took < Duration::from_millis(1500),
        "garbage took {took:?} to be refused"
    );
    let line = backend.wait_log(&[
        "outcome=\"handshake_failed\"",
        "reason=\"tls_error: received corrupt message",
    ]);
    assert!(
        !line.contains("timeout"),
        "garbage must fail as TLS, not time out: {line}"
    );
    assert_eq!(failures(&backend, "tls_error"), 1.0);

    // 2. Random bytes that are not TLS at all on a strict port: reset, logged as plaintext.
    let mut s = connect();
    s.write_all(b"\x00\xffGARBAGE\r\n\r\n\x7f\x80").unwrap();
    let (end, _) = wait_end(&mut s, Duration::from_secs(10)).expect("plaintext closed");
    assert_eq!(end, End::Reset, "plaintext on a strict port is reset");
    backend.wait_log(&["outcome=\"refused\"", "plaintext on a strict"]);

    // 3. A truncated ClientHello, then silence: closed at the handshake timeout.
    let before = failures(&backend, "timeout");
    let mut s = connect();
    s.write_all(&hello[..40]).unwrap();
    let (end, took) = wait_end(&mut s, Duration::from_secs(15)).expect("partial hello closed");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
        "a partial ClientHello must be dropped at the 2 s handshake timeout, took {took:?} ({end:?})"
    );
    backend.wait_log(&[
        "outcome=\"handshake_failed\"",
        "timeout: TLS handshake took too long",
    ]);
    assert_eq!(failures(&backend, "timeout"), before + 1.0);

    // 4. TLS slowloris: the whole ClientHello, one byte every 100 ms (longer than the timeout).
    //    The timeout is a deadline for the handshake, not an idle timer.
    let mut s = connect();
    s.set_nodelay(true).unwrap();
    let start = Instant::now();
    let mut sent = 0;
    for b in &hello {
        if s.write_all(std::slice::from_ref(b)).is_err() {
            break;
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(100));
        if start.elapsed() > Duration::from_secs(12) {
            break;
        }
    }
    let closed_at = match wait_end(&mut s, Duration::from_secs(5)) {
        Some(_) => start.elapsed(),
        None => panic!(
            "dripping client still connected after {:?}",
            start.elapsed()
        ),
    };
    assert!(
        sent < hello.len(),
        "the proxy waited for the whole dripped ClientHello ({sent} bytes)"
    );
    assert!(
        closed_at < Duration::from_secs(10),
        "dripping client closed only after {closed_at:?}"
    );
    assert_eq!(failures(&backend, "timeout"), before + 2.0);

    // 5. A silent client on a strict port: refused once the detection wait (= the handshake
    //    timeout) is over.
    let mut s = connect();
    let (end, took) = wait_end(&mut s, Duration::from_secs(15)).expect("silent client closed");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
        "silent client closed after {took:?} ({end:?})"
    );
    assert_eq!(end, End::Reset);

    // None of it reached the app, and a real peer still gets through.
    let ca = AgentCa::load(&mesh.agent.state_dir);
    let (chain, key) = ca.forge(&Leaf::svid(&format!("spiffe://{TD}/frontend")));
    let ok = mtls_get(port, chain, key).expect("a real peer still gets through");
    assert!(ok.contains("hello from backend"));
    // (Counted when the connection ends, just after the client has its answer.)
    let allowed =
        || backend.metric_sum(&["svidcar_proxy_connections_total", "outcome=\"allowed\""]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while allowed() < 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(allowed(), 1.0, "only the real peer reached the app");
}

/// Soft `RLIMIT_NOFILE` of this process (the proxy inherits it).
fn open_files_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn ten_thousand_simultaneous_connections_hit_the_limit_and_admin_still_answers() {
    const LIMIT: usize = 1000;
    const FLOOD: usize = 10_000;
    // This process holds every client socket; the proxy (same limit, inherited) at most the
    // admitted ones plus the one being refused.
    let nofile = open_files_limit();
    if nofile < FLOOD as u64 + 512 {
        return common::skip(&format!(
            "open-files limit {nofile} is too low for {FLOOD} connections (tests/run.sh sets \
             `ulimit -n 65536`)"
        ));
    }
    let mesh = Mesh::start("hostile-flood", &[]);
    let app = TestApp::start("backend");
    let (backend, port) = backend_with_limits(
        &mesh,
        app.port,
        &[
            &format!("max_connections: {LIMIT}"),
            // Admitted connections stay parked in detection for the whole flood.
            "handshake_timeout: 300s",
        ],
    );
    let pid = backend.child.as_ref().expect("running").id();
    let rss_before = rss_kib(pid);

    // Open the flood; each connection sends nothing, so the admitted ones hold their permit
    // (waiting for a first byte) and everything beyond the limit must be refused.
    let mut conns = Vec::with_capacity(FLOOD);
    // Refused connections are reset at once, sometimes before connect() itself returns.
    let mut reset_at_connect = 0;
    let mut connect_failures = Vec::new();
    for _ in 0..FLOOD {
        match TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5)) {
            Ok(s) => conns.push(s),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => reset_at_connect += 1,
            Err(e) => connect_failures.push(e.to_string()),
        }
    }
    assert!(
        connect_failures.len() < FLOOD / 10,
        "{} connects failed at the TCP level: {:?}",
        connect_failures.len(),
        &connect_failures[..connect_failures.len().min(5)]
    );
    let want = (conns.len() + reset_at_connect - LIMIT) as f64;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut overloaded = 0.0;
    while Instant::now() < deadline {
        overloaded = backend.metric_sum(&["svidcar_proxy_overloaded_total"]);
        if overloaded >= want {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        overloaded,
        want,
        "{} connections against a limit of {LIMIT}: the rest must be refused and counted",
        conns.len() + reset_at_connect
    );
    assert_eq!(
        backend.metric_sum(&["svidcar_proxy_connections_total", "outcome=\"overloaded\""]),
        want
    );
    backend.wait_log(&["outcome=\"refused\"", "connection limit reached"]);
    assert_eq!(
        backend.metric_sum(&["svidcar_proxy_open_connections "]),
        LIMIT as f64,
        "open connections gauge at the limit"
    );

    // Admin still answers while the data plane is saturated.
    let (status, _) = http_get(backend.admin, "/ready").expect("admin answers under flood");
    assert_eq!(status, 200);
    let (status, body) = http_get(backend.admin, "/metrics").expect("metrics under flood");
    assert_eq!(status, 200);
    assert!(body.contains("svidcar_proxy_overloaded"));

    // The refused ones were reset; the admitted ones are still open (no byte sent yet).
    let mut reset = 0;
    let mut open = 0;
    for s in conns.iter_mut() {
        s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => reset += 1,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => open += 1,
            _ => {}
        }
    }
    assert_eq!(
        open, LIMIT,
        "exactly the limit is held open ({reset} reset)"
    );

    // Memory stays bounded (10,000 sockets, 1,000 of them parked in detection).
    let rss = rss_kib(pid);
    assert!(
        rss < rss_before + 64 * 1024,
        "proxy RSS grew from {rss_before} KiB to {rss} KiB under the flood"
    );

    // Once the flood goes away, service resumes.
    drop(conns);
    let ca = AgentCa::load(&mesh.agent.state_dir);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (chain, key) = ca.forge(&Leaf::svid(&format!("spiffe://{TD}/frontend")));
        match mtls_get(port, chain, key) {
            Ok(r) if r.contains("hello from backend") => break,
            r if Instant::now() > deadline => panic!("no service after the flood: {r:?}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
