//! The counters behind the limits: per caller one [`Entry`] of three atomic words (open
//! connections, and the "theoretical arrival time" of two GCRA token buckets), in a sharded map
//! with a cap. Taking a token or a slot is one atomic operation on the caller's entry — no lock,
//! no allocation; the map is only consulted when a connection is admitted.
//!
//! Bounded memory: at most [`MAX_TRACKED_CALLERS`] callers per limit. When a shard is full, the
//! callers at rest (bucket full again, no open connection, not held by a connection) are
//! evicted — losing nothing, an entry at rest is the same as a new one; when none is at rest,
//! further callers share one overflow entry (still limited, together), which is logged (at
//! most once per sweep) and counted ([`LimitState::overflowed`], `/policy`).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Callers tracked per limit at most (then the overflow entry is shared).
pub const MAX_TRACKED_CALLERS: usize = 16_384;

const SHARDS: usize = 16;

/// A full shard is swept at most this often (a flood of new callers must not turn every
/// admission into a sweep).
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Monotonic time since the first call in this process: the clock of every bucket.
pub fn now() -> Duration {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed()
}

/// A token bucket as GCRA: one request every `interval`, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gcra {
    interval: u64,
    tolerance: u64,
    rate: f64,
    burst: u32,
}

impl Gcra {
    /// `rate` per second (> 0), `burst` ≥ 1.
    pub fn new(rate: f64, burst: u32) -> Self {
        let interval = (1e9 / rate).round().max(1.0) as u64;
        let burst = burst.max(1);
        Self {
            interval,
            tolerance: interval.saturating_mul(u64::from(burst) - 1),
            rate,
            burst,
        }
    }

    /// Requests per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Bucket size.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Takes one token from the bucket whose state is `tat` at `now`, or returns how long until
    /// one is available.
    #[inline]
    pub fn take(&self, tat: &AtomicU64, now: Duration) -> Result<(), Duration> {
        let now = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        let mut cur = tat.load(Ordering::Relaxed);
        loop {
            let base = cur.max(now);
            let ahead = base - now;
            if ahead > self.tolerance {
                return Err(Duration::from_nanos(ahead - self.tolerance));
            }
            match tat.compare_exchange_weak(
                cur,
                base.saturating_add(self.interval),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => cur = seen,
            }
        }
    }
}

/// One caller's counters under one limit.
#[derive(Debug, Default)]
pub struct Entry {
    /// Open connections.
    pub open: AtomicU32,
    /// `connectionsPerSecond` bucket state (nanoseconds on [`now`]'s clock).
    pub conn_tat: AtomicU64,
    /// `requestsPerSecond` bucket state.
    pub req_tat: AtomicU64,
}

impl Entry {
    /// Nothing to remember: no open connection and both buckets full.
    fn at_rest(&self, now: u64) -> bool {
        self.open.load(Ordering::Relaxed) == 0
            && self.conn_tat.load(Ordering::Relaxed) <= now
            && self.req_tat.load(Ordering::Relaxed) <= now
    }
}

/// A counted connection; dropping it releases the slot (on every exit path).
#[derive(Debug)]
pub struct ConnSlot(Arc<Entry>);

impl ConnSlot {
    /// Takes a slot if fewer than `max` are open.
    pub fn acquire(entry: Arc<Entry>, max: u32) -> Option<Self> {
        let open = entry.open.fetch_add(1, Ordering::AcqRel);
        if open >= max {
            entry.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(entry))
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Who is counted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CallerKey {
    /// An authenticated caller, by SPIFFE ID.
    Id(Box<str>),
    /// An unauthenticated caller, by source IP.
    Ip(IpAddr),
    /// Neither known (offline evaluation only).
    Anonymous,
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<CallerKey, Arc<Entry>>,
    swept: Option<Duration>,
}

/// The counters of one limit: a bounded map from caller to [`Entry`].
#[derive(Debug)]
pub struct LimitState {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
    hasher: RandomState,
    overflow: Arc<Entry>,
    overflowed: AtomicU64,
}

impl LimitState {
    /// Empty state for at most `cap` callers (then they share one entry).
    pub fn new(cap: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: cap.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
            overflow: Arc::default(),
            overflowed: AtomicU64::new(0),
        }
    }

    /// The entry of `key`, created if needed (see the module doc for the cap).
    pub fn entry(&self, key: &CallerKey, now: Duration) -> Arc<Entry> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        let mut shard = self.shards[i].lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = shard.map.get(key) {
            return e.clone();
        }
        if shard.map.len() >= self.per_shard {
            let due = shard
                .swept
                .is_none_or(|t| now.saturating_sub(t) >= SWEEP_EVERY);
            if due {
                let n = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
                shard
                    .map
                    .retain(|_, e| Arc::strong_count(e) > 1 || !e.at_rest(n));
                shard.swept = Some(now);
                if shard.map.len() >= self.per_shard {
                    tracing::warn!(
                        tracked = shard.map.len() * SHARDS,
                        "limits: too many active callers to count each on its own; new callers \
                         share one counter until some are at rest"
                    );
                }
            }
            if shard.map.len() >= self.per_shard {
                self.overflowed.fetch_add(1, Ordering::Relaxed);
                return self.overflow.clone();
            }
        }
        let e = Arc::new(Entry::default());
        shard.map.insert(key.clone(), e.clone());
        e
    }

    /// Callers tracked.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).map.len())
            .sum()
    }

    /// Admissions that had to share the overflow entry.
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }
}
