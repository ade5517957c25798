//! The hot path: bidirectional byte copying between the two sides of a proxied connection.
//!
//! - [`copy_bidirectional`]: for any pair of streams (TLS or TCP). One poll-driven future owns
//!   both streams (no `split` lock per poll) and moves both directions. Each direction has a
//!   buffer that starts at [`MIN_BUF`], grows 1 KiB → 16 KiB → [`MAX_BUF`] while reads fill it
//!   (bulk traffic) and steps down again after a run of small reads. A small (light-traffic)
//!   buffer is given back whenever its reader would block, so an idle connection holds no copy
//!   buffer at all. Written bytes are flushed only when the reader would block (TLS needs the
//!   flush to emit its records; for TCP it is free), not once per chunk.
//! - [`splice_bidirectional`]: plaintext TCP ↔ TCP with `splice(2)` through a kernel pipe (no
//!   copy into user space), used for permissive plaintext and passthrough.
//!
//! Both half-close correctly: when one side ends its writes (EOF), the write side of the other
//! is shut down and the opposite direction keeps flowing until it ends too. An error in either
//! direction ends the connection ([`CopyEnd::Error`]: the caller resets both sockets). Both stop
//! after `idle` without bytes in either direction. The `_until` variants also stop when a `stop`
//! future resolves (a policy change that now denies the connection: [`CopyEnd::PolicyReset`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Initial (and light-traffic) per-direction buffer size.
pub const MIN_BUF: usize = 1024;
/// Middle step of the buffer ladder (one full TLS record).
const MID_BUF: usize = 16 * 1024;
/// Largest per-direction buffer (four full TLS records).
pub const MAX_BUF: usize = 64 * 1024;
/// Consecutive small reads (under a quarter of the buffer) after which a grown buffer steps down.
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

/// The size ladder of one direction's buffer: grows under bulk traffic, steps down when light.
#[derive(Debug)]
struct BufSize {
    size: usize,
    small_reads: u32,
}

impl BufSize {
    fn new() -> Self {
        Self {
            size: MIN_BUF,
            small_reads: 0,
        }
    }

    /// Adjusts the size after a read of `n` bytes into a buffer of the current size.
    fn observe(&mut self, n: usize) {
        if n >= self.size && self.size < MAX_BUF {
            self.size = if self.size < MID_BUF {
                MID_BUF
            } else {
                MAX_BUF
            };
            self.small_reads = 0;
        } else if n < self.size / 4 && self.size > MIN_BUF {
            self.small_reads += 1;
            if self.small_reads >= SHRINK_AFTER {
                self.size = if self.size > MID_BUF {
                    MID_BUF
                } else {
                    MIN_BUF
                };
                self.small_reads = 0;
            }
        } else {
            self.small_reads = 0;
        }
    }
}

/// One direction (reader → writer) of a bidirectional copy.
#[derive(Debug)]
struct Direction {
    /// The buffer, allocated on demand; `buf[pos..end]` is read but not yet written.
    buf: Option<Box<[u8]>>,
    pos: usize,
    end: usize,
    size: BufSize,
    /// The reader reached EOF.
    eof: bool,
    /// Bytes were written since the last flush.
    need_flush: bool,
    /// Write side shut down after EOF: this direction is finished.
    done: bool,
    /// Bytes copied.
    bytes: u64,
}

impl Direction {
    fn new() -> Self {
        Self {
            buf: None,
            pos: 0,
            end: 0,
            size: BufSize::new(),
            eof: false,
            need_flush: false,
            done: false,
            bytes: 0,
        }
    }

    /// Bytes of buffer held right now (0 when idle on light traffic).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }

    /// Moves bytes until the reader would block (after flushing), the writer would block, or
    /// the direction finished (EOF passed on as a write shutdown).
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.end && !self.eof {
                let want = self.size.size;
                let buf = match &mut self.buf {
                    Some(b) if b.len() == want => b,
                    slot => slot.insert(vec![0u8; want].into_boxed_slice()),
                };
                let mut rb = ReadBuf::new(buf);
                match reader.as_mut().poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        if self.size.size == MIN_BUF {
                            // Light traffic: hold no buffer while waiting.
                            self.buf = None;
                        }
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.eof = true;
                            self.buf = None;
                        } else {
                            self.pos = 0;
                            self.end = n;
                            self.size.observe(n);
                        }
                    }
                }
            }
            if let Some(buf) = &self.buf {
                while self.pos < self.end {
                    let n = ready!(writer.as_mut().poll_write(cx, &buf[self.pos..self.end]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.pos += n;
                    self.bytes += n as u64;
                    self.need_flush = true;
                }
            }
            if self.eof {
                // Half-close: pass the EOF on, keep the other direction running.
                if self.need_flush {
                    ready!(writer.as_mut().poll_flush(cx))?;
                    self.need_flush = false;
                }
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// The idle timer: re-armed lazily (only when it fires) from the time of the last progress.
struct IdleTimer<'a> {
    idle: Duration,
    last: Instant,
    sleep: Pin<&'a mut tokio::time::Sleep>,
}

impl<'a> IdleTimer<'a> {
    fn new(idle: Duration, last: Instant, sleep: Pin<&'a mut tokio::time::Sleep>) -> Self {
        Self { idle, last, sleep }
    }

    fn touch(&mut self) {
        self.last = Instant::now();
    }

    /// Ready when `idle` passed since the last [`IdleTimer::touch`].
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.sleep.as_mut().poll(cx));
            let deadline = self.last + self.idle;
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            self.sleep.as_mut().reset(deadline);
        }
    }
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
pub async fn copy_bidirectional_until<A, B, S>(
    mut a: A,
    mut b: B,
    idle: Duration,
    stop: S,
) -> CopyStats
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    S: Future<Output = String>,
{
    let mut up = Direction::new();
    let mut down = Direction::new();
    let start = Instant::now();
    let sleep = std::pin::pin!(tokio::time::sleep_until(start + idle));
    let mut timer = IdleTimer::new(idle, start, sleep);
    let mut stop = std::pin::pin!(stop);
    let end = std::future::poll_fn(|cx| {
        if let Poll::Ready(rule) = stop.as_mut().poll(cx) {
            return Poll::Ready(CopyEnd::PolicyReset(rule));
        }
        let before = up.bytes + down.bytes;
        if !up.done {
            if let Poll::Ready(Err(e)) = up.poll_copy(cx, Pin::new(&mut a), Pin::new(&mut b)) {
                return Poll::Ready(CopyEnd::Error(e.to_string()));
            }
        }
        if !down.done {
            if let Poll::Ready(Err(e)) = down.poll_copy(cx, Pin::new(&mut b), Pin::new(&mut a)) {
                return Poll::Ready(CopyEnd::Error(e.to_string()));
            }
        }
        if up.done && down.done {
            return Poll::Ready(CopyEnd::Closed);
        }
        if up.bytes + down.bytes != before {
            timer.touch();
        }
        match timer.poll_expired(cx) {
            Poll::Ready(()) => Poll::Ready(CopyEnd::IdleTimeout),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    CopyStats {
        a_to_b: up.bytes,
        b_to_a: down.bytes,
        end,
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
#[path = "copy_tests.rs"]
mod tests;
