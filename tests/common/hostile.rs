//! Test support for hostile-input and fault tests: certificates forged with the agent's real CA
//! key (read from its state dir, as an attacker who stole it or a buggy issuer would), a raw
//! rustls mTLS client that presents any chain, and a proxy process started by hand (for tests
//! that need it before the agent exists or with a config file).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::proxy::{http_get, Mesh, Sidecar};
use super::{free_port, BIN};

/// The agent's signing CA, loaded from `<state_dir>/ca-cert.pem` and `ca-key.pem`.
pub struct AgentCa {
    issuer: Issuer<'static, KeyPair>,
}

/// What to put in a forged leaf.
pub struct Leaf {
    pub uris: Vec<String>,
    pub is_ca: bool,
    /// Valid from January 1st of the first year to January 1st of the second.
    pub years: (i32, i32),
}

impl Leaf {
    /// A structurally valid SVID for `id`, valid from 2020 to 2090.
    pub fn svid(id: &str) -> Self {
        Self {
            uris: vec![id.to_string()],
            is_ca: false,
            years: (2020, 2090),
        }
    }
}

impl AgentCa {
    /// Loads the active CA of an agent's state directory.
    pub fn load(state_dir: &Path) -> Self {
        let cert = std::fs::read_to_string(state_dir.join("ca-cert.pem")).expect("ca-cert.pem");
        let key = std::fs::read_to_string(state_dir.join("ca-key.pem")).expect("ca-key.pem");
        let key = KeyPair::from_pem(&key).expect("CA key");
        // The first PEM block is the signing certificate.
        let first = cert
            .split_inclusive("-----END CERTIFICATE-----")
            .next()
            .expect("a certificate");
        Self {
            issuer: Issuer::from_ca_cert_pem(first, key).expect("CA issuer"),
        }
    }

    /// Signs a leaf built from `leaf` (SVID-shaped unless told otherwise); returns (chain, key).
    pub fn forge(&self, leaf: &Leaf) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        self.forge_with(leaf, |_| {})
    }

    /// [`Self::forge`] with `edit` applied to the parameters before signing (e.g. a validity
    /// of seconds instead of years).
    pub fn forge_with(
        &self,
        leaf: &Leaf,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        if leaf.is_ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
            ];
        } else {
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        }
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.subject_alt_names = leaf
            .uris
            .iter()
            .map(|u| SanType::URI(u.as_str().try_into().expect("ia5")))
            .collect();
        p.not_before = rcgen::date_time_ymd(leaf.years.0, 1, 1);
        p.not_after = rcgen::date_time_ymd(leaf.years.1, 1, 1);
        edit(&mut p);
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.issuer).expect("sign");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone()], key)
    }
}

/// Accepts any server certificate: these tests probe the proxy's *client* verification.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS 1.3 client config presenting `chain`/`key`, offering `alpn`, accepting any server
/// (with rustls' default in-memory resumption store: reuse it to resume).
pub fn client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[u8],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// An mTLS client stream (blocking) to `port` presenting `chain`/`key` (ALPN `svidcar/1`); the
/// handshake happens on first use.
pub fn mtls_connect(
    port: u16,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, String> {
    let config = client_config(chain, key, b"svidcar/1")?;
    let name = ServerName::try_from("backend").expect("name");
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let sock = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(10))).ok();
    Ok(rustls::StreamOwned::new(conn, sock))
}

