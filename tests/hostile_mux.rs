//! Hostile peers against the inbound multiplexed (`svidcar-mux/1`) port, with a hand-made mux
//! client presenting a valid SVID: a connection that never opens a stream, one that goes idle
//! after its streams, and more carrier connections than `limits.max_connections`. Streams take
//! the connection permits, so carriers are bounded on their own; each case asserts the close,
//! the log reason and the metric.

mod common;

use std::time::{Duration, Instant};

use common::hostile::{config_backend, mux_connect, AgentCa, Leaf};
use common::proxy::{Mesh, Sidecar, TestApp, TD};

/// A backend sidecar on a strict port with the config `yaml` (e.g. `limits` and `pool`).
fn backend(mesh: &Mesh, app_port: u16, yaml: &str) -> (Sidecar, u16) {
    let cfg = mesh
        .dir
        .path()
        .join(format!("mux-{}.yaml", common::free_port()));
    std::fs::write(&cfg, yaml).unwrap();
    config_backend(mesh, app_port, "strict", &cfg)
}

/// `CONNECT 127.0.0.1:<port>` on the mux connection of `client`: the response future and the
/// request body's sender.
async fn connect(
    client: h2::client::SendRequest<bytes::Bytes>,
    port: u16,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let req = http::Request::builder()
        .method("CONNECT")
        .uri(format!("127.0.0.1:{port}"))
        .body(())
        .unwrap();
    let mut c = client.ready().await.unwrap();
    c.send_request(req, false).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// How long until the server ends the connection driven by `conn` (None: still open at `limit`).
async fn closed_after(
    conn: tokio::task::JoinHandle<Result<(), h2::Error>>,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    tokio::time::timeout(limit, conn)
        .await
        .ok()
        .map(|_| start.elapsed())
}

#[test]
fn streamless_and_idle_carriers_are_closed() {
    let mesh = Mesh::start("hostile-mux-idle", &[]);
    let app = TestApp::start("app");
    // Carriers: first stream within 2 s (handshake_timeout), idle after 2 × 1 s.
    let (backend, port) = backend(
        &mesh,
        app.port,
        "limits: {handshake_timeout: 2s}\npool: {idle_timeout: 1s}\n",
    );
    let ca = AgentCa::load(&mesh.agent.state_dir);
    let leaf = Leaf::svid(&format!("spiffe://{TD}/frontend"));
    runtime().block_on(async {
        // Never opens a stream: closed at the first-stream deadline, not held.
        let (chain, key) = ca.forge(&leaf);
        let (_client, conn) = mux_connect(port, chain, key).await.expect("mux connect");
        let closed = closed_after(conn, Duration::from_secs(20)).await;
        let closed = closed.expect("a streamless carrier is still open after 20 s");
        assert!(
            closed >= Duration::from_millis(1500),
            "closed before the deadline: {closed:?}"
        );

        // One stream, finished; then idle: closed after about 2 s without streams.
        let (chain, key) = ca.forge(&leaf);
        let (client, conn) = mux_connect(port, chain, key).await.expect("mux connect");
        let (resp, mut send) = connect(client, port).await;
        let resp = resp.await.expect("CONNECT answered");
        assert_eq!(resp.status(), 200);
        send.send_data(bytes::Bytes::from_static(b"GET / HTTP/1.0\r\n\r\n"), true)
            .unwrap();
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("data");
            let _ = body.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        assert!(String::from_utf8_lossy(&got).contains("hello from app"));
        let closed = closed_after(conn, Duration::from_secs(20)).await;
        assert!(closed.is_some(), "an idle carrier is still open after 20 s");
    });
    // Both closes were the server's idle rule, each logged.
    let needle = "mux: closing a connection without streams (idle)";
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend.log_text().matches(needle).count() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = backend.log_text();
    assert_eq!(log.matches(needle).count(), 2, "{log}");
}

#[test]
fn carrier_connections_are_bounded_by_the_connection_limit() {
    let mesh = Mesh::start("hostile-mux-limit", &[]);
    let app = TestApp::start("app");
    let (backend, port) = backend(
        &mesh,
        app.port,
        "limits: {max_connections: 3, handshake_timeout: 60s}\n",
    );
    let ca = AgentCa::load(&mesh.agent.state_dir);
    let leaf = Leaf::svid(&format!("spiffe://{TD}/frontend"));
    runtime().block_on(async {
        let mut held = Vec::new();
        for _ in 0..3 {
            let (chain, key) = ca.forge(&leaf);
            held.push(
                mux_connect(port, chain, key)
                    .await
                    .expect("within the limit"),
            );
        }
        // The fourth is refused right after its handshake: reset, not served.
        let (chain, key) = ca.forge(&leaf);
        match mux_connect(port, chain, key).await {
            Err(_) => {}
            Ok((_client, conn)) => {
                let closed = closed_after(conn, Duration::from_secs(10)).await;
                assert!(closed.is_some(), "a fourth carrier was served");
            }
        }
        // The three admitted ones still work.
        let (client, _) = held.pop().unwrap();
        let (resp, _send) = connect(client, port).await;
        assert_eq!(resp.await.expect("answered").status(), 200);
    });
    backend.wait_log(&[
        "outcome=\"overloaded\"",
        "multiplexed connection limit reached",
    ]);
    assert!(backend.metric_sum(&["svidcar_proxy_overloaded_total"]) >= 1.0);
}
