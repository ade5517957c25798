//! Kubernetes workload attestation: the caller's pod UID and container ID from
//! `/proc/<pid>/cgroup` ([`super::k8s_cgroup`]), the pod's metadata from the kubelet's
//! read-only `GET /pods` (authorized with the agent's service-account token), as selectors:
//!
//! `k8s:ns:<namespace>`, `k8s:sa:<service account>`, `k8s:pod-name:<name>`,
//! `k8s:pod-uid:<uid>`, `k8s:pod-label:<key>:<value>`, `k8s:container-name:<name>`,
//! `k8s:node-name:<node>`.
//!
//! The pod list is cached for [`K8sConfig::cache_ttl`]; a pod (or container) missing from the
//! cache triggers one refresh, never more than one per [`MIN_REFRESH`] (concurrent callers
//! share it). A process in a pod the kubelet does not know is refused; a process outside any
//! pod gets no `k8s:` selectors (its unix selectors still apply).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Deserialize;
use tokio::net::TcpStream;

use super::k8s_cgroup::{self, ContainerRef};
use super::{AttestError, Selectors};
use crate::agent::config::{parse_duration, ConfigError};
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// Default kubelet endpoint (the agent runs on the node, in the host network).
pub const DEFAULT_KUBELET_URL: &str = "https://127.0.0.1:10250";
/// Default service-account token of the agent's pod.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// Default lifetime of the cached pod list.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(5);
/// Never ask the kubelet more often than this, whatever the cache misses.
pub const MIN_REFRESH: Duration = Duration::from_millis(200);
/// Largest pod list accepted.
const MAX_BODY: usize = 64 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);

/// The `k8s:` section of the agent's YAML config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sFile {
    /// Turn Kubernetes attestation on (any other field set turns it on too).
    pub enabled: Option<bool>,
    /// `https://host:port` of the kubelet [default: https://127.0.0.1:10250].
    pub kubelet_url: Option<String>,
    /// Bearer token file [default: the pod's service-account token].
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate(s) that sign the kubelet's serving certificate.
    pub kubelet_ca: Option<PathBuf>,
    /// INSECURE: do not verify the kubelet's certificate (like SPIRE's
    /// `skip_kubelet_verification`). Only for clusters whose kubelet cert is self-signed.
    pub kubelet_insecure_skip_verify: Option<bool>,
    /// Read `<root>/<pid>/cgroup` instead of `/proc/<pid>/cgroup` (tests, recorded files).
    pub cgroup_root: Option<PathBuf>,
    /// Issue `spiffe://<td>/ns/<ns>/sa/<sa>` to every attested pod.
    pub auto_identity: Option<bool>,
    /// Lifetime of the cached pod list [default: 5s].
    pub cache_ttl: Option<String>,
}

impl K8sFile {
    /// True when the section asks for Kubernetes attestation.
    pub fn is_enabled(&self) -> bool {
        self.enabled.unwrap_or(true)
    }

    /// Validates the section.
    pub fn resolve(self, td: &TrustDomain) -> Result<K8sConfig, ConfigError> {
        let url = self
            .kubelet_url
            .unwrap_or_else(|| DEFAULT_KUBELET_URL.to_string());
        let bad = |m: &str| ConfigError::Invalid(format!("k8s kubelet_url {url:?}: {m}"));
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| bad("must start with https://"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                (h, p.parse().map_err(|_| bad("bad port"))?)
            }
            _ => (authority, 10250),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let insecure = self.kubelet_insecure_skip_verify.unwrap_or(false);
        if insecure && self.kubelet_ca.is_some() {
            return Err(ConfigError::Invalid(
                "k8s: kubelet_ca and kubelet_insecure_skip_verify exclude each other".into(),
            ));
        }
        let verify = match (self.kubelet_ca, insecure) {
            (Some(ca), _) => KubeletVerify::Ca(ca),
            (None, true) => KubeletVerify::Insecure,
            (None, false) => KubeletVerify::SystemRoots,
        };
        Ok(K8sConfig {
            host: host.to_string(),
            port,
            verify,
            token_file: self
                .token_file
                .unwrap_or_else(|| PathBuf::from(DEFAULT_TOKEN_FILE)),
            cgroup_root: self.cgroup_root,
            auto_identity: self.auto_identity.unwrap_or(false).then(|| td.clone()),
            cache_ttl: self
                .cache_ttl
                .as_deref()
                .map(parse_duration)
                .transpose()?
                .unwrap_or(DEFAULT_CACHE_TTL),
        })
    }
}

/// How the kubelet's serving certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeletVerify {
    /// Against these PEM CA certificates.
    Ca(PathBuf),
    /// Against the system roots (`/etc/ssl/certs/ca-certificates.crt`).
    SystemRoots,
    /// Not at all (insecure, explicit opt-in).
    Insecure,
}

