//! Assembling and running a proxy: bind every listener up front (errors surface at startup),
//! start the admin thread, follow the agent's SVID stream, serve until the shutdown signal, then
//! drain (stop accepting, let open connections finish up to the drain timeout).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use svidcar_agent::tls::ExpectedPeer;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::admin::{self, AdminState};
use crate::authz::Authorizer;
use crate::config::{ConfigError, DstMatch, ProxyConfig};
use crate::context::ProxyContext;
use crate::credentials::{Credentials, X509Source};
use crate::inbound::{self, InboundTarget};
use crate::metrics::Metrics;
use crate::outbound::{self, OutboundTarget};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Which listener.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] svidcar_agent::tls::TlsError),
}

enum Listener {
    Inbound(TcpListener, Arc<InboundTarget>),
    Outbound(TcpListener, Arc<OutboundTarget>),
}

/// A proxy with all sockets bound, ready to [`Proxy::serve`].
pub struct Proxy {
    ctx: Arc<ProxyContext>,
    listeners: Vec<Listener>,
    shutdown_tx: watch::Sender<bool>,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    max_connections: usize,
    drain_timeout: std::time::Duration,
}

async fn bind(addr: SocketAddr, what: String) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, what, source })
}

/// The IPv6 twin of a transparent listener, because `svidcar init`'s IPv6 rules redirect there:
/// `0.0.0.0:P` → `[::]:P`, `127.0.0.1:P` → `[::1]:P`, bound IPv6-only (IPv4 peers keep plain
/// IPv4 addresses on the IPv4 socket). `None` for other addresses, port 0, or without IPv6.
fn ipv6_companion(addr: SocketAddr) -> Option<TcpListener> {
    use std::net::{IpAddr, Ipv6Addr};
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => Ipv6Addr::UNSPECIFIED,
        IpAddr::V4(v4) if v4.is_loopback() => Ipv6Addr::LOCALHOST,
        _ => return None,
    };
    if addr.port() == 0 {
        return None;
    }
    let v6 = SocketAddr::from((ip, addr.port()));
    let bound = (|| {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
        s.set_only_v6(true)?;
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        s.bind(&v6.into())?;
        s.listen(1024)?;
        TcpListener::from_std(s.into())
    })();
    match bound {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::info!(addr = %v6, error = %e, "no IPv6 twin of the transparent listener (IPv4 only)");
            None
        }
    }
}

