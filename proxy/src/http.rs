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
use hyper::client::conn::http2;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use svidcar_agent::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::authz::{Authorizer, ConnAttrs, Verdict};
use crate::http_authority::{request_authority, set_xfcc};
use crate::metrics::Metrics;
use crate::peer_trust::{self, PeerTrust};

type Body = BoxBody<Bytes, hyper::Error>;

/// What the authorizer sees of one HTTP request.
#[derive(Debug, Clone, Copy)]
pub struct HttpAttrs<'a> {
    /// Method.
    pub method: &'a str,
    /// Path as evaluated: normalized by [`Authorizer::normalize_path`] (query dropped), or as
    /// received when the authorizer does not normalize.
    pub path: &'a str,
    /// The request's one authority (`host[:port]`, canonical), as forwarded to the app.
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

/// Pooled HTTP/1.1 clients to the local app (HTTP/2 requests go over one upstream connection
/// per downstream connection, see `H2Upstream`).
#[derive(Clone)]
pub struct AppClients {
    h1: Client<HttpConnector, Incoming>,
}

impl AppClients {
    /// New pools.
    pub fn new() -> Self {
        // From 127.0.0.6, like every inbound forward (see `inbound::connect_from_passthrough`).
        let mut conn = HttpConnector::new();
        conn.set_local_address(Some(crate::init::INBOUND_PASSTHROUGH_SOURCE_V4.into()));
        // Requests are written whole: never hold one back for Nagle.
        conn.set_nodelay(true);
        let h1 = Client::builder(TokioExecutor::new()).build(conn);
        Self { h1 }
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
    /// The mTLS peer, checked before every request (None: plaintext on a permissive port).
    pub trust: Option<Arc<PeerTrust>>,
    /// The app speaks HTTP/2 (`app_protocol: h2`); else HTTP/1.1, except for gRPC.
    pub app_h2: bool,
}

impl ConnFacts {
    /// The connection as the authorizer sees it.
    pub fn attrs(&self) -> ConnAttrs<'_> {
        ConnAttrs {
            peer: self.peer.as_ref(),
            own: &self.own,
            src: self.src,
            dst: self.dst,
            app_port: self.app_port,
            tls: self.tls,
        }
    }
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

fn bad_request() -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(b"bad request\n"))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::BAD_REQUEST;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r
}

/// A request answered `400` before authorization: logged and counted with `reason`.
fn refused(
    facts: &ConnFacts,
    metrics: &Metrics,
    reason: &'static str,
    raw: &str,
) -> Response<Body> {
    metrics.http_refused("inbound", reason);
    tracing::warn!(target: "access", direction = "inbound", protocol = "http", src = %facts.src,
        peer_id = facts.peer.as_ref().map(|i| i.as_str()).unwrap_or("-"), target = %raw.escape_debug(),
        reason, outcome = "refused", status = 400, "request refused");
    crate::access_log::refused_request(facts, reason, raw);
    bad_request()
}

/// The HTTP/2 connection to the app for one downstream HTTP/2 connection. Requests keep the
/// `:authority` they were evaluated on (a client pooled by app address would send
/// `127.0.0.1:<port>` instead), and a downstream connection opens at most one at a time.
struct H2Upstream {
    port: u16,
    send: tokio::sync::Mutex<Option<http2::SendRequest<Incoming>>>,
}

impl H2Upstream {
    fn new(port: u16) -> Self {
        Self {
            port,
            send: tokio::sync::Mutex::new(None),
        }
    }

    async fn request(&self, req: Request<Incoming>) -> Result<Response<Incoming>, String> {
        let mut send = {
            let mut slot = self.send.lock().await;
            match slot.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let s = self.connect().await?;
                    *slot = Some(s.clone());
                    s
                }
            }
        };
        send.ready().await.map_err(|e| e.to_string())?;
        send.send_request(req).await.map_err(|e| e.to_string())
    }

    async fn connect(&self) -> Result<http2::SendRequest<Incoming>, String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let tcp = crate::inbound::connect_from_passthrough(addr)
            .await
            .map_err(|e| format!("connect to the app: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(send)
    }
}

