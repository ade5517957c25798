//! What happens around a policy decision besides the decision itself (POLICY.md §6):
//! re-evaluating open non-HTTP connections when a new set is swapped in
//! (`settings.onPolicyChange`), and the policy metrics under their exact POLICY.md names
//! (`svidcar_policy_*`, `svidcar_authz_*`: not under the proxy's `svidcar_proxy_` prefix).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::conn_registry::{ConnRegistry, OpenAttrs};
use crate::policy::{self, CompiledPolicy, Decision, Direction, OnPolicyChange, Protocol, Request};

/// Labels of `svidcar_authz_dry_run_mismatch_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DryRunLabels {
    /// `inbound` | `egress`.
    pub direction: &'static str,
    /// The enforced decision: `allow` | `deny`.
    pub actual: &'static str,
    /// The dry-run (shadow) decision: `allow` | `deny`.
    pub shadow: &'static str,
    /// The rule or default that decided the shadow decision.
    pub rule: String,
}

/// Labels of `svidcar_authz_audit_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditLabels {
    /// `inbound` | `egress`.
    pub direction: &'static str,
    /// The matching audit rule.
    pub rule: String,
}

/// Reload counters: those of the watcher in force plus those of replaced watchers.
#[derive(Debug, Default)]
pub struct ReloadCounts {
    retired_errors: AtomicU64,
    retired_reloads: AtomicU64,
    current: arc_swap::ArcSwapOption<WatcherCounts>,
}

/// The counters of one policy watcher.
#[derive(Debug)]
pub struct WatcherCounts {
    /// From [`policy::PolicyWatcher::reload_errors_counter`].
    pub errors: Arc<AtomicU64>,
    /// Successful reloads, counted by the follower task.
    pub reloads: Arc<AtomicU64>,
}

impl ReloadCounts {
    /// Follows a new watcher; the counts of the previous one are kept (counters never go back).
    pub fn follow(&self, counts: WatcherCounts) {
        if let Some(old) = self.current.swap(Some(Arc::new(counts))) {
            self.retired_errors
                .fetch_add(old.errors.load(Ordering::Relaxed), Ordering::Relaxed);
            self.retired_reloads
                .fetch_add(old.reloads.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    fn totals(&self) -> (u64, u64) {
        let cur = self.current.load();
        let (e, r) = cur.as_ref().map_or((0, 0), |c| {
            (
                c.errors.load(Ordering::Relaxed),
                c.reloads.load(Ordering::Relaxed),
            )
        });
        (
            self.retired_errors.load(Ordering::Relaxed) + e,
            self.retired_reloads.load(Ordering::Relaxed) + r,
        )
    }
}

#[derive(Debug)]
struct ReloadCollector(Arc<ReloadCounts>);

impl Collector for ReloadCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let (errors, reloads) = self.0.totals();
        for (name, help, v) in [
            (
                "svidcar_policy_reload_errors",
                "Policy reloads rejected (the previous policy stayed in force)",
                errors,
            ),
            (
                "svidcar_policy_reloads",
                "Policy sets swapped in by hot reload (not counting the first load)",
                reloads,
            ),
        ] {
            let c = ConstCounter::new(v);
            let m = encoder.encode_descriptor(name, help, None, c.metric_type())?;
            c.encode(m)?;
        }
        Ok(())
    }
}

/// The policy metrics of POLICY.md (cheap to clone).
#[derive(Clone, Debug, Default)]
pub struct PolicyMetrics {
    /// `svidcar_authz_dry_run_mismatch_total{direction,actual,shadow,rule}`.
    pub dry_run_mismatch: Family<DryRunLabels, Counter>,
    /// `svidcar_authz_audit_total{direction,rule}`: matches of audit rules.
    pub audit: Family<AuditLabels, Counter>,
    /// `svidcar_policy_reload_errors_total`, `svidcar_policy_reloads_total`.
    pub reloads: Arc<ReloadCounts>,
}

fn label(allow: bool) -> &'static str {
    if allow {
        "allow"
    } else {
        "deny"
    }
}

fn dir_label(d: Direction) -> &'static str {
    match d {
        Direction::Inbound => "inbound",
        Direction::Egress => "egress",
    }
}

