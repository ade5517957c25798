//! The policy engine ([`crate::policy`]) behind the data plane's [`Authorizer`] seam (L4).
//!
//! Policies are compiled for this proxy's own SPIFFE ID, which is known only once the first
//! SVID arrives: until then every connection is denied (`policy:not-loaded`) and the proxy is not
//! ready. After that the policy watcher hot-reloads the files (a bad file is rejected and the old
//! policy stays), and every new set is applied to the open non-HTTP connections
//! ([`crate::policy_change`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use svidcar_agent::SpiffeId;

use crate::authz::{Authorizer, ConnAttrs, EgressAttrs, Verdict};
use crate::conn_registry::{ConnRegistry, OpenAttrs, OpenConn};
use crate::credentials::Credentials;
use crate::limits::{Admission, LimitMetrics};
use crate::policy::limits::Exceeded;
use crate::policy::{
    self, CompiledPolicy, Direction, PolicyLoadError, PolicySet, Protocol, Request,
};
use crate::policy_change::{self, PolicyMetrics, WatcherCounts};

/// The compiled policy in force, for one local ID.
struct Active {
    local_id: SpiffeId,
    policy: Arc<ArcSwap<CompiledPolicy>>,
    _watcher: policy::PolicyWatcher,
    _follower: policy_change::Follower,
}

/// Inbound authorization by the policy files at `path`.
pub struct PolicyAuthorizer {
    path: PathBuf,
    active: ArcSwapOption<Active>,
    /// Open non-HTTP connections (re-evaluated on a policy change).
    open: ConnRegistry,
    metrics: PolicyMetrics,
    limit_metrics: LimitMetrics,
    registry: prometheus_client::registry::Registry,
}

impl PolicyAuthorizer {
    /// Loads and validates `path` once (startup fails on a bad set); the watcher starts when the
    /// first SVID is installed (see [`PolicyAuthorizer::follow`]).
    pub fn new(path: PathBuf) -> Result<Arc<Self>, PolicyLoadError> {
        PolicySet::load(&path)?;
        let metrics = PolicyMetrics::default();
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let limit_metrics = LimitMetrics::default();
        limit_metrics.register(&mut registry);
        Ok(Arc::new(Self {
            path,
            active: ArcSwapOption::empty(),
            open: ConnRegistry::default(),
            metrics,
            limit_metrics,
            registry,
        }))
    }

