//! `auto` ports: after the handshake, the first bytes of the client tell HTTP from anything
//! else. An HTTP/1.x request line (`METHOD SP target SP HTTP/1.d CRLF`) or the HTTP/2
//! connection preface is HTTP (served with per-request policy); bytes that cannot start either,
//! a request line longer than [`MAX_SNIFF`], an early end of stream, or silence for
//! `limits.detect_timeout` (a server-first protocol: the app speaks first) are opaque TCP with
//! L4 policy. The bytes read are not lost: [`Rewind`] hands them to the HTTP server, and the
//! TCP path writes them to the app before copying.
//!
//! Falling back to TCP is fail-safe for policy: an allow rule with HTTP-only fields cannot match
//! TCP, and a deny rule's HTTP-only fields are ignored on TCP (POLICY.md §5).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bytes read at most while sniffing: a request line must end within them.
pub const MAX_SNIFF: usize = 8 * 1024;

/// What the first bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// HTTP/1.x or HTTP/2 (prior knowledge).
    Http,
    /// Anything else (or nothing).
    Opaque,
}

fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Classifies `buf`: `None` while it could still become an HTTP request line or the preface.
pub fn classify(buf: &[u8]) -> Option<Sniffed> {
    if buf.is_empty() {
        return None;
    }
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Some(Sniffed::Http);
    }
    if H2_PREFACE.starts_with(buf) {
        return None;
    }
    // METHOD
    let method = buf.iter().take_while(|&&b| tchar(b)).count();
    if method == buf.len() {
        return (method > 32).then_some(Sniffed::Opaque);
    }
    if method == 0 || method > 32 || buf[method] != b' ' {
        return Some(Sniffed::Opaque);
    }
    // request-target: visible ASCII up to the next space.
    let rest = &buf[method + 1..];
    let target = rest
        .iter()
        .take_while(|&&b| (0x21..=0x7e).contains(&b))
        .count();
    if target == rest.len() {
        return None;
    }
    if target == 0 || rest[target] != b' ' {
        return Some(Sniffed::Opaque);
    }
    // HTTP-version CRLF (a bare LF is tolerated, as by most servers).
    let version = &rest[target + 1..];
    for (i, &b) in version.iter().enumerate() {
        let ok = match i {
            0..=6 => b == b"HTTP/1."[i],
            7 => b.is_ascii_digit(),
            8 if b == b'\n' => return Some(Sniffed::Http),
            8 => b == b'\r',
            9 => {
                return Some(if b == b'\n' {
                    Sniffed::Http
                } else {
                    Sniffed::Opaque
                })
            }
            _ => false,
        };
        if !ok {
            return Some(Sniffed::Opaque);
        }
    }
    None
}

/// Reads from `stream` until [`classify`] decides, the stream ends, [`MAX_SNIFF`] bytes were
/// read or `wait` passed; returns the verdict and the bytes read.
pub async fn sniff<S: AsyncRead + Unpin>(
    stream: &mut S,
    wait: Duration,
) -> io::Result<(Sniffed, Vec<u8>)> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(v) = classify(&buf) {
            return Ok((v, buf));
        }
        if buf.len() >= MAX_SNIFF {
            return Ok((Sniffed::Opaque, buf));
        }
        let room = chunk.len().min(MAX_SNIFF - buf.len());
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..room])).await {
            Err(_) | Ok(Ok(0)) => return Ok((Sniffed::Opaque, buf)),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A stream that first yields `prefix` (the sniffed bytes), then reads from the inner stream.
pub struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    /// `inner` with `prefix` put back in front.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.pos);
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_and_the_h2_preface_are_http() {
        for s in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /a?b=c HTTP/1.0\r\nHost: x\r\n",
            b"OPTIONS * HTTP/1.1\n",
            b"GET http://a/b HTTP/1.1\r\n",
            H2_PREFACE,
        ] {
            assert_eq!(classify(s), Some(Sniffed::Http), "{}", s.escape_ascii());
        }
    }

    #[test]
    fn partial_http_waits_and_anything_else_is_opaque() {
        for s in [
            &b"G"[..],
            b"GET",
            b"GET /x",
            b"GET /x HTTP/1.",
            b"GET / HTTP/1.1\r",
            b"PRI * HTTP/2",
        ] {
            assert_eq!(classify(s), None, "{}", s.escape_ascii());
        }
        for s in [
            &b"\x00\x01"[..],
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"GET  / HTTP/1.1\r\n",
            b"GET / HTTP/2.0\r\n",
            b"GET / HTTP/1.1\rX",
            b"GET /\x01 HTTP/1.1\r\n",
            b"{\"json\": 1}",
            b"*3\r\n$3\r\nSET\r\n",
            b"PRI * HTTP/2.0\r\n\r\nXX",
        ] {
            assert_eq!(classify(s), Some(Sniffed::Opaque), "{}", s.escape_ascii());
        }
        let long = [b'A'; 40];
        assert_eq!(classify(&long), Some(Sniffed::Opaque));
    }

    #[tokio::test]
    async fn silence_is_opaque_and_bytes_are_kept() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let (v, got) = sniff(&mut a, Duration::from_millis(50)).await.unwrap();
        assert_eq!((v, got.len()), (Sniffed::Opaque, 0));
        tokio::io::AsyncWriteExt::write_all(&mut b, b"GET /x HT")
            .await
            .unwrap();
        let t = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tokio::io::AsyncWriteExt::write_all(&mut b, b"TP/1.1\r\nrest")
                .await
                .unwrap();
            b
        });
        let (v, got) = sniff(&mut a, Duration::from_millis(500)).await.unwrap();
        assert_eq!(v, Sniffed::Http);
        let _b = t.await.unwrap();
        let mut r = Rewind::new(got, a);
        let mut line = vec![0u8; 20];
        r.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"GET /x HTTP/1.1\r\nres");
    }
}
