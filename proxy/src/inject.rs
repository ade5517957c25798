//! `svidcar inject`: add the svidcar sidecar to Kubernetes workloads.
//!
//! One pure planning step, [`plan`], turns an object (as JSON) into a list of JSON Patch `add`
//! operations — the mutating webhook ([`webhook`]) returns exactly that patch, and the manifest
//! rewriter ([`manifest`]) applies it to the YAML documents, so both paths inject the same way.
//!
//! What is added to the pod spec:
//! * init container `svidcar-init` (first): runs `svidcar init` as root with only `NET_ADMIN`
//!   and `NET_RAW` (everything else dropped) to install the interception rules;
//! * init container `svidcar-proxy` (second) with `restartPolicy: Always` — a native sidecar,
//!   started before the other init containers and the app, ready once its admin `/ready`
//!   answers (startup probe) — running as [`crate::init::DEFAULT_PROXY_UID`], non-root, no
//!   privilege escalation, read-only root filesystem, all capabilities dropped, seccomp
//!   `RuntimeDefault`, with requests and limits;
//! * volumes: the agent's socket directory (a `hostPath` directory or a CSI volume, mounted
//!   read-only into the sidecar, `SPIFFE_ENDPOINT_SOCKET` pointing into it) and a small
//!   `emptyDir` for the iptables lock of the init container.
//!
//! Annotations (on the pod template, or else on the workload): [`ANNOTATION_INJECT`] `"false"`
//! opts out; [`ANNOTATION_EXCLUDE_INBOUND_PORTS`], [`ANNOTATION_EXCLUDE_OUTBOUND_PORTS`],
//! [`ANNOTATION_EXCLUDE_OUTBOUND_CIDRS`] are passed to `svidcar init`; [`ANNOTATION_PROXY_IMAGE`]
//! overrides the image. A pod that already has a `svidcar-proxy` container is left unchanged,
//! and so is a `hostNetwork` pod (its rules would capture the node's traffic).
#![forbid(unsafe_code)]

pub mod manifest;
mod plan;
mod sidecar;
pub mod webhook;

pub use plan::{plan, pod_spec_pointer, PatchOp, Plan};

/// Opt-out annotation: `"false"` leaves the pod alone.
pub const ANNOTATION_INJECT: &str = "svidcar.io/inject";
/// Comma-separated inbound ports delivered straight to the application.
pub const ANNOTATION_EXCLUDE_INBOUND_PORTS: &str = "svidcar.io/exclude-inbound-ports";
/// Comma-separated outbound ports not captured.
pub const ANNOTATION_EXCLUDE_OUTBOUND_PORTS: &str = "svidcar.io/exclude-outbound-ports";
/// Comma-separated outbound CIDRs not captured.
pub const ANNOTATION_EXCLUDE_OUTBOUND_CIDRS: &str = "svidcar.io/exclude-outbound-cidrs";
/// Proxy image override for this pod.
pub const ANNOTATION_PROXY_IMAGE: &str = "svidcar.io/proxy-image";
/// Name of a ConfigMap (in the pod's namespace) holding the pod's authorization policy files;
/// mounted read-only at [`POLICY_MOUNT_PATH`] and passed as `--policy` (hot-reloaded when the
/// ConfigMap changes).
pub const ANNOTATION_POLICY_CONFIGMAP: &str = "svidcar.io/policy-configmap";

/// Name of the injected sidecar container (its presence means "already injected").
pub const PROXY_CONTAINER: &str = "svidcar-proxy";
/// Name of the injected init container that installs the rules.
pub const INIT_CONTAINER: &str = "svidcar-init";
/// Name of the volume holding the agent's socket.
pub const SOCKET_VOLUME: &str = "svidcar-agent-socket";
/// Name of the scratch volume for the init container (iptables lock file).
pub const INIT_SCRATCH_VOLUME: &str = "svidcar-init-scratch";
/// Name of the policy ConfigMap volume (with [`ANNOTATION_POLICY_CONFIGMAP`]).
pub const POLICY_VOLUME: &str = "svidcar-policy";
/// Where the policy ConfigMap is mounted inside the sidecar.
pub const POLICY_MOUNT_PATH: &str = "/etc/svidcar/policy";
/// Where the socket directory is mounted inside the sidecar.
pub const SOCKET_MOUNT_PATH: &str = "/run/svidcar/sockets";
/// File name of the agent's socket inside its directory.
pub const SOCKET_FILE: &str = "agent.sock";
/// Default host directory of the agent's socket (the agent DaemonSet's hostPath).
pub const DEFAULT_AGENT_SOCKET_DIR: &str = "/run/svidcar/sockets";
/// Default proxy image.
pub const DEFAULT_IMAGE: &str = "ghcr.io/svidcar/svidcar:latest";

/// How the agent's socket reaches the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketVolume {
    /// A `hostPath` directory (type `Directory`) on the node.
    HostPath(String),
    /// An ephemeral CSI volume of this driver (e.g. a SPIFFE CSI driver), read-only.
    Csi(String),
}

/// Which backend the injected `svidcar init` uses.
pub use crate::init::Backend as InitBackend;

/// Injection settings (flags of `svidcar inject`).
#[derive(Debug, Clone)]
pub struct InjectConfig {
    /// Proxy image (also used for the init container) unless annotated otherwise.
    pub image: String,
    /// Where the agent socket comes from.
    pub socket_volume: SocketVolume,
    /// Arguments of the sidecar container (after the image's entrypoint).
    pub proxy_args: Vec<String>,
    /// Backend of `svidcar init` in the init container.
    pub init_backend: InitBackend,
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            image: DEFAULT_IMAGE.to_string(),
            socket_volume: SocketVolume::HostPath(DEFAULT_AGENT_SOCKET_DIR.to_string()),
            proxy_args: default_proxy_args(),
            init_backend: InitBackend::Iptables,
        }
    }
}

/// The sidecar's default arguments: transparent mode, admin on all addresses so the kubelet's
/// probes reach it (an explicit opt-in: the proxy refuses a non-loopback admin address without
/// `--admin-allow-remote`).
pub fn default_proxy_args() -> Vec<String> {
    [
        "proxy",
        "--transparent",
        "--admin-addr",
        "0.0.0.0:15000",
        "--admin-allow-remote",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Why an object could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// An annotation has a value that cannot be used.
    #[error("annotation {key}={value:?} is invalid: {reason}")]
    BadAnnotation {
        /// The annotation key.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The object does not have the shape of its kind.
    #[error("{kind} {name}: {reason}")]
    Malformed {
        /// The object's kind.
        kind: String,
        /// The object's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A YAML document could not be parsed or written.
    #[error("YAML document {index}: {message}")]
    Yaml {
        /// 1-based document number.
        index: usize,
        /// The parser's message.
        message: String,
    },
}
