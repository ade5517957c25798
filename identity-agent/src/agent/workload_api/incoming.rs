//! Accepting connections on the agent socket: who the caller is (bound at accept, see
//! [`Peer`]), how many connections one uid may hold, and how long a connection may stay
//! without sending a request.
//!
//! - Each accepted connection is bound to its caller at once (`SO_PEERCRED`, then
//!   `/proc/<pid>`), before anything else can happen on it; calls attest against that binding.
//! - At most `max_per_uid` connections per uid (by `SO_PEERCRED`): one more is closed at
//!   accept, counted (`connections_refused{reason="per_uid_limit"}`) and logged once per burst.
//!   So one local user cannot use up the agent's file descriptors and starve the others.
//! - A connection that has not sent a request within `first_request_timeout` is closed
//!   (`connections_refused{reason="no_request"}`). Once a request arrived the connection may
//!   stay open as long as its client wants (Workload API streams are long-lived).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::codegen::http;
use tonic::transport::server::Connected;

use crate::agent::attest::peer::Peer;
use crate::agent::attest::AttestError;
use crate::agent::config::DEFAULT_MAX_CONNECTIONS_PER_UID;
use crate::agent::health::Metrics;

/// Connection limits of the agent socket.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections per uid.
    pub max_per_uid: usize,
    /// How long a new connection may stay without a request.
    pub first_request_timeout: Duration,
}

/// The soft open-files limit of this process (`/proc/self/limits`), if known.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The per-uid connection cap: `configured`, else a quarter of the open-files limit between 16
/// and [`DEFAULT_MAX_CONNECTIONS_PER_UID`] (so one uid can never hold most descriptors). Warns
/// when a configured cap lets one uid take half of the limit or more.
pub fn per_uid_cap(configured: Option<usize>, open_files: Option<u64>) -> usize {
    let limit = open_files.and_then(|n| usize::try_from(n).ok());
    match (configured, limit) {
        (Some(n), Some(l)) => {
            if n >= l / 2 {
                tracing::warn!(
                    max_connections_per_uid = n,
                    open_files_limit = l,
                    "max_connections_per_uid lets one uid hold half of the agent's open-files \
                     limit or more: one local user could starve the others"
                );
            }
            n
        }
        (Some(n), None) => n,
        (None, Some(l)) => (l / 4).clamp(16, DEFAULT_MAX_CONNECTIONS_PER_UID),
        (None, None) => DEFAULT_MAX_CONNECTIONS_PER_UID,
    }
}

/// What the handlers learn about a connection (a request extension).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The caller bound at accept, or why it could not be.
    pub peer: Arc<Result<Peer, AttestError>>,
    served: Arc<AtomicBool>,
}

impl ConnInfo {
    /// Records that the connection sent a request (ends the first-request timeout).
    pub fn mark_served(&self) {
        self.served.store(true, Ordering::Release);
    }
}

type HttpRequest = http::Request<tonic::body::Body>;

/// The caller bound to the connection a request came on.
pub fn peer_of<T>(req: &tonic::Request<T>) -> Arc<Result<Peer, AttestError>> {
    req.extensions()
        .get::<ConnInfo>()
        .map(|c| c.peer.clone())
        .unwrap_or_else(|| Arc::new(Err(AttestError::NoCredentials)))
}

/// Marks every request's connection as served (a `tower` layer for the socket's server).
pub fn mark_served_layer() -> tower::util::MapRequestLayer<fn(HttpRequest) -> HttpRequest> {
    tower::util::MapRequestLayer::new(|req: HttpRequest| {
        if let Some(c) = req.extensions().get::<ConnInfo>() {
            c.mark_served();
        }
        req
    })
}

#[derive(Default)]
struct Slot {
    open: usize,
    warned: bool,
}

/// Counts open connections per uid.
struct UidLimiter {
    max: usize,
    slots: Mutex<HashMap<u32, Slot>>,
}

/// One open connection of `uid`; released on drop.
struct Permit {
    limiter: Arc<UidLimiter>,
    metrics: Arc<Metrics>,
    uid: u32,
}

