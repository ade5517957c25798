//! The credential store: the proxy's live SVID and trust bundles, turned into rustls configs once
//! per rotation and published lock-free (`ArcSwap`) to the data plane.
//!
//! - Each new X.509 context from the agent is validated (the SVID must verify against the bundle
//!   of its own trust domain) before it is installed; an invalid one is logged and the previous
//!   credentials stay.
//! - New handshakes pick up the newest configs; open connections keep what they negotiated.
//! - Fail closed: once the installed SVID has expired (the agent is gone and could not renew it),
//!   [`Credentials::current`] returns `None` and every new connection is refused.
//! - Session resumption never skips verification: the inbound resumption state resumes only
//!   sessions whose client chain verifies against the bundles in force now
//!   ([`svidcar_agent::tls::ResumptionGuard`]); after a resumed handshake, in either direction,
//!   [`Credentials::recheck_inbound`] / [`Credentials::recheck_outbound`] verify the restored
//!   peer chain again (outbound tickets are bound to the config, so a new SVID or new bundles
//!   already start over with full handshakes).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::client::ClientSessionStore;
use rustls::pki_types::{ServerName, UnixTime};
use rustls::{ClientConfig, CommonState};
use svidcar_agent::tls::{self, ExpectedPeer, ServerResumption, TlsError};
use svidcar_agent::{BundleSet, SpiffeId, X509Svid};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Why a context from the agent was not installed.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The context holds no SVID (no registration entry matches this proxy anymore).
    #[error("the agent sent no X.509-SVID for this workload")]
    NoSvid,
    /// The SVID does not verify against the bundle of its trust domain.
    #[error("SVID {id} does not verify against its trust bundle: {source}")]
    Invalid {
        /// The SVID's ID.
        id: SpiffeId,
        /// Why.
        source: svidcar_agent::SvidError,
    },
    /// The SVID verified but names another identity in its chain.
    #[error("SVID says {claimed} but its certificate names {actual}")]
    Mismatch {
        /// The ID field.
        claimed: SpiffeId,
        /// The leaf's URI SAN.
        actual: SpiffeId,
    },
    /// rustls refused to build a config.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// What the agent streams: the workload's SVIDs (first = default) and all bundles.
pub trait X509Source {
    /// The SVIDs, default first.
    fn svids(&self) -> &[X509Svid];
    /// Own and federated bundles.
    fn bundles(&self) -> &BundleSet;
}

impl X509Source for svidcar_agent::client::X509Context {
    fn svids(&self) -> &[X509Svid] {
        &self.svids
    }
    fn bundles(&self) -> &BundleSet {
        &self.bundles
    }
}

/// One installed generation of credentials.
pub struct Installed {
    /// Our SPIFFE ID.
    pub id: SpiffeId,
    /// Leaf serial (hex).
    pub serial: String,
    /// Counts installs (a new SVID or new bundles): connections authenticated under an older
    /// generation are not reused for new application connections (see [`crate::mux::client`]).
    pub generation: u64,
    /// Validity start.
    pub not_before: SystemTime,
    /// Validity end: after it, this generation is no longer served.
    pub not_after: SystemTime,
    /// Bundles in force.
    pub bundles: Arc<BundleSet>,
    /// Inbound configs, one per ALPN profile (chosen per ClientHello).
    pub servers: crate::tls_session::ServerConfigs,
    clients: HashMap<ExpectedPeer, Arc<ClientConfig>>,
}

impl Installed {
    /// The outbound config for servers expected to present `expected`.
    pub fn client_config(&self, expected: &ExpectedPeer) -> Option<Arc<ClientConfig>> {
        self.clients.get(expected).cloned()
    }

