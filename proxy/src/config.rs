//! The proxy's configuration: one YAML file (every field optional, safe defaults, unknown fields
//! rejected) merged with `svidcar proxy` flags.
//!
//! ```yaml
//! agent_socket: /run/svidcar/agent.sock     # default: $SPIFFE_ENDPOINT_SOCKET or this path
//! admin_addr: 127.0.0.1:15000
//! admin_allow_remote: false                 # true: admin_addr may be a non-loopback address
//! inbound:                                  # explicit mode: one mTLS listener per app port
//!   - listen: 0.0.0.0:8443
//!     app_port: 8080
//!     mode: strict                          # strict (default) | permissive
//!     protocol: tcp                         # tcp (default) | http (per-request policy, 403)
//!                                           # | auto (sniffed: HTTP per request, else TCP)
//!     app_protocol: http1                   # http ports: what the app speaks, http1 | h2
//! outbound:                                 # explicit mode: one local plaintext listener per route
//!   - listen: 127.0.0.1:9000
//!     upstream: backend.example:8443
//!     expect: spiffe://example.org/backend  # an exact ID, or a trust domain (any ID in it)
//! transparent:
//!   enabled: false
//!   inbound_addr: 0.0.0.0:15006
//!   outbound_addr: 0.0.0.0:15001
//!   default_mode: strict
//!   ports: { 8080: permissive }             # per original port modes
//!   protocols: { 8080: http }               # per original port protocols (default tcp)
//!   app_protocols: { 9090: h2 }             # per http port app protocols (default http1)
//!   destinations:                           # original destination → expected server ID
//!     - dst: 10.0.0.0/8                     # ip, ip:port, cidr, or cidr with `port:`
//!       port: 8443
//!       expect: example.org
//! limits:
//!   max_connections: 10000
//!   handshake_timeout: 10s
//!   idle_timeout: 1h
//!   drain_timeout: 20s
//!   header_timeout: 20s                     # HTTP ports: request headers within this
//!   detect_timeout: 200ms                   # auto ports: first bytes within this, else TCP
//! policy: /etc/svidcar/policy               # reserved for the policy engine
//! pool:                                     # pooled mTLS between proxies (crate::mux)
//!   enabled: true
//!   max_streams: 100
//!   idle_timeout: 60s
//!   resumption: true
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use svidcar_agent::tls::ExpectedPeer;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The YAML file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML is invalid or has unknown fields.
    #[error("invalid config file {path}: {message}")]
    Yaml {
        /// The file.
        path: PathBuf,
        /// What serde said.
        message: String,
    },
    /// A flag or field value could not be parsed.
    #[error("invalid {what} {value:?}: {reason}")]
    Value {
        /// Which setting.
        what: &'static str,
        /// The value given.
        value: String,
        /// Why.
        reason: String,
    },
}

fn bad(what: &'static str, value: &str, reason: impl ToString) -> ConfigError {
    ConfigError::Value {
        what,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// A duration written as `500ms`, `10s`, `5m`, `1h` (or a bare number of seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    /// Parses `500ms`, `10s`, `5m`, `1h`, `30`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| bad("duration", s, "expected e.g. 500ms, 10s, 5m, 1h"))?;
        let secs_per_unit = match unit {
            "ms" => return Ok(Self(Duration::from_millis(n))),
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(bad("duration", s, "unit must be ms, s, m or h")),
        };
        // Found by fuzz/proxy_config: `n * 3600` overflowed (a panic, or in release a silently
        // wrapped, far shorter duration).
        n.checked_mul(secs_per_unit)
            .map(|secs| Self(Duration::from_secs(secs)))
            .ok_or_else(|| bad("duration", s, "too large"))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Dur::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ms = self.0.as_millis();
        let text = match ms {
            0 => "0s".to_string(),
            ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
            ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
            ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
            ms => format!("{ms}ms"),
        };
        s.serialize_str(&text)
    }
}

/// Whether plaintext is admitted on an inbound port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundMode {
    /// mTLS only; plaintext is reset.
    #[default]
    Strict,
    /// mTLS, or plaintext admitted as unauthenticated (migration).
    Permissive,
}

impl std::str::FromStr for InboundMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "strict" => Ok(Self::Strict),
            "permissive" => Ok(Self::Permissive),
            _ => Err(bad("inbound mode", s, "expected strict or permissive")),
        }
    }
}