/// A hand-made `svidcar-mux/1` peer: mTLS to `port` presenting `chain`/`key`, then an HTTP/2
/// client over it (the connection driver runs on the current runtime; its handle ends when
/// the server closes the connection).
pub async fn mux_connect(
    port: u16,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<
    (
        h2::client::SendRequest<bytes::Bytes>,
        tokio::task::JoinHandle<Result<(), h2::Error>>,
    ),
    String,
> {
    let config = client_config(chain, key, b"svidcar-mux/1")?;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("backend").expect("name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    if tls.get_ref().1.alpn_protocol() != Some(&b"svidcar-mux/1"[..]) {
        return Err("the server did not choose svidcar-mux/1".into());
    }
    let (client, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| e.to_string())?;
    Ok((client, tokio::spawn(conn)))
}

/// Connects to `port` with mTLS presenting `chain`/`key` (ALPN `svidcar/1`), sends an HTTP GET
/// and returns the response text, or the error that ended the exchange.
pub fn mtls_get(
    port: u16,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<String, String> {
    let mut tls = mtls_connect(port, chain, key)?;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    match tls.read_to_end(&mut out) {
        Ok(_) if !out.is_empty() => Ok(String::from_utf8_lossy(&out).into_owned()),
        Ok(_) => Err("closed without a response".into()),
        Err(e) if !out.is_empty() => Err(format!("read after {} bytes: {e}", out.len())),
        Err(e) => Err(format!("read: {e}")),
    }
}

/// A `svidcar proxy` process started by hand (no readiness wait), killed on drop.
pub struct RawProxy {
    pub child: Option<Child>,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl RawProxy {
    /// Starts `svidcar --log <filter> proxy --agent-socket <socket> --admin-addr <free> <args>`.
    pub fn spawn(dir: &Path, filter: &str, socket: &Path, args: &[String]) -> Self {
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let log = dir.join(format!("proxy-{}.log", admin.port()));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(BIN)
            .env("NO_COLOR", "1")
            .args(["--log", filter, "proxy", "--agent-socket"])
            .arg(socket)
            .args(["--admin-addr", &admin.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start svidcar proxy");
        Self {
            child: Some(child),
            admin,
            log,
        }
    }

    /// `GET path` on the admin listener: status (0 if it does not answer).
    pub fn admin_status(&self, path: &str) -> u16 {
        http_get(self.admin, path).map(|(s, _)| s).unwrap_or(0)
    }

    /// Waits until `GET path` answers `status`, up to `within`; returns whether it did.
    pub fn wait_status(&self, path: &str, status: u16, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.admin_status(path) == status {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RawProxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits up to `within` for a line of `text()` containing all `needles`.
pub fn wait_line(text: impl Fn() -> String, needles: &[&str], within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(l) = text()
            .lines()
            .find(|l| needles.iter().all(|n| l.contains(n)))
        {
            return Some(l.to_string());
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes a proxy YAML config with these `limits:` lines (e.g. `"handshake_timeout: 1s"`).
pub fn limits_config(dir: &Path, limits: &[&str]) -> PathBuf {
    let mut text = String::from("limits:\n");
    for l in limits {
        text.push_str("  ");
        text.push_str(l);
        text.push('\n');
    }
    let p = dir.join(format!("proxy-{}.yaml", free_port()));
    std::fs::write(&p, text).expect("write config");
    p
}

/// A backend sidecar with the config of [`limits_config`] and one inbound listener
/// `127.0.0.1:<port>=<app_port>:<mode>` (e.g. `strict` or `strict:http`); returns it and the port.
pub fn limits_backend(mesh: &Mesh, app_port: u16, mode: &str, limits: &[&str]) -> (Sidecar, u16) {
    config_backend(
        mesh,
        app_port,
        mode,
        &limits_config(mesh.dir.path(), limits),
    )
}

/// A backend sidecar with the config file `cfg` and one inbound listener
/// `127.0.0.1:<port>=<app_port>:<mode>`; returns it and the port.
pub fn config_backend(mesh: &Mesh, app_port: u16, mode: &str, cfg: &Path) -> (Sidecar, u16) {
    let port = free_port();
    let sc = mesh.sidecar(
        "backend",
        &mesh.backend_bin.clone(),
        &[
            "--config".into(),
            cfg.display().to_string(),
            "--inbound".into(),
            format!("127.0.0.1:{port}={app_port}:{mode}"),
        ],
    );
    (sc, port)
}

/// Reads from `s` until the peer ends the connection, for at most `limit`: the bytes received,
/// how it ended (`Ok` for a clean close, the read error otherwise) and the time taken; `None` if
/// it is still open after `limit`.
pub fn read_until_end(
    s: &mut TcpStream,
    limit: Duration,
) -> Option<(usize, std::io::Result<()>, Duration)> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut got = 0;
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some((got, Ok(()), start.elapsed())),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Some((got, Err(e), start.elapsed())),
        }
    }
    None
}

/// An SVID for `spiffe://<TD>/<path>` signed by `mesh`'s agent CA, valid from a minute ago
/// for `life`; returns the chain, the key and when it expires.
pub fn short_lived(
    mesh: &Mesh,
    path: &str,
    life: Duration,
) -> (
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
    std::time::SystemTime,
) {
    let since = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap();
    let now = std::time::SystemTime::now();
    let end = now + life;
    let ca = AgentCa::load(&mesh.agent.state_dir);
    let id = format!("spiffe://{}/{path}", super::proxy::TD);
    let (chain, key) = ca.forge_with(&Leaf::svid(&id), |p| {
        p.not_before = rcgen::date_time_ymd(1970, 1, 1) + since(now - Duration::from_secs(60));
        p.not_after = rcgen::date_time_ymd(1970, 1, 1) + since(end);
    });
    (chain, key, end)
}

/// How long until `t` is safely in the past (X.509 times have whole seconds).
pub fn until_past(t: std::time::SystemTime) -> Duration {
    (t + Duration::from_millis(1500))
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default()
}

/// A policy allowing inbound peers of the trust domain `partner.test`.
pub const PARTNER_POLICY: &str =
    "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n- name: partner\n  \
                  direction: inbound\n  action: allow\n  rules:\n  - from: [{trustDomains: \
                  [\"partner.test\"]}]\n";

/// A peer of the foreign trust domain `partner.test`, federated with a mesh through the bundle
/// file `fed` (its root); the operator can revoke the domain.
pub struct Partner {
    pub mesh: Mesh,
    /// The bundle file the mesh's agent federates `partner.test` from.
    pub fed: PathBuf,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    _dir: super::TempDir,
}

impl Partner {
    /// A mesh `tag` whose agent federates `partner.test`, and an SVID of that domain.
    pub fn start(tag: &str) -> Self {
        use rustls::pki_types::pem::PemObject;
        let dir = super::TempDir::new(tag);
        let (chain_file, key_file) = super::proxy::foreign_svid(dir.path(), "partner.test");
        let text = std::fs::read_to_string(&chain_file).unwrap();
        let root = &text[text.rfind("-----BEGIN CERTIFICATE-----").unwrap()..];
        let fed = dir.path().join("partner.pem");
        std::fs::write(&fed, root).unwrap();
        let mesh = Mesh::start(
            tag,
            &["--federate", &format!("partner.test={}", fed.display())],
        );
        let chain: Vec<_> = CertificateDer::pem_file_iter(&chain_file)
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_file(&key_file).unwrap();
        Self {
            mesh,
            fed,
            chain,
            key,
            _dir: dir,
        }
    }

    /// The operator revokes the partner domain (an empty key set: SPIFFE's "domain removed");
    /// returns once `backend` installed the new bundles.
    pub fn revoke(&self, backend: &Sidecar) {
        let installs = backend.metric_sum(&["svidcar_proxy_svid_installs_total"]);
        std::fs::write(&self.fed, "{\"keys\": []}\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while backend.metric_sum(&["svidcar_proxy_svid_installs_total"]) <= installs {
            assert!(
                Instant::now() < deadline,
                "the backend never got the new bundles"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
