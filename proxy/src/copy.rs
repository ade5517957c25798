//! The hot path: bidirectional byte copying between the two sides of a proxied connection.
//!
//! - [`copy_bidirectional`]: for any pair of streams (TLS or TCP). Each direction owns one
//!   reusable buffer that starts small ([`MIN_BUF`]), doubles while reads fill it (bulk traffic,
//!   up to [`MAX_BUF`]) and halves again after a run of small reads, so idle connections do not
//!   keep large buffers. No allocation per chunk.
//! - [`splice_bidirectional`]: plaintext TCP ↔ TCP with `splice(2)` through a kernel pipe (no
//!   copy into user space), used for permissive plaintext and passthrough.
//!
//! Both half-close correctly: when one side ends its writes (EOF), the write side of the other
//! is shut down and the opposite direction keeps flowing until it ends too. An error in either
//! direction ends the connection. Both stop after `idle` without bytes in either direction.
//! The `_until` variants also stop when a `stop` future resolves (a policy change that now
//! denies the connection: [`CopyEnd::PolicyReset`]).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Initial per-direction buffer size.
pub const MIN_BUF: usize = 4 * 1024;
/// Largest per-direction buffer (four full TLS records).
pub const MAX_BUF: usize = 64 * 1024;
/// Consecutive small reads after which a grown buffer is halved.
const SHRINK_AFTER: u32 = 16;

/// How a copy ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyEnd {
    /// Both directions reached EOF.
    Closed,
    /// No byte in either direction for the idle timeout.
    IdleTimeout,
    /// A read or write failed (peer reset, broken pipe, TLS error...).
    Error(String),
    /// A new policy denies the connection (POLICY.md §6); the rule or default that decided.
    PolicyReset(String),
}

/// Bytes moved and how the connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes from side `a` to side `b` (for inbound: downstream peer → app).
    pub a_to_b: u64,
    /// Bytes from side `b` to side `a`.
    pub b_to_a: u64,
    /// Why it ended.
    pub end: CopyEnd,
}

impl CopyStats {
    /// True when the copy ended on an error or a policy reset (the caller then resets both
    /// sockets).
    pub fn failed(&self) -> bool {
        matches!(self.end, CopyEnd::Error(_) | CopyEnd::PolicyReset(_))
    }
}

/// Shared between the two directions and the idle watchdog (same task, atomics for `Send`).
struct Progress {
    start: Instant,
    last_ms: AtomicU64,
    a_to_b: AtomicU64,
    b_to_a: AtomicU64,
}

impl Progress {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            a_to_b: AtomicU64::new(0),
            b_to_a: AtomicU64::new(0),
        }
    }
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }
    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
    fn stats(&self, end: CopyEnd) -> CopyStats {
        CopyStats {
            a_to_b: self.a_to_b.load(Ordering::Relaxed),
            b_to_a: self.b_to_a.load(Ordering::Relaxed),
            end,
        }
    }
}

/// A reusable buffer that grows under bulk traffic and shrinks back when traffic is light.
struct AdaptiveBuf {
    buf: Vec<u8>,
    small_reads: u32,
}

impl AdaptiveBuf {
    fn new() -> Self {
        Self {
            buf: vec![0; MIN_BUF],
            small_reads: 0,
        }
    }

    /// Adjusts the size after a read of `n` bytes.
    fn observe(&mut self, n: usize) {
        let cap = self.buf.len();
        if n == cap && cap < MAX_BUF {
            self.buf.resize(cap * 2, 0);
            self.small_reads = 0;
        } else if n < cap / 4 && cap > MIN_BUF {
            self.small_reads += 1;
            if self.small_reads >= SHRINK_AFTER {
                self.buf.truncate(cap / 2);
                self.buf.shrink_to_fit();
                self.small_reads = 0;
            }
        } else {
            self.small_reads = 0;
        }
    }
}

async fn copy_one<R, W>(
    mut r: R,
    mut w: W,
    counter: &AtomicU64,
    progress: &Progress,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = AdaptiveBuf::new();
    loop {
        let n = r.read(&mut buf.buf).await?;
        if n == 0 {
            // Half-close: pass the EOF on, keep the other direction running.
            w.shutdown().await?;
            return Ok(());
        }
        w.write_all(&buf.buf[..n]).await?;
        w.flush().await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        progress.touch();
        buf.observe(n);
    }
}