/// Application protocol of an inbound port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque bytes; authorization per connection.
    #[default]
    Tcp,
    /// HTTP/1.1 or HTTP/2 (gRPC): authorization per request, denials are `403`.
    Http,
    /// Detected per connection after the handshake ([`crate::sniff`]): an HTTP/1.x request
    /// line or the HTTP/2 preface within `limits.detect_timeout` is served as `http`; anything
    /// else, or silence (a server-first protocol), as `tcp`.
    Auto,
}

/// What the application behind an `http` port speaks. The proxy translates: a client's HTTP/2
/// request reaches an `http1` app as HTTP/1.1, an HTTP/1.1 request reaches an `h2` app (cleartext
/// HTTP/2, prior knowledge) as HTTP/2. gRPC requests always reach the app over HTTP/2, the only
/// transport gRPC is defined on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 (default).
    #[default]
    Http1,
    /// HTTP/2 over cleartext (`h2c`, prior knowledge).
    H2,
}

/// An explicit inbound listener: mTLS on `listen`, forwarded to `127.0.0.1:app_port`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InboundListener {
    /// Where peers connect.
    pub listen: SocketAddr,
    /// The application's port on loopback.
    pub app_port: u16,
    /// strict | permissive.
    #[serde(default)]
    pub mode: InboundMode,
    /// tcp | http.
    #[serde(default)]
    pub protocol: Protocol,
    /// `http` ports: what the app speaks (default `http1`).
    #[serde(default)]
    pub app_protocol: AppProtocol,
}

impl InboundListener {
    /// Parses the flag form `ADDR=APP_PORT[:strict|permissive][:tcp|http|h2|auto]` (`h2`: an
    /// `http` port whose app speaks HTTP/2; with `auto`, the app of what is detected as HTTP).
    pub fn parse_flag(s: &str) -> Result<Self, ConfigError> {
        let (addr, rest) = s
            .split_once('=')
            .ok_or_else(|| bad("--inbound", s, "expected ADDR=APP_PORT[:MODE][:PROTOCOL]"))?;
        let listen = parse_listen(addr).map_err(|r| bad("--inbound", s, r))?;
        let mut parts = rest.split(':');
        let app_port = parts
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| bad("--inbound", s, "APP_PORT must be a port number"))?;
        let (mut mode, mut protocol) = (InboundMode::Strict, Protocol::Tcp);
        let mut app_protocol = AppProtocol::Http1;
        for word in parts {
            match word {
                "tcp" => protocol = Protocol::Tcp,
                "http" => protocol = Protocol::Http,
                "auto" => protocol = Protocol::Auto,
                "h2" => {
                    app_protocol = AppProtocol::H2;
                    if protocol != Protocol::Auto {
                        protocol = Protocol::Http;
                    }
                }
                other => mode = other.parse()?,
            }
        }
        Ok(Self {
            listen,
            app_port,
            mode,
            protocol,
            app_protocol,
        })
    }
}

/// An explicit outbound route: plaintext on `listen` (loopback), mTLS to `upstream`, which must
/// present an SVID matching `expect`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundRoute {
    /// Local plaintext listener for the app.
    pub listen: SocketAddr,
    /// `host:port` of the peer's inbound listener.
    pub upstream: String,
    /// `spiffe://td/path` (exact) or `td` (any ID of that trust domain).
    pub expect: String,
}

impl OutboundRoute {
    /// Parses the flag form `LISTEN_ADDR=UPSTREAM_ADDR,ID_OR_TD`.
    pub fn parse_flag(s: &str) -> Result<Self, ConfigError> {
        let (listen, rest) = s
            .split_once('=')
            .ok_or_else(|| bad("--outbound", s, "expected LISTEN=UPSTREAM,ID_OR_TD"))?;
        let (upstream, expect) = rest
            .split_once(',')
            .ok_or_else(|| bad("--outbound", s, "expected LISTEN=UPSTREAM,ID_OR_TD"))?;
        let route = Self {
            listen: parse_listen(listen).map_err(|r| bad("--outbound", s, r))?,
            upstream: upstream.to_string(),
            expect: expect.to_string(),
        };
        route.expected()?;
        Ok(route)
    }

