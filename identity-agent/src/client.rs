//! A SPIFFE Workload API client over the agent's unix socket (always built; the proxy and
//! `svidcar svid show` use it).
//!
//! - [`WorkloadApiClient`]: one connection; `fetch_x509_context`, `fetch_jwt_svid`,
//!   `fetch_bundles`, `validate_jwt_svid`, `stream_x509_contexts`.
//! - [`watch_x509_context`]: a background task that keeps the `FetchX509SVID` stream open,
//!   reconnects with exponential backoff (100 ms .. 5 s) and keeps the last context meanwhile.
//!
//! Socket addresses: `unix:///abs/path`, `unix:/abs/path` or a plain path; [`default_socket`]
//! reads `SPIFFE_ENDPOINT_SOCKET`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use svidcar_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
    X509svidResponse,
};
use svidcar_proto::SpiffeWorkloadApiClient;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::bundle::{Bundle, BundleSet};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::svid::X509Svid;

/// Environment variable naming the Workload API socket.
pub const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// Why a Workload API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid Workload API address {0:?} (expected unix:///path, unix:/path or a path)")]
    BadAddress(String),
    #[error("cannot connect to the Workload API at {path}: {reason} (is the agent running?)")]
    Connect { path: String, reason: String },
    #[error("Workload API call failed: {0}")]
    Rpc(#[from] Status),
    #[error("Workload API stream ended")]
    StreamEnded,
    #[error("agent sent an invalid response: {0}")]
    Invalid(String),
}

/// SVIDs and bundles from one `FetchX509SVID` message.
#[derive(Debug, Clone)]
pub struct X509Context {
    /// The caller's SVIDs; the first is the default.
    pub svids: Vec<X509Svid>,
    /// Our trust domain's bundle and the federated ones.
    pub bundles: BundleSet,
}

impl X509Context {
    /// The default (first) SVID.
    pub fn default_svid(&self) -> Option<&X509Svid> {
        self.svids.first()
    }

    /// Parses a `FetchX509SVID` message (each SVID checked for SPIFFE structure and key match).
    pub fn from_response(resp: X509svidResponse) -> Result<Self, ClientError> {
        let mut bundles = BundleSet::new();
        let mut svids = Vec::with_capacity(resp.svids.len());
        for s in resp.svids {
            let svid = X509Svid::from_der(&s.x509_svid, &s.x509_svid_key, &s.hint)
                .map_err(|e| ClientError::Invalid(format!("SVID {}: {e}", s.spiffe_id)))?;
            let td = svid.id.trust_domain();
            if bundles.get(&td).is_none() {
                let b = Bundle::from_x509_der_concat(td, &s.bundle)
                    .map_err(|e| ClientError::Invalid(format!("bundle of {}: {e}", s.spiffe_id)))?;
                bundles.insert(b);
            }
            svids.push(svid);
        }
        for (k, v) in resp.federated_bundles {
            bundles.insert(parse_x509_bundle(&k, &v)?);
        }
        Ok(Self { svids, bundles })
    }
}

fn parse_td_key(key: &str) -> Result<TrustDomain, ClientError> {
    TrustDomain::parse_lenient(key)
        .map_err(|e| ClientError::Invalid(format!("bundle key {key:?}: {e}")))
}

fn parse_x509_bundle(key: &str, der: &[u8]) -> Result<Bundle, ClientError> {
    Bundle::from_x509_der_concat(parse_td_key(key)?, der)
        .map_err(|e| ClientError::Invalid(format!("bundle {key}: {e}")))
}

/// Parses one `FetchJWTBundles` value: a plain JWKS. SPIRE's agent sends standard JWKS keys
/// without `use` (go-spiffe's `jwtbundle` form), svidcar's agent sends `use: jwt-svid` and
/// `spiffe_sequence`; both are JWT authorities, and every key needs a `kid`.
fn parse_jwt_bundle(key: &str, jwks: &[u8]) -> Result<Bundle, ClientError> {
    Bundle::from_jwt_jwks(parse_td_key(key)?, jwks)
        .map_err(|e| ClientError::Invalid(format!("JWT bundle {key}: {e}")))
}

