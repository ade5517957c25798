//! The SPIFFE bundle endpoint: serves our trust bundle over HTTPS (`GET /`) as a SPIFFE bundle
//! (JWKS with `spiffe_sequence` and `spiffe_refresh_hint`) for other trust domains to federate.
//!
//! Profiles (SPIFFE Federation standard):
//! - `https_spiffe`: the server certificate is an X509-SVID of the agent itself (default ID
//!   `spiffe://<td>/svidcar/bundle-endpoint`), issued by our CA, re-issued at half life and when
//!   the CA rotates. Consumers authenticate it with our bundle (bootstrapped out of band).
//! - `https_web`: an operator-given certificate and key (PEM), for consumers that use Web PKI.
//!
//! `spiffe_sequence` increases whenever the served bundle changes (it never goes below the
//! agent's own bundle sequence).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::agent::config::{parse_duration, ConfigError};
use crate::agent::TrustState;
use crate::bundle::Bundle;
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// Concurrent connections served; more are dropped at accept.
const MAX_CONNECTIONS: usize = 256;
/// Default `spiffe_refresh_hint` served to consumers.
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(300);

/// The `bundle_endpoint` section of the YAML config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleEndpointFile {
    /// `host:port` to listen on (HTTPS).
    pub address: Option<String>,
    /// `https_spiffe` (default) or `https_web`.
    pub profile: Option<String>,
    /// `https_spiffe`: the endpoint's SPIFFE ID (default `spiffe://<td>/svidcar/bundle-endpoint`).
    pub spiffe_id: Option<String>,
    /// `https_web`: PEM certificate chain.
    pub cert_file: Option<PathBuf>,
    /// `https_web`: PEM private key.
    pub key_file: Option<PathBuf>,
    /// `spiffe_refresh_hint` served (default 5m).
    pub refresh_hint: Option<String>,
}

/// How the endpoint authenticates itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerProfile {
    /// Serve with an SVID of this ID, issued by our CA.
    HttpsSpiffe(SpiffeId),
    /// Serve with an operator-given certificate chain and key.
    HttpsWeb { cert: PathBuf, key: PathBuf },
}

/// The resolved bundle endpoint configuration.
#[derive(Debug, Clone)]
pub struct BundleEndpointConfig {
    pub addr: SocketAddr,
    pub profile: ServerProfile,
    pub refresh_hint: Duration,
}

impl BundleEndpointFile {
    /// Validates the section for trust domain `td`.
    pub fn resolve(self, td: &TrustDomain) -> Result<BundleEndpointConfig, ConfigError> {
        let bad = |m: String| ConfigError::Invalid(format!("bundle_endpoint: {m}"));
        let addr_s = self
            .address
            .ok_or_else(|| bad("address is required (host:port)".into()))?;
        let addr = addr_s
            .parse()
            .map_err(|e| bad(format!("address {addr_s:?}: {e}")))?;
        let profile = match self
            .profile
            .as_deref()
            .unwrap_or(if self.cert_file.is_some() {
                "https_web"
            } else {
                "https_spiffe"
            }) {
            "https_spiffe" => {
                let id = match self.spiffe_id {
                    Some(s) => {
                        SpiffeId::parse(&s).map_err(|e| bad(format!("spiffe_id {s:?}: {e}")))?
                    }
                    None => SpiffeId::from_parts(td, "/svidcar/bundle-endpoint")
                        .map_err(|e| bad(e.to_string()))?,
                };
                if id.trust_domain() != *td || id.path().is_empty() {
                    return Err(bad(format!("spiffe_id {id} must be a workload ID of {td}")));
                }
                ServerProfile::HttpsSpiffe(id)
            }
            "https_web" => match (self.cert_file, self.key_file) {
                (Some(cert), Some(key)) => ServerProfile::HttpsWeb { cert, key },
                _ => return Err(bad("https_web needs cert_file and key_file".into())),
            },
            other => {
                return Err(bad(format!(
                    "unknown profile {other:?} (https_spiffe or https_web)"
                )))
            }
        };
        let refresh_hint = match self.refresh_hint {
            Some(s) => parse_duration(&s)?,
            None => DEFAULT_REFRESH_HINT,
        };
        Ok(BundleEndpointConfig {
            addr,
            profile,
            refresh_hint,
        })
    }
}

