//! Non-mesh egress byte streams: transparent passthrough ([`crate::outbound`]) and the payload
//! of an allowed CONNECT tunnel ([`crate::egress_connect`]). What the application sends first
//! decides how the connection is checked (POLICY.md §3/§5):
//!
//! - **TLS** (first byte `0x16`, or another TLS record type): the ClientHello is read whole
//!   ([`crate::client_hello::HelloReader`]: across TCP segments and records, up to 64 KiB,
//!   within `limits.handshake_timeout`) and decided on its SNI together with the CONNECT name;
//!   its bytes are then replayed to the upstream first, unchanged. A ClientHello that cannot be
//!   read whole in time or does not parse (and an SSLv2-style hello) is denied as
//!   [`UNREADABLE_RULE`] and reset: the upstream receives nothing. Only a complete ClientHello
//!   without SNI is decided with no name.
//! - **Plaintext HTTP/1.x**: served per request by [`crate::egress_http`] for as long as the
//!   connection lives.
//! - **Anything else**: decided with no name (CIDR and port rules) and spliced.
//! - **Nothing within [`FIRST_BYTES_WAIT`]** (a server-first protocol): decided with no name and
//!   connected so that the server can speak; its bytes are relayed while svidcar keeps waiting for
//!   the application's first bytes, however long that takes. If the server stayed silent, those
//!   are classified as above before anything reaches the upstream (a late ClientHello is decided
//!   on its SNI, a late HTTP request per request). If the server spoke first (SMTP, MySQL…), the
//!   application's bytes answer that protocol and are spliced: no TLS or HTTP server speaks
//!   before the client, so a client cannot use this to hide a ClientHello or a request from a
//!   TLS or HTTP server.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use svidcar_agent::SpiffeId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::authz::{EgressAttrs, Verdict};
use crate::client_hello::{sniff, HelloReader, Progress, Sniff, Unreadable};
use crate::conn_registry::OpenConn;
use crate::context::{reset, Access, ProxyContext};
use crate::copy::{self, CopyEnd, CopyStats};

/// The rule reported for a TLS connection whose ClientHello cannot be read (POLICY.md §3).
pub const UNREADABLE_RULE: &str = "egress:unreadable-client-hello";

/// How long to wait for the application's first bytes before treating the protocol as
/// server-first (deciding without a name and connecting, then still checking what it sends).
pub const FIRST_BYTES_WAIT: Duration = Duration::from_millis(500);

/// How many bytes are peeked to classify the first bytes (an HTTP request line must fit).
const SNIFF_BYTES: usize = crate::egress_connect::MAX_HEAD;

/// What the application's first bytes turned out to be.
enum First {
    /// A complete ClientHello, its SNI, and the bytes consumed to read it.
    Tls(Option<String>, Vec<u8>),
    /// Starts as TLS but no readable ClientHello: deny.
    Unreadable(Unreadable),
    /// Plaintext HTTP/1.x (nothing consumed).
    Http,
    /// Anything else (nothing consumed), or the application closed its side.
    Other,
    /// A socket error.
    Failed(String),
}

/// A non-mesh egress stream being decided.
pub struct Egress<'a> {
    /// The proxy.
    pub ctx: &'a Arc<ProxyContext>,
    /// The access record of the connection.
    pub access: Access,
    /// Our own ID.
    pub own: &'a SpiffeId,
    /// The application.
    pub src: SocketAddr,
    /// Where the stream goes (original destination, or the address a CONNECT dialed).
    pub dst: SocketAddr,
    /// The CONNECT authority host and the request target, for a tunnel.
    pub connect: Option<(&'a str, &'a str)>,
}

/// An upstream already connected (a CONNECT tunnel) with its decision.
pub struct Dialed {
    /// The upstream connection.
    pub up: TcpStream,
    /// The decision that allowed it (the CONNECT name).
    pub verdict: Verdict,
    /// Its registration for re-evaluation on policy change.
    pub open: Option<OpenConn>,
}

