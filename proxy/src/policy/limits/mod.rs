//! Per-caller limits (`limits:` of a `PolicySet`, docs/policy-limits.md): concurrent
//! connections, new connections per second and, on HTTP ports, requests per second with a burst,
//! for the inbound callers a `from` pattern and optional `ports` select.
//!
//! - **Model**: [`Limit`], validated while deserializing (a bad limit rejects the whole set).
//! - **Selection**: per kind (`connections`, `connectionsPerSecond`, `requestsPerSecond`), the
//!   **first** limit in canonical order (file name, position) that sets that kind and matches the
//!   caller and port applies — so a specific override is written before a catch-all.
//! - **Counting**: per caller (its SPIFFE ID; an unauthenticated caller by its source IP), in
//!   lock-free cells ([`bucket`]): a connection slot is an atomic counter released by a drop guard,
//!   a rate is a GCRA token bucket in one atomic word. Per-limit state is bounded (see
//!   [`bucket::MAX_TRACKED_CALLERS`]).
//! - **Reload**: a limit whose name, callers and ports are unchanged keeps its counters
//!   ([`CompiledLimits::adopt`]); its numbers may change.

pub(crate) mod bucket;
mod lint;
pub mod simulate;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::compile::{compile_from, CFrom};
use super::eval::{check_from, Ctx};
use super::matchers::PortSet;
use super::model::{From, Selector};
use super::pattern::PortRange;
use super::request::Request;
use bucket::{CallerKey, Entry, Gcra, LimitState};

pub use bucket::{now, ConnSlot, MAX_TRACKED_CALLERS};
pub(crate) use lint::lint_limits;

/// Highest accepted rate, burst or connection count.
const MAX_VALUE: f64 = 1_000_000.0;

/// One entry of `limits:` (validated: a name, at least one limit, positive numbers, `burst`
/// only with `requestsPerSecond`).
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawLimit")]
pub struct Limit {
    /// Unique name across the set (logs, metrics).
    pub name: String,
    /// Which local workloads the limit applies to (as a policy's selector).
    pub selector: Option<Selector>,
    /// Callers (any entry; the fields of an inbound rule's `from`); absent = every caller.
    pub from: Option<Vec<From>>,
    /// Original destination ports; absent = every port.
    pub ports: Option<Vec<PortRange>>,
    /// Concurrent connections per caller.
    pub connections: Option<u32>,
    /// New connections per second per caller (bucket size: one second's worth, at least 1).
    pub connections_per_second: Option<f64>,
    /// HTTP requests per second per caller.
    pub requests_per_second: Option<f64>,
    /// Requests the bucket holds (default: one second's worth, at least 1).
    pub burst: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawLimit {
    name: String,
    selector: Option<Selector>,
    from: Option<Vec<From>>,
    ports: Option<Vec<PortRange>>,
    connections: Option<u32>,
    connections_per_second: Option<f64>,
    requests_per_second: Option<f64>,
    burst: Option<u32>,
}

impl TryFrom<RawLimit> for Limit {
    type Error = String;
    fn try_from(r: RawLimit) -> Result<Self, String> {
        let name_ok = !r.name.is_empty()
            && r.name.len() <= 253
            && r.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !name_ok {
            return Err(format!(
                "limit name {:?} must be 1-253 characters of [A-Za-z0-9._-]",
                r.name
            ));
        }
        let n = &r.name;
        if r.connections.is_none()
            && r.connections_per_second.is_none()
            && r.requests_per_second.is_none()
        {
            return Err(format!(
                "limit {n:?} sets no limit: give connections, connectionsPerSecond or requestsPerSecond"
            ));
        }
        let positive = |what: &str, v: Option<f64>| match v {
            Some(x) if !(x.is_finite() && x > 0.0 && x <= MAX_VALUE) => Err(format!(
                "limit {n:?}: {what} must be a number above 0 and at most {MAX_VALUE}"
            )),
            _ => Ok(()),
        };
        positive("connections", r.connections.map(f64::from))?;
        positive("connectionsPerSecond", r.connections_per_second)?;
        positive("requestsPerSecond", r.requests_per_second)?;
        positive("burst", r.burst.map(f64::from))?;
        if r.burst.is_some() && r.requests_per_second.is_none() {
            return Err(format!(
                "limit {n:?}: `burst` belongs to `requestsPerSecond`, which is not set"
            ));
        }
        if r.from.as_ref().is_some_and(Vec::is_empty) {
            return Err(format!(
                "limit {n:?}: `from: []` matches no caller; omit `from` for every caller"
            ));
        }
        if r.ports.as_ref().is_some_and(Vec::is_empty) {
            return Err(format!(
                "limit {n:?}: `ports: []` matches no port; omit `ports` for every port"
            ));
        }
        Ok(Self {
            name: r.name,
            selector: r.selector,
            from: r.from,
            ports: r.ports,
            connections: r.connections,
            connections_per_second: r.connections_per_second,
            requests_per_second: r.requests_per_second,
            burst: r.burst,
        })
    }
}

impl Limit {
    /// The bucket of `requestsPerSecond` (burst default: one second's worth, at least 1).
    pub(crate) fn request_gcra(&self) -> Option<Gcra> {
        let rate = self.requests_per_second?;
        let burst = self.burst.unwrap_or_else(|| rate.ceil() as u32).max(1);
        Some(Gcra::new(rate, burst))
    }

