//! Inbound: peers → this proxy → the local application.
//!
//! One connection, in phases (everything that can refuse happens before a byte is forwarded):
//! 1. target: the app port and the port's mode (explicit listener, or the original destination
//!    of a redirected socket in transparent mode);
//! 2. detect mesh TLS vs plaintext by peeking; plaintext on a `strict` port is reset;
//! 3. mTLS handshake (with a timeout) on the current credentials, the server config chosen per
//!    ClientHello ([`crate::tls_session`]: sidecar ALPN, `h2`/`http/1.1` on `http` ports, or
//!    none — any SPIFFE mTLS client gets in, whatever ALPN it offers); the peer's SPIFFE ID (a
//!    resumed session's peer chain is verified again, against the bundles and clock of now);
//! 4. `auto` ports: sniff the first bytes ([`crate::sniff`]) to serve HTTP or TCP;
//! 5. authorization ([`crate::authz::Authorizer`]); denied → TCP RST; then the caller's limits
//!    ([`crate::limits`]): over `connections` / `connectionsPerSecond` → TCP RST;
//! 6. connect to `127.0.0.1:<app port>` and copy both ways, until the end or until a new policy
//!    denies the connection (then RST both ways, see [`crate::conn_registry`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::authz::ConnAttrs;
use crate::config::{AppProtocol, InboundMode, Protocol};
use crate::context::{reset, Access, ProxyContext};
use crate::copy;
use crate::detect::{detect, Detected};
use crate::http::ConnFacts;
use crate::limits::Admission;
use crate::peer_trust::PeerTrust;
use crate::sniff::{Rewind, Sniffed};

/// How long a permissive port waits for a first byte before treating the connection as a
/// server-first plaintext protocol.
const PERMISSIVE_DETECT_WAIT: Duration = Duration::from_millis(500);

const DIR: &str = "inbound";

/// Where an inbound listener forwards.
#[derive(Debug, Clone)]
pub enum InboundTarget {
    /// Explicit listener: always this app port and mode.
    Explicit {
        /// App port on loopback.
        app_port: u16,
        /// strict | permissive.
        mode: InboundMode,
        /// tcp | http.
        protocol: Protocol,
        /// What the app of an `http` port speaks.
        app_protocol: AppProtocol,
    },
    /// Transparent listener: app port = original destination port.
    Transparent {
        /// Per-port modes.
        ports: BTreeMap<u16, InboundMode>,
        /// Mode of unlisted ports.
        default_mode: InboundMode,
        /// Per-port protocols (default tcp).
        protocols: BTreeMap<u16, Protocol>,
        /// Per-port app protocols of `http` ports (default http1).
        app_protocols: BTreeMap<u16, AppProtocol>,
    },
}

impl InboundTarget {
    /// (destination as the peer saw it, app port, mode, protocol, app protocol) for an
    /// accepted socket.
    fn resolve(
        &self,
        stream: &TcpStream,
    ) -> std::io::Result<(SocketAddr, u16, InboundMode, Protocol, AppProtocol)> {
        match self {
            Self::Explicit {
                app_port,
                mode,
                protocol,
                app_protocol,
            } => Ok((
                stream.local_addr()?,
                *app_port,
                *mode,
                *protocol,
                *app_protocol,
            )),
            Self::Transparent {
                ports,
                default_mode,
                protocols,
                app_protocols,
            } => {
                let local = stream.local_addr()?;
                let dst = crate::sys::original_dst(stream, local.is_ipv6())?;
                let mode = ports.get(&dst.port()).copied().unwrap_or(*default_mode);
                let protocol = protocols.get(&dst.port()).copied().unwrap_or_default();
                let app = app_protocols.get(&dst.port()).copied().unwrap_or_default();
                Ok((dst, dst.port(), mode, protocol, app))
            }
        }
    }
}

