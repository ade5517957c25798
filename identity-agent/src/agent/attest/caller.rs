//! Attestation of a socket caller with every configured attestor: unix (always), then
//! Kubernetes (when configured), and the automatic Kubernetes identity.

use std::path::Path;

use tokio::net::unix::UCred;

use super::{unix, AttestError, Workload};
use crate::agent::config::AgentConfig;
use crate::agent::entries::{self, Entry};
use crate::agent::health::Metrics;

/// Attests the caller: unix selectors, plus `k8s:` selectors when Kubernetes attestation is
/// on. The process's start time is read before and after, so a pid reused while the kubelet
/// was consulted is refused.
pub async fn attest_caller(
    cred: Option<UCred>,
    config: &AgentConfig,
) -> Result<Workload, AttestError> {
    let Some(k8s) = config.k8s.as_ref() else {
        return unix::attest(cred, Path::new("/proc"));
    };
    let pid = cred.and_then(|c| c.pid());
    let before = pid.and_then(start_time);
    let mut workload = unix::attest(cred, Path::new("/proc"))?;
    let k8s_selectors = k8s.selectors(workload.pid).await?;
    if before.is_some() && start_time(workload.pid) != before {
        return Err(AttestError::Changed {
            pid: workload.pid,
            what: "start time changed during Kubernetes attestation".into(),
        });
    }
    workload.selectors.extend(k8s_selectors);
    Ok(workload)
}

/// The rule both socket APIs (Workload API and SDS) apply to every call: attest the caller,
/// then collect the entries matching its selectors (plus the automatic Kubernetes identity).
/// A failed attestation or no matching entry is counted, logged (messages start with
/// `log_prefix`) and answered `PERMISSION_DENIED`.
#[allow(clippy::result_large_err)]
pub async fn entitled(
    cred: Option<UCred>,
    config: &AgentConfig,
    metrics: &Metrics,
    log_prefix: &str,
) -> Result<(Workload, Vec<Entry>), tonic::Status> {
    let workload = attest_caller(cred, config).await.map_err(|e| {
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

/// Field 22 of `/proc/<pid>/stat` (parsed after the last `)`).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}
