//! Plaintext HTTP/1.x egress (transparent mode, inside a CONNECT tunnel, or absolute-form
//! requests to the explicit proxy): the application's connection to a non-mesh destination is
//! served as an HTTP/1 server and every request (keep-alive and pipelined ones included) is
//! decided on its name (lowercased, port and trailing dot removed), method and path (POLICY.md
//! §3/§5), then forwarded over one upstream HTTP/1 connection to the destination. The name is the
//! authority of an absolute-form request-target, which must agree with `Host`, else the `Host`;
//! the request is forwarded in origin form, so the upstream never sees a host that was not
//! evaluated.
//!
//! A denial is `403` with body `RBAC: access denied` and the connection stays open. A request
//! refused before the decision (a path normalization refuses, a `Host` that disagrees with the
//! target, POLICY.md §3/§4) is `400`, logged and counted in
//! `svidcar_proxy_http_refused_total{direction="egress",reason}`. Request heads
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
use crate::http_authority::{canonical, reason};

type Body = BoxBody<Bytes, hyper::Error>;

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

/// Why a request is answered without a decision: status, reason label (`400`s are counted in
/// `svidcar_proxy_http_refused_total`) and the body.
type Refusal = (StatusCode, &'static str, &'static str);

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

    /// The destination and name of `req`. The name is the authority of an absolute-form (or
    /// authority-form) request-target when there is one, else the `Host`; a `Host` that names
    /// another host than the request-target, two `Host` headers or a `Host` that is not a
    /// `host[:port]` are refused (`400`), so the request never names a host that was not
    /// evaluated. An absolute-form request is forwarded in origin form with `Host` set to its
    /// authority (RFC 9112 §3.2.2).
    async fn target(&self, req: &mut Request<Incoming>) -> Result<Target, Refusal> {
        let bad = |reason, m| Err((StatusCode::BAD_REQUEST, reason, m));
        let mut hosts = req.headers().get_all(http::header::HOST).iter();
        let host = hosts.next();
        if hosts.next().is_some() {
            return bad(reason::DUPLICATE_HOST, "two Host headers\n");
        }
        let host = match host {
            // An empty Host (RFC 9112 §3.2: no authority) names no host.
            None => None,
            Some(v) if v.is_empty() => None,
            // The same refusals as inbound (crate::http_authority::canonical).
            Some(v) => match v.to_str().map_err(|_| reason::INVALID).and_then(canonical) {
                Ok(_) => v.to_str().ok().map(str::to_string),
                Err(why) => return bad(why, "bad Host header\n"),
            },
        };
        let authority = req.uri().authority().cloned();
        if let (Some(a), Some(h)) = (&authority, &host) {
            if crate::policy::normalize_name(a.host()) != crate::policy::normalize_name(h) {
                return bad(
                    reason::MISMATCH,
                    "the Host header names another host than the request target\n",
                );
            }
        }
        if authority.as_ref().is_some_and(|a| a.as_str().contains('@')) {
            return bad(reason::USERINFO, "bad request target\n");
        }
        let dst = match self.dst {
            // Transparent or inside a CONNECT tunnel: the destination is fixed.
            Some(dst) => dst,
            None => {
                let Some(auth) = &authority else {
                    return bad(
                        "egress:not-absolute-form",
                        "svidcar egress proxy: an absolute http:// URI (or CONNECT) is required\n",
                    );
                };
                if req.uri().scheme_str() != Some("http") {
                    return bad(
                        "egress:not-http",
                        "svidcar egress proxy: only http:// URIs (use CONNECT for TLS)\n",
                    );
                }
                let port = auth.port_u16().unwrap_or(80);
                let name = auth.host().trim_start_matches('[').trim_end_matches(']');
                let dst = crate::egress_connect::resolve(name, port).await;
                let Some(dst) = dst else {
                    return Err((
                        StatusCode::BAD_GATEWAY,
                        "egress:unresolved",
                        "cannot resolve the host\n",
                    ));
                };
                req.headers_mut().remove("proxy-connection");
                req.headers_mut().remove(http::header::PROXY_AUTHORIZATION);
                dst
            }
        };
        let Some(auth) = authority else {
            return Ok(Target { dst, host });
        };
        if req.uri().scheme().is_some() {
            let origin = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .parse()
                .map_err(|_| {
                    (
                        StatusCode::BAD_REQUEST,
                        reason::INVALID,
                        "bad request target\n",
                    )
                })?;
            *req.uri_mut() = origin;
            match http::HeaderValue::from_str(auth.as_str()) {
                Ok(v) => {
                    req.headers_mut().insert(http::header::HOST, v);
                }
                Err(_) => return bad(reason::INVALID, "bad request target\n"),
            }
        }
        Ok(Target {
            dst,
            host: Some(auth.host().to_string()),
        })
    }

    /// Answers a request refused before the decision; a `400` is logged and counted.
    fn refuse(&self, req: &Request<Incoming>, (status, why, body): Refusal) -> Response<Body> {
        if status == StatusCode::BAD_REQUEST {
            self.ctx.metrics.http_refused("egress", why);
        }
        tracing::warn!(target: "access", direction = "egress", protocol = "http", src = %self.src,
            dst = ?self.dst, own_id = self.own.as_str(), connect = self.connect.as_deref().unwrap_or("-"),
            method = %req.method(), target = %req.uri().to_string().escape_debug(), reason = why,
            outcome = "refused", status = status.as_u16(), "request refused");
        text(status, body)
    }

    async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let Target { dst, host } = match self.target(&mut req).await {
            Ok(t) => t,
            Err(refusal) => return self.refuse(&req, refusal),
        };
        let method = req.method().as_str().to_string();
        // Normalized once: the same path is evaluated and forwarded (POLICY.md §3); a path it
        // refuses is answered `400` like inbound (POLICY.md §3), never decided.
        let normalized = match self.ctx.authz.normalize_path(req.uri().path()) {
            Ok(n) => n,
            Err(why) => {
                self.ctx.metrics.decision("egress", false, why);
                return self.refuse(&req, (StatusCode::BAD_REQUEST, why, "bad request\n"));
            }
        };
        let path = match &normalized {
            Some(p) => p.clone(),
            None => req.uri().path().to_string(),
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
        let verdict: Verdict = self.ctx.authz.authorize_egress(&attrs);
        self.ctx
            .metrics
            .decision("egress", verdict.allow, &verdict.rule);
        let record = crate::access_log::enabled()
            .then(|| crate::access_log::egress_request(&attrs, &verdict));
        let log = |outcome: &str, status: u16, reason: &str| {
            let mut r = record.clone();
            if let Some(r) = r.as_mut().filter(|_| reason != "-") {
                r.reason = Some(reason.to_string());
            }
            crate::access_log::finish_request(r, outcome, status, None);
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
        if let Some(p) = &normalized {
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
    fn host_values() {
        // Egress refuses the Host values inbound refuses (one function).
        for ok in ["a.test", "A.Test.:8080", "[::1]:80", "192.0.2.1", "x"] {
            assert!(canonical(ok).is_ok(), "{ok}");
        }
        for bad in [
            "u@a.test",
            "a.test/x",
            "a.test, b.test",
            "a b",
            "a.test:x",
            "a.test?",
            ".a.test",
            "a.test:",
        ] {
            assert!(canonical(bad).is_err(), "{bad}");
        }
    }
}
