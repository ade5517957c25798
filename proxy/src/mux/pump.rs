//! The mux hot path: a TCP socket ⇄ one `CONNECT` stream, without the extra copy of the generic
//! byte-stream adapter. Socket reads land in a `BytesMut` whose filled part is frozen and handed
//! to h2 as a DATA frame (no copy); received DATA `Bytes` are written straight to the socket and
//! their flow-control capacity released as they are written.
//!
//! Same contract as [`crate::copy::copy_bidirectional_until`]: half-close both ways (socket EOF →
//! END_STREAM, END_STREAM → socket write shutdown), any error ends both directions
//! ([`CopyEnd::Error`]: the caller resets the socket and the stream), `idle` without bytes ends
//! it ([`CopyEnd::IdleTimeout`]), `stop` resolving ends it ([`CopyEnd::PolicyReset`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::io_error;
use super::stream::H2Stream;
use crate::copy::{CopyEnd, CopyStats};

/// Smallest socket read buffer (light traffic).
const MIN_READ: usize = 4 * 1024;
/// Largest socket read buffer (bulk; one DATA frame, at most [`super::MAX_FRAME`]). Larger
/// frames cost pipelining between the hops (a frame is forwarded once complete) and leave
/// malloc's small-block arenas (mmap per buffer).
const MAX_READ: usize = 64 * 1024;
/// While the read buffer size is at most this (light traffic), it is given back whenever the
/// socket has nothing to read.
const LIGHT_READ: usize = 16 * 1024;

fn reset_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        "mux: stream closed by the peer",
    )
}

/// Socket → stream.
struct Up {
    /// Read buffer; under light traffic given back whenever the socket has nothing to read, so
    /// an idle stream holds none (frozen parts live on in h2 until written).
    buf: BytesMut,
    /// Size of the next read buffer: doubles while reads fill it, halves after small reads.
    size: usize,
    pending: Bytes,
    eof: bool,
    done: bool,
    bytes: u64,
}

impl Default for Up {
    fn default() -> Self {
        Self {
            buf: BytesMut::new(),
            size: MIN_READ,
            pending: Bytes::new(),
            eof: false,
            done: false,
            bytes: 0,
        }
    }
}

impl Up {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &mut TcpStream,
        send: &mut SendStream<Bytes>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let mut cap = send.capacity();
                if cap == 0 {
                    send.reserve_capacity(self.pending.len());
                    match ready!(send.poll_capacity(cx)) {
                        Some(Ok(c)) => cap = c,
                        Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                        None => return Poll::Ready(Err(reset_error())),
                    }
                    if cap == 0 {
                        continue;
                    }
                }
                let chunk = self.pending.split_to(cap.min(self.pending.len()));
                self.bytes += chunk.len() as u64;
                send.send_data(chunk, false).map_err(io_error)?;
                continue;
            }
            if self.eof {
                send.send_data(Bytes::new(), true).map_err(io_error)?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            if self.buf.capacity() < MIN_READ {
                self.buf.reserve(self.size);
            }
            let offered = self.buf.capacity();
            let n = match tcp.try_read_buf(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.size <= LIGHT_READ {
                        // Light traffic: hold no buffer while waiting.
                        self.buf = BytesMut::new();
                    }
                    ready!(tcp.poll_read_ready(cx))?;
                    continue;
                }
                Err(e) => return Poll::Ready(Err(e)),
            };
            if n == 0 {
                self.eof = true;
                continue;
            }
            if n == offered {
                self.size = (self.size * 2).min(MAX_READ);
            } else if n < offered / 4 {
                self.size = (self.size / 2).max(MIN_READ);
            }
            self.pending = self.buf.split().freeze();
        }
    }
}

/// Stream → socket.
#[derive(Default)]
struct Down {
    cur: Bytes,
    done: bool,
    bytes: u64,
}

impl Down {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &mut TcpStream,
        recv: &mut RecvStream,
    ) -> Poll<io::Result<()>> {
        loop {
            while !self.cur.is_empty() {
                let n = ready!(Pin::new(&mut *tcp).poll_write(cx, &self.cur))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.cur.advance(n);
                self.bytes += n as u64;
                let _ = recv.flow_control().release_capacity(n);
            }
            match ready!(recv.poll_data(cx)) {
                Some(Ok(data)) => self.cur = data,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => {
                    ready!(Pin::new(&mut *tcp).poll_shutdown(cx))?;
                    self.done = true;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// Moves `tcp` ⇄ `stream` (see the module docs). In the stats, `a_to_b` is socket → stream.
pub async fn pump_until<S>(
    tcp: &mut TcpStream,
    stream: &mut H2Stream,
    idle: Duration,
    stop: S,
) -> CopyStats
where
    S: Future<Output = String>,
{
    let (send, recv, pending) = stream.parts();
    let mut up = Up::default();
    let mut down = Down {
        cur: std::mem::take(pending),
        ..Down::default()
    };
    let mut last = Instant::now();
    let mut sleep = std::pin::pin!(tokio::time::sleep_until(last + idle));
    let mut stop = std::pin::pin!(stop);
    let end = std::future::poll_fn(|cx| {
        if let Poll::Ready(rule) = stop.as_mut().poll(cx) {
            return Poll::Ready(CopyEnd::PolicyReset(rule));
        }
        let before = up.bytes + down.bytes;
        if !up.done {
            if let Poll::Ready(Err(e)) = up.poll(cx, tcp, send) {
                return Poll::Ready(CopyEnd::Error(e.to_string()));
            }
        }
        if !down.done {
            if let Poll::Ready(Err(e)) = down.poll(cx, tcp, recv) {
                return Poll::Ready(CopyEnd::Error(e.to_string()));
            }
        }
        if up.done && down.done {
            return Poll::Ready(CopyEnd::Closed);
        }
        if up.bytes + down.bytes != before {
            last = Instant::now();
        }
        loop {
            ready!(sleep.as_mut().poll(cx));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return Poll::Ready(CopyEnd::IdleTimeout);
            }
            sleep.as_mut().reset(deadline);
        }
    })
    .await;
    CopyStats {
        a_to_b: up.bytes,
        b_to_a: down.bytes,
        end,
    }
}