    /// The parsed expectation.
    pub fn expected(&self) -> Result<ExpectedPeer, ConfigError> {
        ExpectedPeer::parse(&self.expect).map_err(|e| bad("expected server ID", &self.expect, e))
    }
}

/// `:8080` or `8080` mean `127.0.0.1:8080`; otherwise a full socket address.
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim_start_matches(':');
    if let Ok(port) = t.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .map_err(|_| format!("{s:?} is not an address like 127.0.0.1:9000"))
}

/// A transparent-mode destination rule: original destinations matching `dst` (and `port`) are
/// mesh destinations whose server must present `expect`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// `10.1.2.3`, `10.1.2.3:8443`, `10.0.0.0/8`, `fd00::/8`, `[fd00::1]:80`.
    pub dst: String,
    /// Port restriction (when `dst` has none).
    #[serde(default)]
    pub port: Option<u16>,
    /// Expected server ID or trust domain.
    pub expect: String,
}

/// A compiled destination matcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DstMatch {
    net: IpAddr,
    prefix: u8,
    port: Option<u16>,
    /// The expectation for matching destinations.
    pub expect: ExpectedPeer,
}

impl DstMatch {
    /// Compiles a [`Destination`].
    pub fn compile(d: &Destination) -> Result<Self, ConfigError> {
        let expect =
            ExpectedPeer::parse(&d.expect).map_err(|e| bad("expected server ID", &d.expect, e))?;
        let (net, prefix, port) = if let Ok(sa) = d.dst.parse::<SocketAddr>() {
            (
                sa.ip(),
                if sa.is_ipv4() { 32 } else { 128 },
                Some(sa.port()),
            )
        } else if let Some((ip, len)) = d.dst.split_once('/') {
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| bad("destination", &d.dst, "bad CIDR address"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len: u8 = len
                .parse()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| bad("destination", &d.dst, "bad prefix length"))?;
            (ip, len, d.port)
        } else {
            let ip: IpAddr = d
                .dst
                .parse()
                .map_err(|_| bad("destination", &d.dst, "expected ip, ip:port or CIDR"))?;
            (ip, if ip.is_ipv4() { 32 } else { 128 }, d.port)
        };
        Ok(Self {
            net,
            prefix,
            port: port.or(d.port),
            expect,
        })
    }

    /// True when `addr` falls inside this rule.
    pub fn matches(&self, addr: &SocketAddr) -> bool {
        if self.port.is_some_and(|p| p != addr.port()) {
            return false;
        }
        let ip = match addr.ip() {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), self.prefix),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), self.prefix),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = usize::from(bits / 8);
    if a[..full] != b[..full] {
        return false;
    }
    let rem = bits % 8;
    rem == 0 || {
        let mask = 0xffu8 << (8 - rem);
        (a[full] & mask) == (b[full] & mask)
    }
}

/// Transparent mode (iptables REDIRECT + SO_ORIGINAL_DST).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransparentConfig {
    /// Run the transparent listeners.
    pub enabled: bool,
    /// Redirected inbound traffic.
    pub inbound_addr: SocketAddr,
    /// Redirected outbound traffic.
    pub outbound_addr: SocketAddr,
    /// Mode for original ports not listed in `ports`.
    pub default_mode: InboundMode,
    /// Per original inbound port modes.
    pub ports: BTreeMap<u16, InboundMode>,
    /// Per original inbound port protocols (default tcp).
    pub protocols: BTreeMap<u16, Protocol>,
    /// Per original `http` port app protocols (default http1).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub app_protocols: BTreeMap<u16, AppProtocol>,
    /// Mesh destinations and their expected identities; anything else is passthrough egress.
    pub destinations: Vec<Destination>,
}

impl Default for TransparentConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            inbound_addr: SocketAddr::from(([0, 0, 0, 0], 15006)),
            outbound_addr: SocketAddr::from(([0, 0, 0, 0], 15001)),
            default_mode: InboundMode::Strict,
            ports: BTreeMap::new(),
            protocols: BTreeMap::new(),
            app_protocols: BTreeMap::new(),
            destinations: Vec::new(),
        }
    }
}

/// Explicit egress proxy (apps configured with `HTTP(S)_PROXY` send `CONNECT host:port`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Listen address of the HTTP proxy (must be loopback, e.g. `127.0.0.1:15080`); none = off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