/// A JWT-SVID as returned by `FetchJWTSVID`.
#[derive(Clone)]
pub struct JwtSvidToken {
    /// The subject.
    pub id: SpiffeId,
    /// The compact JWS.
    pub token: String,
    /// Workload API hint.
    pub hint: String,
}

impl std::fmt::Debug for JwtSvidToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSvidToken")
            .field("id", &self.id)
            .field("hint", &self.hint)
            .finish()
    }
}

/// Turns `unix:///abs`, `unix:/abs` or a plain path into a socket path.
pub fn parse_socket_addr(addr: &str) -> Result<PathBuf, ClientError> {
    let path = if let Some(rest) = addr.strip_prefix("unix://") {
        rest
    } else if let Some(rest) = addr.strip_prefix("unix:") {
        rest
    } else if addr.contains("://") {
        return Err(ClientError::BadAddress(addr.to_string()));
    } else {
        addr
    };
    if path.is_empty() {
        return Err(ClientError::BadAddress(addr.to_string()));
    }
    Ok(PathBuf::from(path))
}

/// The socket from `SPIFFE_ENDPOINT_SOCKET`, if set and valid.
pub fn default_socket() -> Option<PathBuf> {
    std::env::var(ENDPOINT_ENV)
        .ok()
        .and_then(|v| parse_socket_addr(&v).ok())
}

/// Adds `workload.spiffe.io: true` to every call.
#[derive(Clone, Copy, Debug, Default)]
pub struct SecurityHeader;

impl tonic::service::Interceptor for SecurityHeader {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert(
            "workload.spiffe.io",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        Ok(req)
    }
}

/// A connected Workload API client.
#[derive(Clone)]
pub struct WorkloadApiClient {
    inner: SpiffeWorkloadApiClient<InterceptedService<Channel, SecurityHeader>>,
}

