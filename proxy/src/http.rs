//! Inbound HTTP ports (L7): after the handshake authenticated the peer, every request is
//! authorized on its own (method, path, host, headers) and either forwarded to the app or
//! answered `403 RBAC: access denied` (gRPC: `grpc-status: 7`), keeping the connection open
//! (POLICY.md §5, §9). HTTP/1.1 and HTTP/2 downstream; upstream connections to the app are
//! pooled (HTTP/1.1, or HTTP/2 for HTTP/2 requests).

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use svidcar_agent::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::authz::{Authorizer, ConnAttrs, Verdict};
use crate::metrics::Metrics;

type Body = BoxBody<Bytes, hyper::Error>;

/// What the authorizer sees of one HTTP request.
#[derive(Debug, Clone, Copy)]
pub struct HttpAttrs<'a> {
    /// Method.
    pub method: &'a str,
    /// Path and query as received.
    pub path: &'a str,
    /// `:authority` / `Host`.
    pub host: Option<&'a str>,
    /// True for gRPC (`content-type: application/grpc…`).
    pub grpc: bool,
    /// Request headers.
    pub headers: &'a http::HeaderMap,
}

/// Request headers for the policy engine (lowercase names; repeated headers joined with `,`).
pub struct Headers<'a>(pub &'a http::HeaderMap);

impl crate::policy::HeaderSource for Headers<'_> {
    fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        let mut values = self.0.get_all(name).iter().filter_map(|v| v.to_str().ok());
        let first = values.next()?;
        match values.next() {
            None => Some(Cow::Borrowed(first)),
            Some(second) => {
                let mut all = format!("{first},{second}");
                for v in values {
                    all.push(',');
                    all.push_str(v);
                }
                Some(Cow::Owned(all))
            }
        }
    }
}

/// Pooled clients to the local app (one per listener).
#[derive(Clone)]
pub struct AppClients {
    h1: Client<HttpConnector, Incoming>,
    h2: Client<HttpConnector, Incoming>,
}

impl AppClients {
    /// New pools.
    pub fn new() -> Self {
        // From 127.0.0.6, like every inbound forward (see `inbound::connect_from_passthrough`).
        let mut conn = HttpConnector::new();
        conn.set_local_address(Some(crate::init::INBOUND_PASSTHROUGH_SOURCE_V4.into()));
        // Requests are written whole: never hold one back for Nagle.
        conn.set_nodelay(true);
        let h1 = Client::builder(TokioExecutor::new()).build(conn.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(conn);
        Self { h1, h2 }
    }
}

impl Default for AppClients {
    fn default() -> Self {
        Self::new()
    }
}

/// Connection facts kept for every request of the connection.
#[derive(Clone)]
pub struct ConnFacts {
    /// Peer ID (None: plaintext on a permissive port).
    pub peer: Option<SpiffeId>,
    /// Our ID.
    pub own: SpiffeId,
    /// Source.
    pub src: SocketAddr,
    /// Destination as seen by the peer.
    pub dst: SocketAddr,
    /// App port.
    pub app_port: u16,
    /// mTLS?
    pub tls: bool,
    /// The app speaks HTTP/2 (`app_protocol: h2`); else HTTP/1.1, except for gRPC.
    pub app_h2: bool,
}

fn denied(grpc: bool) -> Response<Body> {
    let resp = if grpc {
        let mut r = Response::new(Full::new(Bytes::new()));
        let h = r.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", http::HeaderValue::from_static("7"));
        h.insert(
            "grpc-message",
            http::HeaderValue::from_static("RBAC: access denied"),
        );
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"RBAC: access denied")));
        *r.status_mut() = StatusCode::FORBIDDEN;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
        r
    };
    resp.map(|b| b.map_err(|never| match never {}).boxed())
}

