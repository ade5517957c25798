//! Per-caller limits in the data plane (docs/policy-limits.md; the engine is
//! [`crate::policy::limits`]).
//!
//! - A new inbound connection — or a stream of a pooled `svidcar-mux/1` carrier, a logical
//!   connection of its own — is admitted by [`crate::Authorizer::admit`] after its authorization
//!   and before a byte reaches the app: over `connections` or `connectionsPerSecond` it is reset
//!   (RST; a mux stream gets `RST_STREAM(REFUSED_STREAM)`). The returned [`Admission`] holds the
//!   connection slot until the connection ends, on every exit path (drop).
//! - On HTTP ports every request that the policy allows is then taken from the caller's
//!   `requestsPerSecond` bucket ([`crate::Authorizer::limit_request`]); over it, `429 Too Many
//!   Requests` with `retry-after` (gRPC: `grpc-status: 8` RESOURCE_EXHAUSTED), and the
//!   connection stays open. The bucket is resolved once per connection and again only after a
//!   policy reload: a request costs one atomic compare-and-swap, no lock, no allocation.
//! - Each excess is logged (target `access`, `outcome=limited`) and counted in
//!   `svidcar_limits_exceeded_total{limit,kind}`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::policy::limits::{Admitted, Exceeded, RequestBucket};

/// The request bucket of a connection under one compiled set.
#[derive(Debug)]
pub(crate) struct CachedBucket {
    pub generation: u64,
    pub bucket: Option<RequestBucket>,
}

/// A connection admitted under its caller's limits (unlimited when no limit applies). Keep it
/// for as long as the connection lives: dropping it releases the `connections` slot.
#[derive(Debug)]
pub struct Admission {
    _held: Admitted,
    pub(crate) requests: ArcSwap<CachedBucket>,
}

impl Admission {
    /// No limit applies.
    pub fn unlimited() -> Self {
        Self::new(Admitted::default(), 0, None)
    }

    pub(crate) fn new(held: Admitted, generation: u64, bucket: Option<RequestBucket>) -> Self {
        Self {
            _held: held,
            requests: ArcSwap::from_pointee(CachedBucket { generation, bucket }),
        }
    }
}

/// Labels of `svidcar_limits_exceeded_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// The limit's name.
    pub limit: String,
    /// `connections` | `connectionsPerSecond` | `requestsPerSecond`.
    pub kind: &'static str,
}

/// Counts excess per limit.
#[derive(Clone, Debug, Default)]
pub struct LimitMetrics {
    exceeded: Family<LimitLabels, Counter>,
}

impl LimitMetrics {
    /// Registers `svidcar_limits_exceeded_total` in `root` (no prefix).
    pub fn register(&self, root: &mut Registry) {
        root.register(
            "svidcar_limits_exceeded",
            "Connections reset and requests answered 429 / RESOURCE_EXHAUSTED because a per-caller limit was exceeded",
            self.exceeded.clone(),
        );
    }

    /// Counts one excess.
    pub fn exceeded(&self, e: &Exceeded) {
        self.exceeded
            .get_or_create(&LimitLabels {
                limit: e.limit.to_string(),
                kind: e.kind.as_str(),
            })
            .inc();
    }
}

/// `retry-after` in whole seconds, at least 1 (RFC 9110 §10.2.3).
pub fn retry_after_secs(e: &Exceeded) -> u64 {
    e.retry_after.as_secs() + u64::from(e.retry_after.subsec_nanos() > 0)
}

/// The answer to a request over its limit: `429` with `retry-after`, or for gRPC a
/// trailers-only `grpc-status: 8` (RESOURCE_EXHAUSTED) with `retry-after`. The limit's name is
/// not sent (it is in the log and the metric).
pub fn too_many_requests(grpc: bool, e: &Exceeded) -> http::Response<BoxBody<Bytes, hyper::Error>> {
    let body = if grpc {
        Bytes::new()
    } else {
        Bytes::from_static(b"rate limited\n")
    };
    let mut r = http::Response::new(
        Full::new(body)
            .map_err(|never: std::convert::Infallible| match never {})
            .boxed(),
    );
    if !grpc {
        *r.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
    }
    let h = r.headers_mut();
    h.insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from(retry_after_secs(e)),
    );
    if grpc {
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", http::HeaderValue::from_static("8"));
        h.insert(
            "grpc-message",
            http::HeaderValue::from_static("rate limited"),
        );
    } else {
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
    }
    r
}

/// The log line's reason for a connection over its limit.
pub fn reason(e: &Exceeded) -> String {
    format!(
        "limit {} exceeded ({}; retry after {} ms)",
        e.limit,
        e.kind.as_str(),
        e.retry_after.as_millis()
    )
}

/// Shared, so `Arc<Admission>` can go into a per-connection service.
pub type SharedAdmission = Arc<Admission>;
