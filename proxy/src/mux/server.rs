//! Inbound `svidcar-mux/1`: an authenticated mTLS connection from a peer proxy that carries one
//! HTTP/2 `CONNECT` stream per application connection.
//!
//! Each stream is a logical inbound connection with everything a plain one gets: its own access
//! log line and metrics, a permit from the connection limit (full → `RST_STREAM(REFUSED_STREAM)`,
//! counted as `overloaded`), the per-connection authorization (peer = the TLS peer's SPIFFE ID,
//! port = the listener's app port), revocation by a policy change, and L7 per request on `http`
//! ports. `:authority` must be an `ip:port`, and every stream of a connection must name the same
//! one (else `421`): a pooled connection carries traffic to one destination. It is normally the
//! destination this connection reached; it may differ when NAT sits between the proxies (a
//! Kubernetes Service address the client dialled), which is logged once per connection.
//! On shutdown the connection sends GOAWAY and lets its streams finish.
//!
//! A carrier outlives credential changes and the peer's SVID, so every new stream first checks
//! that the peer is still trusted ([`PeerTrust::check`]: its leaf has not expired, its trust
//! domain still has a bundle, its chain verifies under changed bundles; an `http` port's stream
//! checks it again on every request). A peer that fails gets `403` and
//! the connection is closed with GOAWAY; otherwise the stream is served as usual. At the peer's
//! expiry the connection is also sent GOAWAY (open streams finish, as on a plain connection).
//!
//! The carrier connections themselves are bounded ([`CarrierLimits`]): at most
//! `limits.max_connections` of them, the first stream must arrive within the handshake
//! timeout, and a connection without an open stream for `2 × pool.idle_timeout` is closed with
//! GOAWAY — so a peer, even one the policy denies every stream, cannot park idle connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use http::{Method, Request, Response, StatusCode};
use svidcar_agent::SpiffeId;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::stream::H2Stream;
use super::{CONNECTION_WINDOW, MAX_FRAME, SEND_BUFFER, STREAM_WINDOW};
use crate::authz::ConnAttrs;
use crate::config::Protocol;
use crate::context::{reset, Access, ProxyContext};
use crate::http::ConnFacts;
use crate::peer_trust::{self, PeerTrust};

const DIR: &str = "inbound";

/// Bounds on inbound multiplexed (carrier) connections.
#[derive(Debug, Clone)]
pub struct CarrierLimits {
    /// Concurrent streams accepted per connection.
    pub max_streams: u32,
    /// A connection with no open stream for this long is closed (GOAWAY).
    pub idle: Duration,
    /// One permit per open carrier (as many as `limits.max_connections`): the streams take the
    /// connection permits, so the carriers need a bound of their own.
    pub carriers: Arc<Semaphore>,
}

impl CarrierLimits {
    /// Limits for `max_connections` carriers of `max_streams` streams, idle after
    /// `2 × pool_idle` (the clients' pools close theirs after `pool_idle`, so a healthy peer
    /// closes first).
    pub fn new(max_connections: usize, max_streams: u32, pool_idle: Duration) -> Self {
        Self {
            max_streams,
            idle: pool_idle.saturating_mul(2),
            carriers: Arc::new(Semaphore::new(max_connections)),
        }
    }
}

/// Counts a connection's open streams; each stream task holds one.
struct StreamCount(Arc<AtomicUsize>);

impl StreamCount {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(open.clone())
    }
}

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What every stream of one multiplexed connection shares.
#[derive(Debug, Clone)]
pub struct MuxFacts {
    /// The authenticated peer (from the TLS handshake).
    pub peer: SpiffeId,
    /// Its certificate chain, to verify again when our bundles change.
    pub peer_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// [`crate::credentials::Installed::generation`] the peer was last verified under.
    pub generation: u64,
    /// When the peer's leaf expires: no new stream from then on.
    pub peer_not_after: std::time::SystemTime,
    /// Our ID.
    pub own: SpiffeId,
    /// The peer proxy's address.
    pub src: SocketAddr,
    /// The destination the TLS connection reached.
    pub dst: SocketAddr,
    /// The app port behind it.
    pub app_port: u16,
    /// tcp | http.
    pub protocol: Protocol,
    /// What the app of an `http` port speaks.
    pub app_protocol: crate::config::AppProtocol,
    /// What the carrier's TLS session negotiated (logged with every stream).
    pub tls: crate::tls_session::TlsFacts,
    /// Concurrent streams accepted.
    pub max_streams: u32,
}

