//! `svidcar agent` flags for Kubernetes workload attestation (flattened into
//! [`AgentCmd`](crate::cli::agent::AgentCmd)); each overrides the same field of the `k8s:`
//! section of `--config`, and any of them turns Kubernetes attestation on.
use std::path::PathBuf;

use svidcar_agent::agent::attest::k8s::K8sFile;
use svidcar_agent::agent::config::AgentFile;

/// Kubernetes attestation flags.
#[derive(clap::Args, Debug, Default)]
pub struct K8sArgs {
    /// Attest pods: pod UID and container from /proc/<pid>/cgroup, metadata from the kubelet
    /// (selectors k8s:ns:, k8s:sa:, k8s:pod-name:, k8s:pod-uid:, k8s:pod-label:K:V,
    /// k8s:container-name:, k8s:node-name:).
    #[arg(long)]
    k8s: bool,
    /// Kubelet API base URL [default: https://127.0.0.1:10250].
    #[arg(long, value_name = "URL")]
    k8s_kubelet_url: Option<String>,
    /// Bearer token for the kubelet [default:
    /// /var/run/secrets/kubernetes.io/serviceaccount/token].
    #[arg(long, value_name = "FILE")]
    k8s_token_file: Option<PathBuf>,
    /// PEM CA that signs the kubelet's serving certificate [default: the system roots].
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "k8s_kubelet_insecure_skip_verify"
    )]
    k8s_kubelet_ca: Option<PathBuf>,
    /// INSECURE: do not verify the kubelet's certificate (self-signed kubelet certs only).
    #[arg(long)]
    k8s_kubelet_insecure_skip_verify: bool,
    /// Read <DIR>/<pid>/cgroup instead of /proc/<pid>/cgroup (tests with recorded files).
    #[arg(long, value_name = "DIR")]
    k8s_cgroup_root: Option<PathBuf>,
    /// Issue spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> to every pod.
    #[arg(long)]
    k8s_auto_identity: bool,
    /// How long the kubelet's pod list is cached [default: 5s]; a new pod refreshes it.
    #[arg(long, value_name = "DURATION")]
    k8s_cache_ttl: Option<String>,
}

impl K8sArgs {
    /// Applies the flags onto the file config.
    pub fn apply(self, f: &mut AgentFile) {
        let any = self.k8s
            || self.k8s_kubelet_url.is_some()
            || self.k8s_token_file.is_some()
            || self.k8s_kubelet_ca.is_some()
            || self.k8s_kubelet_insecure_skip_verify
            || self.k8s_cgroup_root.is_some()
            || self.k8s_auto_identity
            || self.k8s_cache_ttl.is_some();
        if !any {
            return;
        }
        let mut k: K8sFile = f.k8s.take().unwrap_or_default();
        k.enabled = Some(true);
        k.kubelet_url = self.k8s_kubelet_url.or(k.kubelet_url);
        k.token_file = self.k8s_token_file.or(k.token_file);
        k.kubelet_ca = self.k8s_kubelet_ca.or(k.kubelet_ca);
        if self.k8s_kubelet_insecure_skip_verify {
            k.kubelet_insecure_skip_verify = Some(true);
        }
        k.cgroup_root = self.k8s_cgroup_root.or(k.cgroup_root);
        if self.k8s_auto_identity {
            k.auto_identity = Some(true);
        }
        k.cache_ttl = self.k8s_cache_ttl.or(k.cache_ttl);
        f.k8s = Some(k);
    }
}