impl WorkloadApiClient {
    /// Connects to the agent at `socket` (`unix:///abs`, `unix:/abs` or a path).
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Self, ClientError> {
        let raw = socket.as_ref().to_string_lossy().to_string();
        let path = parse_socket_addr(&raw)?;
        let p = path.clone();
        // The URI is required by tonic but unused: the connector dials the unix socket.
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let p = p.clone();
                async move { tokio::net::UnixStream::connect(p).await.map(TokioIo::new) }
            }))
            .await
            .map_err(|e| ClientError::Connect {
                path: path.display().to_string(),
                reason: source_chain(&e),
            })?;
        Ok(Self {
            inner: SpiffeWorkloadApiClient::with_interceptor(channel, SecurityHeader),
        })
    }

    /// Connects to `SPIFFE_ENDPOINT_SOCKET`.
    pub async fn connect_env() -> Result<Self, ClientError> {
        let v = std::env::var(ENDPOINT_ENV)
            .map_err(|_| ClientError::BadAddress(format!("${ENDPOINT_ENV} is not set")))?;
        Self::connect(v).await
    }

    /// Opens `FetchX509SVID` and returns the stream of contexts.
    pub async fn stream_x509_contexts(&mut self) -> Result<X509ContextStream, ClientError> {
        let stream = self
            .inner
            .fetch_x509svid(X509svidRequest {})
            .await?
            .into_inner();
        Ok(X509ContextStream { inner: stream })
    }

    /// The first message of `FetchX509SVID`.
    pub async fn fetch_x509_context(&mut self) -> Result<X509Context, ClientError> {
        self.stream_x509_contexts().await?.next().await
    }

    /// JWT-SVIDs for `audiences` (all identities, or only `id`).
    pub async fn fetch_jwt_svid(
        &mut self,
        audiences: &[String],
        id: Option<&SpiffeId>,
    ) -> Result<Vec<JwtSvidToken>, ClientError> {
        let req = JwtsvidRequest {
            audience: audiences.to_vec(),
            spiffe_id: id.map(|i| i.as_str().to_string()).unwrap_or_default(),
        };
        let resp = self.inner.fetch_jwtsvid(req).await?.into_inner();
        resp.svids
            .into_iter()
            .map(|s| {
                let id = SpiffeId::parse(&s.spiffe_id)
                    .map_err(|e| ClientError::Invalid(format!("JWT-SVID spiffe_id: {e}")))?;
                Ok(JwtSvidToken {
                    id,
                    token: s.svid,
                    hint: s.hint,
                })
            })
            .collect()
    }

    /// X.509 bundles (first `FetchX509Bundles` message).
    pub async fn fetch_bundles(&mut self) -> Result<BundleSet, ClientError> {
        let mut s = self
            .inner
            .fetch_x509_bundles(X509BundlesRequest {})
            .await?
            .into_inner();
        let msg = s.message().await?.ok_or(ClientError::StreamEnded)?;
        let mut set = BundleSet::new();
        for (k, v) in msg.bundles {
            set.insert(parse_x509_bundle(&k, &v)?);
        }
        Ok(set)
    }

    /// JWT bundles (first `FetchJWTBundles` message).
    pub async fn fetch_jwt_bundles(&mut self) -> Result<BundleSet, ClientError> {
        let mut s = self
            .inner
            .fetch_jwt_bundles(JwtBundlesRequest {})
            .await?
            .into_inner();
        let msg = s.message().await?.ok_or(ClientError::StreamEnded)?;
        let mut set = BundleSet::new();
        for (k, v) in msg.bundles {
            set.insert(parse_jwt_bundle(&k, &v)?);
        }
        Ok(set)
    }

    /// Asks the agent to validate a JWT-SVID for `audience`; returns its subject and claims.
    pub async fn validate_jwt_svid(
        &mut self,
        token: &str,
        audience: &str,
    ) -> Result<(SpiffeId, prost_types::Struct), ClientError> {
        let req = ValidateJwtsvidRequest {
            audience: audience.to_string(),
            svid: token.to_string(),
        };
        let resp = self.inner.validate_jwtsvid(req).await?.into_inner();
        let id = SpiffeId::parse(&resp.spiffe_id)
            .map_err(|e| ClientError::Invalid(format!("validated spiffe_id: {e}")))?;
        Ok((id, resp.claims.unwrap_or_default()))
    }
}

/// The `FetchX509SVID` stream, parsed.
pub struct X509ContextStream {
    inner: tonic::Streaming<X509svidResponse>,
}

impl X509ContextStream {
    /// The next context (waits for the agent to push one).
    pub async fn next(&mut self) -> Result<X509Context, ClientError> {
        let msg = self
            .inner
            .message()
            .await?
            .ok_or(ClientError::StreamEnded)?;
        X509Context::from_response(msg)
    }
}

/// PEM-encodes DER bytes under `label` (e.g. `CERTIFICATE`, `PRIVATE KEY`).
pub fn to_pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes a file readable only by its owner (0600), replacing any previous one.
pub fn write_private_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

