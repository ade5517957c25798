//! One HTTP/2 `CONNECT` stream as a byte stream (`AsyncRead + AsyncWrite`), so the proxy's
//! copy loop and the L7 server work on a multiplexed application connection as on a socket.
//!
//! - Reading hands out the received DATA `Bytes` and releases flow-control capacity as soon as
//!   bytes are consumed; the end of the peer's stream (END_STREAM) is EOF; a `RST_STREAM` from
//!   the peer is an error (`ConnectionReset`), never a clean EOF.
//! - Writing waits for send capacity (backpressure) and sends DATA frames; `shutdown` sends
//!   END_STREAM (half-close: the other direction keeps flowing).
//! - [`H2Stream::reset`] sends `RST_STREAM(CANCEL)` (the caller's side broke).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::io_error;

/// Smallest send capacity asked for at once (fewer, larger DATA frames).
const MIN_RESERVE: usize = 64 * 1024;

/// A bidirectional `CONNECT` stream (see the module docs).
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read out.
    pending: Bytes,
    recv_done: bool,
    send_done: bool,
}

impl H2Stream {
    /// Wraps the two halves of an established `CONNECT` stream.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            recv_done: false,
            send_done: false,
        }
    }

    /// The send half, the receive half and what was received but not read out yet (for
    /// [`super::pump`]).
    pub(super) fn parts(&mut self) -> (&mut SendStream<Bytes>, &mut RecvStream, &mut Bytes) {
        (&mut self.send, &mut self.recv, &mut self.pending)
    }

    /// Resets the stream (`RST_STREAM(CANCEL)`): the peer resets its side's TCP socket.
    pub fn reset(&mut self) {
        self.send.send_reset(Reason::CANCEL);
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                // Consumed: let the peer send more.
                let _ = this.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if this.recv_done || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => {
                    this.recv_done = true;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        loop {
            let cap = this.send.capacity();
            if cap > 0 {
                let n = cap.min(buf.len());
                this.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(io_error)?;
                return Poll::Ready(Ok(n));
            }
            this.send.reserve_capacity(buf.len().max(MIN_RESERVE));
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "mux: stream closed by the peer",
                    )))
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes (and flushes) frames as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.send_done {
            self.send_done = true;
            self.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}