/// Resource limits and timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open connections at most (both directions); more are refused.
    pub max_connections: usize,
    /// TLS handshake (and protocol detection) timeout.
    pub handshake_timeout: Dur,
    /// A connection without bytes in either direction for this long is closed.
    pub idle_timeout: Dur,
    /// On SIGTERM, how long open connections may finish.
    pub drain_timeout: Dur,
    /// Connect timeout to upstreams and the local app.
    pub connect_timeout: Dur,
    /// `http` ports and the admin listener: a request's headers must arrive within this time,
    /// or the connection is closed (slowloris guard). hyper also applies it while a keep-alive
    /// connection waits for its next request, so it bounds how long an idle HTTP/1 keep-alive
    /// connection is kept.
    pub header_timeout: Dur,
    /// `auto` ports: how long to wait after the handshake for the first bytes that tell HTTP
    /// from other protocols; silence past it is served as TCP (a server-first protocol waits
    /// this long for its first byte).
    pub detect_timeout: Dur,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            handshake_timeout: Dur(Duration::from_secs(10)),
            idle_timeout: Dur(Duration::from_secs(3600)),
            drain_timeout: Dur(Duration::from_secs(20)),
            connect_timeout: Dur(Duration::from_secs(5)),
            header_timeout: Dur(Duration::from_secs(20)),
            detect_timeout: Dur(Duration::from_millis(200)),
        }
    }
}

/// The whole proxy configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// The agent's Workload API socket.
    pub agent_socket: PathBuf,
    /// Admin listener (/ready, /live, /metrics, /config).
    pub admin_addr: SocketAddr,
    /// Allow a non-loopback [`Self::admin_addr`] (e.g. `0.0.0.0:15000` for Kubernetes probes):
    /// the admin endpoints show the configuration, policy and metrics to whoever reaches them.
    pub admin_allow_remote: bool,
    /// Explicit inbound listeners.
    pub inbound: Vec<InboundListener>,
    /// Explicit outbound routes.
    pub outbound: Vec<OutboundRoute>,
    /// Transparent mode.
    pub transparent: TransparentConfig,
    /// Explicit egress HTTP proxy (CONNECT).
    pub egress: EgressConfig,
    /// Limits and timeouts.
    pub limits: Limits,
    /// Authorization policy path (file or directory); none = the built-in default.
    pub policy: Option<PathBuf>,
    /// Pooled, multiplexed mTLS between proxies ([`crate::mux::PoolConfig`]).
    pub pool: crate::mux::PoolConfig,
    /// JSON access log (`svidcar.access/v1`, [`crate::access_log`]); none = off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log: Option<crate::access_log::AccessLogConfig>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        let agent_socket = std::env::var("SPIFFE_ENDPOINT_SOCKET")
            .ok()
            .map(|s| PathBuf::from(s.trim_start_matches("unix://").trim_start_matches("unix:")))
            .unwrap_or_else(|| PathBuf::from("/run/svidcar/agent.sock"));
        Self {
            agent_socket,
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 15000)),
            admin_allow_remote: false,
            inbound: Vec::new(),
            outbound: Vec::new(),
            transparent: TransparentConfig::default(),
            egress: EgressConfig::default(),
            limits: Limits::default(),
            policy: None,
            pool: crate::mux::PoolConfig::default(),
            access_log: None,
        }
    }
}

