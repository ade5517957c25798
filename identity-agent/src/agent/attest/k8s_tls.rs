//! TLS client configuration for the kubelet API: a configured CA, the system roots, or (explicit,
//! insecure opt-in `kubelet_insecure_skip_verify` / `--k8s-kubelet-insecure-skip-verify`, warned
//! at start) no certificate verification at all. Sessions are never resumed, so no connection
//! skips the verification.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::k8s::KubeletVerify;
use crate::agent::config::ConfigError;

const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Builds the rustls client config for the kubelet.
pub fn client_config(verify: &KubeletVerify) -> Result<rustls::ClientConfig, ConfigError> {
    let provider = crate::tls::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Invalid(format!("k8s: TLS: {e}")))?;
    let mut config = match verify {
        KubeletVerify::Ca(path) => builder
            .with_root_certificates(roots(path)?)
            .with_no_client_auth(),
        KubeletVerify::SystemRoots => builder
            .with_root_certificates(roots(Path::new(SYSTEM_ROOTS))?)
            .with_no_client_auth(),
        KubeletVerify::Insecure => {
            tracing::warn!(
                "k8s: the kubelet's certificate is NOT verified (kubelet_insecure_skip_verify)"
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(crate::tls::algorithms())))
                .with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // A resumed handshake restores the kubelet's certificate from the ticket without running
    // the verifier: every connection verifies the kubelet in full (one per pod-list refresh).
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

fn roots(path: &Path) -> Result<rustls::RootCertStore, ConfigError> {
    let err = |m: String| ConfigError::Invalid(format!("k8s kubelet CA {}: {m}", path.display()));
    let data = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&data) {
        roots
            .add(c.map_err(|e| err(e.to_string()))?)
            .map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("no CA certificate".into()));
    }
    Ok(roots)
}

/// Accepts any kubelet certificate, still checking the handshake signatures.
#[derive(Debug)]
struct NoVerify(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use rustls::pki_types::PrivateKeyDer;

    use super::*;

    /// A TLS server (session tickets and a session cache on, as rustls' defaults) for a
    /// certificate signed by a fresh CA written to `dir/ca.pem`; answers each connection once.
    fn kubelet(dir: &Path) -> u16 {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into()]).unwrap();
        let leaf = leaf
            .signed_by(&key, &rcgen::Issuer::new(ca, ca_key))
            .unwrap();
        let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let mut server = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .unwrap();
        server.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().unwrap();
        let server = Arc::new(server);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let conn = rustls::ServerConnection::new(server.clone()).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, s);
                let mut b = [0u8; 1];
                if tls.read_exact(&mut b).is_ok() {
                    let _ = tls.write_all(b"y");
                    let _ = tls.flush();
                }
            }
        });
        port
    }

    fn handshake(config: &Arc<rustls::ClientConfig>, port: u16) -> Option<rustls::HandshakeKind> {
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
        let mut tls =
            rustls::StreamOwned::new(conn, TcpStream::connect(("127.0.0.1", port)).unwrap());
        tls.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).unwrap();
        // Let the tickets sent after the handshake arrive (they would be stored now).
        let _ = tls
            .sock
            .set_read_timeout(Some(std::time::Duration::from_millis(200)));
        let _ = tls.read(&mut b);
        tls.conn.handshake_kind()
    }

    #[test]
    fn kubelet_sessions_are_never_resumed() {
        let dir = std::env::temp_dir().join(format!("svidcar-k8s-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = kubelet(&dir);
        for verify in [
            KubeletVerify::Ca(dir.join("ca.pem")),
            KubeletVerify::Insecure,
        ] {
            let config = Arc::new(client_config(&verify).unwrap());
            for _ in 0..3 {
                assert_eq!(
                    handshake(&config, port),
                    Some(rustls::HandshakeKind::Full),
                    "{verify:?}: a kubelet session was resumed"
                );
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
