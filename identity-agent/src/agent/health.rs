//! The agent's health and metrics listener (HTTP/1, default `127.0.0.1:8088`):
//! `/live` (200 while the process runs), `/ready` (200 once the Workload API socket is
//! listening, 503 before), `/metrics` (Prometheus text). Loopback only unless
//! `health_allow_remote`; a request's headers must arrive within [`HEADER_TIMEOUT`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A connection whose request headers do not arrive within this time (also between keep-alive
/// requests) is closed: probes and scrapers send theirs at once.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    /// X.509-SVIDs signed.
    pub x509_svids_issued: Counter,
    /// JWT-SVIDs signed.
    pub jwt_svids_issued: Counter,
    /// Open Workload API streams.
    pub streams_open: Gauge,
    /// Identities in the SVID cache (in use, or released and not expired yet).
    pub svid_cache_identities: Gauge,
    attestation_failures: Family<Vec<(String, String)>, Counter>,
    /// Callers refused for lack of a matching entry.
    pub no_entry: Counter,
    /// Open connections on the agent socket.
    pub connections_open: Gauge,
    connections_refused: Family<Vec<(String, String)>, Counter>,
    ca_not_after: Gauge,
    federation_refreshes: Family<Vec<(String, String)>, Counter>,
    federation_last_success: Family<Vec<(String, String)>, Gauge>,
}

/// Where a federated bundle comes from (a metric label).
#[derive(Debug, Clone, Copy)]
pub enum FederationSource {
    /// A SPIFFE bundle endpoint (`federation_endpoints`).
    Endpoint,
    /// A bundle file (`federation`).
    File,
}

/// How one refresh of a federated bundle went (a metric label).
#[derive(Debug, Clone, Copy)]
pub enum RefreshResult {
    /// A new bundle was published to workloads.
    Updated,
    /// Fetched or read, identical to the one held.
    Unchanged,
    /// Failed; the last good bundle is kept.
    Error,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers the metrics (prefix `svidcar_agent_`).
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("svidcar_agent");
        let x509_svids_issued = Counter::default();
        let jwt_svids_issued = Counter::default();
        let streams_open = Gauge::default();
        let svid_cache_identities = Gauge::default();
        let attestation_failures = Family::default();
        let no_entry = Counter::default();
        let connections_open = Gauge::default();
        let connections_refused = Family::default();
        let ca_not_after = Gauge::default();
        let federation_refreshes = Family::default();
        let federation_last_success = Family::default();
        registry.register(
            "federation_refreshes",
            "Refreshes of federated bundles, by trust domain, source (endpoint|file) and result \
             (updated|unchanged|error)",
            federation_refreshes.clone(),
        );
        registry.register(
            "federation_last_success_seconds",
            "When each federated bundle was last fetched or read successfully (unix seconds): \
             alert on time() minus this",
            federation_last_success.clone(),
        );
        registry.register(
            "x509_svids_issued",
            "X.509-SVIDs signed",
            x509_svids_issued.clone(),
        );
        registry.register(
            "jwt_svids_issued",
            "JWT-SVIDs signed",
            jwt_svids_issued.clone(),
        );
        registry.register(
            "streams_open",
            "Open Workload API streams",
            streams_open.clone(),
        );
        registry.register(
            "svid_cache_identities",
            "Identities holding a cached X.509-SVID (one SVID per identity, shared by all its \
             streams)",
            svid_cache_identities.clone(),
        );
        registry.register(
            "attestation_failures",
            "Callers that could not be attested, by reason",
            attestation_failures.clone(),
        );
        registry.register(
            "no_entry",
            "Attested callers without a matching entry",
            no_entry.clone(),
        );
        registry.register(
            "connections_open",
            "Open connections on the agent socket",
            connections_open.clone(),
        );
        registry.register(
            "connections_refused",
            "Agent socket connections closed by the agent, by reason (per_uid_limit: the uid \
             holds max_connections_per_uid; no_request: nothing sent within \
             first_request_timeout; no_credentials; accept_error)",
            connections_refused.clone(),
        );
        registry.register(
            "ca_not_after_seconds",
            "Expiry of the active signing CA (unix seconds)",
            ca_not_after.clone(),
        );
        Self {
            registry,
            x509_svids_issued,
            jwt_svids_issued,
            streams_open,
            svid_cache_identities,
            attestation_failures,
            no_entry,
            connections_open,
            connections_refused,
            ca_not_after,
            federation_refreshes,
            federation_last_success,
        }
    }

    /// Counts one refresh of `trust_domain`'s federated bundle; a success also records when.
    pub fn federation_refreshed(
        &self,
        trust_domain: &str,
        source: FederationSource,
        result: RefreshResult,
    ) {
        let source = match source {
            FederationSource::Endpoint => "endpoint",
            FederationSource::File => "file",
        };
        let outcome = match result {
            RefreshResult::Updated => "updated",
            RefreshResult::Unchanged => "unchanged",
            RefreshResult::Error => "error",
        };
        self.federation_refreshes
            .get_or_create(&vec![
                ("trust_domain".into(), trust_domain.into()),
                ("source".into(), source.into()),
                ("result".into(), outcome.into()),
            ])
            .inc();
        if !matches!(result, RefreshResult::Error) {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.federation_last_success
                .get_or_create(&vec![("trust_domain".into(), trust_domain.into())])
                .set(i64::try_from(now).unwrap_or(i64::MAX));
        }
    }

    /// Counts a connection the agent closed (or never served), by reason.
    pub fn connection_refused(&self, reason: &str) {
        self.connections_refused
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    /// Counts an attestation failure.
    pub fn attestation_failed(&self, reason: &str) {
        self.attestation_failures
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    /// Records the active CA's expiry.
    pub fn set_ca_not_after(&self, t: SystemTime) {
        let secs = t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.ca_not_after
            .set(i64::try_from(secs).unwrap_or(i64::MAX));
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

fn respond(
    req: &Request<hyper::body::Incoming>,
    metrics: &Metrics,
    ready: bool,
) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/live" => (StatusCode::OK, "text/plain", "live\n".to_string()),
        "/ready" if ready => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".to_string(),
        ),
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// Serves `/live`, `/ready`, `/metrics` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, ready: watch::Receiver<bool>) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "health and metrics listening");
    }
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // E.g. EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "health listener accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = respond(&req, &metrics, *ready.borrow());
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
