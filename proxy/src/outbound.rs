//! Outbound: the local application → this proxy → mTLS to a peer proxy.
//!
//! Explicit mode (like ghostunnel): a plaintext loopback listener per route, each with its
//! upstream and the identity the upstream must present. Transparent mode: one listener that
//! receives redirected connections, reads the original destination (`SO_ORIGINAL_DST`), and
//! looks it up in the destination map: a mesh destination gets mTLS with the expected identity,
//! anything else is passed through unchanged (egress, allowed and logged: POLICY.md §9).
//!
//! A server that presents another identity fails the call (the app sees a reset); there is never
//! a fallback to plaintext.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use svidcar_agent::tls::ExpectedPeer;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsConnector;

use crate::authz::EgressAttrs;
use crate::config::DstMatch;
use crate::context::{reset, Access, ProxyContext};
use crate::mux::client::{PoolKey, Refusal, Tls, Upstream};

use crate::copy;

/// Where an outbound listener sends its connections.
#[derive(Debug, Clone)]
pub enum OutboundTarget {
    /// One fixed upstream.
    Route {
        /// `host:port`.
        upstream: String,
        /// The TLS server name derived from the host.
        server_name: ServerName<'static>,
        /// Identity the upstream must present.
        expect: ExpectedPeer,
    },
    /// Transparent: original destination → destination map.
    Transparent {
        /// Mesh destinations in order; first match wins.
        destinations: Vec<DstMatch>,
        /// Our own listener address (connections to it would loop).
        listen: SocketAddr,
    },
    /// The explicit egress HTTP proxy (`CONNECT`), see [`crate::egress_connect`].
    EgressProxy,
}

impl OutboundTarget {
    /// A fixed route to `upstream` (`host:port`).
    pub fn route(upstream: &str, expect: ExpectedPeer) -> Self {
        let host = upstream
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(upstream);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Self::Route {
            upstream: upstream.to_string(),
            server_name: server_name(host),
            expect,
        }
    }
}

/// A TLS server name for `host` (an IP, a DNS name, or a placeholder: SVID verification does not
/// use it; it only keys session resumption).
fn server_name(host: &str) -> ServerName<'static> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ServerName::IpAddress(ip.into());
    }
    ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into()))
}

/// Handles one accepted outbound connection to the end.
pub async fn handle(
    ctx: Arc<ProxyContext>,
    target: Arc<OutboundTarget>,
    app: TcpStream,
    src: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    match target.as_ref() {
        OutboundTarget::EgressProxy => {
            crate::egress_connect::handle(ctx, app, src, _permit).await;
        }
        OutboundTarget::Route {
            upstream,
            server_name,
            expect,
        } => {
            let access = Access::new("outbound", src, upstream.clone());
            let (host, port) = upstream
                .rsplit_once(':')
                .unwrap_or((upstream.as_str(), "0"));
            let ip = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .ok();
            let dst = (ip, port.parse().unwrap_or(0));
            let name = server_name.clone();
            mesh(&ctx, access, app, upstream.as_str(), dst, name, expect).await;
        }
        OutboundTarget::Transparent {
            destinations,
            listen,
        } => {
            let local = match app.local_addr() {
                Ok(l) => l,
                Err(e) => {
                    return Access::new("outbound", src, "?".into()).refused(
                        &ctx.metrics,
                        "io_error",
                        &e.to_string(),
                    )
                }
            };
            let dst = match crate::sys::original_dst(&app, local.is_ipv6()) {
                Ok(d) => d,
                Err(e) => {
                    let a = Access::new("outbound", src, "?".into());
                    a.refused(
                        &ctx.metrics,
                        "no_original_destination",
                        &format!("cannot read the original destination: {e}"),
                    );
                    return reset(app);
                }
            };
            if dst == *listen || dst == local || crate::init::is_proxy_port(dst.port()) {
                let a = Access::new("outbound", src, dst.to_string());
                a.refused(
                    &ctx.metrics,
                    "refused",
                    "connection to the proxy's own listener (redirect loop)",
                );
                return reset(app);
            }
            match destinations.iter().find(|d| d.matches(&dst)) {
                Some(m) => {
                    let access = Access::new("outbound", src, dst.to_string());
                    let name = ServerName::IpAddress(dst.ip().into());
                    let d = (Some(dst.ip()), dst.port());
                    mesh(&ctx, access, app, dst, d, name, &m.expect).await;
                }
                None => passthrough(&ctx, app, src, dst).await,
            }
        }
    }
}

