//! Federation over bundle endpoints: polls foreign SPIFFE bundle endpoints and feeds the fetched
//! bundles into the agent's federated state (the same map `--federate TD=FILE` feeds), so they
//! reach Workload API streams and SDS, filtered per entry by `federates_with`.
//!
//! - `https_spiffe`: the endpoint must present an X509-SVID of the foreign trust domain that
//!   verifies against that domain's *current* bundle (bootstrapped from `--federate TD=FILE`,
//!   then the last fetched one) and, if configured, has the expected SPIFFE ID.
//! - `https_web`: Web PKI with the operator's CA file (default: the system bundle at
//!   `/etc/ssl/certs/ca-certificates.crt`); the host name must match the certificate.
//!
//! A fetched bundle is stored under the configured trust domain only (never merged with
//! another). Polled at the bundle's `spiffe_refresh_hint` (default 5 minutes), never more often
//! than the configured minimum; on failure the last good bundle stays and the fetch is retried
//! sooner.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::agent::config::{parse_duration, ConfigError};
use crate::agent::health::{FederationSource, Metrics, RefreshResult};
use crate::agent::TrustState;
use crate::bundle::{Bundle, BundleSet};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::tls::{ExpectedPeer, SpiffeServerVerifier};

/// Poll interval when the endpoint gives no `spiffe_refresh_hint`.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// Default lower bound on the poll interval.
pub const DEFAULT_MIN_REFRESH: Duration = Duration::from_secs(30);
/// Largest bundle accepted.
const MAX_BODY: usize = 1 << 20;
const DEFAULT_WEB_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// One `federation_endpoints` item of the YAML config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointFile {
    /// The foreign trust domain.
    pub trust_domain: String,
    /// `https://host:port[/path]` of its bundle endpoint.
    pub url: String,
    /// `https_spiffe` or `https_web`.
    pub profile: String,
    /// `https_spiffe`: the endpoint's SPIFFE ID (default: any ID of the trust domain).
    pub endpoint_spiffe_id: Option<String>,
    /// `https_web`: PEM CA certificates to trust (default: the system bundle).
    pub ca_file: Option<PathBuf>,
}

/// How the foreign endpoint is authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointProfile {
    /// SPIFFE authentication with the foreign domain's own bundle.
    HttpsSpiffe { expected: ExpectedPeer },
    /// Web PKI with these roots.
    HttpsWeb { ca_file: PathBuf },
}

/// A resolved foreign bundle endpoint.
#[derive(Debug, Clone)]
pub struct FederationEndpoint {
    pub trust_domain: TrustDomain,
    pub host: String,
    pub port: u16,
    pub path: String,
    pub profile: EndpointProfile,
}

/// All foreign endpoints and the poll floor.
#[derive(Debug, Clone)]
pub struct FederationEndpoints {
    pub endpoints: Vec<FederationEndpoint>,
    pub min_refresh: Duration,
}

impl Default for FederationEndpoints {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            min_refresh: DEFAULT_MIN_REFRESH,
        }
    }
}

/// Parses the flag form `TD=https://host:port,PROFILE[,SPIFFE_ID|CA_FILE]`.
pub fn parse_flag(s: &str) -> Result<EndpointFile, ConfigError> {
    let bad = || {
        ConfigError::Invalid(format!(
            "--federate-endpoint {s:?}: expected TD=https://host:port,https_spiffe[,SPIFFE_ID] or TD=https://host:port,https_web[,CA_FILE]"
        ))
    };
    let (td, rest) = s.split_once('=').ok_or_else(bad)?;
    let mut parts = rest.split(',');
    let url = parts.next().filter(|u| !u.is_empty()).ok_or_else(bad)?;
    let profile = parts.next().ok_or_else(bad)?.to_string();
    let extra = parts.next().filter(|x| !x.is_empty()).map(str::to_string);
    if parts.next().is_some() {
        return Err(bad());
    }
    let (endpoint_spiffe_id, ca_file) = match profile.as_str() {
        "https_spiffe" => (extra, None),
        "https_web" => (None, extra.map(PathBuf::from)),
        _ => return Err(bad()),
    };
    Ok(EndpointFile {
        trust_domain: td.to_string(),
        url: url.to_string(),
        profile,
        endpoint_spiffe_id,
        ca_file,
    })
}

