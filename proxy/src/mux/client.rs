//! The outbound connection pool: pooled mTLS connections to peer proxies, one HTTP/2 `CONNECT`
//! stream per application connection.
//!
//! - Keyed by (upstream address, expected peer, generation of our installed credentials): a new
//!   SVID *or new bundles* start new connections, so every new application connection rides on
//!   a peer verified against the bundles in force (a trust domain dropped from the bundles is
//!   not reached through an old connection); the old ones finish their streams and take no new
//!   ones.
//! - A connection takes at most `max_streams` streams; when all are full (or none exists) a new
//!   one is opened — one handshake in flight per key, concurrent openers wait for it.
//! - Dropped from the pool: when it fails, when the peer sends GOAWAY, after `idle_timeout`
//!   without streams, when our SVID rotated, and at the expiry of either certificate (age cap).
//! - A peer that answers ALPN `svidcar/1` (an older proxy) gets that connection the old way and
//!   the key is remembered as "no mux" for [`NO_MUX_MEMORY`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use svidcar_agent::tls::ExpectedPeer;
use svidcar_agent::SpiffeId;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::stream::H2Stream;
use super::{
    PoolConfig, ALPN_SVIDCAR_MUX, CONNECTION_WINDOW, MAX_FRAME, SEND_BUFFER, STREAM_WINDOW,
};
use crate::credentials::Credentials;
use crate::metrics::Metrics;

/// How long a key whose peer does not speak `svidcar-mux/1` goes without trying again.
pub const NO_MUX_MEMORY: Duration = Duration::from_secs(300);
/// A failed handshake is reported to the openers that waited for it for this long.
const FAILURE_SHARE: Duration = Duration::from_secs(1);
/// Attempts on pooled connections that turn out to be broken before giving up.
const ATTEMPTS: usize = 3;

/// An outbound mTLS connection as the outbound side dials it.
pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// Why no upstream stream or connection could be had: the access-log outcome and reason.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Access-log outcome (`upstream_failed`, `handshake_failed`, `upstream_refused`...).
    pub outcome: &'static str,
    /// Operator-readable reason.
    pub reason: String,
}

/// Pool key: one set of pooled connections per key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The upstream as configured or the original destination (`host:port`).
    pub upstream: String,
    /// The identity the peer must present.
    pub expect: ExpectedPeer,
    /// [`crate::credentials::Installed::generation`] the connections were made under.
    pub generation: u64,
}

/// What the outbound side copies to.
pub enum Upstream {
    /// A stream on a pooled connection; `lease` must live as long as the stream.
    Mux {
        /// The stream.
        stream: H2Stream,
        /// The peer's SPIFFE ID (checked on the pooled TLS connection).
        peer_id: Option<SpiffeId>,
        /// Counts the stream against its connection.
        lease: Lease,
    },
    /// The peer does not multiplex: this application connection gets its own mTLS connection.
    Plain(Box<Tls>),
}

struct PooledConn {
    sender: SendRequest<Bytes>,
    authority: String,
    peer_id: Option<SpiffeId>,
    tls: crate::tls_session::TlsFacts,
    active: AtomicUsize,
    closed: Arc<AtomicBool>,
    retired: AtomicBool,
    expires: Instant,
    idle_since: Mutex<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PooledConn {
    fn usable(&self, now: Instant) -> bool {
        !self.closed.load(Ordering::Relaxed)
            && !self.retired.load(Ordering::Relaxed)
            && now < self.expires
    }
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.active.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(now.saturating_duration_since(*lock(&self.idle_since)))
    }
}

/// One stream's share of a pooled connection (released on drop).
pub struct Lease {
    conn: Arc<PooledConn>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.conn.idle_since) = Instant::now();
        }
    }
}

enum OpenError {
    /// The connection is unusable (failed, GOAWAY): try another.
    Broken(String),
    /// The peer refused this stream: give up.
    Refused(String),
}

impl Lease {
    /// What the pooled connection's TLS session negotiated.
    pub fn tls(&self) -> crate::tls_session::TlsFacts {
        self.conn.tls
    }