/// Handles one accepted inbound connection to the end.
pub async fn handle(
    ctx: Arc<ProxyContext>,
    target: Arc<InboundTarget>,
    stream: TcpStream,
    src: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let (dst, app_port, mode, protocol, app_protocol) = match target.resolve(&stream) {
        Ok(t) => t,
        Err(e) => {
            let a = Access::new(DIR, src, "?".into());
            a.refused(
                &ctx.metrics,
                "no_original_destination",
                &format!("cannot read the original destination: {e}"),
            );
            return reset(stream);
        }
    };
    let mut access = Access::new(DIR, src, dst.to_string());
    if matches!(*target, InboundTarget::Transparent { .. })
        && crate::init::is_proxy_port(dst.port())
    {
        access.refused(
            &ctx.metrics,
            "refused",
            "original destination is one of the proxy's own ports (redirect loop)",
        );
        return reset(stream);
    }

    // Phase 2: detection.
    let wait = match mode {
        InboundMode::Strict => ctx.limits.handshake_timeout.0,
        InboundMode::Permissive => PERMISSIVE_DETECT_WAIT,
    };
    let detected = match detect(&stream, wait).await {
        Ok(d) => d,
        Err(e) => return access.refused(&ctx.metrics, "io_error", &e.to_string()),
    };
    let own = ctx.creds.current();
    access.own_id = own.as_ref().map(|c| c.id.clone());
    match detected {
        Detected::Closed => access.refused(
            &ctx.metrics,
            "closed",
            "peer closed before sending anything",
        ),
        Detected::Plaintext if mode == InboundMode::Strict => {
            ctx.metrics
                .handshake_failed(DIR, "plaintext_on_strict_port");
            access.refused(
                &ctx.metrics,
                "refused",
                "plaintext on a strict (mTLS-only) port",
            );
            reset(stream);
        }
        Detected::Plaintext => {
            let Some(own) = own else {
                access.refused_no_identity(&ctx.metrics);
                return reset(stream);
            };
            let mut stream = stream;
            let Some((protocol, prefix)) = sniff(&ctx, &access, protocol, &mut stream).await else {
                return reset(stream);
            };
            if protocol == Protocol::Http {
                let facts = ConnFacts {
                    peer: None,
                    own: own.id.clone(),
                    src,
                    dst,
                    app_port,
                    tls: false,
                    trust: None,
                    app_h2: app_protocol == AppProtocol::H2,
                };
                let Some(admission) = admit(&ctx, &access, &facts.attrs()) else {
                    return reset(stream);
                };
                let stream = Rewind::new(prefix, stream);
                return Box::pin(serve_http(&ctx, stream, facts, access, admission)).await;
            }
            let attrs = ConnAttrs {
                peer: None,
                own: &own.id,
                src,
                dst,
                app_port,
                tls: false,
            };
            access.saw_inbound(&attrs, crate::policy::Protocol::Tcp);
            let (verdict, open) = ctx.authz.authorize_inbound_open(&attrs);
            if !access.decided(&ctx.metrics, DIR, &verdict) {
                access.refused(&ctx.metrics, "denied", "denied by policy");
                return reset(stream);
            }
            let Some(_admission) = admit(&ctx, &access, &attrs) else {
                return reset(stream);
            };
            let Some(app) = connect_app_with(&ctx, &access, app_port, &prefix).await else {
                return reset(stream);
            };
            let revoked = crate::conn_registry::revoked(open.as_ref());
            let mut stats =
                copy::splice_bidirectional_until(stream, app, ctx.limits.idle_timeout.0, revoked)
                    .await;
            stats.a_to_b += prefix.len() as u64;
            access.finished(&ctx.metrics, &stats);
        }
        Detected::Tls => {
            let Some(own) = own else {
                access.refused_no_identity(&ctx.metrics);
                return reset(stream);
            };
            let http_port = protocol == Protocol::Http;
            let accept = crate::tls_session::accept(stream, &own.servers, http_port);
            let hs = tokio::time::timeout(ctx.limits.handshake_timeout.0, accept).await;
            let tls = match hs {
                Ok(Ok((tls, _profile))) => tls,
                Ok(Err(e)) => {
                    let (label, msg) = svidcar_agent::tls::classify_handshake_error(&e);
                    ctx.metrics.handshake_failed(DIR, label);
                    return access.refused(
                        &ctx.metrics,
                        "handshake_failed",
                        &format!("{label}: {msg}"),
                    );
                }
                Err(_) => {
                    ctx.metrics.handshake_failed(DIR, "timeout");
                    return access.refused(
                        &ctx.metrics,
                        "handshake_failed",
                        "timeout: TLS handshake took too long",
                    );
                }
            };
            let peer = svidcar_agent::tls::peer_spiffe_id(tls.get_ref().1);
            access.peer_id = peer.clone();
            let negotiated = crate::tls_session::TlsFacts::of(tls.get_ref().1);
            ctx.metrics.tls_handshake(DIR, &negotiated);
            access.tls = Some(negotiated);
            if let Err(e) = ctx.creds.recheck_inbound(tls.get_ref().1) {
                // A resumed session whose restored client chain no longer verifies (expired,
                // trust domain removed): refused before a byte reaches the app.
                ctx.metrics.handshake_failed(DIR, "resumed_peer_invalid");
                access.refused(
                    &ctx.metrics,
                    "handshake_failed",
                    &format!("resumed_peer_invalid: resumed session: {e}"),
                );
                return reset(tls.into_inner().0);
            }
            let Some(peer) = peer else {
                ctx.metrics.handshake_failed(DIR, "no_client_certificate");
                access.refused(
                    &ctx.metrics,
                    "handshake_failed",
                    "no_client_certificate: peer has no SPIFFE ID",
                );
                return reset(tls.into_inner().0);
            };
            if tls.get_ref().1.alpn_protocol() == Some(crate::mux::ALPN_SVIDCAR_MUX) {
                // A pooling peer proxy: one logical connection per stream (crate::mux). Each
                // stream takes its own permit; the carrier connection gives its one back, so the
                // limit and the drain count application connections, as without the pool.
                let Some(peer_not_after) = svidcar_agent::tls::peer_not_after(tls.get_ref().1)
                else {
                    access.refused(
                        &ctx.metrics,
                        "handshake_failed",
                        "invalid_certificate: cannot read the peer certificate's validity",
                    );
                    return reset(tls.into_inner().0);
                };
                let Ok(_carrier) = ctx.mux.carriers.clone().try_acquire_owned() else {
                    ctx.metrics.overloaded.inc();
                    access.refused(
                        &ctx.metrics,
                        "overloaded",
                        "multiplexed connection limit reached (limits.max_connections)",
                    );
                    return reset(tls.into_inner().0);
                };
                drop(_permit);
                ctx.metrics.open_connections.dec();
                let peer_chain = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                    .unwrap_or_default();
                let facts = crate::mux::server::MuxFacts {
                    peer,
                    peer_chain,
                    peer_not_after,
                    generation: own.generation,
                    own: own.id.clone(),
                    src,
                    dst,
                    app_port,
                    protocol,
                    app_protocol,
                    tls: negotiated,
                    max_streams: ctx.mux.max_streams,
                };
                Box::pin(crate::mux::server::serve(ctx.clone(), tls, facts)).await;
                // Balances the accept loop's decrement.
                ctx.metrics.open_connections.inc();
                return;
            }
            let mut tls = tls;
            let Some((protocol, prefix)) = sniff(&ctx, &access, protocol, &mut tls).await else {
                return reset(tls.into_inner().0);
            };
            if protocol == Protocol::Http {
                // Every request checks the peer is still trusted (crate::peer_trust).
                let trust = PeerTrust::of(
                    ctx.creds.clone(),
                    tls.get_ref().1,
                    peer.clone(),
                    own.generation,
                );
                let Some(trust) = trust else {
                    access.refused(
                        &ctx.metrics,
                        "handshake_failed",
                        "invalid_certificate: cannot read the peer certificate's validity",
                    );
                    return reset(tls.into_inner().0);
                };
                let facts = ConnFacts {
                    peer: Some(peer),
                    own: own.id.clone(),
                    src,
                    dst,
                    app_port,
                    tls: true,
                    trust: Some(Arc::new(trust)),
                    app_h2: app_protocol == AppProtocol::H2,
                };
                let Some(admission) = admit(&ctx, &access, &facts.attrs()) else {
                    return reset(tls.into_inner().0);
                };
                let tls = Rewind::new(prefix, tls);
                return Box::pin(serve_http(&ctx, tls, facts, access, admission)).await;
            }
            let attrs = ConnAttrs {
                peer: Some(&peer),
                own: &own.id,
                src,
                dst,
                app_port,
                tls: true,
            };
            access.saw_inbound(&attrs, crate::policy::Protocol::Tcp);
            let (verdict, open) = ctx.authz.authorize_inbound_open(&attrs);
            if !access.decided(&ctx.metrics, DIR, &verdict) {
                access.refused(
                    &ctx.metrics,
                    "denied",
                    &format!("denied by {}", verdict.rule),
                );
                return reset(tls.into_inner().0);
            }
            let Some(_admission) = admit(&ctx, &access, &attrs) else {
                return reset(tls.into_inner().0);
            };
            let Some(app) = connect_app_with(&ctx, &access, app_port, &prefix).await else {
                return reset(tls.into_inner().0);
            };
            let _ = app.set_nodelay(true);
            let (mut tls, mut app) = (tls, app);
            let revoked = crate::conn_registry::revoked(open.as_ref());
            let idle = ctx.limits.idle_timeout.0;
            let mut stats = copy::copy_bidirectional_until(&mut tls, &mut app, idle, revoked).await;
            stats.a_to_b += prefix.len() as u64;
            access.finished(&ctx.metrics, &stats);
            if stats.failed() {
                // One side broke: tell the other with a reset, not a clean end of stream.
                reset(tls.into_inner().0);
                reset(app);
            }
        }
    }
}