impl EndpointFile {
    /// Validates the item; `own` is our trust domain (federating with it is refused).
    pub fn resolve(self, own: &TrustDomain) -> Result<FederationEndpoint, ConfigError> {
        let bad =
            |m: String| ConfigError::Invalid(format!("federation endpoint {}: {m}", self.url));
        let td = TrustDomain::parse_lenient(&self.trust_domain)
            .map_err(|e| ConfigError::TrustDomain(self.trust_domain.clone(), e.to_string()))?;
        if td == *own {
            return Err(bad(format!(
                "cannot federate with our own trust domain {td}"
            )));
        }
        let rest = self
            .url
            .strip_prefix("https://")
            .ok_or_else(|| bad("the URL must start with https://".into()))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                p.parse().map_err(|_| bad(format!("bad port {p:?}")))?,
            ),
            _ => (authority.to_string(), 443),
        };
        if host.is_empty() {
            return Err(bad("no host".into()));
        }
        let profile = match self.profile.as_str() {
            "https_spiffe" => EndpointProfile::HttpsSpiffe {
                expected: match &self.endpoint_spiffe_id {
                    Some(id) => {
                        let id = SpiffeId::parse(id)
                            .map_err(|e| bad(format!("endpoint SPIFFE ID {id:?}: {e}")))?;
                        if id.trust_domain() != td {
                            return Err(bad(format!("endpoint SPIFFE ID {id} is not in {td}")));
                        }
                        ExpectedPeer::Id(id)
                    }
                    None => ExpectedPeer::TrustDomain(td.clone()),
                },
            },
            "https_web" => EndpointProfile::HttpsWeb {
                ca_file: self
                    .ca_file
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_WEB_ROOTS)),
            },
            other => {
                return Err(bad(format!(
                    "unknown profile {other:?} (https_spiffe or https_web)"
                )))
            }
        };
        Ok(FederationEndpoint {
            trust_domain: td,
            host,
            port,
            path,
            profile,
        })
    }
}

impl FederationEndpoints {
    /// Resolves the YAML items and the optional `federation_min_refresh`.
    pub fn resolve(
        items: Vec<EndpointFile>,
        min_refresh: Option<&str>,
        own: &TrustDomain,
    ) -> Result<Self, ConfigError> {
        let mut endpoints = Vec::with_capacity(items.len());
        for item in items {
            let ep = item.resolve(own)?;
            if endpoints
                .iter()
                .any(|e: &FederationEndpoint| e.trust_domain == ep.trust_domain)
            {
                return Err(ConfigError::Invalid(format!(
                    "two bundle endpoints for trust domain {}",
                    ep.trust_domain
                )));
            }
            endpoints.push(ep);
        }
        Ok(Self {
            endpoints,
            min_refresh: min_refresh
                .map(parse_duration)
                .transpose()?
                .unwrap_or(DEFAULT_MIN_REFRESH),
        })
    }
}

/// Why one fetch failed (the last good bundle stays in force).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no bundle of {0} to authenticate its https_spiffe endpoint (bootstrap it with --federate {0}=FILE)")]
    NoBootstrap(TrustDomain),
    #[error("CA file {0}: {1}")]
    CaFile(PathBuf, String),
    #[error("connect {0}: {1}")]
    Connect(String, String),
    #[error("TLS with {0}: {1}")]
    Tls(String, String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("bundle endpoint answered {0}")]
    Status(u16),
    #[error("not a SPIFFE bundle: {0}")]
    Bundle(String),
}

