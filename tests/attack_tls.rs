//! Attacks on the TLS layer with the real binaries: resumed sessions of peers that are no longer
//! trusted (SVID expired, trust domain removed from the bundles), inbound and outbound; a
//! pooled (`svidcar-mux/1`) peer opening streams after its SVID expired, and an outbound pooled
//! connection kept past the upstream's certificate. Every case asserts what
//! the application (or the fake upstream) received, and that a valid peer still resumes, so that
//! the test fails if resumption were silently switched off. Admin listeners: attack_tls_admin.rs.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::hostile::{
    client_config, mux_connect, short_lived, until_past, Partner, PARTNER_POLICY,
};
use common::proxy::{http_get, Mesh, TD};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::HandshakeKind;

/// A loopback app that records the bytes of each connection (up to the end of the request
/// headers), answers `hello` and closes.
struct RecordingApp {
    port: u16,
    got: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl RecordingApp {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let record = got.clone();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let record = record.clone();
                std::thread::spawn(move || {
                    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    record.lock().unwrap().push(seen);
                    let _ = s.write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 6\r\n\r\nhello\n");
                });
            }
        });
        Self { port, got }
    }

    /// Connections that reached the app.
    fn connections(&self) -> usize {
        self.got.lock().unwrap().len()
    }
}

/// Sleeps until `t` is safely in the past.
fn wait_past(t: SystemTime) {
    std::thread::sleep(until_past(t));
}

/// One HTTP request over mTLS to `port` with `config` (a config reused resumes): the handshake
/// kind and the response, or how the exchange failed.
fn exchange(
    port: u16,
    config: &Arc<rustls::ClientConfig>,
) -> Result<(Option<HandshakeKind>, String), String> {
    let name = ServerName::try_from("backend").unwrap();
    let conn = rustls::ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
    let sock = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    let read = tls.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    match read {
        Ok(_) if text.contains("hello") => Ok((tls.conn.handshake_kind(), text)),
        Ok(_) => Err(format!("no response ({text:?})")),
        Err(e) => Err(format!("read: {e} ({text:?})")),
    }
}

#[test]
fn a_resumed_session_of_an_expired_peer_is_refused_inbound() {
    let mesh = Mesh::start("attack-tls-expired", &[]);
    let app = RecordingApp::start();
    let (backend, port) = mesh.backend(app.port, "strict");
    let (chain, key, end) = short_lived(&mesh, "frontend", Duration::from_secs(5));
    let config = client_config(chain, key, b"svidcar/1").unwrap();

    let (kind, _) = exchange(port, &config).expect("full handshake");
    assert_eq!(kind, Some(HandshakeKind::Full));
    // While its SVID is valid, the peer resumes (resumption is kept for valid peers).
    let (kind, _) = exchange(port, &config).expect("resumed handshake");
    assert_eq!(
        kind,
        Some(HandshakeKind::Resumed),
        "a valid peer did not resume"
    );
    assert_eq!(app.connections(), 2);

    // The SVID expires; the client still holds tickets (they live for hours) and offers them.
    wait_past(end);
    let r = exchange(port, &config);
    assert!(r.is_err(), "a peer whose SVID expired was served: {r:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        app.connections(),
        2,
        "the app got a connection from an expired peer"
    );
    // Not resumed: the full handshake's verifier refused the expired certificate.
    backend.wait_log(&["handshake_failed", "certificate_expired"]);
}

#[test]
fn a_resumed_session_of_a_peer_whose_trust_domain_left_the_bundles_is_refused() {
    let partner = Partner::start("attack-tls-td");
    let app = RecordingApp::start();
    let (backend, port) = partner
        .mesh
        .policy_backend(PARTNER_POLICY, app.port, "strict");
    let (chain, key) = (partner.chain.clone(), partner.key.clone_key());
    let config = client_config(chain, key, b"svidcar/1").unwrap();

    assert_eq!(
        exchange(port, &config).expect("federated peer").0,
        Some(HandshakeKind::Full)
    );
    assert_eq!(
        exchange(port, &config).expect("federated peer, resumed").0,
        Some(HandshakeKind::Resumed)
    );
    assert_eq!(app.connections(), 2);

    // The operator revokes the partner domain: an empty key set (SPIFFE: domain removed).
    partner.revoke(&backend);
    let r = exchange(port, &config);
    assert!(
        r.is_err(),
        "a peer of a removed trust domain was served: {r:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        app.connections(),
        2,
        "the app got a connection from a removed domain"
    );
    backend.wait_log(&["handshake_failed", "partner.test"]);
}