/// mTLS to a mesh destination that must present `expect`.
async fn mesh<A: tokio::net::ToSocketAddrs + std::fmt::Display + Copy>(
    ctx: &ProxyContext,
    mut access: Access,
    app: TcpStream,
    upstream: A,
    dst: (Option<std::net::IpAddr>, u16),
    name: ServerName<'static>,
    expect: &ExpectedPeer,
) {
    let Some(own) = ctx.creds.current() else {
        access.refused_no_identity(&ctx.metrics);
        return reset(app);
    };
    access.own_id = Some(own.id.clone());
    let destination_id = match expect {
        ExpectedPeer::Id(id) => Some(id),
        ExpectedPeer::TrustDomain(_) => None,
    };
    let attrs = EgressAttrs {
        own: &own.id,
        src: access.src,
        dst_ip: dst.0,
        dst_port: dst.1,
        destination_id,
        sni: None,
        mesh: true,
        connect: None,
        http: None,
    };
    access.saw_egress(&attrs);
    let (verdict, open) = ctx.authz.authorize_egress_open(&attrs);
    if !access.decided(&ctx.metrics, "egress", &verdict) {
        access.refused(
            &ctx.metrics,
            "denied",
            &format!("denied by {}", verdict.rule),
        );
        return reset(app);
    }
    let Some(config) = own.client_config(expect) else {
        access.refused(
            &ctx.metrics,
            "refused",
            &format!("no client config for expected peer {expect}"),
        );
        return reset(app);
    };
    if let Some(pool) = &ctx.pool {
        let key = PoolKey {
            upstream: upstream.to_string(),
            expect: expect.clone(),
            generation: own.generation,
        };
        let dial = || dial(ctx, upstream, name.clone(), config.clone(), expect);
        let up = Box::pin(pool.stream(&key, own.not_after, dial)).await;
        return match up {
            Ok(Upstream::Mux {
                mut stream,
                peer_id,
                lease,
            }) => {
                access.peer_id = peer_id;
                access.tls = Some(lease.tls());
                let mut app = app;
                let revoked = crate::conn_registry::revoked(open.as_ref());
                let idle = ctx.limits.idle_timeout.0;
                let stats =
                    crate::mux::pump::pump_until(&mut app, &mut stream, idle, revoked).await;
                access.finished(&ctx.metrics, &stats);
                if stats.failed() {
                    // One side broke (e.g. the peer reset): a reset both ways, not a clean EOF.
                    stream.reset();
                    reset(app);
                }
                drop(lease);
            }
            Ok(Upstream::Plain(tls)) => {
                plain(ctx, access, app, *tls, open.as_ref()).await;
            }
            Err(r) => {
                access.refused(&ctx.metrics, r.outcome, &r.reason);
                reset(app);
            }
        };
    }
    match dial(ctx, upstream, name, config, expect).await {
        Ok(tls) => plain(ctx, access, app, tls, open.as_ref()).await,
        Err(r) => {
            access.refused(&ctx.metrics, r.outcome, &r.reason);
            reset(app);
        }
    }
}

/// TCP connect and mTLS handshake to `upstream` (the peer identity is checked by `config`'s
/// verifier); a failed handshake is counted here. A *resumed* handshake skipped the verifier, so
/// the server chain it restored is verified again (bundles and clock of now, `expect`); if that
/// fails, the tickets for `name` are dropped and the call dials once more with a full handshake.
async fn dial<A: tokio::net::ToSocketAddrs + std::fmt::Display + Copy>(
    ctx: &ProxyContext,
    upstream: A,
    name: ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
    expect: &ExpectedPeer,
) -> Result<Tls, Refusal> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let tls = handshake(ctx, upstream, name.clone(), config.clone()).await?;
        let Err(e) = ctx.creds.recheck_outbound(tls.get_ref().1, expect) else {
            return Ok(tls);
        };
        ctx.metrics
            .handshake_failed("outbound", "resumed_peer_invalid");
        ctx.creds.forget_sessions(expect, &name);
        reset(tls.into_inner().0);
        let reason = format!("resumed_peer_invalid: resumed session to {upstream}: {e}");
        if attempt >= 2 {
            return Err(Refusal {
                outcome: "handshake_failed",
                reason,
            });
        }
        tracing::info!(upstream = %upstream, reason = %reason, "not using a resumed session; dialling again with a full handshake");
    }
}