fn client_config(
    ep: &FederationEndpoint,
    current: Option<&Bundle>,
) -> Result<rustls::ClientConfig, FetchError> {
    let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| FetchError::Tls(ep.host.clone(), e.to_string()))?;
    let mut config = match &ep.profile {
        EndpointProfile::HttpsSpiffe { expected } => {
            let bundle = current
                .filter(|b| !b.x509_authorities.is_empty())
                .ok_or_else(|| FetchError::NoBootstrap(ep.trust_domain.clone()))?;
            // Only the foreign domain's own bundle: its endpoint must chain to it.
            let mut set = BundleSet::new();
            set.insert(bundle.clone());
            let verifier = SpiffeServerVerifier::new(Arc::new(set), expected.clone());
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        }
        EndpointProfile::HttpsWeb { ca_file } => {
            let err = |e: String| FetchError::CaFile(ca_file.clone(), e);
            let data = std::fs::read(ca_file).map_err(|e| err(e.to_string()))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&data) {
                roots
                    .add(c.map_err(|e| err(e.to_string()))?)
                    .map_err(|e| err(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(err("no CA certificate".into()));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Fetches the foreign bundle once. `current` is the bundle we hold for that domain.
pub async fn fetch(
    ep: &FederationEndpoint,
    current: Option<&Bundle>,
) -> Result<Bundle, FetchError> {
    let config = client_config(ep, current)?;
    let target = format!("{}:{}", ep.host, ep.port);
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        TcpStream::connect((ep.host.as_str(), ep.port)),
    )
    .await
    .map_err(|_| FetchError::Connect(target.clone(), "timed out".into()))?
    .map_err(|e| FetchError::Connect(target.clone(), e.to_string()))?;
    let name = ServerName::try_from(ep.host.clone())
        .map_err(|e| FetchError::Tls(target.clone(), e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| FetchError::Tls(target.clone(), "handshake timed out".into()))?
        .map_err(|e| FetchError::Tls(target.clone(), e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let driver = tokio::spawn(conn);
    let host_header = if ep.port == 443 {
        ep.host.clone()
    } else {
        target.clone()
    };
    let req = hyper::Request::get(ep.path.as_str())
        .header(hyper::header::HOST, host_header)
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let result = async {
        let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .map_err(|_| FetchError::Http("no response within 10s".into()))?
            .map_err(|e| FetchError::Http(e.to_string()))?;
        if resp.status() != hyper::StatusCode::OK {
            return Err(FetchError::Status(resp.status().as_u16()));
        }
        let body = tokio::time::timeout(
            Duration::from_secs(10),
            Limited::new(resp.into_body(), MAX_BODY).collect(),
        )
        .await
        .map_err(|_| FetchError::Http("body not received within 10s".into()))?
        .map_err(|e| FetchError::Http(e.to_string()))?
        .to_bytes();
        Bundle::from_jwks(ep.trust_domain.clone(), &body)
            .map_err(|e| FetchError::Bundle(e.to_string()))
    }
    .await;
    driver.abort();
    result
}

/// Polls one endpoint forever, publishing changed bundles into the shared state.
pub async fn poll(
    ep: FederationEndpoint,
    min_refresh: Duration,
    state: Arc<watch::Sender<Arc<TrustState>>>,
    metrics: Arc<Metrics>,
) {
    let td = ep.trust_domain.clone();
    tracing::info!(trust_domain = %td, endpoint = %format!("https://{}:{}{}", ep.host, ep.port, ep.path),
        profile = ?ep.profile, "polling federated bundle endpoint");
    let mut interval = min_refresh;
    loop {
        let current = state.borrow().federated.get(&td).cloned();
        match fetch(&ep, current.as_ref()).await {
            Ok(b) => {
                interval = b.refresh_hint.unwrap_or(DEFAULT_REFRESH).max(min_refresh);
                if b.is_empty() {
                    tracing::warn!(trust_domain = %td, "bundle endpoint serves an empty bundle: the domain is revoked");
                }
                let changed = current.as_ref() != Some(&b);
                let result = if changed {
                    RefreshResult::Updated
                } else {
                    RefreshResult::Unchanged
                };
                metrics.federation_refreshed(td.name(), FederationSource::Endpoint, result);
                if changed {
                    tracing::info!(trust_domain = %td, sequence = b.sequence,
                        x509_authorities = b.x509_authorities.len(), jwt_authorities = b.jwt_authorities.len(),
                        "federated bundle updated from its endpoint");
                    state.send_modify(|s| {
                        let mut n = (**s).clone();
                        let mut fed = (*n.federated).clone();
                        fed.insert(td.clone(), b);
                        n.federated = Arc::new(fed);
                        n.bundles_version += 1;
                        *s = Arc::new(n);
                    });
                }
            }
            Err(e) => {
                metrics.federation_refreshed(
                    td.name(),
                    FederationSource::Endpoint,
                    RefreshResult::Error,
                );
                tracing::warn!(trust_domain = %td, error = %e, "bundle endpoint fetch failed; keeping the last good bundle");
                interval = interval.min(Duration::from_secs(30)).max(min_refresh);
            }
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_config() {
        let f: crate::agent::config::AgentFile = serde_yaml_ng::from_str(
            "trust_domain: a.org\nbundle_endpoint:\n  address: 127.0.0.1:8443\n  refresh_hint: 1m\nfederation_endpoints:\n  - trust_domain: b.org\n    url: https://b.example:8443\n    profile: https_spiffe\n    endpoint_spiffe_id: spiffe://b.org/be\n  - trust_domain: c.org\n    url: https://c.example\n    profile: https_web\n    ca_file: /etc/c-ca.pem\nfederation_min_refresh: 10s\n",
        )
        .unwrap();
        let cfg = crate::agent::config::AgentConfig::from_file(f).unwrap();
        let be = cfg.bundle_endpoint.unwrap();
        assert_eq!(be.refresh_hint, Duration::from_secs(60));
        let eps = cfg.federation_endpoints;
        assert_eq!(eps.min_refresh, Duration::from_secs(10));
        assert_eq!(eps.endpoints.len(), 2);
        assert_eq!(eps.endpoints[1].port, 443);
        let bad: crate::agent::config::AgentFile = serde_yaml_ng::from_str(
            "federation_endpoints:\n  - trust_domain: b.org\n    url: https://b\n    profile: https_spiffe\n  - trust_domain: b.org\n    url: https://b2\n    profile: https_spiffe\n",
        )
        .unwrap();
        assert!(crate::agent::config::AgentConfig::from_file(bad).is_err());
    }

    #[test]
    fn flags_and_urls() {
        let own = TrustDomain::parse("a.org").unwrap();
        let f = parse_flag("b.org=https://127.0.0.1:8443,https_spiffe,spiffe://b.org/be").unwrap();
        let ep = f.resolve(&own).unwrap();
        assert_eq!(
            (ep.host.as_str(), ep.port, ep.path.as_str()),
            ("127.0.0.1", 8443, "/")
        );
        assert!(matches!(
            ep.profile,
            EndpointProfile::HttpsSpiffe {
                expected: ExpectedPeer::Id(_)
            }
        ));
        let ep = parse_flag("b.org=https://bundles.b.org/x/y,https_web,/tmp/ca.pem")
            .unwrap()
            .resolve(&own)
            .unwrap();
        assert_eq!(
            (ep.host.as_str(), ep.port, ep.path.as_str()),
            ("bundles.b.org", 443, "/x/y")
        );
        assert_eq!(
            ep.profile,
            EndpointProfile::HttpsWeb {
                ca_file: "/tmp/ca.pem".into()
            }
        );
        assert!(parse_flag("b.org=https://h:1,ftp").is_err());
        assert!(parse_flag("b.org").is_err());
        assert!(parse_flag("a.org=https://h:1,https_spiffe")
            .unwrap()
            .resolve(&own)
            .is_err());
        assert!(parse_flag("b.org=http://h:1,https_spiffe")
            .unwrap()
            .resolve(&own)
            .is_err());
        assert!(
            parse_flag("b.org=https://h:1,https_spiffe,spiffe://c.org/x")
                .unwrap()
                .resolve(&own)
                .is_err()
        );
    }
}