    /// The bucket of `connectionsPerSecond` (one second's worth, at least 1).
    pub(crate) fn connection_gcra(&self) -> Option<Gcra> {
        let rate = self.connections_per_second?;
        Some(Gcra::new(rate, (rate.ceil() as u32).max(1)))
    }

    /// What identifies the limit's counters across reloads: name, callers and ports.
    fn scope(&self) -> String {
        format!("{}\n{:?}\n{:?}", self.name, self.from, self.ports)
    }
}

/// A limit with where it came from.
#[derive(Debug, Clone)]
pub struct SourcedLimit {
    /// The limit.
    pub limit: Limit,
    /// Its file.
    pub file: std::path::PathBuf,
}

/// Which kind of limit was exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum LimitKind {
    /// `connections` (concurrent).
    #[serde(rename = "connections")]
    Connections,
    /// `connectionsPerSecond`.
    #[serde(rename = "connectionsPerSecond")]
    ConnectionsPerSecond,
    /// `requestsPerSecond`.
    #[serde(rename = "requestsPerSecond")]
    RequestsPerSecond,
}

impl LimitKind {
    /// The field name, also the metric label (`connections`, `connectionsPerSecond`,
    /// `requestsPerSecond`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::ConnectionsPerSecond => "connectionsPerSecond",
            Self::RequestsPerSecond => "requestsPerSecond",
        }
    }
}

/// A connection or request over a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    /// The limit's name.
    pub limit: Arc<str>,
    /// Which of its limits.
    pub kind: LimitKind,
    /// When a retry could pass (rates; `connections`: 1 s, a guess).
    pub retry_after: Duration,
}

/// A compiled limit: matchers, buckets and its counters.
#[derive(Debug)]
pub(crate) struct CLimit {
    pub name: Arc<str>,
    pub from: Option<Vec<CFrom>>,
    pub ports: Option<PortSet>,
    pub connections: Option<u32>,
    pub conn_rate: Option<Gcra>,
    pub req_rate: Option<Gcra>,
    pub scope: String,
    pub state: Arc<LimitState>,
}

impl CLimit {
    fn matches(&self, req: &Request<'_>) -> bool {
        if let Some(ports) = &self.ports {
            if !req.destination_port.is_some_and(|p| ports.matches(p)) {
                return false;
            }
        }
        match &self.from {
            None => true,
            Some(from) => {
                let c = Ctx::new(req, None);
                from.iter().any(|f| check_from(f, &c).is_ok())
            }
        }
    }
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// The limits of a compiled policy, for one local ID. Empty (the default): unlimited.
#[derive(Debug)]
pub struct CompiledLimits {
    limits: Vec<CLimit>,
    generation: u64,
    any_requests: bool,
}

impl Default for CompiledLimits {
    fn default() -> Self {
        Self {
            limits: Vec::new(),
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            any_requests: false,
        }
    }
}

/// The limits that apply to one caller on one port (ordinals into the compiled list).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    connections: Option<usize>,
    conn_rate: Option<usize>,
    req_rate: Option<usize>,
}

