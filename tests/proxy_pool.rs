//! Pooled, multiplexed mTLS between sidecars (`svidcar-mux/1`), with the real agent and real
//! sidecar processes: many short application connections share one mTLS connection (counted
//! by the metrics on both sides); half-close and resets cross the mux intact; a peer without
//! mux (`--no-pool` on either side) still works; an SVID rotation moves to new pooled
//! connections without a failed request; policy denials and the connection limit apply per
//! stream, each with its access-log line.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::hostile::limits_backend;
use common::proxy::{http_get, KeepAlive, Mesh, Sidecar, TestApp, TD};

fn backend_id() -> String {
    format!("spiffe://{TD}/backend")
}

/// A frontend with one outbound route to `in_port` and `extra` flags.
fn frontend_with(mesh: &Mesh, in_port: u16, extra: &[&str]) -> (Sidecar, u16) {
    let port = common::free_port();
    let mut args = vec![
        "--outbound".to_string(),
        format!("127.0.0.1:{port}=127.0.0.1:{in_port},{}", backend_id()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    (
        mesh.sidecar("frontend", &mesh.frontend_bin.clone(), &args),
        port,
    )
}

fn addr(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// Waits until the metric sum for `needles` reaches `want` (the access log and counters of a
/// stream are written when it ends, a moment after the client saw the answer).
fn wait_metric(s: &Sidecar, needles: &[&str], want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = s.metric_sum(needles);
        if v >= want || Instant::now() > deadline {
            return v;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn short_connections_share_one_pooled_mtls_connection() {
    let mesh = Mesh::start("proxy-pool-share", &[]);
    let app = TestApp::start("app");
    let (backend, in_port) = mesh.backend(app.port, "strict");
    let (frontend, out_port) = mesh.frontend(in_port, &backend_id());

    // A cold burst: 8 concurrent clients, 5 connections each; one handshake in flight per key.
    let workers: Vec<_> = (0..8)
        .map(|_| {
            thread::spawn(move || {
                (0..5)
                    .map(|_| http_get(addr(out_port), "/"))
                    .filter(|r| matches!(r, Ok((200, b)) if b == "hello from app\n"))
                    .count()
            })
        })
        .collect();
    let ok: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(ok, 40, "every request through the pool must succeed");
    // Then 30 more, one after another.
    for i in 0..30 {
        let r = http_get(addr(out_port), "/");
        assert!(
            matches!(&r, Ok((200, b)) if b == "hello from app\n"),
            "request {i}: {r:?}"
        );
    }
    let streams = wait_metric(
        &frontend,
        &["svidcar_proxy_mux_streams_total", "outbound"],
        70.0,
    );
    assert_eq!(streams, 70.0);
    assert_eq!(
        frontend.metric_sum(&["svidcar_proxy_mux_connections_total", "outbound"]),
        1.0,
        "70 application connections must share one mTLS connection:\n{}",
        frontend.metrics()
    );
    assert_eq!(
        frontend.metric_sum(&["svidcar_proxy_pool_lookups_total", "result=\"new\""]),
        1.0
    );
    assert_eq!(
        frontend.metric_sum(&["svidcar_proxy_pool_lookups_total", "result=\"hit\""]),
        69.0
    );
    assert_eq!(
        frontend.metric_sum(&["svidcar_proxy_pool_connections_open"]),
        1.0
    );
    assert_eq!(
        wait_metric(
            &backend,
            &["svidcar_proxy_mux_streams_total", "inbound"],
            70.0
        ),
        70.0
    );
    assert_eq!(
        backend.metric_sum(&["svidcar_proxy_mux_connections_total", "inbound"]),
        1.0
    );
    // One access-log line and one counted connection per stream, with both identities.
    assert_eq!(
        wait_metric(
            &backend,
            &["svidcar_proxy_connections_total", "inbound", "allowed"],
            70.0
        ),
        70.0
    );
    let log = backend.log_text();
    let lines = log
        .lines()
        .filter(|l| {
            l.contains("outcome=\"allowed\"")
                && l.contains(&format!("peer_id=\"spiffe://{TD}/frontend\""))
        })
        .count();
    assert_eq!(lines, 70, "{log}");
    frontend.wait_log(&[
        "direction=\"outbound\"",
        &format!("peer_id=\"{}\"", backend_id()),
    ]);
    let (status, config) = http_get(frontend.admin, "/config").unwrap();
    assert_eq!(status, 200);
    assert!(
        config.contains("\"pool\"") && config.contains("svidcar-mux/1"),
        "{config}"
    );
}

/// An app that reads until EOF, answers `got N bytes` and closes: needs the client's half-close
/// to reach it and its answer to come back afterwards.
fn half_close_app() -> u16 {
    common::tcp_app(|mut s| {
        let mut got = Vec::new();
        if s.read_to_end(&mut got).is_ok() {
            let _ = write!(s, "got {} bytes", got.len());
        }
    })
}

/// An app that echoes everything back, then closes after the client's EOF.
fn echo_app() -> u16 {
    common::tcp_app(|s| {
        let mut r = s.try_clone().unwrap();
        let mut w = s;
        let _ = std::io::copy(&mut r, &mut w);
    })
}

/// An app that reads one byte and closes with the rest unread: the kernel resets.
fn resetting_app() -> u16 {
    common::tcp_app(|mut s| {
        let mut one = [0u8; 1];
        let _ = s.read_exact(&mut one);
        thread::sleep(Duration::from_millis(200));
        drop(s);
    })
}

#[test]
fn half_close_and_resets_cross_the_mux() {
    let mesh = Mesh::start("proxy-pool-halfclose", &[]);
    let echo_port = half_close_app();
    let (_echo_backend, echo_in) = mesh.backend(echo_port, "strict");
    let (echo_front, echo_out) = mesh.frontend(echo_in, &backend_id());
    for round in 0..3 {
        let mut s = TcpStream::connect(addr(echo_out)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let payload = vec![b'x'; 100_000 + round];
        s.write_all(&payload).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, format!("got {} bytes", payload.len()));
    }
    assert_eq!(
        wait_metric(
            &echo_front,
            &["svidcar_proxy_mux_streams_total", "outbound"],
            3.0
        ),
        3.0
    );

    // Bulk both ways at once, beyond the flow-control windows: every byte, in order.
    let echo = echo_app();
    let (_bulk_backend, bulk_in) = mesh.backend(echo, "strict");
    let (_bulk_front, bulk_out) = mesh.frontend(bulk_in, &backend_id());
    let s = TcpStream::connect(addr(bulk_out)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let data: Vec<u8> = (0..24 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let data = Arc::new(data);
    let (mut w, d2) = (s.try_clone().unwrap(), data.clone());
    let writer = thread::spawn(move || {
        for chunk in d2.chunks(100_003) {
            w.write_all(chunk).unwrap();
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(data.len());
    let mut r = s;
    r.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == *data, "the echoed bytes differ");

    let reset_port = resetting_app();
    let (reset_backend, reset_in) = mesh.backend(reset_port, "strict");
    let (_reset_front, reset_out) = mesh.frontend(reset_in, &backend_id());
    let mut s = TcpStream::connect(addr(reset_out)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"hello, this part stays unread").unwrap();
    let mut buf = Vec::new();
    let r = s.read_to_end(&mut buf);
    assert_eq!(
        r.as_ref().err().map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionReset),
        "an app reset must reach the client as a reset, not a clean EOF: {r:?} {buf:?}"
    );
    reset_backend.wait_log(&["direction=\"inbound\"", "end=error: Connection reset"]);
}

#[test]
fn peers_without_mux_still_work() {
    let mesh = Mesh::start("proxy-pool-nomux", &[]);
    let app = TestApp::start("app");
    // An "older" backend (no svidcar-mux/1) behind a pooling frontend.
    let old_in = common::free_port();
    let old_backend = mesh.sidecar(
        "backend",
        &mesh.backend_bin.clone(),
        &[
            "--inbound".into(),
            format!("127.0.0.1:{old_in}={}", app.port),
            "--no-pool".into(),
        ],
    );
    let (frontend, out_port) = mesh.frontend(old_in, &backend_id());
    for i in 0..5 {
        let r = http_get(addr(out_port), "/");
        assert!(matches!(&r, Ok((200, _))), "request {i}: {r:?}");
    }
    assert_eq!(
        wait_metric(
            &frontend,
            &["svidcar_proxy_pool_lookups_total", "result=\"no_mux\""],
            5.0
        ),
        5.0
    );
    assert_eq!(
        frontend.metric_sum(&["svidcar_proxy_mux_connections_total"]),
        0.0
    );
    assert_eq!(
        old_backend.metric_sum(&["svidcar_proxy_mux_connections_total"]),
        0.0
    );

    // A non-pooling frontend in front of a pooling backend.
    let (backend, in_port) = mesh.backend(app.port, "strict");
    let (plain_front, plain_out) = frontend_with(&mesh, in_port, &["--no-pool", "--no-resumption"]);
    for i in 0..5 {
        let r = http_get(addr(plain_out), "/");
        assert!(matches!(&r, Ok((200, _))), "request {i}: {r:?}");
    }
    assert_eq!(
        wait_metric(
            &backend,
            &["svidcar_proxy_connections_total", "inbound", "allowed"],
            5.0
        ),
        5.0
    );
    assert_eq!(
        backend.metric_sum(&["svidcar_proxy_mux_connections_total"]),
        0.0
    );
    assert_eq!(
        plain_front.metric_sum(&["svidcar_proxy_pool_lookups_total"]),
        0.0
    );
}

#[test]
fn svid_rotation_moves_to_new_pooled_connections_without_failures() {
    let mesh = Mesh::start("proxy-pool-rotation", &["--svid-ttl", "4s"]);
    let app = TestApp::start("app");
    let (_backend, in_port) = mesh.backend(app.port, "strict");
    let (frontend, out_port) = mesh.frontend(in_port, &backend_id());
    let installs = |s: &Sidecar| s.metric_sum(&["svidcar_proxy_svid_installs_total"]);
    let first = installs(&frontend);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, ok, failed, errors) =
                (stop.clone(), ok.clone(), failed.clone(), errors.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match http_get(addr(out_port), "/") {
                        Ok((200, b)) if b == "hello from app\n" => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            errors.lock().unwrap().push(format!("{other:?}"));
                        }
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            })
        })
        .collect();
    // A long-lived connection across the rotations too.
    let mut long = KeepAlive::connect(addr(out_port)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while installs(&frontend) < first + 2.0 && Instant::now() < deadline {
        let r = long.get("/");
        assert!(matches!(&r, Ok((200, _))), "long-lived connection: {r:?}");
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert!(
        installs(&frontend) >= first + 2.0,
        "the frontend did not rotate twice"
    );
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(
        failed,
        0,
        "{ok} ok, {failed} failed: {:?}",
        errors.lock().unwrap()
    );
    assert!(ok > 20, "too little traffic: {ok}");
    let conns = frontend.metric_sum(&["svidcar_proxy_mux_connections_total", "outbound"]);
    assert!(
        conns >= 2.0,
        "a new SVID must open new pooled connections, got {conns}"
    );
    assert!(
        frontend.metric_sum(&["svidcar_proxy_pool_lookups_total", "result=\"hit\""]) > 0.0,
        "the pool was never reused"
    );
}

fn deny_policy() -> String {
    format!(
        "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n- name: only-web\n  direction: inbound\n  action: allow\n  rules: [{{ from: [{{ spiffeIds: [\"spiffe://{TD}/web\"] }}] }}]\n"
    )
}

#[test]
fn policy_denial_and_connection_limit_apply_per_stream() {
    let mesh = Mesh::start("proxy-pool-deny", &[]);
    let app = TestApp::start("app");
    let (backend, in_port) = mesh.policy_backend(&deny_policy(), app.port, "strict");
    let (frontend, out_port) = mesh.frontend(in_port, &backend_id());
    for _ in 0..3 {
        let r = http_get(addr(out_port), "/");
        assert_eq!(
            r.as_ref().err().map(|e| e.kind()),
            Some(std::io::ErrorKind::ConnectionReset),
            "a denied stream must reach the app as a reset: {r:?}"
        );
    }
    let line = backend.wait_log(&["outcome=\"denied\"", "rule=\"default:deny(implicit)\""]);
    assert!(
        line.contains(&format!("peer_id=\"spiffe://{TD}/frontend\"")),
        "{line}"
    );
    assert_eq!(
        wait_metric(
            &backend,
            &["svidcar_proxy_connections_total", "inbound", "denied"],
            3.0
        ),
        3.0
    );
    frontend.wait_log(&["outcome=\"upstream_refused\"", "403"]);
    // Denied streams do not cost the pooled connection.
    assert_eq!(
        frontend.metric_sum(&["svidcar_proxy_mux_connections_total", "outbound"]),
        1.0
    );

    // Connection limit 1 on the backend: streams count, the pooled carrier connection does not.
    let (limited, lim_in) = limits_backend(&mesh, app.port, "strict", &["max_connections: 1"]);
    let (_front2, lim_out) = mesh.frontend(lim_in, &backend_id());
    let mut held = KeepAlive::connect(addr(lim_out)).unwrap();
    let r = held.get("/");
    assert!(matches!(&r, Ok((200, _))), "{r:?}");
    let r = http_get(addr(lim_out), "/");
    assert_eq!(
        r.as_ref().err().map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionReset),
        "a stream over the connection limit must be refused: {r:?}"
    );
    limited.wait_log(&["outcome=\"overloaded\"", "connection limit reached"]);
    assert!(limited.metric_sum(&["svidcar_proxy_overloaded_total"]) >= 1.0);
    drop(held);
    // Once the held connection ends, its permit is back.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match http_get(addr(lim_out), "/") {
            Ok((200, _)) => break,
            r if Instant::now() > deadline => panic!("never admitted again: {r:?}"),
            _ => thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
fn idle_pooled_connections_are_closed_and_reopened_on_demand() {
    let mesh = Mesh::start("proxy-pool-idle", &[]);
    let app = TestApp::start("app");
    let (_backend, in_port) = mesh.backend(app.port, "strict");
    let cfg = mesh.dir.path().join("pool-idle.yaml");
    std::fs::write(&cfg, "pool:\n  idle_timeout: 1s\n  max_streams: 4\n").unwrap();
    let cfg = cfg.display().to_string();
    let (frontend, out_port) = frontend_with(&mesh, in_port, &["--config", &cfg]);
    let r = http_get(addr(out_port), "/");
    assert!(matches!(&r, Ok((200, _))), "{r:?}");
    assert_eq!(
        frontend.metric_sum(&["svidcar_proxy_pool_connections_open"]),
        1.0
    );
    // Idle for longer than idle_timeout: the pooled connection is closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while frontend.metric_sum(&["svidcar_proxy_pool_connections_open"]) > 0.0 {
        assert!(
            Instant::now() < deadline,
            "the idle pooled connection was never closed"
        );
        thread::sleep(Duration::from_millis(100));
    }
    // 6 connections held at once with max_streams 4: two pooled connections.
    let held: Vec<_> = (0..6)
        .map(|_| {
            let mut k = KeepAlive::connect(addr(out_port)).unwrap();
            let r = k.get("/");
            assert!(matches!(&r, Ok((200, _))), "{r:?}");
            k
        })
        .collect();
    assert_eq!(
        frontend.metric_sum(&["svidcar_proxy_pool_connections_open"]),
        2.0
    );
    drop(held);
    assert_eq!(
        frontend.metric_sum(&["svidcar_proxy_mux_connections_total", "outbound"]),
        3.0
    );
    let (_, config) = http_get(frontend.admin, "/config").unwrap();
    assert!(config.contains("\"max_streams\": 4"), "{config}");
}

/// A hand-made `svidcar-mux/1` client (valid SVID of the frontend) probing the inbound side:
/// only `CONNECT` is served, and every stream of a connection must name one `ip:port`.
#[test]
fn inbound_mux_refuses_other_methods_and_destinations() {
    use common::hostile::{AgentCa, Leaf};
    let mesh = Mesh::start("proxy-pool-hostile", &[]);
    let app = TestApp::start("app");
    let (backend, in_port) = mesh.backend(app.port, "strict");
    let ca = AgentCa::load(&mesh.agent.state_dir);
    let (chain, key) = ca.forge(&Leaf::svid(&format!("spiffe://{TD}/frontend")));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let statuses = rt.block_on(async move {
        let (client, _conn) = common::hostile::mux_connect(in_port, chain, key)
            .await
            .expect("mux connect");
        let mut out = Vec::new();
        let dst = format!("127.0.0.1:{in_port}");
        for (method, uri) in [
            ("GET", format!("http://{dst}/")),
            ("CONNECT", dst.clone()),
            ("CONNECT", "127.0.0.1:1".to_string()),
            ("CONNECT", "example.com:80".to_string()),
        ] {
            let req = http::Request::builder()
                .method(method)
                .uri(uri.as_str())
                .body(())
                .unwrap();
            let mut c = client.clone().ready().await.unwrap();
            let (resp, _send) = c.send_request(req, false).unwrap();
            out.push(resp.await.map(|r| r.status().as_u16()).unwrap_or(0));
        }
        out
    });
    assert_eq!(statuses, vec![405, 200, 421, 421]);
    backend.wait_log(&["outcome=\"refused\"", "only CONNECT is served"]);
    backend.wait_log(&["outcome=\"refused\"", "127.0.0.1:1"]);
}