/// Resolved Kubernetes attestation settings.
#[derive(Debug, Clone)]
pub struct K8sConfig {
    pub host: String,
    pub port: u16,
    pub verify: KubeletVerify,
    pub token_file: PathBuf,
    pub cgroup_root: Option<PathBuf>,
    /// `Some(td)`: issue `spiffe://<td>/ns/<ns>/sa/<sa>` automatically.
    pub auto_identity: Option<TrustDomain>,
    pub cache_ttl: Duration,
}

pub use super::k8s_pods::{parse_pod_list, PodInfo};

// --- the attestor ------------------------------------------------------------------------

/// The last pod list and when it was fetched.
#[derive(Clone)]
struct Snapshot {
    pods: Arc<HashMap<String, PodInfo>>,
    fetched: Option<Instant>,
}

/// Kubernetes attestor: shared by every connection, holds the TLS client config and the cache.
pub struct K8sAttestor {
    config: K8sConfig,
    tls: Arc<rustls::ClientConfig>,
    /// Read without waiting: a hit never waits for a refresh in progress.
    cache: std::sync::RwLock<Snapshot>,
    /// One refresh at a time; callers that waited for it reuse its result.
    refresh: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for K8sAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sAttestor")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn k8s_err(m: impl std::fmt::Display) -> AttestError {
    AttestError::Kubernetes(m.to_string())
}

impl K8sAttestor {
    /// Builds the attestor (loads the kubelet CA now, so a bad file fails at start).
    pub fn new(config: K8sConfig) -> Result<Self, ConfigError> {
        let tls = super::k8s_tls::client_config(&config.verify)?;
        Ok(Self {
            config,
            tls: Arc::new(tls),
            cache: std::sync::RwLock::new(Snapshot {
                pods: Arc::new(HashMap::new()),
                fetched: None,
            }),
            refresh: tokio::sync::Mutex::new(()),
        })
    }

    /// The settings.
    pub fn config(&self) -> &K8sConfig {
        &self.config
    }

    /// Reads where `pid` lives: `/proc/<pid>/cgroup`, or `<cgroup_root>/<pid>/cgroup`.
    pub fn container_of(&self, pid: i32) -> Result<Option<ContainerRef>, AttestError> {
        let root = self
            .config
            .cgroup_root
            .as_deref()
            .unwrap_or(Path::new("/proc"));
        let path = root.join(pid.to_string()).join("cgroup");
        let text = std::fs::read_to_string(&path).map_err(|e| AttestError::Proc {
            pid,
            reason: format!("{}: {e}", path.display()),
        })?;
        Ok(k8s_cgroup::parse(&text))
    }

    /// The `k8s:` selectors of `pid` (empty when it is in no pod).
    pub async fn selectors(&self, pid: i32) -> Result<Selectors, AttestError> {
        let Some(at) = self.container_of(pid)? else {
            return Ok(Selectors::new());
        };
        let pod = self.pod(&at).await?;
        Ok(pod.selectors(at.container_id.as_deref()))
    }

