//! The node identity agent: attests workloads on a unix socket and serves them SVIDs and
//! bundles over the SPIFFE Workload API, from an embedded (or upstream) CA.
//!
//! Data flow: [`rotation::CaSet`] and [`federation`] publish one shared [`TrustState`] through
//! a `watch` channel; every Workload API stream reads it, attests its caller once
//! ([`attest::unix`]), matches [`entries`] and takes its SVIDs from the [`svid_cache`]: one
//! SVID per identity, issued lazily from the active CA ([`ca`]), shared by every Workload API
//! and SDS stream of that identity and re-issued at half life or when the CA changes. Memory
//! per stream is a few `Arc`s (its SVIDs, the shared state) — no per-stream queue.

pub mod attest;
pub mod bundle_endpoint;
pub mod ca;
pub mod config;
pub mod entries;
pub mod federation;
pub mod federation_client;
pub mod file_safety;
pub mod grpc_health;
pub mod grpc_reflection;
pub mod health;
pub mod jwt_keys;
pub mod rotation;
pub mod sds;
pub mod sds_resources;
pub mod svid_cache;
pub mod upstream_ca;
pub mod upstream_files;
pub mod workload_api;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;

use crate::bundle::{Bundle, BundleSet};
use crate::jwt::JwtSigner;
use crate::spiffe_id::TrustDomain;

pub use config::{AgentConfig, AgentFile};

use ca::{CaError, SigningCa};
use health::Metrics;
use jwt_keys::JwtKeys;
use rotation::CaSet;

/// Why the agent could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("CA: {0}")]
    Ca(#[from] ca::CaError),
    #[error("socket {path}: {reason}")]
    Socket { path: String, reason: String },
    #[error("health listener {addr}: {reason}")]
    Health { addr: String, reason: String },
    #[error("JWT signing key: {0}")]
    Jwt(String),
    #[error("state directory: {0}")]
    State(String),
    #[error("refusing to start: {path} {problem}; fix: {fix}")]
    UnsafePath {
        path: String,
        problem: String,
        fix: String,
    },
    #[error("Workload API server: {0}")]
    Serve(String),
}

/// What every stream needs, shared through one `watch`: the active CA, our bundle and the
/// federated bundles. Replaced (never mutated) on every change.
#[derive(Clone)]
pub struct TrustState {
    /// The CA that signs new SVIDs.
    pub signer: Arc<SigningCa>,
    /// Our trust domain's bundle (X.509 roots incl. next/retired, JWT keys).
    pub bundle: Arc<Bundle>,
    /// Foreign trust domains' bundles loaded from files.
    pub federated: Arc<BTreeMap<TrustDomain, Bundle>>,
    /// Signs JWT-SVIDs; its public key is in `bundle`.
    pub jwt: Arc<JwtSigner>,
    /// Bumped whenever `bundle` or `federated` changes.
    pub bundles_version: u64,
}

impl TrustState {
    /// All bundles (ours and federated) for validation.
    pub fn bundle_set(&self) -> BundleSet {
        let mut set = BundleSet::new();
        set.insert((*self.bundle).clone());
        for b in self.federated.values() {
            set.insert(b.clone());
        }
        set
    }
}

/// Builds our own bundle from the CA set and the JWT keys.
fn own_bundle(td: &TrustDomain, cas: &CaSet, jwt: &JwtKeys, sequence: u64) -> Bundle {
    let mut b = Bundle::new(td.clone());
    b.x509_authorities = cas.bundle_authorities();
    for key in jwt.public_keys() {
        b.add_jwt_key(key);
    }
    b.sequence = sequence;
    b
}

/// The own bundle's `spiffe_sequence`, persisted in the state directory (`bundle-sequence`) so
/// it keeps increasing across restarts, as SPIFFE federation requires of a bundle's sequence.
struct Sequence {
    path: std::path::PathBuf,
    value: u64,
}

