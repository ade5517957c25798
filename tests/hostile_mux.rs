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

/// The CA certificate (PEM, the last of the file) of a [`common::proxy::foreign_svid`] chain.
fn ca_pem(chain_file: &std::path::Path) -> String {
    let text = std::fs::read_to_string(chain_file).unwrap();
    let start = text.rfind("-----BEGIN CERTIFICATE-----").unwrap();
    text[start..].to_string()
}

#[test]
fn a_peer_whose_trust_domain_leaves_the_bundles_is_cut_off_its_carrier() {
    use rustls::pki_types::pem::PemObject;
    let dir = common::TempDir::new("hostile-mux-revoke");
    // A partner trust domain, federated through a bundle file the operator later replaces.
    let (chain_file, key_file) = common::proxy::foreign_svid(dir.path(), "partner.test");
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (other_chain, _) = common::proxy::foreign_svid(&other, "partner.test");
    let fed = dir.path().join("partner.pem");
    std::fs::write(&fed, ca_pem(&chain_file)).unwrap();
    let mesh = Mesh::start(
        "hostile-mux-revoke",
        &["--federate", &format!("partner.test={}", fed.display())],
    );
    let app = TestApp::start("app");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n- name: partner\n  \
         direction: inbound\n  action: allow\n  rules:\n  - from: [{spiffeIds: \
         [\"spiffe://partner.test/intruder\"]}]\n",
    )
    .unwrap();
    let (backend, port) = backend(&mesh, app.port, &format!("policy: {}\n", policy.display()));
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(&chain_file)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&key_file).unwrap();
    runtime().block_on(async {
        let (client, conn) = mux_connect(port, chain, key)
            .await
            .expect("partner connects");
        let (resp, mut first) = connect(client.clone(), port).await;
        assert_eq!(
            resp.await.expect("answered").status(),
            200,
            "federated: served"
        );
        // That connection ends (streams already open are not cut when trust changes, as with
        // plain connections; only new ones are refused).
        first.send_reset(h2::Reason::CANCEL);

        // The operator drops the partner's root from the bundle (another root replaces it).
        let installs = backend.metric_sum(&["svidcar_proxy_svid_installs_total"]);
        std::fs::write(&fed, ca_pem(&other_chain)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while backend.metric_sum(&["svidcar_proxy_svid_installs_total"]) <= installs {
            assert!(
                Instant::now() < deadline,
                "the backend never got the new bundles"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The carrier was verified under the old bundles: its next stream is refused and the
        // connection closed, instead of trusting the partner for as long as it stays open.
        let (resp, _send) = connect(client, port).await;
        let status = resp.await.map(|r| r.status().as_u16()).unwrap_or(0);
        assert!(status == 403 || status == 0, "a revoked peer got {status}");
        assert!(
            closed_after(conn, Duration::from_secs(10)).await.is_some(),
            "the carrier of a revoked peer stays open"
        );
    });
    backend.wait_log(&["no longer verifies under the current bundles"]);
}
