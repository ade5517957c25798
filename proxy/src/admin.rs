//! The admin listener (default `127.0.0.1:15000`), on its own thread and runtime so a scrape
//! never competes with traffic: `/ready` (503 until an SVID is held), `/live`, `/metrics`
//! (Prometheus text), `/config` (SVID serial and validity, bundles, listeners — never keys),
//! `/policy` (the effective authorization policy). Loopback only unless
//! `admin_allow_remote`; request headers must arrive within `limits.header_timeout`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::credentials::Credentials;

/// What the admin endpoints show.
pub struct AdminState {
    /// The credential store.
    pub creds: Arc<Credentials>,
    /// Metrics registry.
    pub registry: Registry,
    /// Human-readable listener descriptions.
    pub listeners: Vec<serde_json::Value>,
    /// Connection pooling between proxies (settings).
    pub pool: serde_json::Value,
    /// What the kernel offers for TLS offload ([`crate::ktls`]).
    pub ktls: serde_json::Value,
    /// Which policy is in force.
    pub policy: String,
    /// The authorizer (readiness: policy loaded).
    pub authz: Arc<dyn crate::authz::Authorizer>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AdminState {
    fn config_json(&self) -> serde_json::Value {
        let now = SystemTime::now();
        let svid = self.creds.last().map(|c| {
            json!({
                "spiffe_id": c.id.as_str(),
                "serial": c.serial,
                "not_before": unix(c.not_before),
                "not_after": unix(c.not_after),
                "expired": c.expired(now),
                "expires_in_seconds": c.not_after.duration_since(now).map(|d| d.as_secs()).unwrap_or(0),
            })
        });
        let bundles: Vec<_> = self
            .creds
            .last()
            .map(|c| {
                let mut v: Vec<_> = c
                    .bundles
                    .iter()
                    .map(|b| json!({"trust_domain": b.trust_domain.name(), "x509_authorities": b.x509_authorities.len()}))
                    .collect();
                v.sort_by(|a, b| a["trust_domain"].as_str().cmp(&b["trust_domain"].as_str()));
                v
            })
            .unwrap_or_default();
        json!({
            "ready": self.creds.ready() && self.authz.ready(),
            "svid": svid,
            "bundles": bundles,
            "listeners": self.listeners,
            "pool": self.pool,
            "ktls": self.ktls,
            "policy": self.policy,
        })
    }

    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        let (status, ctype, body) = match path {
            "/live" => (StatusCode::OK, "text/plain", "live\n".to_string()),
            "/ready" if self.creds.ready() && self.authz.ready() => {
                (StatusCode::OK, "text/plain", "ready\n".to_string())
            }
            "/ready" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!(
                    "not ready: svid={} policy={}\n",
                    self.creds.ready(),
                    self.authz.ready()
                ),
            ),
            "/metrics" => {
                use prometheus_client::encoding::text::{encode_eof, encode_registry};
                let mut s = String::new();
                let r = encode_registry(&mut s, &self.registry)
                    .and_then(|()| match self.authz.metrics_registry() {
                        Some(extra) => encode_registry(&mut s, extra),
                        None => Ok(()),
                    })
                    .and_then(|()| encode_eof(&mut s));
                match r {
                    Ok(()) => (
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        s,
                    ),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        format!("{e}\n"),
                    ),
                }
            }
            "/config" => {
                let body = serde_json::to_string_pretty(&self.config_json()).unwrap_or_default();
                (StatusCode::OK, "application/json", body + "\n")
            }
            "/policy" => {
                let body =
                    serde_json::to_string_pretty(&self.authz.policy_json()).unwrap_or_default();
                (StatusCode::OK, "application/json", body + "\n")
            }
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /ready /live /metrics /config /policy\n".to_string(),
            ),
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
            resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        resp
    }
}

/// Binds `addr` now (so errors surface at startup) and serves the admin endpoints on a
/// dedicated thread with its own single-threaded runtime. A connection whose request headers
/// do not arrive within `header_timeout` (also between keep-alive requests) is closed.
/// Returns the bound address. Whether `addr` may be non-loopback is the configuration's call
/// ([`crate::config::ProxyConfig::admin_allow_remote`]).
pub fn spawn(
    addr: SocketAddr,
    header_timeout: std::time::Duration,
    state: Arc<AdminState>,
) -> std::io::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let bound = std_listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("svidcar-admin".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!(error = %e, "admin listener failed"),
                };
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let state = state.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(
                            move |req: Request<hyper::body::Incoming>| {
                                let resp = state.respond(req.uri().path());
                                async move { Ok::<_, Infallible>(resp) }
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(header_timeout)
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            })
        })?;
    Ok(bound)
}
