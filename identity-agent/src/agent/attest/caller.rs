//! Attestation of a socket caller with every configured attestor: unix (always), then
//! Kubernetes (when configured), and the automatic Kubernetes identity.

use super::peer::Peer;
use super::{unix, AttestError, Workload};
use crate::agent::config::AgentConfig;
use crate::agent::entries::{self, Entry};
use crate::agent::health::Metrics;

/// Attests the caller bound to a connection: unix selectors, plus `k8s:` selectors when
/// Kubernetes attestation is on. The process is checked again after the kubelet was
/// consulted, so a pid that exited, was reused or exec'd meanwhile is refused.
pub async fn attest_caller(peer: &Peer, config: &AgentConfig) -> Result<Workload, AttestError> {
    let mut workload = unix::attest(peer)?;
    let Some(k8s) = config.k8s.as_ref() else {
        return Ok(workload);
    };
    let k8s_selectors = k8s.selectors(workload.pid).await?;
    peer.verify()?;
    workload.selectors.extend(k8s_selectors);
    Ok(workload)
}

/// The rule both socket APIs (Workload API and SDS) apply to every call: attest the caller,
/// then collect the entries matching its selectors (plus the automatic Kubernetes identity).
/// A failed attestation or no matching entry is counted, logged (messages start with
/// `log_prefix`) and answered `PERMISSION_DENIED`.
#[allow(clippy::result_large_err)]
pub async fn entitled(
    peer: Result<&Peer, &AttestError>,
    config: &AgentConfig,
    metrics: &Metrics,
    log_prefix: &str,
) -> Result<(Workload, Vec<Entry>), tonic::Status> {
    let attested = match peer {
        Ok(peer) => attest_caller(peer, config).await,
        Err(e) => Err(e.clone()),
    };
    let workload = attested.map_err(|e| {
        metrics.attestation_failed(e.reason());
        tracing::warn!(error = %e, "{log_prefix}attestation failed");
        tonic::Status::permission_denied(format!("caller could not be attested: {e}"))
    })?;
    let mut matched: Vec<Entry> = entries::matching(&config.entries, &workload.selectors)
        .into_iter()
        .cloned()
        .collect();
    add_auto_identity(config, &workload, &mut matched);
    if matched.is_empty() {
        metrics.no_entry.inc();
        tracing::info!(pid = workload.pid, selectors = ?workload.selectors,
            "{log_prefix}no registration entry matches the caller");
        return Err(tonic::Status::permission_denied(
            "no identity issued: no registration entry matches the caller",
        ));
    }
    Ok((workload, matched))
}

/// Before each update on an open stream: the connection's process must still be the one bound
/// at accept (same start time, uid and executable), else the stream ends `PERMISSION_DENIED`.
#[allow(clippy::result_large_err)]
pub fn recheck(peer: &Peer, metrics: &Metrics, log_prefix: &str) -> Result<(), tonic::Status> {
    peer.verify().map(|_| ()).map_err(|e| {
        metrics.attestation_failed(e.reason());
        tracing::warn!(error = %e, "{log_prefix}stream ended: caller changed");
        tonic::Status::permission_denied(format!("caller changed: {e}"))
    })
}

/// Appends the automatic `spiffe://<td>/ns/<ns>/sa/<sa>` entry when enabled and the workload
/// is a pod (after the configured entries, so those stay the default SVID).
pub fn add_auto_identity(config: &AgentConfig, workload: &Workload, matched: &mut Vec<Entry>) {
    let Some(td) = config
        .k8s
        .as_ref()
        .and_then(|k| k.config().auto_identity.as_ref())
    else {
        return;
    };
    let Some(id) = super::k8s::auto_identity(td, &workload.selectors) else {
        return;
    };
    if matched.iter().any(|e| e.id == id) {
        return;
    }
    let selectors: Vec<String> = workload
        .selectors
        .iter()
        .filter(|s| s.starts_with("k8s:ns:") || s.starts_with("k8s:sa:"))
        .cloned()
        .collect();
    match Entry::new(td, id.as_str(), &selectors, None, None, &[]) {
        Ok(e) => matched.push(e),
        Err(e) => tracing::warn!(error = %e, "cannot build the automatic Kubernetes identity"),
    }
}