impl ProxyConfig {
    /// Reads a YAML file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml(&text).map_err(|message| ConfigError::Yaml {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses YAML text (empty text = all defaults).
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks everything that can be checked before binding sockets.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for r in &self.outbound {
            r.expected()?;
        }
        for d in &self.transparent.destinations {
            DstMatch::compile(d)?;
        }
        if let Some(a) = self.egress.listen {
            if !a.ip().is_loopback() {
                return Err(bad(
                    "egress.listen",
                    &a.to_string(),
                    "must be a loopback address (anyone reaching the egress proxy would use this \
                     workload's egress policy)",
                ));
            }
        }
        if !self.admin_addr.ip().is_loopback() && !self.admin_allow_remote {
            return Err(bad(
                "admin_addr",
                &self.admin_addr.to_string(),
                "is not a loopback address: the admin listener shows the configuration, policy \
                 and metrics without authentication; set admin_allow_remote: true (or \
                 --admin-allow-remote) to serve it there anyway",
            ));
        }
        for i in &self.inbound {
            if i.app_protocol == AppProtocol::H2 && i.protocol == Protocol::Tcp {
                return Err(bad(
                    "inbound.app_protocol",
                    "h2",
                    format!(
                        "applies to http and auto ports only (app port {} is tcp)",
                        i.app_port
                    ),
                ));
            }
        }
        for port in self.transparent.app_protocols.keys() {
            let proto = self.transparent.protocols.get(port);
            if !matches!(proto, Some(Protocol::Http | Protocol::Auto)) {
                return Err(bad(
                    "transparent.app_protocols",
                    &port.to_string(),
                    "applies to http and auto ports only: list the port in transparent.protocols as http or auto",
                ));
            }
        }
        self.pool.validate()?;
        if self.limits.max_connections == 0 {
            return Err(bad("limits.max_connections", "0", "must be at least 1"));
        }
        if self.limits.detect_timeout.0.is_zero()
            || self.limits.detect_timeout.0 > Duration::from_secs(10)
        {
            return Err(bad(
                "limits.detect_timeout",
                &format!("{:?}", self.limits.detect_timeout.0),
                "must be positive and at most 10s (auto ports wait this long for the first bytes)",
            ));
        }
        if self.limits.header_timeout.0.is_zero() {
            return Err(bad(
                "limits.header_timeout",
                "0s",
                "must be positive (it is the slowloris guard of http ports)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (fuzz/proxy_config, crash-faeb78a5): `n * 3600` overflowed and panicked.
    #[test]
    fn a_duration_too_large_is_an_error_not_a_panic() {
        for s in [
            "5124095576030432h",
            "307445734561825861m",
            "18446744073709551615h",
        ] {
            let e = Dur::parse(s).unwrap_err().to_string();
            assert!(e.contains("too large"), "{s}: {e}");
        }
        assert_eq!(
            Dur::parse("5124095576030431h").unwrap().0.as_secs(),
            5124095576030431 * 3600
        );
        assert!(ProxyConfig::from_yaml("limits:\n  idle_timeout: 999999999999999999h\n").is_err());
    }

    #[test]
    fn a_remote_admin_address_needs_the_opt_in() {
        let c = ProxyConfig::from_yaml("admin_addr: 0.0.0.0:15000\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("admin_addr") && e.contains("admin_allow_remote"),
            "{e}"
        );
        let c = ProxyConfig::from_yaml("admin_addr: \"[::]:15000\"\n").unwrap();
        assert!(c.validate().is_err());
        let c = ProxyConfig::from_yaml("admin_addr: 10.1.2.3:15000\n").unwrap();
        assert!(c.validate().is_err());
        let c = ProxyConfig::from_yaml("admin_addr: 0.0.0.0:15000\nadmin_allow_remote: true\n")
            .unwrap();
        assert!(c.validate().is_ok());
        for local in ["127.0.0.1:15000", "127.0.0.9:1", "\"[::1]:15000\""] {
            let c = ProxyConfig::from_yaml(&format!("admin_addr: {local}\n")).unwrap();
            assert!(c.validate().is_ok(), "{local}");
        }
        assert!(ProxyConfig::default().validate().is_ok());
    }

    #[test]
    fn egress_proxy_section() {
        let c = ProxyConfig::from_yaml("egress: {listen: 127.0.0.1:15080}\n").unwrap();
        assert_eq!(
            c.egress.listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 15080)))
        );
        assert_eq!(ProxyConfig::default().egress.listen, None);
        assert!(ProxyConfig::from_yaml("egress: {listen: nope}\n").is_err());
        assert!(ProxyConfig::from_yaml("egress: {port: 1}\n").is_err());
        let open = ProxyConfig::from_yaml("egress: {listen: 0.0.0.0:15080}\n").unwrap();
        assert!(open.validate().is_err());
        assert!(c.validate().is_ok());
        let text = serde_yaml_ng::to_string(&c).unwrap();
        assert_eq!(ProxyConfig::from_yaml(&text).unwrap(), c, "{text}");
    }

