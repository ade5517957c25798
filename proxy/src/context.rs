//! What every connection handler needs: credentials, the authorizer, metrics, limits, the
//! connection limit and the shutdown signal; and the access log record of one connection.

use std::net::SocketAddr;
use std::sync::Arc;

use svidcar_agent::SpiffeId;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::access_log::AccessRecord;
use crate::authz::{Authorizer, ConnAttrs, EgressAttrs, Verdict};
use crate::config::Limits;
use crate::copy::{CopyEnd, CopyStats};
use crate::credentials::Credentials;
use crate::metrics::Metrics;

/// Shared state of the data plane.
pub struct ProxyContext {
    /// The live SVID and configs.
    pub creds: Arc<Credentials>,
    /// Inbound authorization.
    pub authz: Arc<dyn Authorizer>,
    /// Metrics.
    pub metrics: Metrics,
    /// Timeouts and limits.
    pub limits: Limits,
    /// One permit per open connection.
    pub conns: Arc<Semaphore>,
    /// Becomes `true` when the proxy drains: listeners stop accepting.
    pub shutdown: watch::Receiver<bool>,
    /// Pooled HTTP clients to local apps (`http` ports).
    pub app_clients: crate::http::AppClients,
    /// Pooled, multiplexed mTLS to peer proxies (`None`: one handshake per connection, and
    /// inbound does not offer `svidcar-mux/1`).
    pub pool: Option<Arc<crate::mux::client::Pool>>,
    /// Bounds on inbound multiplexed connections.
    pub mux: crate::mux::server::CarrierLimits,
}

impl ProxyContext {
    /// Accepts connections on `listener` until shutdown, enforcing the connection limit, and
    /// spawns `handle` for each.
    pub async fn accept_loop<F, Fut>(
        self: Arc<Self>,
        listener: TcpListener,
        direction: &'static str,
        handle: F,
    ) where
        F: Fn(Arc<Self>, TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut shutdown = self.shutdown.clone();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(direction, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let permit = match self.conns.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    self.metrics.overloaded.inc();
                    self.metrics.connection(direction, "overloaded");
                    tracing::warn!(target: "access", direction, src = %peer, outcome = "refused", reason = "connection limit reached");
                    reset(stream);
                    continue;
                }
            };
            let metrics = self.metrics.clone();
            metrics.open_connections.inc();
            let conn = handle(self.clone(), stream, peer, permit);
            tokio::spawn(async move {
                conn.await;
                metrics.open_connections.dec();
            });
        }
    }
}

/// Closes with a TCP RST (SO_LINGER 0) instead of a FIN: an explicit refusal.
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// One access log line (target `access`) and the matching metrics for a connection.
pub struct Access {
    /// `inbound` | `outbound` | `egress`.
    pub direction: &'static str,
    /// Connecting side.
    pub src: SocketAddr,
    /// Destination (listener, original destination or upstream).
    pub dst: String,
    /// The peer's SPIFFE ID (inbound: the client; outbound: the server).
    pub peer_id: Option<SpiffeId>,
    /// Our ID.
    pub own_id: Option<SpiffeId>,
    /// Rule or default that decided, if any.
    pub rule: Option<String>,
    /// What the mTLS session negotiated (`None`: plaintext, or no handshake yet).
    pub tls: Option<crate::tls_session::TlsFacts>,
    /// When the connection was accepted.
    pub start: Instant,
    /// The JSON access-log record (only when one is configured, see [`crate::access_log`]).
    pub record: Option<Box<AccessRecord>>,
}

impl Access {
    /// Starts a record.
    pub fn new(direction: &'static str, src: SocketAddr, dst: String) -> Self {
        let record =
            crate::access_log::enabled().then(|| Box::new(connection_record(direction, src, &dst)));
        Self {
            direction,
            src,
            dst,
            peer_id: None,
            own_id: None,
            rule: None,
            tls: None,
            start: Instant::now(),
            record,
        }
    }

    /// Records what an inbound decision sees (JSON access log).
    pub fn saw_inbound(&mut self, attrs: &ConnAttrs<'_>, protocol: crate::policy::Protocol) {
        if let Some(r) = &mut self.record {
            r.saw_inbound(attrs, protocol);
        }
    }

    /// Records what an egress decision sees (JSON access log).
    pub fn saw_egress(&mut self, attrs: &EgressAttrs<'_>) {
        if let Some(r) = &mut self.record {
            r.saw_egress(attrs);
        }
    }

    /// Records the connection facts of an `http` port, decided per request (JSON access log).
    pub fn saw_http_port(&mut self, facts: &crate::http::ConnFacts) {
        if let Some(r) = &mut self.record {
            r.protocol = Some(crate::policy::Protocol::Http);
            r.dst_ip = Some(facts.dst.ip());
            r.dst_port = Some(facts.app_port);
        }
    }

    /// Writes the JSON access-log record, if one is configured.
    fn emit(&self, outcome: &str, fill: impl FnOnce(&mut AccessRecord)) {
        let Some(mut r) = self.record.as_deref().cloned() else {
            return;
        };
        if let Some(id) = &self.own_id {
            r.local_id = Some(id.as_str().to_string());
        }
        if let Some(id) = &self.peer_id {
            r.peer_id = Some(id.as_str().to_string());
        }
        fill(&mut r);
        r.emit(outcome);
    }

