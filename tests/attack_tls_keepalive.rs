//! Long-lived connections on inbound `http` ports do not outlive the peer's trust: a plain
//! mTLS keep-alive connection is closed at the peer's SVID expiry, a request after its trust
//! domain left the bundles is refused (`403`, `connection: close`) before it reaches the app,
//! and a `svidcar-mux/1` stream carrying keep-alive HTTP ends at the expiry too. Every case
//! asserts what the app received, and that the connection really was reused before.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::hostile::{
    mtls_connect, mux_connect, short_lived, until_past, Partner, PARTNER_POLICY,
};
use common::l7::RecordingApp;
use common::proxy::{Mesh, Sidecar};

type Tls = BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>;

/// One keep-alive `GET path` on `tls`: the status and the response head (lowercase), or how
/// the exchange failed (the connection was closed).
fn get(tls: &mut Tls, path: &str) -> Result<(u16, String), String> {
    write!(
        tls.get_mut(),
        "GET {path} HTTP/1.1\r\nHost: backend\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut head = String::new();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        match tls.read_line(&mut line) {
            Ok(0) => return Err(format!("closed ({head:?})")),
            Ok(_) => {}
            // The proxy must close, not leave the connection hanging.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the connection hangs instead of being closed ({head:?})")
            }
            Err(e) => return Err(format!("read: {e} ({head:?})")),
        }
        if line.trim_end().is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        head.push_str(&line.to_ascii_lowercase());
    }
    let mut body = vec![0u8; len];
    tls.read_exact(&mut body).map_err(|e| e.to_string())?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, head))
}

/// The request lines the app received.
fn requests(app: &RecordingApp) -> Vec<String> {
    app.seen()
        .iter()
        .map(|s| s.lines().next().unwrap_or("").to_string())
        .collect()
}

/// After an expired peer's last request: the app got `/one` and `/two` only, and the backend
/// logged why it refused the rest.
fn only_before_expiry(app: &RecordingApp, backend: &Sidecar) {
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        requests(app),
        ["GET /one HTTP/1.1", "GET /two HTTP/1.1"],
        "the app got a request from an expired peer"
    );
    backend.wait_log(&["peer_invalid", "expired"]);
}

#[test]
fn an_http_keep_alive_connection_ends_at_the_peers_expiry() {
    let mesh = Mesh::start("attack-ka-expiry", &[]);
    let app = RecordingApp::start();
    let (backend, port) = mesh.backend(app.port, "strict:http");
    let (chain, key, end) = short_lived(&mesh, "frontend", Duration::from_secs(5));
    let mut tls = BufReader::new(mtls_connect(port, chain, key).expect("connect"));
    assert_eq!(get(&mut tls, "/one").expect("valid peer").0, 200);
    assert_eq!(get(&mut tls, "/two").expect("same connection").0, 200);

    // The connection stays open while the SVID expires; the next request must not get through.
    std::thread::sleep(until_past(end));
    let r = get(&mut tls, "/three");
    assert!(
        r.is_err() || r.as_ref().unwrap().0 == 403,
        "an expired peer was served: {r:?}"
    );
    only_before_expiry(&app, &backend);
}

#[test]
fn a_keep_alive_request_after_the_peers_trust_domain_left_the_bundles_is_refused() {
    let partner = Partner::start("attack-ka-td");
    let app = RecordingApp::start();
    let (backend, port) = partner
        .mesh
        .policy_backend(PARTNER_POLICY, app.port, "strict:http");
    let (chain, key) = (partner.chain.clone(), partner.key.clone_key());
    let mut tls = BufReader::new(mtls_connect(port, chain, key).expect("connect"));
    assert_eq!(get(&mut tls, "/one").expect("federated peer").0, 200);

    // The operator revokes the partner domain while the connection is kept alive.
    partner.revoke(&backend);
    let (status, head) = get(&mut tls, "/two").expect("an answer");
    assert_eq!(status, 403, "{head}");
    assert!(head.contains("connection: close"), "{head}");
    // ... and the connection is closed: nothing more is read from it.
    let r = get(&mut tls, "/three");
    assert!(
        r.is_err(),
        "the connection of a removed domain stays usable: {r:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        requests(&app),
        ["GET /one HTTP/1.1"],
        "the app got a request from a removed domain"
    );
    assert!(
        backend.metric_sum(&[
            "svidcar_proxy_http_refused_total",
            "reason=\"peer_invalid\""
        ]) >= 1.0,
        "{}",
        backend.metrics()
    );
    backend.wait_log(&["peer_invalid", "partner.test", "no bundle"]);
}

/// Sends `GET path` (keep-alive) on a mux stream and reads until a whole response arrived:
/// its status, or 0 if the stream ended first.
async fn stream_get(
    send: &mut h2::SendStream<bytes::Bytes>,
    body: &mut h2::RecvStream,
    path: &str,
) -> u16 {
    let req = format!("GET {path} HTTP/1.1\r\nHost: backend\r\n\r\n");
    if send.send_data(bytes::Bytes::from(req), false).is_err() {
        return 0;
    }
    let mut got = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0usize);
            if rest.len() >= len {
                return head
                    .split(' ')
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), body.data()).await {
            Ok(Some(Ok(chunk))) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                got.extend_from_slice(&chunk);
            }
            Ok(_) => return 0,
            Err(_) => panic!("the stream hangs instead of being closed"),
        }
    }
}

#[test]
fn a_mux_stream_carrying_keep_alive_http_ends_at_the_peers_expiry() {
    let mesh = Mesh::start("attack-ka-mux", &[]);
    let app = RecordingApp::start();
    let (backend, port) = mesh.backend(app.port, "strict:http");
    let (chain, key, end) = short_lived(&mesh, "frontend", Duration::from_secs(5));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, _conn) = mux_connect(port, chain, key).await.expect("mux connect");
        let req = http::Request::builder()
            .method("CONNECT")
            .uri(format!("127.0.0.1:{port}"))
            .body(())
            .unwrap();
        let mut client = client.ready().await.expect("ready");
        let (resp, mut send) = client.send_request(req, false).expect("send");
        let resp = resp.await.expect("CONNECT answered");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        assert_eq!(stream_get(&mut send, &mut body, "/one").await, 200);
        assert_eq!(stream_get(&mut send, &mut body, "/two").await, 200);

        // The stream stays open while the SVID expires.
        tokio::time::sleep(until_past(end)).await;
        let status = stream_get(&mut send, &mut body, "/three").await;
        assert!(
            status == 0 || status == 403,
            "an expired peer was served: {status}"
        );
    });
    only_before_expiry(&app, &backend);
}