    /// Opens the `CONNECT` stream and waits for the peer's `200`.
    async fn open(&self) -> Result<H2Stream, OpenError> {
        let broken = |e: h2::Error| OpenError::Broken(e.to_string());
        let mut sender = self.conn.sender.clone().ready().await.map_err(broken)?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(self.conn.authority.as_str())
            .body(())
            .map_err(|e| OpenError::Refused(format!("bad CONNECT authority: {e}")))?;
        let (resp, send) = sender.send_request(req, false).map_err(broken)?;
        let resp = match resp.await {
            Ok(r) => r,
            Err(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM) && !e.is_go_away() => {
                return Err(OpenError::Refused(
                    "the peer proxy refused the stream (its connection limit?)".into(),
                ))
            }
            Err(e) => return Err(broken(e)),
        };
        if resp.status() != StatusCode::OK {
            return Err(OpenError::Refused(format!(
                "the peer proxy answered {}",
                resp.status()
            )));
        }
        Ok(H2Stream::new(send, resp.into_body()))
    }
}

#[derive(Default)]
struct Slot {
    conns: Mutex<Vec<Arc<PooledConn>>>,
    opening: tokio::sync::Mutex<()>,
    no_mux_until: Mutex<Option<Instant>>,
    last_failure: Mutex<Option<(Instant, Refusal)>>,
}

impl Slot {
    /// Reserves a stream on a usable connection with room (under the slot lock: no overshoot).
    fn reserve(&self, max: usize, now: Instant) -> Option<Lease> {
        let mut conns = lock(&self.conns);
        conns.retain(|c| c.usable(now));
        let conn = conns
            .iter()
            .find(|c| c.active.load(Ordering::Acquire) < max)?;
        conn.active.fetch_add(1, Ordering::AcqRel);
        Some(Lease { conn: conn.clone() })
    }
    fn has_room(&self, max: usize, now: Instant) -> bool {
        lock(&self.conns)
            .iter()
            .any(|c| c.usable(now) && c.active.load(Ordering::Acquire) < max)
    }
    fn no_mux(&self, now: Instant) -> bool {
        lock(&self.no_mux_until).is_some_and(|t| now < t)
    }
    fn failed_since(&self, since: Instant) -> Option<Refusal> {
        lock(&self.last_failure)
            .as_ref()
            .filter(|(t, _)| *t >= since && t.elapsed() < FAILURE_SHARE)
            .map(|(_, r)| r.clone())
    }
}

/// The pool (see the module docs).
pub struct Pool {
    cfg: PoolConfig,
    slots: Mutex<HashMap<PoolKey, Arc<Slot>>>,
    metrics: Metrics,
}

impl Pool {
    /// An empty pool.
    pub fn new(cfg: PoolConfig, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            slots: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// Closes idle connections and those of rotated SVIDs periodically (runs forever).
    pub async fn reap(self: Arc<Self>, creds: Arc<Credentials>) {
        let idle = self.cfg.idle_timeout.0;
        let period = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let generation = creds.current().map(|c| c.generation);
            let now = Instant::now();
            let mut slots = lock(&self.slots);
            slots.retain(|key, slot| {
                let current = generation == Some(key.generation);
                let mut conns = lock(&slot.conns);
                conns.retain(|c| {
                    let idle_out = c.idle_for(now).is_some_and(|d| d >= idle);
                    let keep = current && c.usable(now) && !idle_out;
                    if !keep {
                        tracing::debug!(upstream = %key.upstream, idle_out, current, "pooled connection leaves the pool");
                    }
                    keep
                });
                // Keep slots someone is using, with connections, or remembering "no mux".
                Arc::strong_count(slot) > 1 || !conns.is_empty() || slot.no_mux(now)
            });
        }
    }

    fn slot(&self, key: &PoolKey) -> Arc<Slot> {
        lock(&self.slots).entry(key.clone()).or_default().clone()
    }