/// A TLS 1.3 server config presenting `chain` (no client auth), offering `alpn`.
fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[u8],
) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

/// Per connection: the handshake kind (None: failed) and whether a request arrived.
type Seen = Arc<Mutex<Vec<(Option<HandshakeKind>, bool)>>>;

/// A TLS server presenting `chain` (no client auth, ALPN `svidcar/1`, tickets on) that records
/// each connection's handshake kind and whether a request reached it, and answers `hello`.
struct FakeUpstream {
    port: u16,
    seen: Seen,
}

impl FakeUpstream {
    fn start(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Self {
        let mut config = server_config(chain, key, b"svidcar/1");
        config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().unwrap();
        let config = Arc::new(config);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let seen: Seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let (config, record) = (config.clone(), record.clone());
                std::thread::spawn(move || {
                    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                    let mut conn = rustls::ServerConnection::new(config).unwrap();
                    while conn.is_handshaking() {
                        if conn.complete_io(&mut s).is_err() {
                            record.lock().unwrap().push((None, false));
                            return;
                        }
                    }
                    let kind = conn.handshake_kind();
                    let mut tls = rustls::StreamOwned::new(conn, s);
                    let mut buf = [0u8; 1024];
                    let got = matches!(tls.read(&mut buf), Ok(n) if n > 0);
                    record.lock().unwrap().push((kind, got));
                    if got {
                        let _ = tls.write_all(b"HTTP/1.0 200 OK\r\n\r\nhello from upstream\n");
                        tls.conn.send_close_notify();
                        let _ = tls.flush();
                    }
                });
            }
        });
        Self { port, seen }
    }

    fn seen(&self) -> Vec<(Option<HandshakeKind>, bool)> {
        self.seen.lock().unwrap().clone()
    }
}

