//! Agent configuration: the YAML file form (every field optional, unknown fields rejected) and
//! the resolved [`AgentConfig`] the agent runs with.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::agent::entries::{Entry, EntryError};
use crate::spiffe_id::TrustDomain;

/// Default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "svidcar.local";
/// Default Workload API socket.
pub const DEFAULT_SOCKET: &str = "/tmp/svidcar/agent.sock";
/// Default state directory for an unprivileged agent.
pub const DEFAULT_STATE_DIR_USER: &str = "/tmp/svidcar/agent-state";
/// Default state directory when the agent runs as root.
pub const DEFAULT_STATE_DIR_ROOT: &str = "/var/lib/svidcar/agent";
/// Default health/metrics listener.
pub const DEFAULT_HEALTH_ADDR: &str = "127.0.0.1:8088";
/// Default socket mode: world-connectable, like SPIRE. Attestation (not file permissions)
/// decides who gets an identity; a caller without an entry gets `PERMISSION_DENIED`.
pub const DEFAULT_SOCKET_MODE: u32 = 0o777;
/// Upper bound of the default cap on open connections per uid on the agent socket (the
/// default is a quarter of the open-files limit, between 16 and this): far above what one
/// uid's workloads need (a sidecar holds one connection; 250 pods whose sidecars share a uid
/// hold ~250), far below the open-files limit the agent raises itself to.
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 1024;
/// Default time a new connection may stay without sending a request.
pub const DEFAULT_FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Yaml {
        path: PathBuf,
        source: serde_yaml_ng::Error,
    },
    #[error("invalid duration {0:?} (use e.g. 500ms, 30s, 5m, 1h, 2d)")]
    Duration(String),
    #[error("invalid trust domain {0:?}: {1}")]
    TrustDomain(String, String),
    #[error("{0}")]
    Entry(#[from] EntryError),
    #[error("invalid federation {0:?} (expected TRUST_DOMAIN=BUNDLE_FILE)")]
    Federation(String),
    #[error("invalid health address {0:?}: {1}")]
    HealthAddr(String, String),
    #[error("invalid socket mode {0:?} (octal, e.g. 0770)")]
    SocketMode(String),
    #[error("--upstream-cert and --upstream-key must be given together")]
    UpstreamPair,
    #[error("{0}")]
    Invalid(String),
}

/// Parses a duration like `500ms`, `30s`, `5m`, `1h`, `2d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let t = s.trim();
    let bad = || ConfigError::Duration(s.to_string());
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(bad());
    }
    // Beyond what a Duration holds (e.g. `99999999999999999999d`): an error, not a panic.
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

/// A registration entry in the YAML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryFile {
    /// The SPIFFE ID to issue.
    pub spiffe_id: String,
    /// Selectors that must all be present in the workload's selectors.
    pub selectors: Vec<String>,
    /// SVID TTL for this entry (defaults to `svid_ttl`).
    pub ttl: Option<String>,
    /// Workload API `hint` (defaults to the SPIFFE ID).
    pub hint: Option<String>,
    /// Trust domains whose bundles this workload receives (default: all federated).
    #[serde(default)]
    pub federates_with: Vec<String>,
}

/// A federated bundle file in the YAML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationFile {
    /// The foreign trust domain.
    pub trust_domain: String,
    /// Its bundle: SPIFFE bundle (JWKS JSON) or PEM certificates; re-read when it changes.
    pub bundle_file: PathBuf,
}

/// Upstream CA files in the YAML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// PEM: the intermediate CA certificate first, then optionally its chain (self-signed roots
    /// found here go into the bundle).
    pub cert: PathBuf,
    /// PEM PKCS#8 private key of the intermediate.
    pub key: PathBuf,
    /// PEM root certificate(s) for the bundle, if not in `cert`.
    pub bundle: Option<PathBuf>,
}

/// The YAML configuration file: every field optional, unknown fields rejected.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub trust_domain: Option<String>,
    pub socket: Option<PathBuf>,
    /// Octal string, e.g. "0770".
    pub socket_mode: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub svid_ttl: Option<String>,
    pub jwt_svid_ttl: Option<String>,
    pub ca_ttl: Option<String>,
    /// `host:port` of the health/metrics listener; `off` disables it.
    pub health_addr: Option<String>,
    /// Open connections one uid may hold on the socket (default: a quarter of the open-files
    /// limit, at least 16, at most 1024).
    pub max_connections_per_uid: Option<usize>,
    /// How long a new connection may stay without a request (default 10s).
    pub first_request_timeout: Option<String>,
    /// Allow a non-loopback `health_addr` (e.g. `0.0.0.0:8088` for Kubernetes probes).
    pub health_allow_remote: Option<bool>,
    #[serde(default)]
    pub entries: Vec<EntryFile>,
    #[serde(default)]
    pub federation: Vec<FederationFile>,
    pub upstream: Option<UpstreamFile>,
    /// How often federated bundle files are checked for changes.
    pub federation_poll: Option<String>,
    /// SPIFFE bundle endpoint serving our bundle (see `agent::bundle_endpoint`).
    pub bundle_endpoint: Option<crate::agent::bundle_endpoint::BundleEndpointFile>,
    /// Foreign bundle endpoints to poll (see `agent::federation_client`).
    #[serde(default)]
    pub federation_endpoints: Vec<crate::agent::federation_client::EndpointFile>,
    /// Lower bound on the bundle endpoint poll interval (default 30s).
    pub federation_min_refresh: Option<String>,
    /// Kubernetes workload attestation (see `agent::attest::k8s`).
    pub k8s: Option<crate::agent::attest::k8s::K8sFile>,
}

