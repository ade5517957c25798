//! Session resumption that never skips peer verification.
//!
//! A resumed TLS 1.3 handshake restores the peer's certificates from the ticket (or the session
//! cache) without calling the verifier: without this module a peer whose SVID expired, or whose
//! trust domain left our bundles, would be admitted for as long as its tickets live (hours).
//!
//! - Server side, before resuming: [`ResumptionGuard`] sits in front of the ticketer and the
//!   session cache of [`super::ServerResumption`]. A ticket whose client chain no longer verifies
//!   against the bundles in force now (expired, trust domain removed, authority gone) is not
//!   resumed: rustls falls back to a full handshake, where the verifier decides (an honest peer
//!   that rotated its SVID then simply presents the new one).
//! - Both sides, after the handshake: [`recheck_resumed`] verifies the peer of a resumed
//!   connection again against the bundles and clock of now. On the server it is a second line
//!   behind the guard; on the client it is the check (the client's ticket store cannot be
//!   inspected), and the caller drops the stale tickets and dials again.
//! - [`VerifiedChains`] remembers successful verifications (per chain, role and bundle set, until
//!   the earliest expiry in the chain or its trust domain's authorities), so that resumed
//!   handshakes keep their cost.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwapOption;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::{ProducesTickets, StoresServerSessions};
use rustls::{CommonState, HandshakeKind};

use super::{ExpectedPeer, TlsError};
use crate::bundle::BundleSet;
use crate::spiffe_id::SpiffeId;
use crate::svid::{self, PeerRole, SvidError};

/// Successful chain verifications, reused until something they depended on changes.
pub struct VerifiedChains {
    entries: Mutex<HashMap<Vec<u8>, Verified>>,
    capacity: usize,
}

struct Verified {
    bundles: Weak<BundleSet>,
    /// Unix seconds: the earliest `notAfter` of the chain and of its trust domain's authorities.
    until: i64,
    id: SpiffeId,
}

impl fmt::Debug for VerifiedChains {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedChains").finish_non_exhaustive()
    }
}

fn role_tag(role: PeerRole) -> u8 {
    match role {
        PeerRole::Any => 0,
        PeerRole::Server => 1,
        PeerRole::Client => 2,
    }
}

fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

impl VerifiedChains {
    /// A cache of at most `capacity` chains (emptied when full).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Verified>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`svid::verify_chain_for`], answered from the cache when the same chain already verified
    /// for `role` under this very `bundles` set and nothing in it has expired since.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        bundles: &Arc<BundleSet>,
        now: UnixTime,
        role: PeerRole,
    ) -> Result<SpiffeId, SvidError> {
        let mut key = Vec::with_capacity(1 + chain.iter().map(|c| c.len() + 4).sum::<usize>());
        key.push(role_tag(role));
        for c in chain {
            key.extend_from_slice(&u32::try_from(c.len()).unwrap_or(u32::MAX).to_be_bytes());
            key.extend_from_slice(c);
        }
        let now_secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let weak = Arc::downgrade(bundles);
        if let Some(v) = self.lock().get(&key) {
            if Weak::ptr_eq(&v.bundles, &weak) && now_secs < v.until {
                return Ok(v.id.clone());
            }
        }
        let id = svid::verify_chain_for(chain, bundles, now, role)?;
        let authorities = bundles
            .get(&id.trust_domain())
            .map(|b| b.x509_authorities.as_slice())
            .unwrap_or_default();
        let until = chain
            .iter()
            .map(|c| c.as_ref())
            .chain(authorities.iter().map(|a| a.as_ref()))
            .map(|der| not_after(der).unwrap_or(i64::MIN))
            .min()
            .unwrap_or(i64::MIN);
        let mut entries = self.lock();
        if entries.len() >= self.capacity {
            entries.clear();
        }
        entries.insert(
            key,
            Verified {
                bundles: weak,
                until,
                id: id.clone(),
            },
        );
        Ok(id)
    }
}

/// Decides, before rustls resumes a session, whether the client chain the ticket restores
/// still verifies (see the module docs). Follows the bundles of the last server config built
/// with it ([`ResumptionGuard::set_bundles`]); without bundles nothing is resumed.
pub struct ResumptionGuard {
    bundles: ArcSwapOption<BundleSet>,
    chains: VerifiedChains,
}

impl fmt::Debug for ResumptionGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResumptionGuard").finish_non_exhaustive()
    }
}

impl ResumptionGuard {
    /// A guard without bundles yet (it refuses every resumption until [`Self::set_bundles`]);
    /// it remembers up to `capacity` (at most 1024) verified chains.
    pub fn new(capacity: usize) -> Self {
        Self {
            bundles: ArcSwapOption::empty(),
            chains: VerifiedChains::new(capacity.min(1024)),
        }
    }