impl PolicyMetrics {
    /// Counts the dry-run and audit parts of a decision that was enforced.
    pub fn record(&self, direction: Direction, d: &Decision) {
        let direction = dir_label(direction);
        if let Some(s) = &d.shadow {
            self.dry_run_mismatch
                .get_or_create(&DryRunLabels {
                    direction,
                    actual: label(d.allow),
                    shadow: label(s.allow),
                    rule: s.reason.to_string(),
                })
                .inc();
        }
        for rule in &d.audit {
            self.audit
                .get_or_create(&AuditLabels {
                    direction,
                    rule: rule.to_string(),
                })
                .inc();
        }
    }

    /// Registers the metrics in `root`, which must have no prefix (full names are used).
    pub fn register(&self, root: &mut Registry) {
        root.register(
            "svidcar_authz_dry_run_mismatch",
            "Decisions where the dry-run (shadow) decision differs from the enforced one",
            self.dry_run_mismatch.clone(),
        );
        root.register(
            "svidcar_authz_audit",
            "Matches of audit rules",
            self.audit.clone(),
        );
        root.register_collector(Box::new(ReloadCollector(self.reloads.clone())));
    }
}

/// Decides an open connection again with `policy`, from its original attributes.
pub fn decide_open(policy: &CompiledPolicy, attrs: &OpenAttrs) -> Decision {
    match attrs {
        OpenAttrs::Inbound {
            peer,
            src,
            dst,
            app_port,
        } => {
            let mut req = Request::new(Direction::Inbound, Protocol::Tcp);
            req.peer = peer.as_ref();
            req.source_ip = Some(src.ip());
            req.destination_ip = Some(dst.ip());
            req.destination_port = Some(*app_port);
            policy.decide(&req)
        }
        OpenAttrs::Egress {
            src,
            dst_ip,
            dst_port,
            destination_id,
            sni,
            connect,
        } => {
            // As `PolicyAuthorizer::authorize_egress` decides a byte-stream connection.
            let protocol = if sni.is_some() {
                Protocol::Tls
            } else if connect.is_some() {
                Protocol::Connect
            } else {
                Protocol::Tcp
            };
            let sni = sni.as_deref().map(policy::normalize_name);
            let connect = connect.as_deref().map(policy::normalize_name);
            let mut req = Request::new(Direction::Egress, protocol);
            req.source_ip = Some(src.ip());
            req.destination_ip = *dst_ip;
            req.destination_port = Some(*dst_port);
            req.destination_spiffe_id = destination_id.as_ref();
            req.sni = sni.as_deref();
            req.connect_authority = connect.as_deref();
            policy.decide(&req)
        }
    }
}

/// Applies a newly swapped-in `policy` to the open connections: with `onPolicyChange:
/// reevaluate` each is decided once more and those now denied are signalled (their copy loops
/// reset them and log `connection_reset`); with `keep` nothing happens. Returns how many were
/// signalled.
pub fn reevaluate(open: &ConnRegistry, policy: &CompiledPolicy) -> usize {
    if policy.settings().on_policy_change == OnPolicyChange::Keep {
        tracing::info!(
            open_connections = open.len(),
            "policy changed; open connections kept (settings.onPolicyChange: keep)"
        );
        return 0;
    }
    let denied = open.reevaluate(|attrs| {
        let d = decide_open(policy, attrs);
        (!d.allow).then(|| d.reason.to_string())
    });
    tracing::info!(
        open_connections = open.len(),
        now_denied = denied,
        "policy changed; open non-HTTP connections re-evaluated"
    );
    denied
}

/// A task that re-evaluates `open` on every policy the watcher swaps in and counts the reloads;
/// aborted on drop.
pub struct Follower(tokio::task::JoinHandle<()>);

impl Drop for Follower {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts a [`Follower`] on `changes` (from [`policy::PolicyWatcher::subscribe`]).
pub fn follow(
    mut changes: watch::Receiver<Arc<CompiledPolicy>>,
    open: ConnRegistry,
    reloads: Arc<AtomicU64>,
) -> Follower {
    Follower(tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let policy = changes.borrow_and_update().clone();
            reloads.fetch_add(1, Ordering::Relaxed);
            reevaluate(&open, &policy);
        }
    }))
}