    /// The pod of `at`, from the cache or (on a miss) a fresh pod list.
    async fn pod(&self, at: &ContainerRef) -> Result<PodInfo, AttestError> {
        fn known<'a>(pods: &'a HashMap<String, PodInfo>, at: &ContainerRef) -> Option<&'a PodInfo> {
            pods.get(&at.pod_uid).filter(|p| {
                at.container_id
                    .as_ref()
                    .is_none_or(|c| p.containers.contains_key(c))
            })
        }
        let snapshot = || {
            self.cache
                .read()
                .map(|c| c.clone())
                .unwrap_or_else(|p| p.into_inner().clone())
        };
        let asked = Instant::now();
        let cache = snapshot();
        let fresh = cache
            .fetched
            .is_some_and(|t| t.elapsed() < self.config.cache_ttl);
        if fresh {
            if let Some(p) = known(&cache.pods, at) {
                return Ok(p.clone());
            }
        }
        // Miss or stale: one refresh at a time, never more often than MIN_REFRESH.
        let _refreshing = self.refresh.lock().await;
        let mut cache = snapshot();
        let refreshed_meanwhile = cache.fetched.is_some_and(|t| t >= asked);
        if !refreshed_meanwhile {
            if let Some(t) = cache.fetched {
                if t.elapsed() < MIN_REFRESH {
                    tokio::time::sleep(MIN_REFRESH - t.elapsed()).await;
                }
            }
            cache = Snapshot {
                pods: Arc::new(self.fetch().await?),
                fetched: Some(Instant::now()),
            };
            match self.cache.write() {
                Ok(mut c) => *c = cache.clone(),
                Err(p) => *p.into_inner() = cache.clone(),
            }
        }
        if let Some(p) = known(&cache.pods, at) {
            return Ok(p.clone());
        }
        // The pod is known but its container status not yet: pod-level selectors only.
        cache.pods.get(&at.pod_uid).cloned().ok_or_else(|| {
            k8s_err(format!(
                "pod {} is not among the kubelet's pods on {}:{}",
                at.pod_uid, self.config.host, self.config.port
            ))
        })
    }

    /// `GET /pods` from the kubelet with the service-account token.
    async fn fetch(&self) -> Result<HashMap<String, PodInfo>, AttestError> {
        let c = &self.config;
        let token = std::fs::read_to_string(&c.token_file)
            .map_err(|e| k8s_err(format!("token file {}: {e}", c.token_file.display())))?;
        let target = format!("{}:{}", c.host, c.port);
        let tcp = tokio::time::timeout(TIMEOUT, TcpStream::connect((c.host.as_str(), c.port)))
            .await
            .map_err(|_| k8s_err(format!("kubelet {target}: connect timed out")))?
            .map_err(|e| k8s_err(format!("kubelet {target}: {e}")))?;
        let name = ServerName::try_from(c.host.clone())
            .map_err(|e| k8s_err(format!("kubelet {target}: {e}")))?;
        let tls = tokio::time::timeout(
            TIMEOUT,
            tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp),
        )
        .await
        .map_err(|_| k8s_err(format!("kubelet {target}: TLS handshake timed out")))?
        .map_err(|e| k8s_err(format!("kubelet {target}: TLS: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| k8s_err(format!("kubelet {target}: {e}")))?;
        let driver = tokio::spawn(conn);
        let result = async {
            let req = hyper::Request::get("/pods")
                .header(hyper::header::HOST, target.as_str())
                .header(hyper::header::ACCEPT, "application/json")
                .header(
                    hyper::header::AUTHORIZATION,
                    format!("Bearer {}", token.trim()),
                )
                .body(Empty::<Bytes>::new())
                .map_err(|e| k8s_err(e.to_string()))?;
            let resp = tokio::time::timeout(TIMEOUT, sender.send_request(req))
                .await
                .map_err(|_| k8s_err(format!("kubelet {target}: no answer within 5s")))?
                .map_err(|e| k8s_err(format!("kubelet {target}: {e}")))?;
            if resp.status() != hyper::StatusCode::OK {
                return Err(k8s_err(format!(
                    "kubelet {target} answered {} to GET /pods (is the token allowed nodes/proxy?)",
                    resp.status()
                )));
            }
            let body =
                tokio::time::timeout(TIMEOUT, Limited::new(resp.into_body(), MAX_BODY).collect())
                    .await
                    .map_err(|_| k8s_err(format!("kubelet {target}: body timed out")))?
                    .map_err(|e| k8s_err(format!("kubelet {target}: {e}")))?
                    .to_bytes();
            parse_pod_list(&body).map_err(|e| k8s_err(format!("kubelet {target}: /pods: {e}")))
        }
        .await;
        driver.abort();
        if let Ok(pods) = &result {
            tracing::debug!(pods = pods.len(), kubelet = %target, "kubelet pod list refreshed");
        }
        result
    }
}

/// The automatic identity of a workload with `k8s:ns:` and `k8s:sa:` selectors.
pub fn auto_identity(td: &TrustDomain, selectors: &Selectors) -> Option<SpiffeId> {
    let find = |p: &str| {
        selectors
            .iter()
            .find_map(|s| s.strip_prefix(p).map(str::to_string))
    };
    let (ns, sa) = (find("k8s:ns:")?, find("k8s:sa:")?);
    SpiffeId::parse(&format!("{}/ns/{ns}/sa/{sa}", td.id_string())).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_section_enables_and_resolves() {
        use crate::agent::config::{AgentConfig, AgentFile};
        let f: AgentFile = serde_yaml_ng::from_str(
            "k8s:\n  kubelet_url: https://10.0.0.5:10250\n  kubelet_insecure_skip_verify: true\n  auto_identity: true\n  cache_ttl: 2s\n",
        )
        .unwrap();
        let cfg = AgentConfig::from_file(f).unwrap();
        let k = cfg.k8s.as_ref().unwrap().config().clone();
        assert_eq!((k.host.as_str(), k.port), ("10.0.0.5", 10250));
        assert_eq!(k.verify, KubeletVerify::Insecure);
        assert_eq!(k.cache_ttl, Duration::from_secs(2));
        assert_eq!(k.auto_identity.unwrap().name(), "svidcar.local");
        let off: AgentFile = serde_yaml_ng::from_str("k8s:\n  enabled: false\n").unwrap();
        assert!(AgentConfig::from_file(off).unwrap().k8s.is_none());
        assert!(serde_yaml_ng::from_str::<AgentFile>("k8s:\n  kubelet: x\n").is_err());
    }

    #[test]
    fn url_and_verify_resolution() {
        let td = TrustDomain::parse("example.org").unwrap();
        let c = K8sFile {
            kubelet_url: Some("https://node-1:10250".into()),
            ..Default::default()
        }
        .resolve(&td)
        .unwrap();
        assert_eq!((c.host.as_str(), c.port), ("node-1", 10250));
        assert_eq!(c.verify, KubeletVerify::SystemRoots);
        assert!(K8sFile {
            kubelet_url: Some("http://node:10250".into()),
            ..Default::default()
        }
        .resolve(&td)
        .is_err());
        assert!(K8sFile {
            kubelet_ca: Some("/x".into()),
            kubelet_insecure_skip_verify: Some(true),
            ..Default::default()
        }
        .resolve(&td)
        .is_err());
    }
}
