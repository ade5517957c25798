//! Plaintext HTTP/1.x egress in transparent mode: the application's connection to a non-mesh
//! destination is served as an HTTP/1 server and every request (keep-alive included) is decided
//! on its `Host` (lowercased, port and trailing dot removed), method and path (POLICY.md §3/§5),
//! then forwarded over one upstream HTTP/1 connection to the original destination.
//!
//! A denial is `403` with body `RBAC: access denied` and the connection stays open. Request heads
//! are bounded (hyper answers `431` over [`crate::egress_connect::MAX_HEAD`]). Protocol upgrades
//! (WebSocket over plaintext egress) are not forwarded.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use svidcar_agent::SpiffeId;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::authz::{EgressAttrs, EgressHttp, Verdict};
use crate::context::ProxyContext;

type Body = BoxBody<Bytes, hyper::Error>;

/// Longest HTTP method token recognized when sniffing.
const MAX_METHOD: usize = 16;

/// True when `first` starts like an HTTP/1.x request line: a method token (`A-Z`) and a space.
pub fn looks_like_http(first: &[u8]) -> bool {
    let n = first.iter().take_while(|b| b.is_ascii_uppercase()).count();
    n > 0 && n <= MAX_METHOD && first.get(n) == Some(&b' ')
}

/// Peeks (without consuming) at the first bytes and says whether they are an HTTP/1.x request
/// line; waits at most `wait`.
pub async fn peek_is_http(stream: &TcpStream, wait: std::time::Duration) -> bool {
    let mut buf = [0u8; MAX_METHOD + 1];
    match tokio::time::timeout(wait, stream.peek(&mut buf)).await {
        Ok(Ok(n)) => looks_like_http(&buf[..n]),
        _ => false,
    }
}

/// Per-connection state shared by the requests of one application connection.
struct Conn {
    ctx: Arc<ProxyContext>,
    own: SpiffeId,
    src: SocketAddr,
    /// `Some`: transparent (original destination); `None`: explicit proxy (absolute-form URI).
    dst: Option<SocketAddr>,
    /// The CONNECT authority host when this is plaintext HTTP inside a CONNECT tunnel (every
    /// request is then decided on both names, CONNECT first).
    connect: Option<String>,
    /// The upstream connection and where it goes.
    upstream: Mutex<Option<(SocketAddr, SendRequest<Incoming>)>>,
}

/// Where one request goes and the name it is decided on.
struct Target {
    dst: SocketAddr,
    host: Option<String>,
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r
}