impl Proxy {
    /// Validates `config`, binds every listener and the admin endpoint.
    pub async fn bind(
        config: &ProxyConfig,
        authz: Arc<dyn Authorizer>,
    ) -> Result<Self, StartError> {
        config.validate()?;
        let metrics = Metrics::default();
        let mut expected: Vec<ExpectedPeer> = Vec::new();
        let mut listeners = Vec::new();
        let mut described = Vec::new();
        for i in &config.inbound {
            let l = bind(i.listen, format!("inbound to app port {}", i.app_port)).await?;
            let target = InboundTarget::Explicit {
                app_port: i.app_port,
                mode: i.mode,
                protocol: i.protocol,
                app_protocol: i.app_protocol,
            };
            described.push(serde_json::json!({"kind": "inbound", "listen": l.local_addr().ok(), "app_port": i.app_port, "mode": i.mode, "protocol": i.protocol, "app_protocol": i.app_protocol}));
            listeners.push(Listener::Inbound(l, Arc::new(target)));
        }
        for r in &config.outbound {
            let expect = r.expected()?;
            expected.push(expect.clone());
            let l = bind(r.listen, format!("outbound route to {}", r.upstream)).await?;
            described.push(serde_json::json!({"kind": "outbound", "listen": l.local_addr().ok(), "upstream": r.upstream, "expect": expect.to_string()}));
            listeners.push(Listener::Outbound(
                l,
                Arc::new(OutboundTarget::route(&r.upstream, expect)),
            ));
        }
        let t = &config.transparent;
        if t.enabled {
            let destinations = t
                .destinations
                .iter()
                .map(DstMatch::compile)
                .collect::<Result<Vec<_>, _>>()?;
            expected.extend(destinations.iter().map(|d| d.expect.clone()));
            let l = bind(t.inbound_addr, "transparent inbound".into()).await?;
            described.push(serde_json::json!({"kind": "transparent-inbound", "listen": t.inbound_addr, "default_mode": t.default_mode, "ports": t.ports}));
            let target = InboundTarget::Transparent {
                ports: t.ports.clone(),
                default_mode: t.default_mode,
                protocols: t.protocols.clone(),
                app_protocols: t.app_protocols.clone(),
            };
            let target = Arc::new(target);
            if let Some(l6) = ipv6_companion(t.inbound_addr) {
                listeners.push(Listener::Inbound(l6, target.clone()));
            }
            listeners.push(Listener::Inbound(l, target));
            let l = bind(t.outbound_addr, "transparent outbound".into()).await?;
            described.push(serde_json::json!({"kind": "transparent-outbound", "listen": t.outbound_addr, "destinations": t.destinations.len()}));
            let target = OutboundTarget::Transparent {
                destinations,
                listen: t.outbound_addr,
            };
            let target = Arc::new(target);
            if let Some(l6) = ipv6_companion(t.outbound_addr) {
                listeners.push(Listener::Outbound(l6, target.clone()));
            }
            listeners.push(Listener::Outbound(l, target));
        }
        if let Some(addr) = config.egress.listen {
            let l = bind(addr, "egress proxy".into()).await?;
            described
                .push(serde_json::json!({"kind": "egress-proxy", "listen": l.local_addr().ok()}));
            listeners.push(Listener::Outbound(l, Arc::new(OutboundTarget::EgressProxy)));
        }
        expected.sort();
        expected.dedup();
        let pool_cfg = &config.pool;
        let creds = Arc::new(
            Credentials::new(expected, metrics.clone())?
                .with_options(pool_cfg.enabled, pool_cfg.resumption),
        );
        let pool = pool_cfg
            .enabled
            .then(|| crate::mux::client::Pool::new(pool_cfg.clone(), metrics.clone()));
        if let Some(p) = &pool {
            tokio::spawn(p.clone().reap(creds.clone()));
        }

        let (shutdown_tx, shutdown) = watch::channel(false);
        let max = config.limits.max_connections;
        let policy = authz.describe();
        let ctx = Arc::new(ProxyContext {
            creds: creds.clone(),
            authz: authz.clone(),
            metrics: metrics.clone(),
            limits: config.limits.clone(),
            conns: Arc::new(Semaphore::new(max)),
            shutdown,
            app_clients: crate::http::AppClients::new(),
            pool,
            mux: crate::mux::server::CarrierLimits::new(
                max,
                pool_cfg.max_streams,
                pool_cfg.idle_timeout.0,
            ),
        });
        let state = AdminState {
            creds,
            registry: metrics.register(),
            listeners: described,
            pool: pool_cfg.describe(),
            ktls: {
                let k = crate::ktls::Ktls::probe();
                k.log();
                k.describe()
            },
            policy: policy.clone(),
            authz,
        };
        let header_timeout = config.limits.header_timeout.0;
        let admin_addr =
            admin::spawn(config.admin_addr, header_timeout, Arc::new(state)).map_err(|source| {
                StartError::Bind {
                    addr: config.admin_addr,
                    what: "admin".into(),
                    source,
                }
            })?;
        tracing::info!("{policy}");
        Ok(Self {
            ctx,
            listeners,
            shutdown_tx,
            admin_addr,
            max_connections: max,
            drain_timeout: config.limits.drain_timeout.0,
        })
    }

    /// The credential store (readiness, current SVID).
    pub fn credentials(&self) -> Arc<Credentials> {
        self.ctx.creds.clone()
    }

    /// Serves until `shutdown` resolves, following the agent's X.509 context stream, then drains.
    pub async fn serve<C, S>(self, contexts: watch::Receiver<Option<Arc<C>>>, shutdown: S)
    where
        C: X509Source + Send + Sync + 'static,
        S: Future<Output = ()>,
    {
        let follower = tokio::spawn(self.ctx.creds.clone().follow(contexts));
        let mut tasks = Vec::new();
        for l in self.listeners {
            let ctx = self.ctx.clone();
            let task = match l {
                Listener::Inbound(l, target) => {
                    tracing::info!(listen = ?l.local_addr().ok(), ?target, "inbound listener");
                    tokio::spawn(ctx.accept_loop(l, "inbound", move |ctx, s, src, permit| {
                        inbound::handle(ctx, target.clone(), s, src, permit)
                    }))
                }
                Listener::Outbound(l, target) => {
                    tracing::info!(listen = ?l.local_addr().ok(), ?target, "outbound listener");
                    tokio::spawn(ctx.accept_loop(l, "outbound", move |ctx, s, src, permit| {
                        outbound::handle(ctx, target.clone(), s, src, permit)
                    }))
                }
            };
            tasks.push(task);
        }
        shutdown.await;
        let open = self.max_connections - self.ctx.conns.available_permits();
        tracing::info!(open_connections = open, drain_timeout = ?self.drain_timeout, "draining: no new connections");
        let _ = self.shutdown_tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
        let all = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        match tokio::time::timeout(self.drain_timeout, self.ctx.conns.acquire_many(all)).await {
            Ok(_) => tracing::info!("drained: all connections finished"),
            Err(_) => {
                let open = self.max_connections - self.ctx.conns.available_permits();
                tracing::warn!(
                    open_connections = open,
                    "drain timeout: closing remaining connections"
                );
            }
        }
        follower.abort();
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => tracing::info!("SIGTERM received"),
                _ = i.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