impl Sequence {
    /// The last persisted value + 1 (1 on first start), written back at once.
    fn load(dir: &std::path::Path) -> Result<Self, AgentError> {
        let path = dir.join("bundle-sequence");
        let last = match std::fs::read_to_string(&path) {
            Ok(t) => t.trim().parse::<u64>().map_err(|e| {
                AgentError::State(format!("{}: not a bundle sequence: {e}", path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(AgentError::State(format!("{}: {e}", path.display()))),
        };
        let mut seq = Self { path, value: last };
        seq.bump()
            .map_err(|e| AgentError::State(format!("{}: {e}", seq.path.display())))?;
        Ok(seq)
    }

    /// Increments and persists (the new value is used even if writing fails; the error is
    /// returned for the caller to report).
    fn bump(&mut self) -> std::io::Result<u64> {
        self.value = self.value.saturating_add(1);
        std::fs::write(&self.path, self.value.to_string())?;
        Ok(self.value)
    }
}

/// Warns about entries that select on `unix:path:` without a uid or gid: any local user who
/// can run that binary (or exec it on a connection opened just before) gets the identity.
fn warn_path_only_entries(entries: &[entries::Entry]) {
    for e in entries {
        let has = |p: &str| e.selectors.iter().any(|s| s.starts_with(p));
        if has("unix:path:")
            && !has("unix:uid:")
            && !has("unix:gid:")
            && !has("unix:supplementary_gid:")
        {
            tracing::warn!(id = %e.id, selectors = ?e.selectors,
                "entry selects on unix:path: without unix:uid: or unix:gid: — any local user who \
                 can run that binary gets this identity; add the uid (or gid) the workload runs as");
        }
    }
}

/// Runs the agent until `shutdown` completes: loads (or creates) the CA, starts the health
/// listener, federation watchers and the CA rotation schedule, then serves the Workload API on
/// the unix socket. The socket file is removed on the way out.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let config = Arc::new(config);
    file_safety::prepare_socket_dir(&config.socket)?;
    file_safety::prepare_state_dir(&config.state_dir)?;
    if let config::CaSource::Upstream { cert, key, bundle } = &config.ca {
        file_safety::check_upstream_files(cert, key, bundle.as_deref())?;
    }
    warn_path_only_entries(&config.entries);
    let metrics = Arc::new(Metrics::new());
    let mut cas = CaSet::load(
        &config.ca,
        &config.trust_domain,
        config.ca_ttl,
        &config.state_dir,
        SystemTime::now(),
    )?;
    let mut jwt = JwtKeys::load(&config.state_dir).map_err(AgentError::Jwt)?;
    jwt.follow(
        cas.has_next(),
        false,
        SystemTime::now(),
        config.jwt_svid_ttl,
    )
    .map_err(AgentError::Jwt)?;
    let mut sequence = Sequence::load(&config.state_dir)?;
    let initial = TrustState {
        signer: cas.active().clone(),
        bundle: Arc::new(own_bundle(&config.trust_domain, &cas, &jwt, sequence.value)),
        federated: Arc::new(federation::load_initial(&config.federation, &metrics)),
        jwt: jwt.active().clone(),
        bundles_version: 1,
    };
    metrics.set_ca_not_after(initial.signer.not_after);
    let (state_tx, state_rx) = watch::channel(Arc::new(initial));
    let state_tx = Arc::new(state_tx);
    let (ready_tx, ready_rx) = watch::channel(false);

    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = config.health_addr {
        let listener =
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| AgentError::Health {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })?;
        tasks.spawn(health::serve(listener, metrics.clone(), ready_rx));
    }
    if let Some(be) = config.bundle_endpoint.clone() {
        let listener = bundle_endpoint::bind(&be)
            .await
            .map_err(AgentError::Serve)?;
        tasks.spawn(bundle_endpoint::serve(
            be,
            listener,
            state_rx.clone(),
            config.svid_ttl,
        ));
    }
    for ep in config.federation_endpoints.endpoints.iter().cloned() {
        let min = config.federation_endpoints.min_refresh;
        tasks.spawn(federation_client::poll(
            ep,
            min,
            state_tx.clone(),
            metrics.clone(),
        ));
    }
    for f in config.federation.iter().cloned() {
        tasks.spawn(federation::watch_file(
            f,
            config.federation_poll,
            state_tx.clone(),
            metrics.clone(),
        ));
    }
    {
        let state_tx = state_tx.clone();
        let metrics = metrics.clone();
        let td = config.trust_domain.clone();
        let token_ttl = config.jwt_svid_ttl;
        tasks.spawn(async move {
            loop {
                let Some(at) = cas.next_event() else { return };
                let at = jwt.next_expiry().map_or(at, |j| j.min(at));
                let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(wait).await;
                let now = SystemTime::now();
                // The JWT key switches only when a prepared (published) root does, never on an
                // upstream intermediate reload or an emergency new root.
                let (had_next, serial) = (cas.has_next(), cas.active().serial_hex.clone());
                let ticked = cas.tick(now).and_then(|ca_changed| {
                    let activated = had_next && cas.active().serial_hex != serial;
                    let jwt_changed = jwt
                        .follow(cas.has_next(), activated, now, token_ttl)
                        .map_err(|reason| CaError::Load {
                            what: "JWT signing keys".into(),
                            reason,
                        })?;
                    Ok(ca_changed || jwt_changed)
                });
                match ticked {
                    Ok(false) => {}
                    Ok(true) => {
                        if let Err(e) = sequence.bump() {
                            tracing::warn!(error = %e, path = %sequence.path.display(),
                                "cannot persist the bundle sequence; a restart may reuse it");
                        }
                        let bundle = Arc::new(own_bundle(&td, &cas, &jwt, sequence.value));
                        let signer = cas.active().clone();
                        let jwt_signer = jwt.active().clone();
                        metrics.set_ca_not_after(signer.not_after);
                        state_tx.send_modify(|s| {
                            let mut n = (**s).clone();
                            n.signer = signer;
                            n.jwt = jwt_signer;
                            n.bundle = bundle;
                            n.bundles_version += 1;
                            *s = Arc::new(n);
                        });
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "CA rotation failed; retrying in 5s");
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    }
                }
            }
        });
    }

    let result = workload_api::serve(config.clone(), state_rx, metrics, ready_tx, shutdown).await;
    tasks.shutdown().await;
    result
}
