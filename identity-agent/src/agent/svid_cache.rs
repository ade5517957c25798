//! One X.509-SVID per identity, shared by every stream of the agent (Workload API
//! `FetchX509SVID` and SDS), as SPIRE's agent serves one cached SVID per registration entry.
//!
//! - **Keyed by identity after attestation**: a stream attests its caller first, then leases
//!   the slots of the entries it matched ([`SvidCache::lease`]). The key is the SPIFFE ID and
//!   the TTL (what goes into the certificate); the hint stays per entry. A caller can only
//!   ever reach the slots of entries it was attested for, so an entry that no longer matches
//!   (removed from the configuration, a pod gone) is never served to a new caller.
//! - **One SVID until half life**: every lease of an identity gets the same SVID (same key,
//!   same serial). The first stream to look at it after its half life, or after the active CA
//!   changed, issues the successor under the slot's lock; every other stream of that identity
//!   then gets the successor (they wake at the same half-life instant, or on the same state
//!   change, and push it). Two streams arriving at once issue once.
//! - **Bounded**: a slot nobody leases is dropped once its SVID has expired or its CA is no
//!   longer the active one, by [`SvidCache::sweep`] (run every minute by the server, and
//!   whenever the map doubled) or when its last lease ends. So the cache holds at most the
//!   identities in use plus those released within one SVID lifetime.
//! - **Memory only**: the private keys live in the cached [`IssuedSvid`]s, never on disk; a
//!   restart issues new SVIDs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::agent::ca::{CaError, IssuedSvid};
use crate::agent::entries::Entry;
use crate::agent::health::Metrics;
use crate::agent::TrustState;
use crate::spiffe_id::SpiffeId;

/// The map is swept when it reaches this size, then whenever it doubled since the last sweep.
const MIN_SWEEP: usize = 64;

/// What goes into an SVID: one cached SVID per (ID, TTL).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    id: SpiffeId,
    ttl: Duration,
}

/// The SVID of one identity and the CA (serial) that signed it.
struct Current {
    svid: Arc<IssuedSvid>,
    signer: String,
}

/// One identity's slot; its lock is held while issuing, so concurrent streams issue once.
struct Slot {
    key: Key,
    hint: String,
    current: Mutex<Option<Current>>,
}

impl Slot {
    fn current(&self) -> MutexGuard<'_, Option<Current>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when nobody should be handed this slot's SVID anymore: none yet, expired, or
    /// signed by a CA that is no longer the active one.
    fn spent(&self, signer: &str, now: SystemTime) -> bool {
        self.current()
            .as_ref()
            .is_none_or(|c| now >= c.svid.not_after || c.signer != signer)
    }
}

struct Held {
    slot: Arc<Slot>,
    leases: usize,
}

struct Slots {
    map: HashMap<Key, Held>,
    sweep_at: usize,
}

/// Why an SVID could not be issued.
#[derive(Debug, thiserror::Error)]
#[error("cannot issue an SVID for {id}: {source}")]
pub struct IssueError {
    /// The identity.
    pub id: SpiffeId,
    /// The CA's reason.
    pub source: CaError,
}

/// The agent's SVID cache; shared (`Arc`) by the Workload API and SDS services.
pub struct SvidCache {
    state: watch::Receiver<Arc<TrustState>>,
    default_ttl: Duration,
    metrics: Arc<Metrics>,
    slots: Mutex<Slots>,
}