impl AgentFile {
    /// Reads and parses a YAML config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_yaml_ng::from_str(&text).map_err(|source| ConfigError::Yaml {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Where the signing CA comes from.
#[derive(Debug, Clone)]
pub enum CaSource {
    /// A root generated on first start and kept under the state directory.
    Embedded,
    /// An intermediate (signed by an upstream root) loaded from files; the agent does not rotate
    /// it but reloads it when the files change (renewal by the operator or cert-manager).
    Upstream {
        cert: PathBuf,
        key: PathBuf,
        bundle: Option<PathBuf>,
    },
}

/// A foreign trust domain's bundle file.
#[derive(Debug, Clone)]
pub struct FederatedFile {
    pub trust_domain: TrustDomain,
    pub path: PathBuf,
}

/// The resolved configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub trust_domain: TrustDomain,
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub state_dir: PathBuf,
    pub svid_ttl: Duration,
    pub jwt_svid_ttl: Duration,
    pub ca_ttl: Duration,
    /// `None` disables the health/metrics listener.
    pub health_addr: Option<SocketAddr>,
    /// Open connections one uid may hold on the socket; more are closed at accept. `None`:
    /// a quarter of the open-files limit, between 16 and [`DEFAULT_MAX_CONNECTIONS_PER_UID`].
    pub max_connections_per_uid: Option<usize>,
    /// A connection that sent no request by then is closed.
    pub first_request_timeout: Duration,
    pub entries: Vec<Entry>,
    pub federation: Vec<FederatedFile>,
    pub ca: CaSource,
    pub federation_poll: Duration,
    /// Serve our bundle on a SPIFFE bundle endpoint.
    pub bundle_endpoint: Option<crate::agent::bundle_endpoint::BundleEndpointConfig>,
    /// Foreign bundle endpoints polled into the federated bundles.
    pub federation_endpoints: crate::agent::federation_client::FederationEndpoints,
    /// Kubernetes attestation, when enabled.
    pub k8s: Option<std::sync::Arc<crate::agent::attest::k8s::K8sAttestor>>,
}

impl AgentConfig {
    /// Resolves a file config (already merged with flags) into a runnable config.
    pub fn from_file(f: AgentFile) -> Result<Self, ConfigError> {
        let td_str = f.trust_domain.as_deref().unwrap_or(DEFAULT_TRUST_DOMAIN);
        let trust_domain = TrustDomain::parse_lenient(td_str)
            .map_err(|e| ConfigError::TrustDomain(td_str.to_string(), e.to_string()))?;
        let svid_ttl = opt_duration(f.svid_ttl.as_deref(), Duration::from_secs(3600))?;
        let jwt_svid_ttl = opt_duration(f.jwt_svid_ttl.as_deref(), Duration::from_secs(300))?;
        let ca_ttl = opt_duration(f.ca_ttl.as_deref(), Duration::from_secs(24 * 3600))?;
        let federation_poll = opt_duration(f.federation_poll.as_deref(), Duration::from_secs(1))?;
        let first_request_timeout = opt_duration(
            f.first_request_timeout.as_deref(),
            DEFAULT_FIRST_REQUEST_TIMEOUT,
        )?;
        let max_connections_per_uid = f.max_connections_per_uid;
        if max_connections_per_uid == Some(0) {
            return Err(ConfigError::Invalid(
                "max_connections_per_uid must be at least 1".into(),
            ));
        }
        let socket_mode = match f.socket_mode.as_deref() {
            None => DEFAULT_SOCKET_MODE,
            Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|v| *v <= 0o777)
                .ok_or_else(|| ConfigError::SocketMode(m.to_string()))?,
        };
        let health_addr = match f.health_addr.as_deref() {
            Some("off") | Some("") => None,
            other => {
                let s = other.unwrap_or(DEFAULT_HEALTH_ADDR);
                let addr: SocketAddr = s.parse().map_err(|e: std::net::AddrParseError| {
                    ConfigError::HealthAddr(s.to_string(), e.to_string())
                })?;
                if !addr.ip().is_loopback() && f.health_allow_remote != Some(true) {
                    return Err(ConfigError::HealthAddr(
                        s.to_string(),
                        "not a loopback address: /metrics and /ready are served without \
                         authentication; set health_allow_remote: true (or \
                         --health-allow-remote) to serve them there anyway"
                            .into(),
                    ));
                }
                Some(addr)
            }
        };
        let mut entries = Vec::new();
        for e in &f.entries {
            let ttl = e.ttl.as_deref().map(parse_duration).transpose()?;
            entries.push(Entry::new(
                &trust_domain,
                &e.spiffe_id,
                &e.selectors,
                ttl,
                e.hint.clone(),
                &e.federates_with,
            )?);
        }
        let mut federation = Vec::new();
        for fed in f.federation {
            let td = TrustDomain::parse_lenient(&fed.trust_domain)
                .map_err(|e| ConfigError::TrustDomain(fed.trust_domain.clone(), e.to_string()))?;
            if td == trust_domain {
                return Err(ConfigError::Invalid(format!(
                    "cannot federate with our own trust domain {td}"
                )));
            }
            federation.push(FederatedFile {
                trust_domain: td,
                path: fed.bundle_file,
            });
        }
        let ca = match f.upstream {
            None => CaSource::Embedded,
            Some(u) => CaSource::Upstream {
                cert: u.cert,
                key: u.key,
                bundle: u.bundle,
            },
        };
        if ca_ttl < Duration::from_secs(3) {
            return Err(ConfigError::Invalid("ca_ttl must be at least 3s".into()));
        }
        let bundle_endpoint = f
            .bundle_endpoint
            .map(|b| b.resolve(&trust_domain))
            .transpose()?;
        let federation_endpoints = crate::agent::federation_client::FederationEndpoints::resolve(
            f.federation_endpoints,
            f.federation_min_refresh.as_deref(),
            &trust_domain,
        )?;
        let k8s = match f.k8s.filter(|k| k.is_enabled()) {
            None => None,
            Some(k) => Some(std::sync::Arc::new(
                crate::agent::attest::k8s::K8sAttestor::new(k.resolve(&trust_domain)?)?,
            )),
        };
        Ok(Self {
            k8s,
            bundle_endpoint,
            federation_endpoints,
            trust_domain,
            socket: f.socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            socket_mode,
            state_dir: f.state_dir.unwrap_or_else(default_state_dir),
            svid_ttl,
            jwt_svid_ttl,
            ca_ttl,
            health_addr,
            max_connections_per_uid,
            first_request_timeout,
            entries,
            federation,
            ca,
            federation_poll,
        })
    }
}