    /// Logs a connection that was refused or failed before any byte was forwarded.
    pub fn refused(&self, metrics: &Metrics, outcome: &'static str, reason: &str) {
        metrics.connection(self.direction, outcome);
        tracing::warn!(
            target: "access",
            direction = self.direction,
            src = %self.src,
            dst = %self.dst,
            peer_id = self.peer_id.as_ref().map(|i| i.as_str()).unwrap_or("-"),
            own_id = self.own_id.as_ref().map(|i| i.as_str()).unwrap_or("-"),
            rule = self.rule.as_deref().unwrap_or("-"),
            outcome,
            reason,
            tls_protocol = self.tls.map_or("-", |t| t.protocol),
            tls_cipher = self.tls.map_or("-", |t| t.cipher),
            tls_group = self.tls.map_or("-", |t| t.group),
            duration_ms = self.start.elapsed().as_millis() as u64,
            "connection refused"
        );
        self.emit(outcome, |r| r.reason = Some(reason.to_string()));
    }

    /// Logs a connection refused because no valid SVID is held.
    pub fn refused_no_identity(&self, metrics: &Metrics) {
        self.refused(
            metrics,
            "no_identity",
            "no valid SVID held (agent unreachable and SVID expired?)",
        );
    }

    /// Records a policy decision (rule and decision metric, policy direction `dir`); returns
    /// whether it allows the connection.
    pub fn decided(&mut self, metrics: &Metrics, dir: &'static str, verdict: &Verdict) -> bool {
        self.rule = Some(verdict.rule.clone());
        if let Some(r) = &mut self.record {
            r.decided(verdict);
        }
        metrics.decision(dir, verdict.allow, &verdict.rule);
        verdict.allow
    }

    /// Logs and counts the reset of an open connection that a new policy denies (POLICY.md §6).
    fn policy_reset(&self, metrics: &Metrics, rule: &str) {
        // The policy direction: mesh `outbound` connections are decided as `egress`.
        let direction = match self.direction {
            "inbound" => "inbound",
            _ => "egress",
        };
        metrics
            .policy_change_resets
            .get_or_create(&crate::metrics::DirLabels { direction })
            .inc();
        tracing::warn!(
            target: "access",
            event = "connection_reset",
            reason = "policy_change",
            rule,
            direction = self.direction,
            src = %self.src,
            dst = %self.dst,
            peer_id = self.peer_id.as_ref().map(|i| i.as_str()).unwrap_or("-"),
            allowed_by = self.rule.as_deref().unwrap_or("-"),
            duration_ms = self.start.elapsed().as_millis() as u64,
            "connection_reset: a new policy denies this open connection"
        );
    }

    /// Logs a proxied connection when it ends (`rx` = bytes from the connecting side).
    pub fn finished(&self, metrics: &Metrics, stats: &CopyStats) {
        metrics.connection(self.direction, "allowed");
        metrics.add_bytes(self.direction, stats.a_to_b, stats.b_to_a);
        self.emit("allowed", |r| {
            r.bytes_in = Some(stats.a_to_b);
            r.bytes_out = Some(stats.b_to_a);
            let (end, reason) = match &stats.end {
                CopyEnd::Closed => ("closed", None),
                CopyEnd::IdleTimeout => ("idle_timeout", None),
                CopyEnd::Error(e) => ("error", Some(e.clone())),
                CopyEnd::PolicyReset(rule) => ("policy_reset", Some(format!("reset by {rule}"))),
            };
            r.end = Some(end.to_string());
            r.reason = reason;
        });
        let end = match &stats.end {
            CopyEnd::Closed => "closed".to_string(),
            CopyEnd::IdleTimeout => "idle timeout".to_string(),
            CopyEnd::Error(e) => format!("error: {e}"),
            CopyEnd::PolicyReset(rule) => {
                self.policy_reset(metrics, rule);
                format!("reset: policy change ({rule})")
            }
        };
        tracing::info!(
            target: "access",
            direction = self.direction,
            src = %self.src,
            dst = %self.dst,
            peer_id = self.peer_id.as_ref().map(|i| i.as_str()).unwrap_or("-"),
            own_id = self.own_id.as_ref().map(|i| i.as_str()).unwrap_or("-"),
            rule = self.rule.as_deref().unwrap_or("-"),
            outcome = "allowed",
            tls_protocol = self.tls.map_or("-", |t| t.protocol),
            tls_cipher = self.tls.map_or("-", |t| t.cipher),
            tls_group = self.tls.map_or("-", |t| t.group),
            bytes_rx = stats.a_to_b,
            bytes_tx = stats.b_to_a,
            end = %end,
            duration_ms = self.start.elapsed().as_millis() as u64,
            "connection"
        );
    }
}

/// The record of a connection accepted on `direction` (`inbound` | `outbound` | `egress`).
fn connection_record(direction: &str, src: SocketAddr, dst: &str) -> AccessRecord {
    use crate::policy::Direction;
    let policy_dir = match direction {
        "inbound" => Direction::Inbound,
        _ => Direction::Egress,
    };
    let mut r = AccessRecord::new(crate::access_log::Kind::Connection, policy_dir);
    r.mesh = direction == "outbound";
    r.src_ip = Some(src.ip());
    r.src_port = Some(src.port());
    if let Ok(d) = dst.parse::<SocketAddr>() {
        r.dst_ip = Some(d.ip());
        r.dst_port = Some(d.port());
    }
    r
}
