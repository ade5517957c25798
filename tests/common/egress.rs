//! Test support for egress attacks: a real TLS upstream (rustls) that records every raw byte
//! it receives per connection, a rustls client whose first flight can be re-cut (records, 1-byte
//! segments, pauses) before the handshake is finished over the same socket, and a plaintext
//! HTTP app that records the raw requests it receives.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::proxy::{Mesh, Sidecar};

/// Names in the upstream's certificate (so that a leaked connection would complete).
pub const NAMES: [&str; 3] = ["allowed.test", "evil.test", "localhost"];

/// One connection as the upstream saw it.
#[derive(Default)]
pub struct Seen {
    /// Raw bytes received.
    pub bytes: Vec<u8>,
    /// The connection ended (EOF or error).
    pub done: bool,
    /// The SNI the TLS server saw, when the handshake got that far.
    pub sni: Option<String>,
}

/// A recording upstream (TLS or plain); one thread per connection.
pub struct Recorder {
    pub port: u16,
    pub conns: Arc<Mutex<Vec<Arc<Mutex<Seen>>>>>,
    /// CA certificate that signed the TLS upstream's certificate.
    pub ca: Option<rustls::pki_types::CertificateDer<'static>>,
}

struct Rec(TcpStream, Arc<Mutex<Seen>>);

impl Read for Rec {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(b)?;
        self.1.lock().unwrap().bytes.extend_from_slice(&b[..n]);
        Ok(n)
    }
}

impl Write for Rec {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

fn server_config() -> (
    Arc<rustls::ServerConfig>,
    rustls::pki_types::CertificateDer<'static>,
) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(NAMES.map(String::from).to_vec()).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(svidcar_agent::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf_cert.der().clone()], key)
        .unwrap();
    (Arc::new(config), ca_cert.der().clone())
}

impl Recorder {
    /// A TLS upstream on 127.0.0.1: completes the handshake, reads one line and answers
    /// `sni=<name> got=<line>`.
    pub fn tls() -> Self {
        let (config, ca) = server_config();
        Self::start(Some(config), Some(ca))
    }

    /// A plaintext upstream on 127.0.0.1 that answers every request head (`\r\n\r\n`) with
    /// `200 ok`.
    pub fn http() -> Self {
        Self::start(None, None)
    }

    fn start(
        tls: Option<Arc<rustls::ServerConfig>>,
        ca: Option<rustls::pki_types::CertificateDer<'static>>,
    ) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<Arc<Mutex<Seen>>>>> = Arc::default();
        let all = conns.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let seen = Arc::new(Mutex::new(Seen::default()));
                all.lock().unwrap().push(seen.clone());
                let tls = tls.clone();
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                    let rec = Rec(s, seen.clone());
                    match tls {
                        Some(config) => serve_tls(config, rec, &seen),
                        None => serve_http(rec),
                    }
                    seen.lock().unwrap().done = true;
                });
            }
        });
        Self { port, conns, ca }
    }

    /// Number of connections accepted so far.
    pub fn count(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// Waits until every connection after the first `from` has ended; returns their bytes.
    pub fn ended_since(&self, from: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let conns: Vec<_> = self.conns.lock().unwrap()[from..].to_vec();
            if conns.iter().all(|c| c.lock().unwrap().done) {
                return conns
                    .iter()
                    .map(|c| c.lock().unwrap().bytes.clone())
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "upstream connections did not end"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every byte received on connections after the first `from` (waiting for them to end).
    pub fn bytes_since(&self, from: usize) -> Vec<u8> {
        self.ended_since(from).concat()
    }
}

fn serve_tls(config: Arc<rustls::ServerConfig>, rec: Rec, seen: &Mutex<Seen>) {
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, rec);
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        match tls.read(&mut b) {
            Ok(1) => line.push(b[0]),
            _ => return,
        }
        if line.len() == 1 {
            seen.lock().unwrap().sni = tls.conn.server_name().map(str::to_string);
        }
    }
    let sni = tls.conn.server_name().unwrap_or("-").to_string();
    let got = String::from_utf8_lossy(&line).trim().to_string();
    let _ = writeln!(tls, "sni={sni} got={got}");
    let _ = tls.flush();
    let _ = tls.read(&mut b);
}

fn serve_http(mut rec: Rec) {
    let mut buf = [0u8; 4096];
    let mut pending = Vec::new();
    loop {
        let n = match rec.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            pending.drain(..i + 4);
            let _ = rec.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n");
        }
    }
}