/// The certificate the endpoint presents, swapped on re-issue.
#[derive(Debug)]
struct CurrentCert(std::sync::RwLock<Option<Arc<CertifiedKey>>>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().and_then(|g| g.clone())
    }
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, String> {
    let signing = crate::tls::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("unusable private key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

fn load_web_cert(cert: &PathBuf, key: &PathBuf) -> Result<Arc<CertifiedKey>, String> {
    let cdata = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cdata)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no PEM certificate", cert.display()));
    }
    let kdata = std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let key_der = PrivateKeyDer::from_pem_slice(&kdata).map_err(|e| match e {
        pem::Error::NoItemsFound => format!("{}: no PEM private key", key.display()),
        e => format!("{}: {e}", key.display()),
    })?;
    certified(chain, key_der)
}

/// Keeps the endpoint's SVID fresh: issue now, re-issue at half life or when the CA changes.
async fn keep_svid(
    id: SpiffeId,
    ttl: Duration,
    mut state: watch::Receiver<Arc<TrustState>>,
    current: Arc<CurrentCert>,
) {
    let mut signer = String::new();
    let mut refresh_at = SystemTime::now();
    loop {
        let st = state.borrow_and_update().clone();
        let now = SystemTime::now();
        if now >= refresh_at || st.signer.serial_hex != signer {
            match st.signer.issue(&id, id.as_str(), ttl, now) {
                Ok(s) => {
                    let chain = crate::svid::split_der_chain(&s.chain_der).unwrap_or_default();
                    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(s.key_pkcs8.clone()));
                    match certified(chain, key) {
                        Ok(ck) => {
                            if let Ok(mut g) = current.0.write() {
                                *g = Some(ck);
                            }
                            signer = st.signer.serial_hex.clone();
                            // Floor: never spin on an SVID capped by an expiring CA.
                            refresh_at = s.refresh_at().max(now + Duration::from_millis(100));
                            tracing::debug!(id = %id, "bundle endpoint SVID issued");
                        }
                        Err(e) => tracing::error!(error = %e, "bundle endpoint SVID unusable"),
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot issue the bundle endpoint SVID; retrying in 5s");
                    refresh_at = now + Duration::from_secs(5);
                }
            }
        }
        let wait = refresh_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::select! {
            r = state.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Tracks `spiffe_sequence`: bumped whenever the served keys change.
struct Sequencer {
    last: Option<Bundle>,
    seq: u64,
}

impl Sequencer {
    fn jwks(&mut self, own: &Bundle, hint: Duration) -> Vec<u8> {
        let mut b = own.clone();
        b.sequence = 0;
        b.refresh_hint = None;
        if self.last.as_ref() != Some(&b) {
            self.seq = (self.seq + 1).max(own.sequence);
            self.last = Some(b.clone());
        }
        b.sequence = self.seq;
        b.refresh_hint = Some(hint);
        b.to_jwks()
    }
}

fn respond(status: StatusCode, ctype: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Binds the endpoint's listener.
pub async fn bind(cfg: &BundleEndpointConfig) -> Result<TcpListener, String> {
    TcpListener::bind(cfg.addr)
        .await
        .map_err(|e| format!("bundle endpoint {}: {e}", cfg.addr))
}

/// Serves our bundle on `listener` until the task is dropped. `svid_ttl` is the lifetime of
/// the endpoint's own SVID (`https_spiffe`).
pub async fn serve(
    cfg: BundleEndpointConfig,
    listener: TcpListener,
    state: watch::Receiver<Arc<TrustState>>,
    svid_ttl: Duration,
) {
    let current = Arc::new(CurrentCert(std::sync::RwLock::new(None)));
    let mut tasks = tokio::task::JoinSet::new();
    match &cfg.profile {
        ServerProfile::HttpsSpiffe(id) => {
            tasks.spawn(keep_svid(
                id.clone(),
                svid_ttl,
                state.clone(),
                current.clone(),
            ));
        }
        ServerProfile::HttpsWeb { cert, key } => match load_web_cert(cert, key) {
            Ok(ck) => {
                if let Ok(mut g) = current.0.write() {
                    *g = Some(ck);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "bundle endpoint (https_web) disabled: cannot load its certificate");
                return;
            }
        },
    }
    let tls = match rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
    {
        Ok(b) => {
            let mut c = b.with_no_client_auth().with_cert_resolver(current);
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(c)
        }
        Err(e) => {
            tracing::error!(error = %e, "bundle endpoint TLS config");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let seq = Arc::new(Mutex::new(Sequencer { last: None, seq: 0 }));
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tracing::info!(addr = %cfg.addr, profile = ?cfg.profile, "SPIFFE bundle endpoint listening");
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "bundle endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(peer = %peer, "bundle endpoint busy ({MAX_CONNECTIONS} connections); dropping one");
            continue;
        };
        let (acceptor, state, seq, hint) = (
            acceptor.clone(),
            state.clone(),
            seq.clone(),
            cfg.refresh_hint,
        );
        tasks.spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer, error = %e, "bundle endpoint handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = if req.uri().path() != "/" {
                    respond(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec())
                } else if req.method() != Method::GET {
                    respond(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "text/plain",
                        b"GET only\n".to_vec(),
                    )
                } else {
                    let own = state.borrow().bundle.clone();
                    let body = match seq.lock() {
                        Ok(mut s) => s.jwks(&own, hint),
                        Err(_) => own.to_jwks(),
                    };
                    respond(StatusCode::OK, "application/json", body)
                };
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc);
            let _permit = permit;
            if let Err(e) = tokio::time::timeout(Duration::from_secs(30), conn).await {
                tracing::debug!(peer = %peer, error = %e, "bundle endpoint connection timed out");
            }
        });
        while tasks.try_join_next().is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_profiles() {
        let td = TrustDomain::parse("a.org").unwrap();
        let f = BundleEndpointFile {
            address: Some("127.0.0.1:0".into()),
            ..Default::default()
        };
        let c = f.clone().resolve(&td).unwrap();
        assert_eq!(
            c.profile,
            ServerProfile::HttpsSpiffe(
                SpiffeId::parse("spiffe://a.org/svidcar/bundle-endpoint").unwrap()
            )
        );
        assert_eq!(c.refresh_hint, DEFAULT_REFRESH_HINT);
        let mut other = f.clone();
        other.spiffe_id = Some("spiffe://b.org/x".into());
        assert!(other.resolve(&td).is_err());
        let mut web = f.clone();
        web.profile = Some("https_web".into());
        assert!(web.resolve(&td).is_err());
        assert!(BundleEndpointFile::default().resolve(&td).is_err());
    }

    #[test]
    fn sequence_increases_on_change_only() {
        let td = TrustDomain::parse("a.org").unwrap();
        let mut s = Sequencer { last: None, seq: 0 };
        let mut b = Bundle::new(td);
        let seq_of = |j: Vec<u8>| {
            serde_json::from_slice::<serde_json::Value>(&j).unwrap()["spiffe_sequence"]
                .as_u64()
                .unwrap()
        };
        assert_eq!(seq_of(s.jwks(&b, DEFAULT_REFRESH_HINT)), 1);
        assert_eq!(seq_of(s.jwks(&b, DEFAULT_REFRESH_HINT)), 1);
        b.add_jwt_key(crate::bundle::JwtKey::new(
            serde_json::json!({"kid":"k","kty":"EC","crv":"P-256","x":"AA","y":"AA"}),
        ));
        assert_eq!(seq_of(s.jwks(&b, DEFAULT_REFRESH_HINT)), 2);
    }
}