impl Egress<'_> {
    fn attrs<'b>(&'b self, sni: Option<&'b str>) -> EgressAttrs<'b> {
        EgressAttrs {
            own: self.own,
            src: self.src,
            dst_ip: Some(self.dst.ip()),
            dst_port: self.dst.port(),
            destination_id: None,
            sni,
            mesh: false,
            connect: self.connect.map(|c| c.0),
            http: None,
        }
    }

    /// `egress` or `CONNECT <target>`, for log lines.
    fn what(&self, sni: Option<&str>) -> String {
        let head = match self.connect {
            Some((_, target)) => format!("CONNECT {target}"),
            None => "egress".into(),
        };
        match sni {
            Some(s) => format!("{head} (SNI {s})"),
            None => head,
        }
    }

    /// Decides with `sni` (and the CONNECT name); logs and counts a denial.
    fn decide(&mut self, sni: Option<&str>) -> Result<(Verdict, Option<OpenConn>), ()> {
        let attrs = self.attrs(sni);
        let (verdict, open) = self.ctx.authz.authorize_egress_open(&attrs);
        let record = self.access.record.clone().map(|mut r| {
            r.saw_egress(&attrs);
            r
        });
        self.access.record = record;
        if self.access.decided(&self.ctx.metrics, "egress", &verdict) {
            return Ok((verdict, open));
        }
        let msg = format!("{} denied by {}", self.what(sni), verdict.rule);
        self.access.refused(&self.ctx.metrics, "denied", &msg);
        Err(())
    }

    fn deny_unreadable(&mut self, why: Unreadable) {
        let verdict = Verdict::deny(UNREADABLE_RULE);
        self.access.decided(&self.ctx.metrics, "egress", &verdict);
        let msg = format!(
            "{} denied by {UNREADABLE_RULE}: the TLS ClientHello could not be read whole ({})",
            self.what(None),
            why.label()
        );
        self.access.refused(&self.ctx.metrics, "denied", &msg);
    }

    async fn dial(&self) -> Result<TcpStream, String> {
        let dst = self.dst;
        match tokio::time::timeout(self.ctx.limits.connect_timeout.0, TcpStream::connect(dst)).await
        {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Ok(Err(e)) => Err(format!("cannot connect to {dst}: {e}")),
            Err(_) => Err(format!("timeout connecting to {dst}")),
        }
    }

    /// Decides and relays the stream to the end. `dialed`: the upstream of an allowed CONNECT.
    pub async fn run(mut self, mut app: TcpStream, dialed: Option<Dialed>) {
        let hs_timeout = self.ctx.limits.handshake_timeout.0;
        let idle = self.ctx.limits.idle_timeout.0;
        let mut dialed = dialed;
        let mut relayed = 0;
        let spoke = wait_first_byte(&app, FIRST_BYTES_WAIT).await;
        if !spoke {
            // Server-first (or a client that waits): decide without a name, let the server
            // speak, and keep watching for the application's first bytes.
            let d = match dialed.take() {
                Some(d) => d,
                None => {
                    let Ok((verdict, open)) = self.decide(None) else {
                        return reset(app);
                    };
                    let up = match self.dial().await {
                        Ok(up) => up,
                        Err(e) => {
                            self.access
                                .refused(&self.ctx.metrics, "upstream_failed", &e);
                            return reset(app);
                        }
                    };
                    Dialed { up, verdict, open }
                }
            };
            let Dialed {
                mut up,
                verdict,
                open,
            } = d;
            match relay_until_app_speaks(&mut app, &mut up, idle, open.as_ref()).await {
                Ok(n) => relayed = n,
                Err(stats) => {
                    self.access.rule = Some(verdict.rule.clone());
                    self.access.finished(&self.ctx.metrics, &stats);
                    if stats.failed() {
                        reset(app);
                        reset(up);
                    }
                    return;
                }
            }
            dialed = Some(Dialed { up, verdict, open });
        }
        let first = if relayed > 0 {
            // The server spoke first (SMTP, MySQL, FTP…): what the app answers is that
            // protocol, not a TLS or HTTP start (no TLS or HTTP server speaks first).
            First::Other
        } else {
            classify(&mut app, Instant::now() + hs_timeout).await
        };
        match first {
            First::Failed(e) => {
                self.access.refused(&self.ctx.metrics, "io_error", &e);
                reset(app);
                if let Some(d) = dialed {
                    reset(d.up);
                }
            }
            First::Unreadable(why) => {
                self.deny_unreadable(why);
                reset(app);
                if let Some(d) = dialed {
                    reset(d.up);
                }
            }
            First::Http => {
                // Every request is decided on its own (and the CONNECT name); the upstream is
                // dialed per request by egress_http.
                drop(dialed);
                let connect = self.connect.map(|c| c.0.to_string());
                let (ctx, own, src, dst) = (self.ctx.clone(), self.own.clone(), self.src, self.dst);
                crate::egress_http::serve(ctx, app, src, Some(dst), own, connect).await;
            }
            First::Tls(sni, bytes) => {
                // Decided again with the SNI (a ClientHello without SNI: with no name).
                let Ok((_, open)) = self.decide(sni.as_deref()) else {
                    reset(app);
                    if let Some(d) = dialed {
                        reset(d.up);
                    }
                    return;
                };
                let up = match dialed {
                    Some(d) => d.up,
                    None => match self.dial().await {
                        Ok(up) => up,
                        Err(e) => {
                            self.access
                                .refused(&self.ctx.metrics, "upstream_failed", &e);
                            return reset(app);
                        }
                    },
                };
                self.splice(app, up, &bytes, relayed, open).await;
            }
            First::Other => {
                let (up, open) = match dialed {
                    Some(d) => {
                        self.access.rule = Some(d.verdict.rule.clone());
                        (d.up, d.open)
                    }
                    None => {
                        let Ok((_, open)) = self.decide(None) else {
                            return reset(app);
                        };
                        match self.dial().await {
                            Ok(up) => (up, open),
                            Err(e) => {
                                self.access
                                    .refused(&self.ctx.metrics, "upstream_failed", &e);
                                return reset(app);
                            }
                        }
                    }
                };
                self.splice(app, up, &[], relayed, open).await;
            }
        }
    }

    /// Replays `first` to `up`, then splices both ways until the end or a policy reset.
    async fn splice(
        self,
        app: TcpStream,
        mut up: TcpStream,
        first: &[u8],
        relayed: u64,
        open: Option<OpenConn>,
    ) {
        if let Err(e) = up.write_all(first).await {
            self.access.refused(
                &self.ctx.metrics,
                "upstream_failed",
                &format!("cannot write to {}: {e}", self.dst),
            );
            reset(app);
            return reset(up);
        }
        let revoked = crate::conn_registry::revoked(open.as_ref());
        let idle = self.ctx.limits.idle_timeout.0;
        let mut stats = copy::splice_bidirectional_until(app, up, idle, revoked).await;
        stats.a_to_b += first.len() as u64;
        stats.b_to_a += relayed;
        self.access.finished(&self.ctx.metrics, &stats);
    }
}