    #[test]
    fn app_protocol_of_http_ports() {
        let i = InboundListener::parse_flag("127.0.0.1:8443=8080:http").unwrap();
        assert_eq!(
            (i.protocol, i.app_protocol),
            (Protocol::Http, AppProtocol::Http1)
        );
        let i = InboundListener::parse_flag("127.0.0.1:8443=8080:permissive:h2").unwrap();
        assert_eq!(
            (i.protocol, i.app_protocol),
            (Protocol::Http, AppProtocol::H2)
        );
        let y = "inbound: [{listen: 127.0.0.1:1, app_port: 2, protocol: http, app_protocol: h2}]\n";
        assert!(ProxyConfig::from_yaml(y).unwrap().validate().is_ok());
        let tcp = ProxyConfig::from_yaml(
            "inbound: [{listen: 127.0.0.1:1, app_port: 2, app_protocol: h2}]\n",
        )
        .unwrap();
        assert!(tcp
            .validate()
            .unwrap_err()
            .to_string()
            .contains("http and auto ports only"));
        let i = InboundListener::parse_flag("127.0.0.1:8443=8080:h2:auto").unwrap();
        assert_eq!(
            (i.protocol, i.app_protocol),
            (Protocol::Auto, AppProtocol::H2)
        );
        let i = InboundListener::parse_flag("127.0.0.1:8443=8080:auto:h2").unwrap();
        assert_eq!(i.protocol, Protocol::Auto);
        let t = "transparent: {protocols: {80: auto}, app_protocols: {80: h2}}\n";
        assert!(ProxyConfig::from_yaml(t).unwrap().validate().is_ok());
        let t = "transparent: {protocols: {80: http}, app_protocols: {80: h2}}\n";
        assert!(ProxyConfig::from_yaml(t).unwrap().validate().is_ok());
        let t = "transparent: {app_protocols: {80: h2}}\n";
        assert!(ProxyConfig::from_yaml(t).unwrap().validate().is_err());
        assert!(ProxyConfig::from_yaml("transparent: {app_protocols: {80: h3}}\n").is_err());
    }

    #[test]
    fn parses_flags_yaml_and_cidrs() {
        let i = InboundListener::parse_flag("127.0.0.1:8443=8080:permissive").unwrap();
        assert_eq!((i.app_port, i.mode), (8080, InboundMode::Permissive));
        assert!(InboundListener::parse_flag("127.0.0.1:8443=x").is_err());
        let o =
            OutboundRoute::parse_flag("127.0.0.1:9000=localhost:8443,spiffe://ex.org/b").unwrap();
        assert!(matches!(o.expected().unwrap(), ExpectedPeer::Id(_)));
        let o = OutboundRoute::parse_flag(":9000=h:1,ex.org").unwrap();
        assert!(matches!(
            o.expected().unwrap(),
            ExpectedPeer::TrustDomain(_)
        ));
        assert!(ProxyConfig::from_yaml("nope: 1").is_err());
        let mut full = ProxyConfig::default();
        full.transparent.ports.insert(8080, InboundMode::Permissive);
        full.inbound.push(i.clone());
        let text = serde_yaml_ng::to_string(&full).unwrap();
        assert_eq!(ProxyConfig::from_yaml(&text).unwrap(), full, "{text}");
        let c = ProxyConfig::from_yaml("limits:\n  idle_timeout: 5m\n").unwrap();
        assert_eq!(c.limits.idle_timeout.0, Duration::from_secs(300));
        assert_eq!(
            c.limits.header_timeout.0,
            Duration::from_secs(20),
            "default"
        );
        let c = ProxyConfig::from_yaml("limits:\n  header_timeout: 4s\n").unwrap();
        assert_eq!(c.limits.header_timeout.0, Duration::from_secs(4));
        let zero = ProxyConfig::from_yaml("limits:\n  header_timeout: 0s\n").unwrap();
        let e = zero.validate().unwrap_err().to_string();
        assert!(e.contains("limits.header_timeout"), "{e}");
        let d = Destination {
            dst: "10.0.0.0/8".into(),
            port: Some(80),
            expect: "ex.org".into(),
        };
        let m = DstMatch::compile(&d).unwrap();
        assert!(m.matches(&"10.9.8.7:80".parse().unwrap()));
        assert!(!m.matches(&"10.9.8.7:81".parse().unwrap()));
        assert!(!m.matches(&"11.0.0.1:80".parse().unwrap()));
    }
}