/// Serves one `svidcar-mux/1` connection until the peer closes it (or after a graceful drain).
pub async fn serve(
    ctx: Arc<ProxyContext>,
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    facts: MuxFacts,
) {
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_streams(facts.max_streams)
        .handshake::<_, Bytes>(tls);
    let mut conn = match tokio::time::timeout(ctx.limits.handshake_timeout.0, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::warn!(src = %facts.src, peer_id = %facts.peer, error = %e, "mux: HTTP/2 start failed");
            return;
        }
        Err(_) => {
            tracing::warn!(src = %facts.src, peer_id = %facts.peer, "mux: HTTP/2 start timed out");
            return;
        }
    };
    ctx.metrics.mux_connection(DIR);
    tracing::debug!(src = %facts.src, peer_id = %facts.peer, "mux connection open");
    // Checked before every new stream, and by every request of an `http` port's stream.
    let trust = Arc::new(PeerTrust::new(
        ctx.creds.clone(),
        facts.peer.clone(),
        facts.peer_chain.clone(),
        facts.peer_not_after,
        facts.generation,
    ));
    let facts = Arc::new(facts);
    let mut shutdown = ctx.shutdown.clone();
    let mut draining = false;
    let mut streams = 0u64;
    let open = Arc::new(AtomicUsize::new(0));
    // The first stream must come promptly; later, the connection may idle this long.
    let mut idle_at = Instant::now() + ctx.limits.handshake_timeout.0;
    // The destination the first stream named; all others must name it too.
    let mut pinned: Option<Option<String>> = None;
    let peer_expiry = Instant::now() + trust.expires_in();
    loop {
        let next = tokio::select! {
            _ = tokio::time::sleep_until(peer_expiry), if !draining => {
                tracing::info!(src = %facts.src, peer_id = %facts.peer, streams,
                    "mux: the peer's SVID expired; closing the connection (GOAWAY)");
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
            _ = shutdown.wait_for(|s| *s), if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
            _ = tokio::time::sleep_until(idle_at), if !draining => {
                if open.load(Ordering::Relaxed) > 0 {
                    idle_at = Instant::now() + ctx.mux.idle;
                } else {
                    tracing::info!(src = %facts.src, peer_id = %facts.peer, streams,
                        "mux: closing a connection without streams (idle)");
                    draining = true;
                    conn.graceful_shutdown();
                }
                continue;
            }
            next = conn.accept() => next,
        };
        match next {
            Some(Ok((req, mut respond))) => {
                streams += 1;
                if let Err(reason) = trust.check() {
                    answer(&mut respond, StatusCode::FORBIDDEN);
                    let mut access = Access::new(DIR, facts.src, facts.dst.to_string());
                    access.peer_id = Some(facts.peer.clone());
                    access.refused(
                        &ctx.metrics,
                        "refused",
                        &format!(
                            "{}: mux: {reason}; closing the connection",
                            peer_trust::REASON
                        ),
                    );
                    draining = true;
                    conn.graceful_shutdown();
                    continue;
                }
                let authority = req.uri().authority().map(|a| a.as_str().to_string());
                let authority = authority.filter(|a| a.parse::<SocketAddr>().is_ok());
                let pin = pinned.get_or_insert_with(|| {
                    if let Some(a) = &authority {
                        if a.parse::<SocketAddr>().ok() != Some(facts.dst) {
                            tracing::info!(src = %facts.src, authority = %a, dst = %facts.dst, "mux: the client dialled another address than this connection reached (NAT between the proxies)");
                        }
                    }
                    authority.clone()
                });
                let same = authority.is_some() && *pin == authority;
                idle_at = Instant::now() + ctx.mux.idle;
                let count = StreamCount::new(&open);
                let task = stream(
                    ctx.clone(),
                    facts.clone(),
                    trust.clone(),
                    req,
                    respond,
                    same,
                );
                tokio::spawn(Box::pin(async move {
                    task.await;
                    drop(count);
                }));
            }
            Some(Err(e)) => {
                tracing::debug!(src = %facts.src, error = %e, "mux connection ended with an error");
                break;
            }
            None => break,
        }
    }
    tracing::debug!(src = %facts.src, peer_id = %facts.peer, streams, "mux connection closed");
}

fn answer(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    if respond.send_response(resp, true).is_err() {
        respond.send_reset(Reason::CANCEL);
    }
}