    /// A stream to `key`'s upstream: on a pooled connection with room, else on a new connection
    /// from `dial` (which does TCP + the mTLS handshake with the identity check, and logs its
    /// own failures). `own_not_after` caps the age of a new connection.
    pub async fn stream<F, Fut>(
        &self,
        key: &PoolKey,
        own_not_after: SystemTime,
        dial: F,
    ) -> Result<Upstream, Refusal>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Tls, Refusal>>,
    {
        let slot = self.slot(key);
        let max = self.cfg.max_streams as usize;
        let started = Instant::now();
        let mut broken = 0;
        loop {
            if let Some(lease) = slot.reserve(max, Instant::now()) {
                self.lookup("hit");
                match self.open(lease).await {
                    Ok(up) => return Ok(up),
                    Err((r, retry)) if !retry || broken + 1 >= ATTEMPTS => return Err(r),
                    Err(_) => {
                        broken += 1;
                        continue;
                    }
                }
            }
            let guard = if slot.no_mux(Instant::now()) {
                None
            } else {
                let g = slot.opening.lock().await;
                if slot.has_room(max, Instant::now()) {
                    // Someone opened a connection while we waited: use it.
                    continue;
                }
                if let Some(r) = slot.failed_since(started) {
                    return Err(r);
                }
                Some(g)
            };
            let tls = match dial().await {
                Ok(t) => t,
                Err(r) => {
                    *lock(&slot.last_failure) = Some((Instant::now(), r.clone()));
                    return Err(r);
                }
            };
            if tls.get_ref().1.alpn_protocol() != Some(ALPN_SVIDCAR_MUX) {
                *lock(&slot.no_mux_until) = Some(Instant::now() + NO_MUX_MEMORY);
                self.lookup("no_mux");
                return Ok(Upstream::Plain(Box::new(tls)));
            }
            let lease = self.add(&slot, tls, own_not_after).await?;
            drop(guard);
            self.lookup("new");
            return self.open(lease).await.map_err(|(r, _)| r);
        }
    }

    fn lookup(&self, result: &'static str) {
        self.metrics
            .pool_lookups
            .get_or_create(&crate::metrics::ResultLabels { result })
            .inc();
    }

    /// Opens a stream on the leased connection; on failure, whether another connection may be
    /// tried (the connection broke, rather than the peer refusing the stream).
    async fn open(&self, lease: Lease) -> Result<Upstream, (Refusal, bool)> {
        match lease.open().await {
            Ok(stream) => {
                self.metrics.mux_stream("outbound");
                Ok(Upstream::Mux {
                    stream,
                    peer_id: lease.conn.peer_id.clone(),
                    lease,
                })
            }
            Err(OpenError::Refused(reason)) => Err((
                Refusal {
                    outcome: "upstream_refused",
                    reason,
                },
                false,
            )),
            Err(OpenError::Broken(reason)) => {
                lease.conn.retired.store(true, Ordering::Relaxed);
                Err((
                    Refusal {
                        outcome: "upstream_failed",
                        reason: format!("pooled connection to the peer proxy failed: {reason}"),
                    },
                    true,
                ))
            }
        }
    }

    /// Starts HTTP/2 on a new `svidcar-mux/1` connection, adds it to `slot` with one stream
    /// reserved.
    async fn add(
        &self,
        slot: &Slot,
        tls: Tls,
        own_not_after: SystemTime,
    ) -> Result<Lease, Refusal> {
        let (tcp, conn) = tls.get_ref();
        let peer_id = svidcar_agent::tls::peer_spiffe_id(conn);
        let negotiated = crate::tls_session::TlsFacts::of(conn);
        // Both ends of validity as the handshake's verification sees them (whole seconds: a
        // `notAfter` of T is valid through T.999; see `peer_not_after`).
        let own_end = own_not_after + Duration::from_secs(1);
        let not_after =
            svidcar_agent::tls::peer_not_after(conn).map_or(own_end, |p| p.min(own_end));
        let left = not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        if left.is_zero() {
            return Err(Refusal {
                outcome: "handshake_failed",
                reason: "the peer's or our certificate has expired: not pooling the connection"
                    .into(),
            });
        }
        let authority = tcp.peer_addr().map_err(|e| Refusal {
            outcome: "upstream_failed",
            reason: format!("no peer address: {e}"),
        })?;
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(SEND_BUFFER)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| Refusal {
                outcome: "upstream_failed",
                reason: format!("HTTP/2 start on the pooled connection failed: {e}"),
            })?;
        let closed = Arc::new(AtomicBool::new(false));
        let metrics = self.metrics.clone();
        metrics.pool_connections_open.inc();
        metrics.mux_connection("outbound");
        let flag = closed.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "pooled connection ended with an error");
            }
            flag.store(true, Ordering::Relaxed);
            metrics.pool_connections_open.dec();
        });
        let now = Instant::now();
        let conn = Arc::new(PooledConn {
            sender,
            authority: authority.to_string(),
            peer_id,
            tls: negotiated,
            active: AtomicUsize::new(1),
            closed,
            retired: AtomicBool::new(false),
            expires: now + left,
            idle_since: Mutex::new(now),
        });
        lock(&slot.conns).push(conn.clone());
        Ok(Lease { conn })
    }
}