fn opt_duration(s: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
    s.map(parse_duration)
        .transpose()
        .map(|d| d.unwrap_or(default))
}

/// `/var/lib/svidcar/agent` when running as root, `/tmp/svidcar/agent-state` otherwise.
pub fn default_state_dir() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    // /proc/self is owned by the effective uid of this process.
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    PathBuf::from(if root {
        DEFAULT_STATE_DIR_ROOT
    } else {
        DEFAULT_STATE_DIR_USER
    })
}

/// Parses `TRUST_DOMAIN=BUNDLE_FILE`.
pub fn parse_federate_flag(s: &str) -> Result<FederationFile, ConfigError> {
    let (td, path) = s
        .split_once('=')
        .ok_or_else(|| ConfigError::Federation(s.to_string()))?;
    if td.is_empty() || path.is_empty() {
        return Err(ConfigError::Federation(s.to_string()));
    }
    Ok(FederationFile {
        trust_domain: td.to_string(),
        bundle_file: PathBuf::from(path),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("1x").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("").is_err());
        // Too large for a Duration: an error, not a panic.
        assert!(parse_duration("99999999999999999999999d").is_err());
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn yaml_rejects_unknown_fields() {
        let err = serde_yaml_ng::from_str::<AgentFile>("trust_domian: x\n").unwrap_err();
        assert!(err.to_string().contains("trust_domian"), "{err}");
        let ok: AgentFile = serde_yaml_ng::from_str(
            "trust_domain: example.org\nentries:\n  - spiffe_id: spiffe://example.org/a\n    selectors: [\"unix:uid:1\"]\n",
        )
        .unwrap();
        let cfg = AgentConfig::from_file(ok).unwrap();
        assert_eq!(cfg.entries.len(), 1);
        assert_eq!(cfg.socket_mode, 0o777);
    }

    #[test]
    fn a_remote_health_address_needs_the_opt_in() {
        let file = |yaml: &str| serde_yaml_ng::from_str::<AgentFile>(yaml).unwrap();
        for remote in ["0.0.0.0:8088", "\"[::]:8088\"", "10.0.0.1:8088"] {
            let e = AgentConfig::from_file(file(&format!("health_addr: {remote}\n")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("health_allow_remote"), "{e}");
            let ok = format!("health_addr: {remote}\nhealth_allow_remote: true\n");
            assert!(AgentConfig::from_file(file(&ok)).is_ok(), "{remote}");
        }
        let cfg = AgentConfig::from_file(file("health_addr: \"[::1]:9\"\n")).unwrap();
        assert!(cfg.health_addr.is_some());
        let cfg = AgentConfig::from_file(file("health_addr: \"off\"\n")).unwrap();
        assert!(cfg.health_addr.is_none());
        assert!(AgentConfig::from_file(AgentFile::default()).is_ok());
    }
}