/// One `CONNECT` stream = one logical inbound connection.
async fn stream(
    ctx: Arc<ProxyContext>,
    facts: Arc<MuxFacts>,
    trust: Arc<PeerTrust>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    same_destination: bool,
) {
    let mut access = Access::new(DIR, facts.src, facts.dst.to_string());
    access.peer_id = Some(facts.peer.clone());
    access.own_id = Some(facts.own.clone());
    access.tls = Some(facts.tls);
    if req.method() != Method::CONNECT {
        answer(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
        return access.refused(
            &ctx.metrics,
            "refused",
            &format!("mux: {} request (only CONNECT is served)", req.method()),
        );
    }
    if !same_destination {
        let authority = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
        answer(&mut respond, StatusCode::MISDIRECTED_REQUEST);
        return access.refused(
            &ctx.metrics,
            "refused",
            &format!(
                "mux: CONNECT to {authority:?}: not an ip:port, or not the destination of this \
                 connection's first stream"
            ),
        );
    }
    let Ok(_permit) = ctx.conns.clone().try_acquire_owned() else {
        ctx.metrics.overloaded.inc();
        respond.send_reset(Reason::REFUSED_STREAM);
        return access.refused(&ctx.metrics, "overloaded", "connection limit reached");
    };
    ctx.metrics.mux_stream(DIR);
    ctx.metrics.open_connections.inc();
    let _open = OpenGuard(&ctx.metrics);
    let conn = ConnFacts {
        peer: Some(facts.peer.clone()),
        own: facts.own.clone(),
        src: facts.src,
        dst: facts.dst,
        app_port: facts.app_port,
        tls: true,
        trust: Some(trust),
        app_h2: facts.app_protocol == crate::config::AppProtocol::H2,
    };
    // An `auto` port: the stream is accepted to read its first bytes (a later refusal resets it).
    let (mut req, mut sniffed) = (Some(req), None);
    let mut protocol = facts.protocol;
    if protocol == Protocol::Auto {
        let Some(mut stream) = req.take().and_then(|r| accept(&mut respond, r)) else {
            return access.refused(&ctx.metrics, "closed", "mux: stream reset by the peer");
        };
        let Some((p, prefix)) = crate::inbound::sniff(&ctx, &access, protocol, &mut stream).await
        else {
            return stream.reset();
        };
        protocol = p;
        sniffed = Some((stream, prefix));
    }
    if protocol == Protocol::Http {
        let Some(admission) = crate::inbound::admit(&ctx, &access, &conn.attrs()) else {
            return match sniffed {
                Some((mut stream, _)) => stream.reset(),
                None => respond.send_reset(Reason::REFUSED_STREAM),
            };
        };
        let (stream, prefix) = match (sniffed, req) {
            (Some(s), _) => s,
            (None, Some(r)) => match accept(&mut respond, r) {
                Some(s) => (s, Vec::new()),
                None => {
                    return access.refused(&ctx.metrics, "closed", "mux: stream reset by the peer")
                }
            },
            (None, None) => return,
        };
        let stream = crate::sniff::Rewind::new(prefix, stream);
        return crate::inbound::serve_http(&ctx, stream, conn, access, admission).await;
    }
    let attrs = ConnAttrs {
        peer: Some(&facts.peer),
        own: &facts.own,
        src: facts.src,
        dst: facts.dst,
        app_port: facts.app_port,
        tls: true,
    };
    access.saw_inbound(&attrs, crate::policy::Protocol::Tcp);
    // Refusals: before the stream was accepted a status (or RST_STREAM), after it a reset.
    let refuse =
        |respond: &mut SendResponse<Bytes>, sniffed: Option<(H2Stream, Vec<u8>)>, status| {
            match sniffed {
                Some((mut stream, _)) => stream.reset(),
                None if status == StatusCode::TOO_MANY_REQUESTS => {
                    respond.send_reset(Reason::REFUSED_STREAM)
                }
                None => answer(respond, status),
            }
        };
    let (verdict, open) = ctx.authz.authorize_inbound_open(&attrs);
    if !access.decided(&ctx.metrics, DIR, &verdict) {
        refuse(&mut respond, sniffed, StatusCode::FORBIDDEN);
        return access.refused(
            &ctx.metrics,
            "denied",
            &format!("denied by {}", verdict.rule),
        );
    }
    let Some(_admission) = crate::inbound::admit(&ctx, &access, &attrs) else {
        return refuse(&mut respond, sniffed, StatusCode::TOO_MANY_REQUESTS);
    };
    let prefix = sniffed.as_ref().map(|s| s.1.as_slice()).unwrap_or_default();
    let Some(app) = crate::inbound::connect_app_with(&ctx, &access, facts.app_port, prefix).await
    else {
        return refuse(&mut respond, sniffed, StatusCode::BAD_GATEWAY);
    };
    let _ = app.set_nodelay(true);
    let sniffed_len = prefix.len() as u64;
    let accepted = match (sniffed, req) {
        (Some((stream, _)), _) => Some(stream),
        (None, Some(r)) => accept(&mut respond, r),
        (None, None) => None,
    };
    let Some(mut peer) = accepted else {
        access.refused(&ctx.metrics, "closed", "mux: stream reset by the peer");
        return reset(app);
    };
    let mut app = app;
    let revoked = crate::conn_registry::revoked(open.as_ref());
    let idle = ctx.limits.idle_timeout.0;
    let mut stats = super::pump::pump_until(&mut app, &mut peer, idle, revoked).await;
    // Access-log convention: rx = from the connecting side (the peer).
    std::mem::swap(&mut stats.a_to_b, &mut stats.b_to_a);
    stats.a_to_b += sniffed_len;
    access.finished(&ctx.metrics, &stats);
    if stats.failed() {
        // One side broke: tell the other with a reset, not a clean end of stream.
        peer.reset();
        reset(app);
    }
}

/// Answers `200` and returns the stream as a byte stream.
fn accept(respond: &mut SendResponse<Bytes>, req: Request<RecvStream>) -> Option<H2Stream> {
    let send = respond.send_response(Response::new(()), false).ok()?;
    Some(H2Stream::new(send, req.into_body()))
}

/// Decrements the open-connections gauge when a stream ends.
struct OpenGuard<'a>(&'a crate::metrics::Metrics);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open_connections.dec();
    }
}