async fn idle_watch(progress: &Progress, idle: Duration) {
    loop {
        let deadline = progress.last() + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// Runs two direction futures until both finish, one fails, the idle watchdog fires or `stop`
/// resolves (with the rule that now denies the connection).
async fn drive<F1, F2, S>(up: F1, down: F2, progress: &Progress, idle: Duration, stop: S) -> CopyEnd
where
    F1: std::future::Future<Output = io::Result<()>>,
    F2: std::future::Future<Output = io::Result<()>>,
    S: std::future::Future<Output = String>,
{
    tokio::pin!(up, down, stop);
    let idle_fut = idle_watch(progress, idle);
    tokio::pin!(idle_fut);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(e) => return CopyEnd::Error(e.to_string()),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(e) => return CopyEnd::Error(e.to_string()),
            },
            () = &mut idle_fut => return CopyEnd::IdleTimeout,
            rule = &mut stop => return CopyEnd::PolicyReset(rule),
        }
    }
    CopyEnd::Closed
}

/// Copies `a` ⇄ `b` until both sides closed, an error, or `idle` without traffic. Pass
/// `&mut stream` to keep the streams (e.g. to reset them when [`CopyStats::failed`]).
pub async fn copy_bidirectional<A, B>(a: A, b: B, idle: Duration) -> CopyStats
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    copy_bidirectional_until(a, b, idle, std::future::pending()).await
}

/// [`copy_bidirectional`] that also ends ([`CopyEnd::PolicyReset`]) when `stop` resolves.
pub async fn copy_bidirectional_until<A, B, S>(a: A, b: B, idle: Duration, stop: S) -> CopyStats
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    S: std::future::Future<Output = String>,
{
    let progress = Progress::new();
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let up = copy_one(ar, bw, &progress.a_to_b, &progress);
    let down = copy_one(br, aw, &progress.b_to_a, &progress);
    let end = drive(up, down, &progress, idle, stop).await;
    progress.stats(end)
}

/// One direction of a splice copy: `from` → pipe → `to`.
async fn splice_one(
    from: &TcpStream,
    to: &TcpStream,
    counter: &AtomicU64,
    progress: &Progress,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;
    let pipe = crate::sys::Pipe::new()?;
    loop {
        from.readable().await?;
        let n = match from.try_io(Interest::READABLE, || {
            crate::sys::splice(from.as_raw_fd(), pipe.write.as_raw_fd(), MAX_BUF)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            crate::sys::shutdown_write(to.as_raw_fd())?;
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                crate::sys::splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
        progress.touch();
    }
}

/// Copies plaintext `a` ⇄ `b` with `splice(2)`; falls back to [`copy_bidirectional`] when the
/// kernel refuses a pipe.
pub async fn splice_bidirectional(a: TcpStream, b: TcpStream, idle: Duration) -> CopyStats {
    splice_bidirectional_until(a, b, idle, std::future::pending()).await
}

/// [`splice_bidirectional`] that also ends ([`CopyEnd::PolicyReset`], both sockets reset) when
/// `stop` resolves.
pub async fn splice_bidirectional_until<S>(
    a: TcpStream,
    b: TcpStream,
    idle: Duration,
    stop: S,
) -> CopyStats
where
    S: std::future::Future<Output = String>,
{
    let (mut a, mut b) = (a, b);
    let stats = if crate::sys::Pipe::new().is_err() {
        copy_bidirectional_until(&mut a, &mut b, idle, stop).await
    } else {
        let progress = Progress::new();
        let up = splice_one(&a, &b, &progress.a_to_b, &progress);
        let down = splice_one(&b, &a, &progress.b_to_a, &progress);
        let end = drive(up, down, &progress, idle, stop).await;
        progress.stats(end)
    };
    if stats.failed() {
        let _ = a.set_zero_linger();
        let _ = b.set_zero_linger();
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_grows_under_bulk_and_shrinks_when_light() {
        let mut b = AdaptiveBuf::new();
        for _ in 0..10 {
            let n = b.buf.len();
            b.observe(n);
        }
        assert_eq!(b.buf.len(), MAX_BUF);
        for _ in 0..(SHRINK_AFTER * 6) {
            b.observe(10);
        }
        assert_eq!(b.buf.len(), MIN_BUF);
    }
}