/// Formats a time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_utc(t: std::time::SystemTime) -> String {
    let (date, rem, _) = civil_utc(t);
    format!(
        "{date}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Formats a time as `YYYY-MM-DDTHH:MM:SS.mmmZ` (RFC 3339, UTC, milliseconds).
pub fn format_utc_millis(t: std::time::SystemTime) -> String {
    let (date, rem, millis) = civil_utc(t);
    format!(
        "{date}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `YYYY-MM-DD`, seconds into that day, and milliseconds of a time (before 1970: the epoch).
fn civil_utc(t: std::time::SystemTime) -> (String, u64, u32) {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (format!("{y:04}-{m:02}-{day:02}"), rem, d.subsec_millis())
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let part = c.to_string();
        if !s.contains(&part) {
            s.push_str(": ");
            s.push_str(&part);
        }
        cur = c.source();
    }
    s
}

/// Keeps an `FetchX509SVID` stream open in a background task and publishes every context.
/// The receiver holds `None` until the first context arrives and keeps the last context while
/// the agent is away; the task reconnects with exponential backoff (100 ms doubling to 5 s,
/// reset after a message) and stops when every receiver is dropped. Needs a tokio runtime.
pub fn watch_x509_context(socket: impl Into<PathBuf>) -> watch::Receiver<Option<Arc<X509Context>>> {
    let socket = socket.into();
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        const MIN: Duration = Duration::from_millis(100);
        const MAX: Duration = Duration::from_secs(5);
        let mut backoff = MIN;
        loop {
            let err = match WorkloadApiClient::connect(&socket).await {
                Err(e) => e,
                Ok(mut c) => match c.stream_x509_contexts().await {
                    Err(e) => e,
                    Ok(mut stream) => loop {
                        let next = tokio::select! {
                            n = stream.next() => n,
                            _ = tx.closed() => return,
                        };
                        match next {
                            Ok(ctx) => {
                                backoff = MIN;
                                tracing::debug!(svids = ctx.svids.len(), "received X.509 context");
                                if tx.send(Some(Arc::new(ctx))).is_err() {
                                    return;
                                }
                            }
                            Err(e) => break e,
                        }
                    },
                },
            };
            tracing::warn!(socket = %socket.display(), error = %err, retry_in = ?backoff,
                "Workload API stream lost; keeping the last SVID and retrying");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = tx.closed() => return,
            }
            backoff = (backoff * 2).min(MAX);
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses() {
        assert_eq!(
            parse_socket_addr("unix:///run/a.sock").unwrap(),
            PathBuf::from("/run/a.sock")
        );
        assert_eq!(
            parse_socket_addr("unix:/run/a.sock").unwrap(),
            PathBuf::from("/run/a.sock")
        );
        assert_eq!(
            parse_socket_addr("/run/a.sock").unwrap(),
            PathBuf::from("/run/a.sock")
        );
        assert!(parse_socket_addr("tcp://1.2.3.4:5").is_err());
        assert!(parse_socket_addr("unix://").is_err());
    }

    #[test]
    fn jwt_bundles_as_spire_and_svidcar_send_them() {
        // SPIRE v1.13's agent: bundleutil.Marshal(.., NoX509SVIDKeys(), StandardJWKS()) — no
        // `use`, no spiffe_* members, pretty-printed.
        let spire = br#"{
    "keys": [
        {
            "kty": "EC",
            "kid": "oXxcqvmmBn3mnVkUqDWmHvESM6ypT6vc",
            "crv": "P-256",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"
        }
    ]
}"#;
        let b = parse_jwt_bundle("spiffe://b.test", spire).expect("SPIRE's JWT bundle");
        assert_eq!(b.trust_domain.name(), "b.test");
        assert!(b
            .jwt_authorities
            .contains_key("oXxcqvmmBn3mnVkUqDWmHvESM6ypT6vc"));
        assert!(b.x509_authorities.is_empty());
        assert_eq!((b.sequence, b.refresh_hint), (0, None));
        let ours = br#"{"keys":[{"use":"jwt-svid","kty":"EC","kid":"k1","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}],"spiffe_sequence":3}"#;
        let ours = parse_jwt_bundle("a.test", ours).expect("svidcar's JWT bundle");
        assert!(ours.jwt_authorities.contains_key("k1"));
        assert_eq!(ours.sequence, 3, "svidcar's agent sends spiffe_sequence");
        // Still strict: a key without `kid` cannot verify anything.
        let no_kid = br#"{"keys":[{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;
        assert!(parse_jwt_bundle("b.test", no_kid).is_err());
    }

    #[test]
    fn utc_format() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(format_utc(t), "2023-11-14T22:13:20Z");
        assert!(to_pem("CERTIFICATE", b"abc").starts_with("-----BEGIN CERTIFICATE-----\nYWJj\n"));
    }
}