    /// True once the SVID has expired.
    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

/// The credential store (see the module docs).
pub struct Credentials {
    current: ArcSwapOption<Installed>,
    client_stores: HashMap<ExpectedPeer, Arc<dyn ClientSessionStore>>,
    server_resumption: ServerResumption,
    metrics: Metrics,
    /// Offer `svidcar-mux/1` (inbound) and ask for it (outbound) before `svidcar/1`.
    mux: bool,
    /// TLS session resumption on outbound connections.
    client_resumption: bool,
    /// Installs so far (the next [`Installed::generation`]).
    generation: std::sync::atomic::AtomicU64,
}

impl Credentials {
    /// A store that will build outbound configs for each of `expected`.
    pub fn new(
        expected: impl IntoIterator<Item = ExpectedPeer>,
        metrics: Metrics,
    ) -> Result<Self, TlsError> {
        let client_stores = expected
            .into_iter()
            .map(|e| (e, tls::client_session_store(256)))
            .collect();
        Ok(Self {
            current: ArcSwapOption::empty(),
            client_stores,
            server_resumption: ServerResumption::new(4096)?,
            metrics,
            mux: false,
            client_resumption: true,
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Sets the ALPN offer (`mux`: `svidcar-mux/1` then `svidcar/1`, else `svidcar/1` only) and
    /// whether outbound handshakes try session resumption. Takes effect at the next install.
    pub fn with_options(mut self, mux: bool, client_resumption: bool) -> Self {
        self.mux = mux;
        self.client_resumption = client_resumption;
        self
    }

    /// The credentials to use for a new connection, or `None` if we hold no valid SVID
    /// (not yet received, or expired: fail closed).
    pub fn current(&self) -> Option<Arc<Installed>> {
        let cur = self.current.load_full()?;
        if cur.expired(SystemTime::now()) {
            return None;
        }
        Some(cur)
    }

    /// The last installed generation even if expired (for `/config`).
    pub fn last(&self) -> Option<Arc<Installed>> {
        self.current.load_full()
    }

    /// True once a valid SVID is held.
    pub fn ready(&self) -> bool {
        self.current().is_some()
    }

    /// Validates `ctx` and, if good, builds and publishes new configs.
    pub fn install(&self, ctx: &dyn X509Source) -> Result<Arc<Installed>, CredentialError> {
        let svid = ctx.svids().first().ok_or(CredentialError::NoSvid)?;
        let bundles = Arc::new(ctx.bundles().clone());
        let actual = svidcar_agent::svid::verify_chain(&svid.chain, &bundles, UnixTime::now())
            .map_err(|source| CredentialError::Invalid {
                id: svid.id.clone(),
                source,
            })?;
        if actual != svid.id {
            return Err(CredentialError::Mismatch {
                claimed: svid.id.clone(),
                actual,
            });
        }
        // One base config (one verifier, and the guarded session cache and ticketer shared by
        // every generation), cloned per ALPN profile: built per install, never per connection.
        let server = tls::server_config(svid, bundles.clone(), &self.server_resumption)?;
        let mesh_alpn = if self.mux {
            vec![tls::ALPN_SVIDCAR_MUX.to_vec(), tls::ALPN_SVIDCAR.to_vec()]
        } else {
            vec![tls::ALPN_SVIDCAR.to_vec()]
        };
        let servers = crate::tls_session::ServerConfigs::new(server, mesh_alpn);
        let mut clients = HashMap::with_capacity(self.client_stores.len());
        for (expected, store) in &self.client_stores {
            let mut cfg =
                tls::client_config(svid, bundles.clone(), expected.clone(), store.clone())?;
            if self.mux || !self.client_resumption {
                let mut c = Arc::unwrap_or_clone(cfg);
                if self.mux {
                    c.alpn_protocols =
                        vec![tls::ALPN_SVIDCAR_MUX.to_vec(), tls::ALPN_SVIDCAR.to_vec()];
                }
                if !self.client_resumption {
                    c.resumption = rustls::client::Resumption::disabled();
                }
                cfg = Arc::new(c);
            }
            clients.insert(expected.clone(), cfg);
        }
        let installed = Arc::new(Installed {
            id: svid.id.clone(),
            serial: svid.serial_hex(),
            generation: self
                .generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1,
            not_before: svid.not_before,
            not_after: svid.not_after,
            bundles,
            servers,
            clients,
        });
        self.current.store(Some(installed.clone()));
        self.metrics.svid_rotations.inc();
        self.update_gauge();
        Ok(installed)
    }

    /// Inbound: when `conn` was resumed, verifies the client's chain (restored from the ticket)
    /// again against the bundles in force, now ([`tls::recheck_resumed`]).
    pub fn recheck_inbound(&self, conn: &CommonState) -> Result<(), TlsError> {
        self.recheck(conn, svidcar_agent::svid::PeerRole::Client, None)
    }

    /// Outbound: when `conn` was resumed, verifies the server's chain again against the bundles
    /// in force, now, and that it still names `expected`.
    pub fn recheck_outbound(
        &self,
        conn: &CommonState,
        expected: &ExpectedPeer,
    ) -> Result<(), TlsError> {
        self.recheck(conn, svidcar_agent::svid::PeerRole::Server, Some(expected))
    }

    fn recheck(
        &self,
        conn: &CommonState,
        role: svidcar_agent::svid::PeerRole,
        expected: Option<&ExpectedPeer>,
    ) -> Result<(), TlsError> {
        if conn.handshake_kind() != Some(rustls::HandshakeKind::Resumed) {
            return Ok(());
        }
        let bundles = self.last().ok_or(TlsError::NoBundles)?.bundles.clone();
        let chains = self.server_resumption.guard.chains();
        tls::recheck_resumed(conn, &bundles, role, expected, chains)
    }

    /// Drops the outbound resumption tickets held for `name` under `expected` (their server
    /// chain no longer verifies), so that the next handshake there is a full one.
    pub fn forget_sessions(&self, expected: &ExpectedPeer, name: &ServerName<'static>) {
        let Some(store) = self.client_stores.get(expected) else {
            return;
        };
        store.remove_tls12_session(name);
        // The store holds a few tickets per server; bounded in case the peer keeps adding.
        for _ in 0..64 {
            if store.take_tls13_ticket(name).is_none() {
                break;
            }
        }
    }

    /// Forgets the credentials (the agent says this workload has no identity anymore).
    pub fn clear(&self) {
        self.current.store(None);
    }

    fn update_gauge(&self) {
        let secs = match self.current.load_full() {
            Some(c) => match c.not_after.duration_since(SystemTime::now()) {
                Ok(left) => left.as_secs() as i64,
                Err(past) => -(past.duration().as_secs() as i64),
            },
            None => 0,
        };
        self.metrics.svid_expiry_seconds.set(secs);
    }

    /// Follows the agent's stream forever: installs each new context, refreshes the expiry gauge,
    /// and says loudly when the cached SVID expired (fail closed).
    pub async fn follow<C>(self: Arc<Self>, mut rx: watch::Receiver<Option<Arc<C>>>)
    where
        C: X509Source + Send + Sync + 'static,
    {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut expired_logged = false;
        loop {
            let ctx = rx.borrow_and_update().clone();
            if let Some(ctx) = ctx {
                match self.install(ctx.as_ref()) {
                    Ok(i) => {
                        expired_logged = false;
                        tracing::info!(
                            id = %i.id,
                            serial = %i.serial,
                            expires_in_s = i.not_after.duration_since(SystemTime::now()).map(|d| d.as_secs()).unwrap_or(0),
                            trust_domains = i.bundles.len(),
                            "installed X.509-SVID"
                        );
                    }
                    Err(CredentialError::NoSvid) => {
                        tracing::error!(
                            "the agent sent no SVID for this proxy: refusing new connections"
                        );
                        self.clear();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "rejected new credentials; keeping the previous ones")
                    }
                }
            }
            loop {
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() {
                            tracing::error!("the Workload API watcher stopped; serving the cached SVID until it expires");
                            // Keep ticking the gauge until the process ends.
                            loop {
                                tick.tick().await;
                                self.update_gauge();
                            }
                        }
                        break;
                    }
                    _ = tick.tick() => {
                        self.update_gauge();
                        if let Some(c) = self.last() {
                            if c.expired(SystemTime::now()) && !expired_logged {
                                expired_logged = true;
                                tracing::error!(id = %c.id, "cached SVID expired and the agent has not renewed it: failing closed (new connections refused)");
                            }
                        }
                    }
                }
            }
        }
    }
}
