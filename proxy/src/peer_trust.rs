//! Whether an authenticated inbound peer is still trusted, long after its handshake.
//!
//! A connection outlives the peer's SVID and our own credential changes, so what a connection
//! starts afterwards — a new stream of a multiplexed carrier ([`crate::mux::server`]), a new
//! request on an `http` port ([`crate::http`]) — first asks [`PeerTrust::check`]: the peer's
//! leaf has not expired (the same clock as the handshake's verification), its trust domain still
//! has a bundle, and after our credentials changed its chain verifies again against the bundles
//! now in force. A peer that fails is refused with the reason label [`REASON`].
//!
//! Plain `tcp` connections are not cut at the peer's expiry (as in Istio and Linkerd): they
//! carry no requests to check; a new connection needs a new handshake, which verifies.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use svidcar_agent::SpiffeId;

use crate::credentials::Credentials;

/// The reason label (logs, `svidcar_proxy_http_refused_total`) of a peer that is no longer
/// trusted.
pub const REASON: &str = "peer_invalid";

/// An authenticated peer as verified at the handshake.
pub struct PeerTrust {
    creds: Arc<Credentials>,
    peer: SpiffeId,
    /// The peer's trust domain, kept so the per-request check allocates nothing.
    trust_domain: svidcar_agent::TrustDomain,
    chain: Vec<CertificateDer<'static>>,
    not_after: SystemTime,
    /// [`crate::credentials::Installed::generation`] the chain last verified under.
    verified: AtomicU64,
}

impl PeerTrust {
    /// The peer `peer` presenting `chain`, whose leaf expires at `not_after`, verified under
    /// generation `generation` of `creds` (the credentials it is checked against from now on).
    pub fn new(
        creds: Arc<Credentials>,
        peer: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        not_after: SystemTime,
        generation: u64,
    ) -> Self {
        Self {
            creds,
            trust_domain: peer.trust_domain(),
            peer,
            chain,
            not_after,
            verified: AtomicU64::new(generation),
        }
    }

    /// The verified peer of an established server connection (`None` without a readable
    /// peer certificate: refuse the connection).
    pub fn of(
        creds: Arc<Credentials>,
        conn: &rustls::ServerConnection,
        peer: SpiffeId,
        generation: u64,
    ) -> Option<Self> {
        let not_after = svidcar_agent::tls::peer_not_after(conn)?;
        let chain = conn
            .peer_certificates()?
            .iter()
            .map(|c| c.clone().into_owned())
            .collect();
        Some(Self::new(creds, peer, chain, not_after, generation))
    }

    /// How long until the peer's leaf expires (zero once it has).
    pub fn expires_in(&self) -> Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    }

    /// Before each new stream or request: `Ok` while the peer is still trusted, else why not.
    pub fn check(&self) -> Result<(), String> {
        let Some(own) = self.creds.current() else {
            return Err("no SVID in force".into());
        };
        let now = SystemTime::now();
        if now >= self.not_after {
            let ago = now
                .duration_since(self.not_after)
                .unwrap_or_default()
                .as_secs();
            return Err(format!(
                "the peer's SVID ({}) expired {ago}s ago",
                self.peer
            ));
        }
        let td = &self.trust_domain;
        if own
            .bundles
            .get(td)
            .is_none_or(|b| b.x509_authorities.is_empty())
        {
            return Err(format!(
                "the peer {} no longer verifies under the current bundles: no bundle for its trust domain {}",
                self.peer,
                td.name()
            ));
        }
        if own.generation == self.verified.load(Ordering::Acquire) {
            return Ok(());
        }
        let id = svidcar_agent::svid::verify_chain_for(
            &self.chain,
            &own.bundles,
            rustls::pki_types::UnixTime::now(),
            svidcar_agent::svid::PeerRole::Client,
        )
        .map_err(|e| {
            format!(
                "the peer {} no longer verifies under the current bundles: {e}",
                self.peer
            )
        })?;
        if id != self.peer {
            return Err(format!(
                "the peer's certificate now names {id}, not {}",
                self.peer
            ));
        }
        self.verified.store(own.generation, Ordering::Release);
        Ok(())
    }
}