/// One limit as it applies to a caller (`policy check`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AppliedLimit {
    /// The limit's name.
    pub name: String,
    /// Which kind.
    pub kind: LimitKind,
    /// The number (connections, or per second).
    pub value: f64,
    /// `requestsPerSecond`: the bucket size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// A connection admitted under its limits: holds its `connections` slot until dropped.
#[derive(Debug, Default)]
pub struct Admitted {
    _slot: Option<ConnSlot>,
}

/// The `requestsPerSecond` bucket of one caller under one compiled set (cache it per connection
/// and resolve again when [`CompiledLimits::generation`] changes).
#[derive(Debug, Clone)]
pub struct RequestBucket {
    name: Arc<str>,
    gcra: Gcra,
    entry: Arc<Entry>,
}

impl RequestBucket {
    /// Takes one request from the bucket, or says when one could pass. Lock-free, no
    /// allocation unless exceeded.
    #[inline]
    pub fn take(&self, now: Duration) -> Result<(), Exceeded> {
        self.gcra
            .take(&self.entry.req_tat, now)
            .map_err(|retry_after| Exceeded {
                limit: self.name.clone(),
                kind: LimitKind::RequestsPerSecond,
                retry_after,
            })
    }
}

/// The caller's counter key: its SPIFFE ID, or its source IP when unauthenticated.
fn caller_key(req: &Request<'_>) -> CallerKey {
    match (req.peer, req.source_ip) {
        (Some(id), _) => CallerKey::Id(id.as_str().into()),
        (None, Some(ip)) => CallerKey::Ip(ip),
        (None, None) => CallerKey::Anonymous,
    }
}

impl CompiledLimits {
    /// Compiles the limits selected for `local`.
    pub(crate) fn compile(limits: &[SourcedLimit], local: &svidcar_agent::SpiffeId) -> Self {
        let limits: Vec<CLimit> = limits
            .iter()
            .map(|s| &s.limit)
            .filter(|l| {
                l.selector
                    .as_ref()
                    .and_then(|s| s.spiffe_ids.as_ref())
                    .is_none_or(|pats| pats.iter().any(|p| p.matches(local)))
            })
            .map(|l| CLimit {
                name: l.name.as_str().into(),
                from: l
                    .from
                    .as_ref()
                    .map(|v| v.iter().map(compile_from).collect()),
                ports: l.ports.as_deref().map(PortSet::new),
                connections: l.connections,
                conn_rate: l.connection_gcra(),
                req_rate: l.request_gcra(),
                scope: l.scope(),
                state: Arc::new(LimitState::new(MAX_TRACKED_CALLERS)),
            })
            .collect();
        Self {
            any_requests: limits.iter().any(|l| l.req_rate.is_some()),
            limits,
            ..Self::default()
        }
    }

    /// Takes over the counters of `prev` for every limit whose name, callers and ports are
    /// unchanged (hot reload).
    pub fn adopt(&mut self, prev: &CompiledLimits) {
        for l in &mut self.limits {
            if let Some(p) = prev.limits.iter().find(|p| p.scope == l.scope) {
                l.state = p.state.clone();
            }
        }
    }

    /// No limit at all (the default: unlimited).
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Some limit sets `requestsPerSecond`.
    #[inline]
    pub fn limits_requests(&self) -> bool {
        self.any_requests
    }

