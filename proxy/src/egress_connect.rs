//! Explicit egress HTTP proxy (`egress.listen`, `--egress-proxy`): applications configured with
//! `HTTP(S)_PROXY` send `CONNECT host:port`.
//!
//! Decision (POLICY.md §3/§5): the CONNECT authority host is decided first (`destination.port` =
//! the CONNECT port, `destination.ip` = the first address svidcar resolves and dials); a refusal
//! is a `403` to the CONNECT. When allowed, svidcar dials, answers `200 Connection Established`,
//! and the tunnel is handled by [`crate::egress_stream`]: a TLS ClientHello (whenever it comes)
//! is read whole and decided again with both names (CONNECT authority and SNI, every name must
//! allow), a refusal or an unreadable ClientHello resets the tunnel before the upstream gets a
//! byte; plaintext HTTP/1.x is decided per request on the CONNECT name and its `Host` (plus
//! method and path) by [`crate::egress_http`], `403` on denial.
//! Other requests (absolute-form `GET http://host/…`) are served by [`crate::egress_http`]:
//! each decided on its URI host, method and path, `403` on denial.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::authz::EgressAttrs;
use crate::context::{Access, ProxyContext};

/// Largest accepted request head; larger heads get `431`.
pub const MAX_HEAD: usize = 16 * 1024;

/// A proxy request head, peeked (not consumed).
struct Head {
    method: String,
    target: String,
    /// Length of the head in bytes.
    len: usize,
}

/// Why a request head could not be read.
enum HeadError {
    /// Over [`MAX_HEAD`] or too many headers.
    TooLarge,
    /// Not HTTP/1.x.
    Malformed,
    /// Closed, timed out or an I/O error before a whole head arrived.
    Gone,
}