/// A request the policy allows but its caller's `requestsPerSecond` refuses: `429` (gRPC:
/// `grpc-status: 8`) with `retry-after`, logged and counted per limit.
fn limited(
    facts: &ConnFacts,
    e: &crate::policy::limits::Exceeded,
    grpc: bool,
    (method, path, host): (&str, &str, &str),
    record: Option<crate::access_log::AccessRecord>,
) -> Response<Body> {
    let status = if grpc { 200 } else { 429 };
    tracing::warn!(target: "access", direction = "inbound", protocol = "http", src = %facts.src,
        peer_id = facts.peer.as_ref().map(|i| i.as_str()).unwrap_or("-"), method, path, host,
        limit = %e.limit, kind = e.kind.as_str(), retry_after_ms = e.retry_after.as_millis() as u64,
        outcome = "limited", status, "request limited");
    let record = record.map(|mut r| {
        r.reason = Some(crate::limits::reason(e));
        r
    });
    crate::access_log::finish_request(record, "limited", status, None);
    crate::limits::too_many_requests(grpc, e)
}

/// A request of a peer that is no longer trusted (SVID expired, trust domain gone): answered
/// as denied, logged and counted with [`peer_trust::REASON`]; the caller closes the connection.
fn untrusted(
    req: &Request<Incoming>,
    facts: &ConnFacts,
    metrics: &Metrics,
    grpc: bool,
    why: &str,
) -> Response<Body> {
    metrics.http_refused("inbound", peer_trust::REASON);
    tracing::warn!(target: "access", direction = "inbound", protocol = "http", src = %facts.src,
        peer_id = facts.peer.as_ref().map(|i| i.as_str()).unwrap_or("-"), method = %req.method(),
        reason = peer_trust::REASON, detail = %why, outcome = "refused", status = if grpc { 200 } else { 403 },
        "request refused: {why}; closing the connection");
    let mut resp = denied(grpc);
    if req.version() < http::Version::HTTP_2 {
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// What the requests of one downstream connection share: the HTTP/2 connection to the app and
/// the connection's admission under its caller's limits.
struct PerConn {
    h2: H2Upstream,
    admission: crate::limits::Admission,
}

async fn one_request(
    mut req: Request<Incoming>,
    facts: &ConnFacts,
    authz: &dyn Authorizer,
    metrics: &Metrics,
    clients: &AppClients,
    upstream: &PerConn,
    close: &tokio::sync::Notify,
) -> Response<Body> {
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    // The connection outlives the peer's SVID: every request checks it is still trusted.
    if let Some(Err(why)) = facts.trust.as_ref().map(|t| t.check()) {
        close.notify_one();
        return untrusted(&req, facts, metrics, grpc, &why);
    }
    // Owned: the request's parts are rewritten below.
    let raw = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    // One authority, evaluated and forwarded (POLICY.md §4 "Authority").
    let authority = match request_authority(req.uri(), req.headers()) {
        Ok(a) => a,
        Err(reason) => return refused(facts, metrics, reason, &raw),
    };
    // Only origin-form paths (absolute-form keeps its path): no CONNECT, no `OPTIONS *`.
    if !raw.starts_with('/') {
        return refused(facts, metrics, "normalize:not-absolute", &raw);
    }
    // Normalized once: the same path is evaluated and forwarded (POLICY.md §3).
    let normalized = match authz.normalize_path(&raw) {
        Ok(n) => n,
        Err(reason) => {
            metrics.decision("inbound", false, reason);
            return refused(facts, metrics, reason, &raw);
        }
    };
    let path = normalized.as_deref().unwrap_or(&raw);
    // The app may trust this header: the sidecar's own, never the client's (also before
    // authorization, so a `request.headers[x-forwarded-client-cert]` condition sees ours).
    set_xfcc(req.headers_mut(), &facts.own, facts.peer.as_ref());
    let host = authority.as_str();
    let attrs = HttpAttrs {
        method: req.method().as_str(),
        path,
        host: Some(host),
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
    let verdict: Verdict = authz.authorize_request(&conn, &attrs);
    metrics.decision("inbound", verdict.allow, &verdict.rule);
    let record = crate::access_log::enabled()
        .then(|| crate::access_log::inbound_request(&conn, &attrs, authz, &verdict));
    let (method, path) = (attrs.method.to_string(), path.to_string());
    if !verdict.allow {
        tracing::warn!(target: "access", direction = "inbound", protocol = "http", src = %facts.src,
            peer_id = facts.peer.as_ref().map(|i| i.as_str()).unwrap_or("-"), method = %method, path = %path,
            host = %host, rule = %verdict.rule, outcome = "denied", status = if grpc { 200 } else { 403 }, "request denied");
        crate::access_log::finish_request(record, "denied", if grpc { 200 } else { 403 }, None);
        return denied(grpc);
    }
    if let Err(e) = authz.limit_request(&conn, &upstream.admission) {
        return limited(facts, &e, grpc, (&method, &path, host), record);
    }
    // Forward what was evaluated: the normalized path with the query kept, and the authority.
    let target = match &normalized {
        Some(p) => format!("{p}{}", crate::policy::query_part(&raw)),
        None => raw.clone(),
    };
    let (mut parts, body) = req.into_parts();
    // What the app speaks, whatever the client spoke (gRPC exists only over HTTP/2).
    let h2 = facts.app_h2 || grpc;
    parts.headers.remove(http::header::HOST);
    let uri = if h2 {
        // `:authority` is the evaluated authority; no `host` header beside it.
        parts.version = http::Version::HTTP_2;
        format!("http://{host}{target}")
    } else {
        parts.version = http::Version::HTTP_11;
        match http::HeaderValue::from_str(host) {
            Ok(v) => parts.headers.insert(http::header::HOST, v),
            Err(_) => return refused(facts, metrics, crate::http_authority::reason::INVALID, &raw),
        };
        format!("http://127.0.0.1:{}{target}", facts.app_port)
    };
    parts.uri = match uri.parse() {
        Ok(u) => u,
        Err(e) => return bad_gateway(format!("bad request target: {e}")),
    };
    let req = Request::from_parts(parts, body);
    let resp = if h2 {
        upstream.h2.request(req).await
    } else {
        clients.h1.request(req).await.map_err(|e| e.to_string())
    };
    match resp {
        Ok(resp) => {
            tracing::info!(target: "access", direction = "inbound", protocol = "http", src = %facts.src,
                peer_id = facts.peer.as_ref().map(|i| i.as_str()).unwrap_or("-"), method = %method, path = %path,
                host = %host, rule = %verdict.rule, outcome = "allowed", status = resp.status().as_u16(), "request");
            let out = crate::access_log::content_length(resp.headers());
            crate::access_log::finish_request(record, "allowed", resp.status().as_u16(), out);
            resp.map(|b| b.boxed())
        }
        Err(e) => {
            tracing::warn!(target: "access", direction = "inbound", protocol = "http", path = %path, error = %e, outcome = "upstream_failed", "request failed");
            crate::access_log::finish_request(record, "upstream_failed", 502, None);
            bad_gateway(format!("upstream app error: {e}\n"))
        }
    }
}

/// Serves HTTP/1.1 or HTTP/2 on `stream` until the peer closes, authorizing each request.
/// With `facts.trust`, the connection is closed gracefully (HTTP/2: GOAWAY; HTTP/1: after the
/// request in flight) at the peer's expiry or after a request found the peer untrusted.
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
    admission: crate::limits::Admission,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let per_conn = Arc::new(PerConn {
        h2: H2Upstream::new(facts.app_port),
        admission,
    });
    let expiry = facts
        .trust
        .as_ref()
        .map(|t| tokio::time::Instant::now() + t.expires_in());
    let facts = Arc::new(facts);
    let close = Arc::new(tokio::sync::Notify::new());
    let (log_facts, closing) = (facts.clone(), close.clone());
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (facts, authz, metrics, clients, per_conn, close) = (
            facts.clone(),
            authz.clone(),
            metrics.clone(),
            clients.clone(),
            per_conn.clone(),
            close.clone(),
        );
        async move {
            let resp = one_request(
                req,
                &facts,
                authz.as_ref(),
                &metrics,
                &clients,
                &per_conn,
                &close,
            )
            .await;
            Ok::<_, Infallible>(resp)
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
    // In a block: the connection (and the stream it holds) is dropped before `back` resolves.
    let served = {
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        tokio::pin!(conn);
        let mut draining = false;
        loop {
            tokio::select! {
                r = conn.as_mut() => break r.map_err(|e| e.to_string()),
                _ = closing.notified(), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = sleep_until_some(expiry), if !draining => {
                    tracing::info!(src = %log_facts.src,
                        peer_id = log_facts.peer.as_ref().map(|i| i.as_str()).unwrap_or("-"),
                        reason = peer_trust::REASON, "http: the peer's SVID expired; closing the connection");
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    };
    // hyper has dropped the connection: close it without a reset destroying the last response.
    if let Ok(stream) = back.await {
        crate::linger::linger(stream).await;
    }
    served
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
