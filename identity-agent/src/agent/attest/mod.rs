//! Workload attestation: who is calling on the socket, expressed as selectors
//! (`unix:uid:1000`, `unix:gid:1000`, `unix:path:/usr/bin/app`; on Kubernetes `k8s:ns:…`,
//! `k8s:sa:…`, `k8s:pod-label:k:v`, … — see [`k8s`]).

pub mod caller;
pub mod k8s;
pub mod k8s_cgroup;
pub mod k8s_pods;
mod k8s_tls;
pub mod peer;
pub mod process;
pub mod unix;

use std::collections::BTreeSet;

/// The selectors of one workload (`type:key:value`).
pub type Selectors = BTreeSet<String>;

/// Why a caller could not be attested (the message is logged and counted; the caller only
/// sees `PERMISSION_DENIED`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    #[error("no peer credentials on the connection (not a unix socket?)")]
    NoCredentials,
    #[error("peer credentials carry no pid")]
    NoPid,
    #[error("process {pid} changed while being attested (pid reused or uid changed): {what}")]
    Changed { pid: i32, what: String },
    #[error(
        "process {pid} that opened the connection has exited (a process that inherited the \
             socket may not use its identity)"
    )]
    Exited { pid: i32 },
    #[error(
        "process {pid} runs {now} but ran {at_connect} when it connected: a process may \
             not exec another binary and use the connection it opened before"
    )]
    ExeChanged {
        pid: i32,
        at_connect: String,
        now: String,
    },
    #[error("cannot read /proc/{pid}: {reason}")]
    Proc { pid: i32, reason: String },
    #[error("Kubernetes attestation: {0}")]
    Kubernetes(String),
}

impl AttestError {
    /// Short label for the metric.
    pub fn reason(&self) -> &'static str {
        match self {
            AttestError::NoCredentials => "no_credentials",
            AttestError::NoPid => "no_pid",
            AttestError::Changed { .. } => "pid_reused",
            AttestError::Exited { .. } => "process_exited",
            AttestError::ExeChanged { .. } => "exe_changed",
            AttestError::Proc { .. } => "proc_unreadable",
            AttestError::Kubernetes(_) => "kubernetes",
        }
    }
}

/// An attested caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub selectors: Selectors,
}