/// An `auto` port: sniffs the first bytes of `stream` and says whether to serve it as `http` or
/// `tcp`, with the bytes read (`None`: the stream failed, logged). Other ports: as configured.
pub(crate) async fn sniff<S: tokio::io::AsyncRead + Unpin>(
    ctx: &ProxyContext,
    access: &Access,
    protocol: Protocol,
    stream: &mut S,
) -> Option<(Protocol, Vec<u8>)> {
    if protocol != Protocol::Auto {
        return Some((protocol, Vec::new()));
    }
    match crate::sniff::sniff(stream, ctx.limits.detect_timeout.0).await {
        Ok((Sniffed::Http, prefix)) => Some((Protocol::Http, prefix)),
        Ok((Sniffed::Opaque, prefix)) => Some((Protocol::Tcp, prefix)),
        Err(e) => {
            access.refused(&ctx.metrics, "io_error", &format!("auto port: {e}"));
            None
        }
    }
}

/// Admits an allowed connection under its caller's limits; over one, logs and counts it
/// (`outcome=limited`) and returns `None`: the caller resets the connection.
pub(crate) fn admit(
    ctx: &ProxyContext,
    access: &Access,
    attrs: &ConnAttrs<'_>,
) -> Option<Admission> {
    match ctx.authz.admit(attrs) {
        Ok(a) => Some(a),
        Err(e) => {
            access.refused(&ctx.metrics, "limited", &crate::limits::reason(&e));
            None
        }
    }
}

