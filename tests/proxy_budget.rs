//! Per-connection memory budget: the futures that carry one inbound or outbound connection
//! must stay small, so that a refactor cannot silently double the memory of every idle
//! connection (the copy buffers are heap-allocated separately and start at 4 KiB per direction).

use std::sync::Arc;
use std::time::Duration;

use svidcar_proxy::config::{InboundMode, Limits};
use svidcar_proxy::context::ProxyContext;
use svidcar_proxy::credentials::Credentials;
use svidcar_proxy::inbound::{self, InboundTarget};
use svidcar_proxy::metrics::Metrics;
use svidcar_proxy::outbound::{self, OutboundTarget};
use svidcar_proxy::DefaultAuthorizer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// Upper bound for one connection's state machine (bytes).
const BUDGET: usize = 8 * 1024;

#[tokio::test]
async fn connection_futures_stay_within_budget() {
    let (_tx, shutdown) = watch::channel(false);
    let ctx = Arc::new(ProxyContext {
        creds: Arc::new(Credentials::new([], Metrics::default()).unwrap()),
        authz: Arc::new(DefaultAuthorizer),
        metrics: Metrics::default(),
        limits: Limits::default(),
        conns: Arc::new(Semaphore::new(4)),
        shutdown,
        app_clients: svidcar_proxy::http::AppClients::new(),
        pool: None,
        mux: svidcar_proxy::mux::server::CarrierLimits::new(4, 100, Duration::from_secs(60)),
    });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let _c1 = TcpStream::connect(addr).await.unwrap();
    let (s1, p1) = l.accept().await.unwrap();
    let _c2 = TcpStream::connect(addr).await.unwrap();
    let (s2, p2) = l.accept().await.unwrap();

    let target = Arc::new(InboundTarget::Explicit {
        protocol: svidcar_proxy::config::Protocol::Tcp,
        app_protocol: svidcar_proxy::config::AppProtocol::Http1,
        app_port: 1,
        mode: InboundMode::Strict,
    });
    let permit = ctx.conns.clone().try_acquire_owned().unwrap();
    let fut = inbound::handle(ctx.clone(), target, s1, p1, permit);
    let inbound_size = std::mem::size_of_val(&fut);
    drop(fut);

    let expect = svidcar_agent::tls::ExpectedPeer::parse("td.test").unwrap();
    let target = Arc::new(OutboundTarget::route("127.0.0.1:1", expect));
    let permit = ctx.conns.clone().try_acquire_owned().unwrap();
    let fut = outbound::handle(ctx.clone(), target, s2, p2, permit);
    let outbound_size = std::mem::size_of_val(&fut);
    drop(fut);

    println!("inbound connection future: {inbound_size} B, outbound: {outbound_size} B");
    assert!(
        inbound_size <= BUDGET,
        "inbound connection future grew to {inbound_size} B"
    );
    assert!(
        outbound_size <= BUDGET,
        "outbound connection future grew to {outbound_size} B"
    );
    assert!(
        inbound_size >= 256 && outbound_size >= 256,
        "implausibly small: the test measures nothing"
    );
}