/// Peeks at one HTTP/1.x request head (bounded by [`MAX_HEAD`]) without consuming it.
async fn peek_head(app: &TcpStream, wait: std::time::Duration) -> Result<Head, HeadError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; MAX_HEAD];
    loop {
        let n = match tokio::time::timeout_at(deadline, app.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Err(HeadError::Gone),
            Ok(Ok(n)) => n,
        };
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..n]) {
            Ok(httparse::Status::Complete(len)) => {
                return Ok(Head {
                    method: req.method.unwrap_or_default().to_string(),
                    target: req.path.unwrap_or_default().to_string(),
                    len,
                });
            }
            Ok(httparse::Status::Partial) if n >= MAX_HEAD => return Err(HeadError::TooLarge),
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(_) => return Err(HeadError::Malformed),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(HeadError::Gone);
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// `host:port` (`[v6]:port`) → (host without brackets, port).
pub fn split_authority(authority: &str) -> Option<(&str, u16)> {
    let (host, port) = authority.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(['/', ' ', '@']) {
        return None;
    }
    Some((host, port))
}

/// The first address of `host` (a trailing dot is dropped, as in policy names), the one
/// svidcar dials and reports as `destination.ip`.
pub async fn resolve(host: &str, port: u16) -> Option<SocketAddr> {
    let host = host
        .strip_suffix('.')
        .filter(|h| !h.is_empty())
        .unwrap_or(host);
    tokio::net::lookup_host((host, port)).await.ok()?.next()
}

/// Writes a short response that closes the connection.
async fn respond(app: &mut TcpStream, status: &str, body: &str) {
    let msg = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = app.write_all(msg.as_bytes()).await;
    let _ = app.shutdown().await;
}

/// Handles one connection to the egress proxy listener to the end.
pub async fn handle(
    ctx: Arc<ProxyContext>,
    mut app: TcpStream,
    src: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let mut access = Access::new("egress", src, "?".into());
    let head = match peek_head(&app, ctx.limits.handshake_timeout.0).await {
        Ok(h) => h,
        Err(HeadError::TooLarge) => {
            access.refused(&ctx.metrics, "refused", "proxy request head too large");
            return respond(&mut app, "431 Request Header Fields Too Large", "").await;
        }
        Err(HeadError::Malformed) => {
            access.refused(&ctx.metrics, "refused", "malformed proxy request");
            return respond(&mut app, "400 Bad Request", "malformed request\n").await;
        }
        Err(HeadError::Gone) => {
            return access.refused(&ctx.metrics, "refused", "no proxy request received");
        }
    };
    if head.method != "CONNECT" {
        let Some(own) = ctx.creds.current() else {
            access.refused_no_identity(&ctx.metrics);
            return respond(&mut app, "503 Service Unavailable", "no identity\n").await;
        };
        return crate::egress_http::serve(ctx.clone(), app, src, None, own.id.clone(), None).await;
    }
    access.dst = head.target.clone();
    let mut consumed = vec![0u8; head.len];
    if app.read_exact(&mut consumed).await.is_err() {
        return access.refused(&ctx.metrics, "io_error", "client left during CONNECT");
    }
    let Some((host, port)) = split_authority(&head.target) else {
        access.refused(&ctx.metrics, "refused", "CONNECT target is not host:port");
        return respond(
            &mut app,
            "400 Bad Request",
            "CONNECT target must be host:port\n",
        )
        .await;
    };
    let Some(own) = ctx.creds.current() else {
        access.refused_no_identity(&ctx.metrics);
        return respond(&mut app, "503 Service Unavailable", "no identity\n").await;
    };
    access.own_id = Some(own.id.clone());
    let dst = resolve(host, port).await;
    let Some(dst) = dst else {
        access.refused(
            &ctx.metrics,
            "upstream_failed",
            &format!("cannot resolve {host}"),
        );
        return respond(&mut app, "502 Bad Gateway", "cannot resolve the host\n").await;
    };
    let attrs = EgressAttrs {
        own: &own.id,
        src,
        dst_ip: Some(dst.ip()),
        dst_port: port,
        destination_id: None,
        sni: None,
        mesh: false,
        connect: Some(host),
        http: None,
    };
    access.saw_egress(&attrs);
    let (verdict, open) = ctx.authz.authorize_egress_open(&attrs);
    if !access.decided(&ctx.metrics, "egress", &verdict) {
        access.refused(
            &ctx.metrics,
            "denied",
            &format!("CONNECT {} denied by {}", head.target, verdict.rule),
        );
        return respond(&mut app, "403 Forbidden", "RBAC: access denied").await;
    }
    let up = match tokio::time::timeout(ctx.limits.connect_timeout.0, TcpStream::connect(dst)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            access.refused(
                &ctx.metrics,
                "upstream_failed",
                &format!("cannot connect to {dst}: {e}"),
            );
            return respond(&mut app, "502 Bad Gateway", "cannot connect\n").await;
        }
        Err(_) => {
            access.refused(
                &ctx.metrics,
                "upstream_failed",
                &format!("timeout connecting to {dst}"),
            );
            return respond(&mut app, "504 Gateway Timeout", "connect timeout\n").await;
        }
    };
    let _ = up.set_nodelay(true);
    let _ = app.set_nodelay(true);
    if app
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .is_err()
    {
        return access.refused(&ctx.metrics, "io_error", "client left before the tunnel");
    }
    let egress = crate::egress_stream::Egress {
        ctx: &ctx,
        access,
        own: &own.id,
        src,
        dst,
        connect: Some((host, head.target.as_str())),
    };
    let dialed = crate::egress_stream::Dialed { up, verdict, open };
    egress.run(app, Some(dialed)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        assert_eq!(split_authority("a.test:443"), Some(("a.test", 443)));
        assert_eq!(split_authority("[::1]:8443"), Some(("::1", 8443)));
        assert_eq!(split_authority("a.test"), None);
        assert_eq!(split_authority(":443"), None);
        assert_eq!(split_authority("a.test:x"), None);
    }
}
