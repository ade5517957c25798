//! Lingering close for HTTP ports (nginx's `lingering_close`).
//!
//! When svidcar refuses a request before reading all of it (`431` for oversized headers, a
//! parse error), the peer may still be sending. Closing a socket with unread data makes the
//! kernel answer with a reset, and a reset can destroy our response in the peer's receive
//! buffer before the peer reads it. So the connection is not dropped at once: its stream is
//! handed back when hyper lets go of it, our side is shut down (TLS `close_notify`, then FIN),
//! and what the peer still sends is read and discarded — at most [`LINGER_BYTES`] for at most
//! [`LINGER_TIME`] — before the socket is closed.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::oneshot;

/// Longest time a closing connection is drained.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// Most bytes discarded from a closing connection.
pub const LINGER_BYTES: usize = 4 << 20;

/// A stream that, when dropped, hands itself back through a channel so it can be drained.
pub struct HandBack<S> {
    inner: Option<S>,
    back: Option<oneshot::Sender<S>>,
}

/// Wraps `stream`; the receiver yields it once the wrapper is dropped.
pub fn hand_back<S>(stream: S) -> (HandBack<S>, oneshot::Receiver<S>) {
    let (tx, rx) = oneshot::channel();
    (
        HandBack {
            inner: Some(stream),
            back: Some(tx),
        },
        rx,
    )
}

impl<S> HandBack<S> {
    fn io(&mut self) -> std::io::Result<&mut S> {
        // `inner` is only taken in `drop`, so it is always present while the wrapper is used.
        self.inner
            .as_mut()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))
    }
}

impl<S> Drop for HandBack<S> {
    fn drop(&mut self) {
        if let (Some(stream), Some(back)) = (self.inner.take(), self.back.take()) {
            let _ = back.send(stream);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HandBack<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HandBack<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// Shuts our side down, then discards what the peer still sends until it closes, until
/// [`LINGER_BYTES`] were read, or until [`LINGER_TIME`] passed. Errors end the drain.
pub async fn linger<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let drain = async {
        let _ = stream.shutdown().await;
        let mut buf = [0u8; 4096];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}