#[test]
fn an_upstream_whose_certificate_expired_is_not_resumed_outbound() {
    let mesh = Mesh::start("attack-tls-outbound", &[]);
    let backend_id = format!("spiffe://{TD}/backend");
    let (chain, key, end) = short_lived(&mesh, "backend", Duration::from_secs(5));
    let upstream = FakeUpstream::start(chain, key);
    let (frontend, port) = mesh.frontend(upstream.port, &backend_id);
    let get = || http_get(([127, 0, 0, 1], port).into(), "/");

    let (status, body) = get().expect("first call");
    assert_eq!((status, body.as_str()), (200, "hello from upstream\n"));
    let (status, _) = get().expect("second call");
    assert_eq!(status, 200);
    let kinds: Vec<_> = upstream.seen().iter().map(|s| s.0).collect();
    assert_eq!(
        kinds,
        [Some(HandshakeKind::Full), Some(HandshakeKind::Resumed)],
        "the frontend did not resume with a valid upstream"
    );

    // The upstream's certificate expires; the frontend holds its tickets.
    wait_past(end);
    let r = get();
    assert!(
        !matches!(r, Ok((200, _))),
        "an upstream with an expired certificate was used: {r:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let seen = upstream.seen();
    let served = seen.iter().filter(|s| s.1).count();
    assert_eq!(
        served, 2,
        "a request reached the expired upstream: {seen:?}"
    );
    // The resumed session was dropped, then a full handshake refused the certificate.
    frontend.wait_log(&["resumed_peer_invalid", "expired"]);
    frontend.wait_log(&["handshake_failed", "certificate_expired"]);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `CONNECT 127.0.0.1:<port>` on a mux connection, sending `GET /`: the status (0 if the
/// stream or connection failed) and the body received.
async fn connect_get(client: &h2::client::SendRequest<bytes::Bytes>, port: u16) -> (u16, String) {
    let req = http::Request::builder()
        .method("CONNECT")
        .uri(format!("127.0.0.1:{port}"))
        .body(())
        .unwrap();
    let Ok(mut c) = client.clone().ready().await else {
        return (0, String::new());
    };
    let Ok((resp, mut send)) = c.send_request(req, false) else {
        return (0, String::new());
    };
    let Ok(resp) = resp.await else {
        return (0, String::new());
    };
    let status = resp.status().as_u16();
    if status != 200 {
        return (status, String::new());
    }
    let _ = send.send_data(bytes::Bytes::from_static(b"GET / HTTP/1.0\r\n\r\n"), true);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    (status, String::from_utf8_lossy(&got).into_owned())
}

#[test]
fn a_mux_peer_whose_svid_expired_opens_no_new_stream() {
    let mesh = Mesh::start("attack-tls-mux", &[]);
    let app = RecordingApp::start();
    let (backend, port) = mesh.backend(app.port, "strict");
    let (chain, key, end) = short_lived(&mesh, "frontend", Duration::from_secs(5));
    runtime().block_on(async {
        let (client, conn) = mux_connect(port, chain, key).await.expect("mux connect");
        let (status, body) = connect_get(&client, port).await;
        assert_eq!(status, 200, "valid peer");
        assert!(body.ends_with("\r\n\r\nhello\n"), "{body:?}");
        assert_eq!(app.connections(), 1);

        // Its SVID expires while the carrier stays open: no new stream gets through.
        tokio::time::sleep(until_past(end)).await;
        let (status, _) = connect_get(&client, port).await;
        assert!(status == 403 || status == 0, "an expired peer got {status}");
        let closed = tokio::time::timeout(Duration::from_secs(10), conn).await;
        assert!(closed.is_ok(), "the carrier of an expired peer stays open");
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        app.connections(),
        1,
        "the app got a stream from an expired peer"
    );
    backend.wait_log(&["mux: the peer's SVID", "expired"]);
}

/// A `svidcar-mux/1` server presenting `chain` (no client auth): each `CONNECT` stream is
/// answered `200` and, once a request arrived on it, `hello from mux`. Counts TLS connections
/// and streams that carried a request.
fn fake_mux_upstream(
    rt: &tokio::runtime::Runtime,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> (u16, Arc<Mutex<(usize, usize)>>) {
    let config = server_config(chain, key, b"svidcar-mux/1");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let std = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = std.local_addr().unwrap().port();
    std.set_nonblocking(true).unwrap();
    let counts = Arc::new(Mutex::new((0, 0)));
    let seen = counts.clone();
    rt.spawn(async move {
        let l = tokio::net::TcpListener::from_std(std).unwrap();
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                seen.lock().unwrap().0 += 1;
                let Ok(mut h2) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = h2.accept().await {
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let Ok(mut send) = respond.send_response(http::Response::new(()), false)
                        else {
                            return;
                        };
                        let mut body = req.into_body();
                        if let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            seen.lock().unwrap().1 += 1;
                            let reply = b"HTTP/1.0 200 OK\r\n\r\nhello from mux\n";
                            let _ = send.send_data(bytes::Bytes::from_static(reply), true);
                        }
                    });
                }
            });
        }
    });
    (port, counts)
}

#[test]
fn a_pooled_connection_is_not_used_past_the_upstream_certificate() {
    let mesh = Mesh::start("attack-tls-pool", &[]);
    let backend_id = format!("spiffe://{TD}/backend");
    let (chain, key, end) = short_lived(&mesh, "backend", Duration::from_secs(5));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (up_port, counts) = fake_mux_upstream(&rt, chain, key);
    let (frontend, port) = mesh.frontend(up_port, &backend_id);
    let get = || http_get(([127, 0, 0, 1], port).into(), "/");
    for _ in 0..2 {
        let (status, body) = get().expect("call through the pool");
        assert_eq!((status, body.as_str()), (200, "hello from mux\n"));
    }
    assert_eq!(
        *counts.lock().unwrap(),
        (1, 2),
        "two streams on one pooled connection"
    );

    wait_past(end);
    let r = get();
    assert!(
        !matches!(r, Ok((200, _))),
        "served past the upstream's expiry: {r:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        counts.lock().unwrap().1,
        2,
        "a stream reached the expired upstream"
    );
    frontend.wait_log(&["handshake_failed", "certificate_expired"]);
}