    /// The bundles tickets are checked against from now on.
    pub fn set_bundles(&self, bundles: Arc<BundleSet>) {
        self.bundles.store(Some(bundles));
    }

    /// The verification cache (shared with [`recheck_resumed`] callers).
    pub fn chains(&self) -> &VerifiedChains {
        &self.chains
    }

    /// True when the session `plain` (rustls' encoding) may be resumed.
    fn admit(&self, plain: &[u8]) -> bool {
        let Some(chain) = ticket_client_chain(plain) else {
            tracing::debug!("not resuming a TLS session without a readable client certificate");
            return false;
        };
        let Some(bundles) = self.bundles.load_full() else {
            return false;
        };
        match self
            .chains
            .verify(&chain, &bundles, UnixTime::now(), PeerRole::Client)
        {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(error = %e, "not resuming a TLS session: its client certificate no longer verifies (full handshake instead)");
                false
            }
        }
    }
}

/// The client certificate chain inside a server session value as rustls 0.23 encodes it
/// (`ServerSessionValue`: SNI option, version, suite, master secret, extended-MS flag, client
/// chain option, ...). `None` when absent or unreadable — the caller then does not resume, so a
/// change of the encoding costs resumption (caught by the tests), never verification.
pub(crate) fn ticket_client_chain(plain: &[u8]) -> Option<Vec<CertificateDer<'static>>> {
    let mut r = Reader(plain);
    if r.u8()? == 1 {
        let n = r.u8()?;
        r.take(usize::from(n))?;
    }
    let version = r.take(2)?;
    if version != [0x03, 0x04] && version != [0x03, 0x03] {
        return None;
    }
    r.take(2)?; // cipher suite
    let secret = r.u8()?;
    r.take(usize::from(secret))?;
    if r.u8()? > 1 {
        return None; // extended master secret: a boolean
    }
    if r.u8()? != 1 {
        return None;
    }
    let total = r.u24()?;
    let mut list = Reader(r.take(total)?);
    let mut chain = Vec::new();
    while !list.0.is_empty() {
        let len = list.u24()?;
        chain.push(CertificateDer::from(list.take(len)?.to_vec()));
    }
    (!chain.is_empty()).then_some(chain)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u24(&mut self) -> Option<usize> {
        let b = self.take(3)?;
        Some(usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}

/// A ticketer whose tickets are only resumed when [`ResumptionGuard`] admits them.
pub(crate) struct GuardedTicketer {
    pub(crate) inner: Arc<dyn ProducesTickets>,
    pub(crate) guard: Arc<ResumptionGuard>,
}

impl fmt::Debug for GuardedTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedTicketer").finish_non_exhaustive()
    }
}

impl ProducesTickets for GuardedTicketer {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }
    fn lifetime(&self) -> u32 {
        self.inner.lifetime()
    }
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.inner.encrypt(plain)
    }
    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let plain = self.inner.decrypt(cipher)?;
        self.guard.admit(&plain).then_some(plain)
    }
}

/// A session cache whose sessions are only resumed when [`ResumptionGuard`] admits them.
pub(crate) struct GuardedSessions {
    pub(crate) inner: Arc<dyn StoresServerSessions>,
    pub(crate) guard: Arc<ResumptionGuard>,
}

impl fmt::Debug for GuardedSessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedSessions").finish_non_exhaustive()
    }
}

impl StoresServerSessions for GuardedSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.inner.put(key, value)
    }
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let plain = self.inner.get(key)?;
        self.guard.admit(&plain).then_some(plain)
    }
    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let plain = self.inner.take(key)?;
        self.guard.admit(&plain).then_some(plain)
    }
    fn can_cache(&self) -> bool {
        self.inner.can_cache()
    }
}

/// After a handshake: when it was *resumed*, verifies the peer's chain (restored from the
/// ticket, never seen by the verifier) again against `bundles` at the current time, for `role`,
/// and against `expected` when given. A full handshake passes (the verifier ran). The error
/// reads as a refusal reason; callers label it `resumed_peer_invalid`.
pub fn recheck_resumed(
    conn: &CommonState,
    bundles: &Arc<BundleSet>,
    role: PeerRole,
    expected: Option<&ExpectedPeer>,
    chains: &VerifiedChains,
) -> Result<(), TlsError> {
    if conn.handshake_kind() != Some(HandshakeKind::Resumed) {
        return Ok(());
    }
    let chain = conn.peer_certificates().unwrap_or_default();
    let id = chains.verify(chain, bundles, UnixTime::now(), role)?;
    match expected {
        Some(want) if !want.matches(&id) => Err(TlsError::UnexpectedPeer {
            expected: want.clone(),
            actual: id,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[path = "tls_resume_tests.rs"]
mod tests;