impl SvidCache {
    /// A cache issuing from the active CA of `state`, for `default_ttl` unless an entry says
    /// otherwise.
    pub fn new(
        state: watch::Receiver<Arc<TrustState>>,
        default_ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            state,
            default_ttl,
            metrics,
            slots: Mutex::new(Slots {
                map: HashMap::new(),
                sweep_at: MIN_SWEEP,
            }),
        })
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leases the slots of `entries` (an attested caller's matches, in order) for one stream
    /// or call; released when the [`Lease`] is dropped.
    pub fn lease(self: &Arc<Self>, entries: &[Entry]) -> Lease {
        let mut slots = self.slots();
        let mut held = Vec::with_capacity(entries.len());
        for e in entries {
            let key = Key {
                id: e.id.clone(),
                ttl: e.ttl.unwrap_or(self.default_ttl),
            };
            let h = slots.map.entry(key.clone()).or_insert_with(|| Held {
                slot: Arc::new(Slot {
                    key,
                    hint: e.hint.clone(),
                    current: Mutex::new(None),
                }),
                leases: 0,
            });
            h.leases += 1;
            held.push((h.slot.clone(), e.hint.clone()));
        }
        if slots.map.len() >= slots.sweep_at {
            self.sweep_locked(&mut slots, SystemTime::now());
        }
        self.metrics
            .svid_cache_identities
            .set(slots.map.len() as i64);
        Lease {
            cache: self.clone(),
            held,
        }
    }

    /// Drops the slots nobody leases whose SVID expired or was signed by a CA that is no
    /// longer active (their private keys go with them).
    pub fn sweep(&self) {
        let mut slots = self.slots();
        self.sweep_locked(&mut slots, SystemTime::now());
        self.metrics
            .svid_cache_identities
            .set(slots.map.len() as i64);
    }

    fn sweep_locked(&self, slots: &mut Slots, now: SystemTime) {
        let signer = self.state.borrow().signer.serial_hex.clone();
        slots
            .map
            .retain(|_, h| h.leases > 0 || !h.slot.spent(&signer, now));
        slots.sweep_at = (slots.map.len() * 2).max(MIN_SWEEP);
    }

    /// Number of identities held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.slots().map.len()
    }

    /// True when no identity is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn release(&self, held: &[(Arc<Slot>, String)]) {
        let mut slots = self.slots();
        let now = SystemTime::now();
        let signer = self.state.borrow().signer.serial_hex.clone();
        for (slot, _) in held {
            let Some(h) = slots.map.get_mut(&slot.key) else {
                continue;
            };
            h.leases = h.leases.saturating_sub(1);
            if h.leases == 0 && h.slot.spent(&signer, now) {
                slots.map.remove(&slot.key);
            }
        }
        self.metrics
            .svid_cache_identities
            .set(slots.map.len() as i64);
    }

    /// The slot's SVID, issued from the active CA when there is none, at half life, or when
    /// the CA that signed it is no longer active.
    fn get(&self, slot: &Slot, now: SystemTime) -> Result<Arc<IssuedSvid>, IssueError> {
        let mut current = slot.current();
        // Read after taking the lock: a stream that waited for another's issuance sees the
        // state that issuance used (or a newer one), never an older one.
        let st = self.state.borrow().clone();
        if let Some(c) = current.as_ref() {
            if c.signer == st.signer.serial_hex && now < c.svid.refresh_at() {
                return Ok(c.svid.clone());
            }
        }
        let svid = st
            .signer
            .issue(&slot.key.id, &slot.hint, slot.key.ttl, now)
            .map_err(|source| IssueError {
                id: slot.key.id.clone(),
                source,
            })?;
        self.metrics.x509_svids_issued.inc();
        tracing::debug!(id = %slot.key.id, not_after = ?svid.not_after, ca = %st.signer.serial_hex,
            "issued X.509-SVID (shared by every stream of this identity)");
        let svid = Arc::new(svid);
        *current = Some(Current {
            svid: svid.clone(),
            signer: st.signer.serial_hex.clone(),
        });
        Ok(svid)
    }
}

/// One stream's (or call's) hold on the slots of its entries.
pub struct Lease {
    cache: Arc<SvidCache>,
    held: Vec<(Arc<Slot>, String)>,
}

impl Lease {
    /// The SVIDs of the leased entries, in entry order (see [`SvidCache`] for when they are
    /// issued anew).
    pub fn svids(&self) -> Result<Vec<Arc<IssuedSvid>>, IssueError> {
        self.svids_at(SystemTime::now())
    }

    fn svids_at(&self, now: SystemTime) -> Result<Vec<Arc<IssuedSvid>>, IssueError> {
        self.held
            .iter()
            .map(|(slot, _)| self.cache.get(slot, now))
            .collect()
    }

    /// The entries' hints, aligned with [`Lease::svids`] (an SVID is shared by entries of the
    /// same ID; the hint is each entry's own).
    pub fn hints(&self) -> impl Iterator<Item = &str> {
        self.held.iter().map(|(_, h)| h.as_str())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.cache.release(&self.held);
    }
}

#[cfg(test)]
#[path = "svid_cache_tests.rs"]
mod tests;