impl UidLimiter {
    /// `Ok(permit)`, or `Err(first)` when `uid` is at the limit (`first`: first refusal since
    /// it was last below).
    fn acquire(self: &Arc<Self>, uid: u32, metrics: &Arc<Metrics>) -> Result<Permit, bool> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots.entry(uid).or_default();
        if slot.open >= self.max {
            let first = !slot.warned;
            slot.warned = true;
            return Err(first);
        }
        slot.open += 1;
        metrics.connections_open.inc();
        Ok(Permit {
            limiter: self.clone(),
            metrics: metrics.clone(),
            uid,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.metrics.connections_open.dec();
        let mut slots = self.limiter.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get_mut(&self.uid) {
            slot.open = slot.open.saturating_sub(1);
            if slot.open < self.limiter.max {
                slot.warned = false;
            }
            if slot.open == 0 {
                slots.remove(&self.uid);
            }
        }
    }
}

/// The stream of admitted connections for `tonic`'s `serve_with_incoming_shutdown`.
pub struct Incoming {
    listener: UnixListener,
    limiter: Arc<UidLimiter>,
    limits: Limits,
    metrics: Arc<Metrics>,
    proc_root: PathBuf,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    /// Accepts on `listener` with `limits`, binding callers from `/proc` under `proc_root`.
    pub fn new(
        listener: UnixListener,
        limits: Limits,
        metrics: Arc<Metrics>,
        proc_root: PathBuf,
    ) -> Self {
        Self {
            listener,
            limiter: Arc::new(UidLimiter {
                max: limits.max_per_uid.max(1),
                slots: Mutex::new(HashMap::new()),
            }),
            limits,
            metrics,
            proc_root,
            backoff: None,
        }
    }

    /// Binds and admits one accepted connection, or drops it (counted and logged).
    fn admit(&self, stream: UnixStream) -> Option<Conn> {
        let cred = stream.peer_cred().ok();
        let Some(uid) = cred.map(|c| c.uid()) else {
            self.metrics.connection_refused("no_credentials");
            tracing::warn!("closed a connection without peer credentials");
            return None;
        };
        let permit =
            match self.limiter.acquire(uid, &self.metrics) {
                Ok(p) => p,
                Err(first) => {
                    self.metrics.connection_refused("per_uid_limit");
                    if first {
                        tracing::warn!(uid, limit = self.limiter.max,
                        "uid holds the maximum number of connections to the agent socket; closing \
                         new ones (raise max_connections_per_uid if this uid runs many workloads)");
                    }
                    return None;
                }
            };
        let peer = Peer::bind(cred, &self.proc_root);
        if let Err(e) = &peer {
            tracing::debug!(error = %e, uid, "caller could not be bound at accept");
        }
        let served = Arc::new(AtomicBool::new(false));
        Some(Conn {
            stream,
            info: ConnInfo {
                peer: Arc::new(peer),
                served,
            },
            deadline: Some(Box::pin(tokio::time::sleep(
                self.limits.first_request_timeout,
            ))),
            timeout: self.limits.first_request_timeout,
            metrics: self.metrics.clone(),
            _permit: permit,
        })
    }
}

impl Stream for Incoming {
    type Item = Result<Conn, io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(b) = this.backoff.as_mut() {
                if b.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.backoff = None;
            }
            match this.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    // EMFILE/ENFILE: back off instead of spinning; the listener stays.
                    tracing::warn!(error = %e, "agent socket: accept failed; retrying in 100ms");
                    this.metrics.connection_refused("accept_error");
                    this.backoff = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
                }
                Poll::Ready(Ok((stream, _))) => {
                    if let Some(conn) = this.admit(stream) {
                        return Poll::Ready(Some(Ok(conn)));
                    }
                }
            }
        }
    }
}

/// An admitted connection: the socket, its caller, and the first-request deadline.
pub struct Conn {
    stream: UnixStream,
    info: ConnInfo,
    deadline: Option<Pin<Box<Sleep>>>,
    timeout: Duration,
    metrics: Arc<Metrics>,
    _permit: Permit,
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(deadline) = this.deadline.as_mut() {
            if this.info.served.load(Ordering::Acquire) {
                this.deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                this.deadline = None;
                this.metrics.connection_refused("no_request");
                let pid = this.info.peer.as_ref().as_ref().map(|p| p.pid).ok();
                tracing::debug!(?pid, timeout = ?this.timeout,
                    "closed an agent socket connection that sent no request");
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within the first-request timeout",
                )));
            }
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_cap_follows_the_open_files_limit() {
        assert_eq!(per_uid_cap(None, Some(20_000)), 1024);
        assert_eq!(per_uid_cap(None, Some(1024)), 256);
        assert_eq!(per_uid_cap(None, Some(32)), 16);
        assert_eq!(per_uid_cap(None, None), 1024);
        assert_eq!(per_uid_cap(Some(5000), Some(1024)), 5000);
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }

    #[test]
    fn per_uid_limit_counts_and_releases() {
        let metrics = Arc::new(Metrics::new());
        let l = Arc::new(UidLimiter {
            max: 2,
            slots: Mutex::new(HashMap::new()),
        });
        let a = l.acquire(7, &metrics).unwrap();
        let _b = l.acquire(7, &metrics).unwrap();
        assert!(matches!(l.acquire(7, &metrics), Err(true)));
        assert!(matches!(l.acquire(7, &metrics), Err(false)));
        let _other = l.acquire(8, &metrics).unwrap();
        drop(a);
        let _c = l.acquire(7, &metrics).unwrap();
        assert!(matches!(l.acquire(7, &metrics), Err(true)));
    }
}