/// An `http` port: per-request authorization and forwarding (see [`crate::http`]), under the
/// connection's `admission` (limits).
pub(crate) async fn serve_http<S>(
    ctx: &ProxyContext,
    stream: S,
    facts: ConnFacts,
    mut access: Access,
    admission: Admission,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    access.saw_http_port(&facts);
    let r = crate::http::serve(
        stream,
        facts,
        ctx.authz.clone(),
        ctx.metrics.clone(),
        ctx.app_clients.clone(),
        ctx.limits.header_timeout.0,
        admission,
    )
    .await;
    let end = match r {
        Ok(()) => copy::CopyEnd::Closed,
        Err(e) => copy::CopyEnd::Error(e),
    };
    access.finished(
        &ctx.metrics,
        &copy::CopyStats {
            a_to_b: 0,
            b_to_a: 0,
            end,
        },
    );
}

/// Connects to the app from [`crate::init::INBOUND_PASSTHROUGH_SOURCE_V4`] (`127.0.0.6`): the
/// rules of `svidcar init` never capture that source, so neither the proxy's forwarding nor
/// the app's replies are redirected back into the proxy.
pub(crate) async fn connect_from_passthrough(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((
        crate::init::INBOUND_PASSTHROUGH_SOURCE_V4,
        0,
    )))?;
    sock.connect(addr).await
}

/// [`connect_app`], then writes `prefix` (the bytes an `auto` port sniffed) to the app.
pub(crate) async fn connect_app_with(
    ctx: &ProxyContext,
    access: &Access,
    app_port: u16,
    prefix: &[u8],
) -> Option<TcpStream> {
    let mut app = connect_app(ctx, access, app_port).await?;
    if !prefix.is_empty() {
        if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut app, prefix).await {
            access.refused(
                &ctx.metrics,
                "upstream_failed",
                &format!("cannot write to the app on port {app_port}: {e}"),
            );
            return None;
        }
    }
    Some(app)
}

/// Connects to the local app (logs and counts a failure as `upstream_failed`).
pub(crate) async fn connect_app(
    ctx: &ProxyContext,
    access: &Access,
    app_port: u16,
) -> Option<TcpStream> {
    let addr = SocketAddr::from(([127, 0, 0, 1], app_port));
    match tokio::time::timeout(ctx.limits.connect_timeout.0, connect_from_passthrough(addr)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            access.refused(
                &ctx.metrics,
                "upstream_failed",
                &format!("cannot connect to the app at {addr}: {e}"),
            );
            None
        }
        Err(_) => {
            access.refused(
                &ctx.metrics,
                "upstream_failed",
                &format!("timeout connecting to the app at {addr}"),
            );
            None
        }
    }
}