fn bad_gateway(msg: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

async fn one_request(
    req: Request<Incoming>,
    facts: &ConnFacts,
    authz: &dyn Authorizer,
    metrics: &Metrics,
    clients: &AppClients,
) -> Response<Body> {
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let host = req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    let raw = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    // Normalized once: the same path is evaluated and forwarded (POLICY.md §3).
    let normalized = authz.normalize_path(raw);
    let path = match &normalized {
        Ok(Some(p)) => p.as_str(),
        _ => raw,
    };
    let attrs = HttpAttrs {
        method: req.method().as_str(),
        path,
        host,
        grpc,
        headers: req.headers(),
    };
    let conn = ConnAttrs {
        peer: facts.peer.as_ref(),
        own: &facts.own,
        src: facts.src,
        dst: facts.dst,
        app_port: facts.app_port,
        tls: facts.tls,
    };
    let verdict: Verdict = match &normalized {
        Err(rule) => Verdict::deny(rule.clone()),
        Ok(_) => authz.authorize_request(&conn, &attrs),
    };
    metrics.decision("inbound", verdict.allow, &verdict.rule);
    let (method, path) = (attrs.method.to_string(), path.to_string());
    let authority = host.map(str::to_owned);
    if !verdict.allow {
        tracing::warn!(target: "access", direction = "inbound", protocol = "http", src = %facts.src,
            peer_id = facts.peer.as_ref().map(|i| i.as_str()).unwrap_or("-"), method = %method, path = %path,
            rule = %verdict.rule, outcome = "denied", status = if grpc { 200 } else { 403 }, "request denied");
        return denied(grpc);
    }
    // Forward what was evaluated, with the query kept.
    let uri = match &normalized {
        Ok(Some(p)) => format!(
            "http://127.0.0.1:{}{p}{}",
            facts.app_port,
            crate::policy::query_part(raw)
        ),
        _ => format!("http://127.0.0.1:{}{raw}", facts.app_port),
    };
    let (mut parts, body) = req.into_parts();
    parts.uri = match uri.parse() {
        Ok(u) => u,
        Err(e) => return bad_gateway(format!("bad request target: {e}")),
    };
    // What the app speaks, whatever the client spoke (gRPC exists only over HTTP/2).
    let h2 = facts.app_h2 || grpc;
    if !h2 && parts.headers.get(http::header::HOST).is_none() {
        // An HTTP/2 request carries its authority in `:authority`; HTTP/1.1 needs `Host`.
        if let Some(Ok(host)) = authority.as_deref().map(http::HeaderValue::from_str) {
            parts.headers.insert(http::header::HOST, host);
        }
    }
    parts.version = if h2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    let req = Request::from_parts(parts, body);
    let resp = if h2 {
        clients.h2.request(req).await
    } else {
        clients.h1.request(req).await
    };
    match resp {
        Ok(resp) => {
            tracing::info!(target: "access", direction = "inbound", protocol = "http", src = %facts.src,
                peer_id = facts.peer.as_ref().map(|i| i.as_str()).unwrap_or("-"), method = %method, path = %path,
                rule = %verdict.rule, outcome = "allowed", status = resp.status().as_u16(), "request");
            resp.map(|b| b.boxed())
        }
        Err(e) => {
            tracing::warn!(target: "access", direction = "inbound", protocol = "http", path = %path, error = %e, outcome = "upstream_failed", "request failed");
            bad_gateway(format!("upstream app error: {e}\n"))
        }
    }
}

/// Serves HTTP/1.1 or HTTP/2 on `stream` until the peer closes, authorizing each request.
/// `header_timeout` (`limits.header_timeout`) is the longest an HTTP/1 peer may take to send one
/// request's headers (hyper starts the clock when it waits for a request, so an idle keep-alive
/// connection is also closed after it).
pub async fn serve<S>(
    stream: S,
    facts: ConnFacts,
    authz: Arc<dyn Authorizer>,
    metrics: Metrics,
    clients: AppClients,
    header_timeout: std::time::Duration,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let facts = Arc::new(facts);
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (facts, authz, metrics, clients) = (
            facts.clone(),
            authz.clone(),
            metrics.clone(),
            clients.clone(),
        );
        async move {
            Ok::<_, Infallible>(one_request(req, &facts, authz.as_ref(), &metrics, &clients).await)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Slowloris guard: a request's headers must arrive within this time, else the connection
    // is closed (without a timer hyper waits forever). Found by tests/hostile_http.rs.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    let (stream, back) = crate::linger::hand_back(stream);
    let served = builder
        .serve_connection(TokioIo::new(stream), svc)
        .await
        .map_err(|e| e.to_string());
    // hyper has dropped the connection: close it without a reset destroying the last response.
    if let Ok(stream) = back.await {
        crate::linger::linger(stream).await;
    }
    served
}