/// Whether the application sent a byte (or closed) within `wait`.
async fn wait_first_byte(app: &TcpStream, wait: Duration) -> bool {
    let mut one = [0u8; 1];
    tokio::time::timeout(wait, app.peek(&mut one)).await.is_ok()
}

/// Relays upstream → app until the application has bytes to send (or closed its side);
/// returns the bytes relayed. Ends early (with the stats) on an error, the idle timeout, a
/// policy change that denies the connection, or when both sides are done.
async fn relay_until_app_speaks(
    app: &mut TcpStream,
    up: &mut TcpStream,
    idle: Duration,
    open: Option<&OpenConn>,
) -> Result<u64, CopyStats> {
    let mut revoked = pin!(crate::conn_registry::revoked(open));
    let mut buf = vec![0u8; copy::MIN_BUF * 16];
    let mut one = [0u8; 1];
    let mut relayed = 0u64;
    let mut up_done = false;
    let end = |relayed, end| CopyStats {
        a_to_b: 0,
        b_to_a: relayed,
        end,
    };
    loop {
        tokio::select! {
            r = app.peek(&mut one) => return match r {
                Ok(_) => Ok(relayed),
                Err(e) => Err(end(relayed, CopyEnd::Error(format!("app: {e}")))),
            },
            r = up.read(&mut buf), if !up_done => match r {
                Ok(0) => {
                    up_done = true;
                    let _ = app.shutdown().await;
                }
                Ok(n) => {
                    if let Err(e) = app.write_all(&buf[..n]).await {
                        return Err(end(relayed, CopyEnd::Error(format!("app: {e}"))));
                    }
                    relayed += n as u64;
                }
                Err(e) => return Err(end(relayed, CopyEnd::Error(format!("upstream: {e}")))),
            },
            rule = &mut revoked => return Err(end(relayed, CopyEnd::PolicyReset(rule))),
            _ = tokio::time::sleep(idle) => return Err(end(relayed, CopyEnd::IdleTimeout)),
        }
    }
}

/// Classifies the application's first bytes (peeked), waiting until `deadline`; a TLS
/// ClientHello is then read (consumed) whole.
async fn classify(app: &mut TcpStream, deadline: Instant) -> First {
    let mut buf = vec![0u8; SNIFF_BYTES];
    let mut pause = Duration::from_millis(1);
    let kind = loop {
        let n = match tokio::time::timeout_at(deadline, app.peek(&mut buf)).await {
            Err(_) => 0,
            Ok(Ok(0)) => return First::Other,
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return First::Failed(format!("app: {e}")),
        };
        let full = n == buf.len() || Instant::now() >= deadline;
        match sniff(&buf[..n], full) {
            Sniff::NeedMore => {}
            kind => break kind,
        }
        // More bytes may come: peek again after a pause (a peek does not wait for new bytes).
        tokio::time::sleep_until((Instant::now() + pause).min(deadline)).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    };
    match kind {
        Sniff::Tls => read_hello(app, deadline).await,
        Sniff::SslV2 => First::Unreadable(Unreadable::SslV2),
        Sniff::Http => First::Http,
        Sniff::Other | Sniff::NeedMore => First::Other,
    }
}

/// Reads (consumes) a whole ClientHello, until `deadline`.
async fn read_hello(app: &mut TcpStream, deadline: Instant) -> First {
    let mut reader = HelloReader::new();
    let mut buf = vec![0u8; 16 * 1024 + 5];
    loop {
        let want = reader.wanted().clamp(1, buf.len());
        let n = match tokio::time::timeout_at(deadline, app.read(&mut buf[..want])).await {
            Err(_) => return First::Unreadable(Unreadable::Timeout),
            Ok(Ok(0)) => return First::Unreadable(Unreadable::Truncated),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return First::Failed(format!("app: {e}")),
        };
        match reader.feed(&buf[..n]) {
            Progress::NeedMore => {}
            Progress::Done(sni) => return First::Tls(sni, reader.into_bytes()),
            Progress::Bad(why) => return First::Unreadable(why),
        }
    }
}