    /// Identifies this compiled set (changes on every reload).
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The limits of each kind that apply to `req`'s caller and port.
    pub fn applied(&self, req: &Request<'_>) -> Applied {
        let mut a = Applied::default();
        for (i, l) in self.limits.iter().enumerate() {
            let want = (l.connections.is_some() && a.connections.is_none())
                || (l.conn_rate.is_some() && a.conn_rate.is_none())
                || (l.req_rate.is_some() && a.req_rate.is_none());
            if !want || !l.matches(req) {
                continue;
            }
            if l.connections.is_some() {
                a.connections.get_or_insert(i);
            }
            if l.conn_rate.is_some() {
                a.conn_rate.get_or_insert(i);
            }
            if l.req_rate.is_some() {
                a.req_rate.get_or_insert(i);
            }
        }
        a
    }

    /// The limits that apply to `req`, for `policy check`.
    pub fn describe(&self, req: &Request<'_>) -> Vec<AppliedLimit> {
        let a = self.applied(req);
        let mut out = Vec::new();
        if let Some(l) = a.connections.map(|i| &self.limits[i]) {
            out.push(AppliedLimit {
                name: l.name.to_string(),
                kind: LimitKind::Connections,
                value: f64::from(l.connections.unwrap_or_default()),
                burst: None,
            });
        }
        if let Some(l) = a.conn_rate.map(|i| &self.limits[i]) {
            out.push(AppliedLimit {
                name: l.name.to_string(),
                kind: LimitKind::ConnectionsPerSecond,
                value: l.conn_rate.map_or(0.0, |g| g.rate()),
                burst: None,
            });
        }
        if let Some(l) = a.req_rate.map(|i| &self.limits[i]) {
            out.push(AppliedLimit {
                name: l.name.to_string(),
                kind: LimitKind::RequestsPerSecond,
                value: l.req_rate.map_or(0.0, |g| g.rate()),
                burst: l.req_rate.map(|g| g.burst()),
            });
        }
        out
    }

    /// Admits a new connection of `req`'s caller at `now` (see [`bucket::now`]): takes a
    /// `connections` slot, then a `connectionsPerSecond` token. The slot is released when the
    /// returned guard drops.
    pub fn admit(&self, req: &Request<'_>, now: Duration) -> Result<Admitted, Exceeded> {
        if self.limits.is_empty() {
            return Ok(Admitted::default());
        }
        let a = self.applied(req);
        if a.connections.is_none() && a.conn_rate.is_none() {
            return Ok(Admitted::default());
        }
        let key = caller_key(req);
        let mut slot = None;
        if let Some(l) = a.connections.map(|i| &self.limits[i]) {
            let entry = l.state.entry(&key, now);
            let max = l.connections.unwrap_or(u32::MAX);
            slot = Some(ConnSlot::acquire(entry, max).ok_or_else(|| Exceeded {
                limit: l.name.clone(),
                kind: LimitKind::Connections,
                retry_after: Duration::from_secs(1),
            })?);
        }
        if let Some(l) = a.conn_rate.map(|i| &self.limits[i]) {
            let entry = l.state.entry(&key, now);
            if let Some(g) = l.conn_rate {
                g.take(&entry.conn_tat, now)
                    .map_err(|retry_after| Exceeded {
                        limit: l.name.clone(),
                        kind: LimitKind::ConnectionsPerSecond,
                        retry_after,
                    })?;
            }
        }
        Ok(Admitted { _slot: slot })
    }

    /// The `requestsPerSecond` bucket of `req`'s caller, if a limit applies.
    pub fn request_bucket(&self, req: &Request<'_>, now: Duration) -> Option<RequestBucket> {
        if !self.any_requests {
            return None;
        }
        let l = &self.limits[self.applied(req).req_rate?];
        Some(RequestBucket {
            name: l.name.clone(),
            gcra: l.req_rate?,
            entry: l.state.entry(&caller_key(req), now),
        })
    }

    /// Callers tracked and overflow events per limit name (for tests and `/policy`).
    pub fn tracked(&self) -> Vec<(String, usize, u64)> {
        self.limits
            .iter()
            .map(|l| (l.name.to_string(), l.state.len(), l.state.overflowed()))
            .collect()
    }
}

#[cfg(test)]
mod tests;