/// One TCP connect and mTLS handshake (see [`dial`]).
async fn handshake<A: tokio::net::ToSocketAddrs + std::fmt::Display + Copy>(
    ctx: &ProxyContext,
    upstream: A,
    name: ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
) -> Result<Tls, Refusal> {
    let failed = |reason: String| Refusal {
        outcome: "upstream_failed",
        reason,
    };
    let tcp = match tokio::time::timeout(ctx.limits.connect_timeout.0, TcpStream::connect(upstream))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(failed(format!("cannot connect to {upstream}: {e}"))),
        Err(_) => return Err(failed(format!("timeout connecting to {upstream}"))),
    };
    let _ = tcp.set_nodelay(true);
    let connector = TlsConnector::from(config);
    match tokio::time::timeout(ctx.limits.handshake_timeout.0, connector.connect(name, tcp)).await {
        Ok(Ok(t)) => {
            let negotiated = crate::tls_session::TlsFacts::of(t.get_ref().1);
            ctx.metrics.tls_handshake("outbound", &negotiated);
            Ok(t)
        }
        Ok(Err(e)) => {
            let (label, msg) = svidcar_agent::tls::classify_handshake_error(&e);
            ctx.metrics.handshake_failed("outbound", label);
            Err(Refusal {
                outcome: "handshake_failed",
                reason: format!("{label}: {msg}"),
            })
        }
        Err(_) => {
            ctx.metrics.handshake_failed("outbound", "timeout");
            Err(Refusal {
                outcome: "handshake_failed",
                reason: "timeout: TLS handshake took too long".into(),
            })
        }
    }
}

/// One application connection over its own mTLS connection (no pooling).
async fn plain(
    ctx: &ProxyContext,
    mut access: Access,
    app: TcpStream,
    tls: Tls,
    open: Option<&crate::conn_registry::OpenConn>,
) {
    access.peer_id = svidcar_agent::tls::peer_spiffe_id(tls.get_ref().1);
    access.tls = Some(crate::tls_session::TlsFacts::of(tls.get_ref().1));
    let (mut app, mut tls) = (app, tls);
    let revoked = crate::conn_registry::revoked(open);
    let idle = ctx.limits.idle_timeout.0;
    let stats = copy::copy_bidirectional_until(&mut app, &mut tls, idle, revoked).await;
    let refusal = stats
        .failed()
        .then(|| crate::tls_session::peer_refusal(tls.get_mut().1, stats.b_to_a))
        .flatten();
    if let Some(alert) = refusal {
        // TLS 1.3: the server checks our certificate after our handshake is done; its verdict
        // is this alert, not a connection that ran.
        let alert = alert.as_str().unwrap_or("unknown");
        ctx.metrics.handshake_failed("outbound", "refused_by_peer");
        access.refused(
            &ctx.metrics,
            "refused_by_peer",
            &format!(
                "the server refused the connection right after the handshake with TLS alert \
                 {alert} (typically: it does not accept our client certificate; is our trust \
                 domain's bundle in its trust store, and our SPIFFE ID allowed?)"
            ),
        );
        reset(app);
        return reset(tls.into_inner().0);
    }
    access.finished(&ctx.metrics, &stats);
    if stats.failed() {
        // One side broke (e.g. the peer reset): tell the app with a reset, not a clean EOF.
        reset(app);
        reset(tls.into_inner().0);
    }
}

/// Non-mesh destination in transparent mode: decided on what the application sends first
/// (TLS ClientHello read whole, plaintext HTTP per request, anything else without a name), see
/// [`crate::egress_stream`].
async fn passthrough(ctx: &Arc<ProxyContext>, app: TcpStream, src: SocketAddr, dst: SocketAddr) {
    let mut access = Access::new("egress", src, dst.to_string());
    let Some(own) = ctx.creds.current() else {
        access.refused_no_identity(&ctx.metrics);
        return reset(app);
    };
    access.own_id = Some(own.id.clone());
    let egress = crate::egress_stream::Egress {
        ctx,
        access,
        own: &own.id,
        src,
        dst,
        connect: None,
    };
    egress.run(app, None).await;
}