/// A rustls client for `sni` trusting `ca`; `alpn_bytes` > 0 adds that many bytes of ALPN
/// protocol names (a legitimately large ClientHello).
pub fn client(
    ca: &rustls::pki_types::CertificateDer<'static>,
    sni: &str,
    alpn_bytes: usize,
) -> rustls::ClientConnection {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(svidcar_agent::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = (0..alpn_bytes / 200)
        .map(|i| format!("{i:0200}").into_bytes())
        .collect();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    rustls::ClientConnection::new(Arc::new(config), name).unwrap()
}

/// The client's first flight (the ClientHello records).
pub fn first_flight(conn: &mut rustls::ClientConnection) -> Vec<u8> {
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// The handshake payload of TLS records `wire`, re-cut into records of the given sizes (the
/// last one takes the rest).
pub fn recut(wire: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut payload = Vec::new();
    let mut rest = wire;
    while rest.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        payload.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
    }
    let mut out = Vec::new();
    let mut rest = &payload[..];
    let mut sizes = sizes.iter();
    while !rest.is_empty() {
        let n = sizes.next().copied().unwrap_or(16384).min(rest.len());
        out.extend_from_slice(&[0x16, 3, 1]);
        out.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
        out.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

/// How the first bytes are sent.
#[derive(Clone, Copy, Debug)]
pub enum Send {
    /// In one write.
    Whole,
    /// After a pause.
    After(Duration),
    /// One byte per write (TCP_NODELAY), `pause` between them.
    Bytes(Duration),
}

/// Writes `bytes` to `s` as `how` says.
pub fn send(s: &mut TcpStream, bytes: &[u8], how: Send) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    match how {
        Send::Whole => s.write_all(bytes),
        Send::After(d) => {
            std::thread::sleep(d);
            s.write_all(bytes)
        }
        Send::Bytes(pause) => {
            for b in bytes {
                s.write_all(std::slice::from_ref(b))?;
                std::thread::sleep(pause);
            }
            Ok(())
        }
    }
}

/// Finishes the handshake of `conn` over `s` (its first flight already sent), sends `ping` and
/// returns the server's answer line.
pub fn finish(conn: rustls::ClientConnection, s: TcpStream) -> std::io::Result<String> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(conn, s);
    tls.write_all(b"ping\n")?;
    tls.flush()?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        if tls.read(&mut b)? == 0 {
            break;
        }
        line.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&line).trim().to_string())
}

/// Whether the peer closed or reset `s` (instead of answering or holding it) within 15 s.
pub fn refused(s: &mut TcpStream) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe),
    }
}

/// The header of a policy set file.
pub const HEAD: &str = "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\n";

/// True if `name` resolves to a loopback address.
pub fn resolves_to_loopback(name: &str) -> bool {
    use std::net::ToSocketAddrs;
    (name, 1)
        .to_socket_addrs()
        .map(|mut a| a.next().is_some_and(|a| a.ip().is_loopback()))
        .unwrap_or(false)
}

/// An egress-proxy sidecar allowing the names `localhost` and `allowed.test` (implicit default
/// deny), with a 2 s handshake timeout; returns it and the proxy port.
pub fn egress_proxy(mesh: &Mesh) -> (Sidecar, u16) {
    let policy = mesh.dir.path().join("egress.yaml");
    std::fs::write(
        &policy,
        format!("{HEAD}policies:\n- name: tunnel\n  direction: egress\n  action: allow\n  rules:\n  - to: [{{ hosts: [\"localhost\", \"allowed.test\"] }}]\n"),
    )
    .unwrap();
    let cfg = mesh.dir.path().join("egress-limits.yaml");
    std::fs::write(&cfg, "limits:\n  handshake_timeout: 2s\n").unwrap();
    let port = super::free_port();
    let sc = mesh.sidecar(
        "frontend",
        &mesh.frontend_bin.clone(),
        &[
            "--config".into(),
            cfg.display().to_string(),
            "--policy".into(),
            policy.display().to_string(),
            "--egress-proxy".into(),
            format!("127.0.0.1:{port}"),
        ],
    );
    (sc, port)
}

/// Reads up to and including the end of a response head, byte by byte (nothing more).
pub fn read_head(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => got.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A CONNECT tunnel to `localhost:<port>` through the egress proxy.
pub fn tunnel(proxy: u16, port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "CONNECT: {head}");
    s
}

/// Reads HTTP/1.1 responses from `s` until `n` status lines arrived; returns the codes.
pub fn statuses(s: &mut TcpStream, n: usize) -> Vec<u16> {
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.matches("HTTP/1.1 ").count() < n && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => got.push_str(&String::from_utf8_lossy(&buf[..k])),
        }
    }
    got.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| got[i + 9..i + 12].parse().ok())
        .collect()
}