    /// Waits for our SPIFFE ID and (re)compiles the policy for it; call inside the data-plane
    /// runtime.
    pub async fn follow(self: Arc<Self>, creds: Arc<Credentials>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let Some(own) = creds.current().map(|c| c.id.clone()) else {
                continue;
            };
            let current = self.active.load();
            if current.as_ref().is_some_and(|a| a.local_id == own) {
                continue;
            }
            match policy::spawn_watcher(self.path.clone(), own.clone()) {
                Ok(w) => {
                    tracing::info!(path = %self.path.display(), local_id = %own, "authorization policy in force");
                    let policy = w.handle();
                    let reloads = Arc::default();
                    self.metrics.reloads.follow(WatcherCounts {
                        errors: w.reload_errors_counter(),
                        reloads: Arc::clone(&reloads),
                    });
                    let follower = policy_change::follow(w.subscribe(), self.open.clone(), reloads);
                    let first = w.current();
                    let old = self.active.swap(Some(Arc::new(Active {
                        local_id: own,
                        policy,
                        _watcher: w,
                        _follower: follower,
                    })));
                    if old.is_some() {
                        // A new local ID: a newly compiled set for the open connections too.
                        policy_change::reevaluate(&self.open, &first);
                    }
                }
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, "policy failed to load; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

impl Authorizer for PolicyAuthorizer {
    fn authorize_inbound(&self, conn: &ConnAttrs<'_>) -> Verdict {
        let Some(active) = self.active.load_full() else {
            return Verdict::deny("policy:not-loaded");
        };
        let mut req = Request::new(Direction::Inbound, Protocol::Tcp);
        req.peer = conn.peer;
        req.source_ip = Some(conn.src.ip());
        req.destination_ip = Some(conn.dst.ip());
        req.destination_port = Some(conn.app_port);
        let decision = active.policy.load().decide(&req);
        policy::log_decision(&req, &decision);
        self.metrics.record(req.direction, &decision);
        Verdict {
            allow: decision.allow,
            rule: decision.reason.to_string(),
        }
    }

    fn authorize_request(
        &self,
        conn: &ConnAttrs<'_>,
        http: &crate::http::HttpAttrs<'_>,
    ) -> Verdict {
        let Some(active) = self.active.load_full() else {
            return Verdict::deny("policy:not-loaded");
        };
        let compiled = active.policy.load();
        let host = http.host.map(policy::normalize_name);
        let headers = crate::http::Headers(http.headers);
        let protocol = if http.grpc {
            Protocol::Grpc
        } else {
            Protocol::Http
        };
        let mut req = Request::new(Direction::Inbound, protocol);
        req.peer = conn.peer;
        req.source_ip = Some(conn.src.ip());
        req.destination_ip = Some(conn.dst.ip());
        req.destination_port = Some(conn.app_port);
        req.method = Some(http.method);
        req.path = Some(http.path);
        req.host = host.as_deref();
        req.headers = &headers;
        let decision = compiled.decide(&req);
        policy::log_decision(&req, &decision);
        self.metrics.record(req.direction, &decision);
        Verdict {
            allow: decision.allow,
            rule: decision.reason.to_string(),
        }
    }

    fn authorize_egress(&self, conn: &EgressAttrs<'_>) -> Verdict {
        let Some(active) = self.active.load_full() else {
            return Verdict::deny("policy:not-loaded");
        };
        let compiled = active.policy.load();
        let protocol = if conn.http.is_some() {
            Protocol::Http
        } else if conn.sni.is_some() {
            Protocol::Tls
        } else if conn.connect.is_some() {
            Protocol::Connect
        } else {
            Protocol::Tcp
        };
        let sni = conn.sni.map(policy::normalize_name);
        let connect = conn.connect.map(policy::normalize_name);
        let host = conn.http.and_then(|h| h.host).map(policy::normalize_name);
        let mut req = Request::new(Direction::Egress, protocol);
        req.source_ip = Some(conn.src.ip());
        req.destination_ip = conn.dst_ip;
        req.destination_port = Some(conn.dst_port);
        req.destination_spiffe_id = conn.destination_id;
        req.sni = sni.as_deref();
        req.connect_authority = connect.as_deref();
        req.host = host.as_deref();
        req.method = conn.http.map(|h| h.method);
        req.path = conn.http.map(|h| h.path);
        let decision = compiled.decide(&req);
        policy::log_decision(&req, &decision);
        self.metrics.record(req.direction, &decision);
        Verdict {
            allow: decision.allow,
            rule: decision.reason.to_string(),
        }
    }

    fn authorize_inbound_open(&self, conn: &ConnAttrs<'_>) -> (Verdict, Option<OpenConn>) {
        // Registered before deciding: a policy swap cannot slip between decision and copy.
        let guard = self.open.register(OpenAttrs::inbound(conn));
        let verdict = self.authorize_inbound(conn);
        let guard = verdict.allow.then_some(guard);
        (verdict, guard)
    }

    fn authorize_egress_open(&self, conn: &EgressAttrs<'_>) -> (Verdict, Option<OpenConn>) {
        if conn.http.is_some() {
            // Plaintext HTTP egress is decided per request.
            return (self.authorize_egress(conn), None);
        }
        let guard = self.open.register(OpenAttrs::egress(conn));
        let verdict = self.authorize_egress(conn);
        let guard = verdict.allow.then_some(guard);
        (verdict, guard)
    }

    fn admit(&self, conn: &ConnAttrs<'_>) -> Result<Admission, Exceeded> {
        let guard = self.active.load();
        let Some(active) = guard.as_ref() else {
            return Ok(Admission::unlimited()); // not loaded: every connection is denied anyway
        };
        let compiled = active.policy.load();
        let limits = compiled.limits();
        if limits.is_empty() {
            return Ok(Admission::new(
                Default::default(),
                limits.generation(),
                None,
            ));
        }
        let mut req = Request::new(Direction::Inbound, Protocol::Tcp);
        req.peer = conn.peer;
        req.source_ip = Some(conn.src.ip());
        req.destination_ip = Some(conn.dst.ip());
        req.destination_port = Some(conn.app_port);
        let now = policy::limits::now();
        let held = limits.admit(&req, now).inspect_err(|e| {
            self.limit_metrics.exceeded(e);
        })?;
        let bucket = limits.request_bucket(&req, now);
        Ok(Admission::new(held, limits.generation(), bucket))
    }

    #[inline]
    fn limit_request(&self, conn: &ConnAttrs<'_>, admission: &Admission) -> Result<(), Exceeded> {
        let guard = self.active.load();
        let Some(active) = guard.as_ref() else {
            return Ok(()); // not loaded: every request is denied anyway
        };
        let compiled = active.policy.load();
        let limits = compiled.limits();
        if !limits.limits_requests() {
            return Ok(());
        }
        let now = policy::limits::now();
        let cached = admission.requests.load();
        let result = if cached.generation == limits.generation() {
            cached.bucket.as_ref().map_or(Ok(()), |b| b.take(now))
        } else {
            // A reloaded set: resolve the caller's bucket again (once per connection).
            let mut req = Request::new(Direction::Inbound, Protocol::Http);
            req.peer = conn.peer;
            req.source_ip = Some(conn.src.ip());
            req.destination_ip = Some(conn.dst.ip());
            req.destination_port = Some(conn.app_port);
            let bucket = limits.request_bucket(&req, now);
            let r = bucket.as_ref().map_or(Ok(()), |b| b.take(now));
            admission
                .requests
                .store(Arc::new(crate::limits::CachedBucket {
                    generation: limits.generation(),
                    bucket,
                }));
            r
        };
        result.inspect_err(|e| self.limit_metrics.exceeded(e))
    }

    fn metrics_registry(&self) -> Option<&prometheus_client::registry::Registry> {
        Some(&self.registry)
    }

    fn normalize_path(&self, raw: &str) -> Result<Option<String>, &'static str> {
        let Some(active) = self.active.load_full() else {
            return Ok(None); // not loaded: every request is denied anyway
        };
        let settings = active.policy.load().settings();
        settings
            .normalize_path(raw)
            .map(Some)
            .map_err(|e| e.reason())
    }

    fn recorded_headers(
        &self,
        headers: &http::HeaderMap,
    ) -> std::collections::BTreeMap<String, String> {
        let Some(active) = self.active.load_full() else {
            return Default::default();
        };
        active
            .policy
            .load()
            .recorded_headers(&crate::http::Headers(headers))
    }

    fn policy_json(&self) -> serde_json::Value {
        match self.active.load_full() {
            Some(a) => serde_json::json!({
                "path": self.path.display().to_string(),
                "effective": a.policy.load().describe(),
            }),
            None => serde_json::json!({ "path": self.path.display().to_string(), "loaded": false }),
        }
    }

    fn ready(&self) -> bool {
        self.active.load().is_some()
    }

    fn describe(&self) -> String {
        format!(
            "authorization policy from {} (hot-reloaded)",
            self.path.display()
        )
    }
}