impl Conn {
    /// Makes `slot` hold a ready sender on the upstream connection, (re)connecting when needed.
    async fn ready(
        &self,
        slot: &mut Option<(SocketAddr, SendRequest<Incoming>)>,
        dst: SocketAddr,
    ) -> Result<(), String> {
        if let Some((to, s)) = slot.as_mut() {
            if *to == dst && !s.is_closed() && s.ready().await.is_ok() {
                return Ok(());
            }
        }
        *slot = None;
        let tcp =
            match tokio::time::timeout(self.ctx.limits.connect_timeout.0, TcpStream::connect(dst))
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return Err(format!("cannot connect to {}: {e}", dst)),
                Err(_) => return Err(format!("timeout connecting to {}", dst)),
            };
        let _ = tcp.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP handshake with {}: {e}", dst))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender
            .ready()
            .await
            .map_err(|e| format!("upstream {}: {e}", dst))?;
        *slot = Some((dst, sender));
        Ok(())
    }

    /// The destination and name of `req`; for the explicit proxy also rewrites the absolute-form
    /// request to origin-form with `Host` = the URI authority (RFC 9112 §3.2.2).
    async fn target(
        &self,
        req: &mut Request<Incoming>,
    ) -> Result<Target, (StatusCode, &'static str)> {
        if let Some(dst) = self.dst {
            let host = req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri().authority().map(|a| a.as_str()))
                .map(str::to_string);
            return Ok(Target { dst, host });
        }
        let bad = |m| Err((StatusCode::BAD_REQUEST, m));
        let Some(auth) = req.uri().authority().cloned() else {
            return bad("svidcar egress proxy: an absolute http:// URI (or CONNECT) is required\n");
        };
        if req.uri().scheme_str() != Some("http") {
            return bad("svidcar egress proxy: only http:// URIs (use CONNECT for TLS)\n");
        }
        let port = auth.port_u16().unwrap_or(80);
        let host = auth.host().trim_start_matches('[').trim_end_matches(']');
        let dst = crate::egress_connect::resolve(host, port).await;
        let Some(dst) = dst else {
            return Err((StatusCode::BAD_GATEWAY, "cannot resolve the host\n"));
        };
        let origin = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse()
            .map_err(|_| (StatusCode::BAD_REQUEST, "bad request target\n"))?;
        *req.uri_mut() = origin;
        let h = req.headers_mut();
        if let Ok(v) = http::HeaderValue::from_str(auth.as_str()) {
            h.insert(http::header::HOST, v);
        }
        h.remove("proxy-connection");
        h.remove(http::header::PROXY_AUTHORIZATION);
        Ok(Target {
            dst,
            host: Some(auth.host().to_string()),
        })
    }

    async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let Target { dst, host } = match self.target(&mut req).await {
            Ok(t) => t,
            Err((status, msg)) => return text(status, msg),
        };
        let method = req.method().as_str().to_string();
        // Normalized once: the same path is evaluated and forwarded (POLICY.md §3).
        let normalized = self.ctx.authz.normalize_path(req.uri().path());
        let path = match &normalized {
            Ok(Some(p)) => p.clone(),
            _ => req.uri().path().to_string(),
        };
        let attrs = EgressAttrs {
            own: &self.own,
            src: self.src,
            dst_ip: Some(dst.ip()),
            dst_port: dst.port(),
            destination_id: None,
            sni: None,
            mesh: false,
            connect: self.connect.as_deref(),
            http: Some(EgressHttp {
                host: host.as_deref(),
                method: &method,
                path: &path,
            }),
        };
        let verdict = match &normalized {
            Err(rule) => Verdict::deny(*rule),
            Ok(_) => self.ctx.authz.authorize_egress(&attrs),
        };
        self.ctx
            .metrics
            .decision("egress", verdict.allow, &verdict.rule);
        let log = |outcome: &str, status: u16, reason: &str| {
            tracing::info!(
                target: "access",
                direction = "egress",
                src = %self.src,
                dst = %dst,
                own_id = self.own.as_str(),
                connect = self.connect.as_deref().unwrap_or("-"),
                host = host.as_deref().unwrap_or("-"),
                method = method.as_str(),
                path = path.as_str(),
                rule = verdict.rule.as_str(),
                outcome,
                status,
                reason,
                "http request"
            );
        };
        if !verdict.allow {
            log("denied", 403, &format!("denied by {}", verdict.rule));
            return text(StatusCode::FORBIDDEN, "RBAC: access denied");
        }
        if let Ok(Some(p)) = &normalized {
            if p != req.uri().path() {
                let query = req
                    .uri()
                    .query()
                    .map(|q| format!("?{q}"))
                    .unwrap_or_default();
                match format!("{p}{query}").parse() {
                    Ok(uri) => *req.uri_mut() = uri,
                    Err(_) => return text(StatusCode::BAD_REQUEST, "bad request target\n"),
                }
            }
        }
        let sent = {
            let mut slot = self.upstream.lock().await;
            match self.ready(&mut slot, dst).await {
                Ok(()) => match slot.as_mut() {
                    Some((_, s)) => s.send_request(req),
                    None => return text(StatusCode::BAD_GATEWAY, "upstream connect failed\n"),
                },
                Err(e) => {
                    log("upstream_failed", 502, &e);
                    return text(StatusCode::BAD_GATEWAY, "upstream connect failed\n");
                }
            }
        };
        match sent.await {
            Ok(resp) => {
                log("allowed", resp.status().as_u16(), "-");
                resp.map(BodyExt::boxed)
            }
            Err(e) => {
                log("upstream_failed", 502, &e.to_string());
                text(StatusCode::BAD_GATEWAY, "upstream request failed\n")
            }
        }
    }
}

/// Serves one plaintext HTTP/1.x egress connection until either side closes: to the original
/// destination `dst` (transparent), or, with `None`, as an explicit proxy for absolute-form
/// `http://` requests (each decided on its URI host and sent to the first resolved address).
/// `connect`: the CONNECT host when the connection is a CONNECT tunnel carrying plaintext HTTP.
pub async fn serve(
    ctx: Arc<ProxyContext>,
    app: TcpStream,
    src: SocketAddr,
    dst: Option<SocketAddr>,
    own: SpiffeId,
    connect: Option<String>,
) {
    let idle = ctx.limits.idle_timeout.0;
    let conn = Arc::new(Conn {
        ctx,
        own,
        src,
        dst,
        connect,
        upstream: Mutex::new(None),
    });
    let svc = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.handle(req).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(idle)
        .max_buf_size(crate::egress_connect::MAX_HEAD)
        .serve_connection(TokioIo::new(app), svc);
    if let Err(e) = served.await {
        tracing::debug!(%src, ?dst, error = %e, "plaintext egress connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_request_lines() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"OPTIONS * HTTP/1.1"));
        assert!(!looks_like_http(b"\x16\x03\x01"));
        assert!(!looks_like_http(b"SSH-2.0-OpenSSH"));
        assert!(!looks_like_http(b"get / HTTP/1.1"));
        assert!(!looks_like_http(b""));
    }
}
