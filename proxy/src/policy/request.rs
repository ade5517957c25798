//! What a decision is made on (POLICY.md §3) and what it returns.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use svidcar_agent::SpiffeId;

pub use super::model::Direction;

/// How the traffic is seen by the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// An HTTP/1.1 or HTTP/2 request (per-request decision).
    Http,
    /// A gRPC request (method `POST`, path `/package.Service/Method`).
    Grpc,
    /// Opaque TCP.
    Tcp,
    /// TLS passthrough (egress), decided on SNI.
    Tls,
    /// An explicit-proxy `CONNECT` (decided on the authority before tunnelling).
    Connect,
}

impl Protocol {
    /// HTTP-only fields apply (HTTP and gRPC requests).
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::Grpc)
    }
}

/// Request headers by lowercase name; repeated headers joined with `,` (Envoy behavior).
pub trait HeaderSource {
    /// The value of `name` (already lowercase), if present.
    fn header(&self, name: &str) -> Option<Cow<'_, str>>;
}

/// No headers (non-HTTP traffic).
pub struct NoHeaders;

impl HeaderSource for NoHeaders {
    fn header(&self, _: &str) -> Option<Cow<'_, str>> {
        None
    }
}

impl HeaderSource for http::HeaderMap {
    fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        let mut it = self.get_all(name).iter();
        let first = it.next()?;
        let first = String::from_utf8_lossy(first.as_bytes());
        match it.next() {
            None => Some(first),
            Some(second) => {
                let mut s = first.into_owned();
                for v in std::iter::once(second).chain(it) {
                    s.push(',');
                    s.push_str(&String::from_utf8_lossy(v.as_bytes()));
                }
                Some(Cow::Owned(s))
            }
        }
    }
}

impl HeaderSource for Vec<(String, String)> {
    fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        let mut vals = self
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v);
        let first = vals.next()?;
        match vals.next() {
            None => Some(Cow::Borrowed(first.as_str())),
            Some(second) => {
                let mut s = first.clone();
                for v in std::iter::once(second).chain(vals) {
                    s.push(',');
                    s.push_str(v);
                }
                Some(Cow::Owned(s))
            }
        }
    }
}

/// The attributes of one connection or request. Names (`sni`, `connect_authority`, `host`) must
/// be normalized with [`normalize_name`]; `path` with [`super::normalize_path`].
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// Direction.
    pub direction: Direction,
    /// Protocol.
    pub protocol: Protocol,
    /// Inbound: the peer's verified SPIFFE ID (`None` = plaintext / unauthenticated).
    pub peer: Option<&'a SpiffeId>,
    /// Peer (inbound) or application (egress) socket address.
    pub source_ip: Option<IpAddr>,
    /// Original destination IP (egress via CONNECT: the address dialled).
    pub destination_ip: Option<IpAddr>,
    /// Original destination port before redirection (CONNECT: the CONNECT port).
    pub destination_port: Option<u16>,
    /// Egress mesh destination: the expected SPIFFE ID from the outbound config.
    pub destination_spiffe_id: Option<&'a SpiffeId>,
    /// TLS ClientHello SNI.
    pub sni: Option<&'a str>,
    /// Egress explicit-proxy `CONNECT` host (port removed).
    pub connect_authority: Option<&'a str>,
    /// HTTP `:authority`/`Host`.
    pub host: Option<&'a str>,
    /// HTTP method.
    pub method: Option<&'a str>,
    /// Normalized HTTP path (no query).
    pub path: Option<&'a str>,
    /// HTTP headers.
    pub headers: &'a dyn HeaderSource,
}

impl<'a> Request<'a> {
    /// A request with only direction and protocol set.
    pub fn new(direction: Direction, protocol: Protocol) -> Self {
        Self {
            direction,
            protocol,
            peer: None,
            source_ip: None,
            destination_ip: None,
            destination_port: None,
            destination_spiffe_id: None,
            sni: None,
            connect_authority: None,
            host: None,
            method: None,
            path: None,
            headers: &NoHeaders,
        }
    }

    /// The egress names in evaluation order: CONNECT authority, SNI, Host (HTTP only).
    pub fn egress_names(&self) -> [Option<&'a str>; 3] {
        [
            self.connect_authority,
            self.sni,
            self.host.filter(|_| self.protocol.is_http()),
        ]
    }
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("direction", &self.direction)
            .field("protocol", &self.protocol)
            .field("peer", &self.peer.map(SpiffeId::as_str))
            .field("source_ip", &self.source_ip)
            .field("destination_ip", &self.destination_ip)
            .field("destination_port", &self.destination_port)
            .field("sni", &self.sni)
            .field("connect_authority", &self.connect_authority)
            .field("host", &self.host)
            .field("method", &self.method)
            .field("path", &self.path)
            .finish()
    }
}

/// Normalizes a name seen on the wire (Host, SNI, CONNECT authority): lowercased, port and
/// trailing dot removed; IPv6 brackets kept off (`[::1]:80` → `::1`).
pub fn normalize_name(raw: &str) -> Cow<'_, str> {
    let raw = raw.trim();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if raw.matches(':').count() == 1 {
        raw.split(':').next().unwrap_or(raw)
    } else {
        raw
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// A rule id, `<policy>/rules[<i>]`.
pub type RuleId = Arc<str>;

/// Why a decision was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The first matching rule in canonical order.
    Rule(RuleId),
    /// The direction's default: explicit (`defaults.<dir>`) or the Istio implicit rule.
    Default {
        /// The default decision.
        allow: bool,
        /// Not configured: deny if the set has an allow policy, else allow.
        implicit: bool,
    },
    /// Refused before any rule was evaluated (a path normalization refuses:
    /// `normalize:escaped-slash`, `normalize:bad-escape`, `normalize:not-absolute`; an
    /// authority the proxy refuses: `authority:invalid`, `authority:userinfo`).
    Refused(&'static str),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rule(id) => f.write_str(id),
            Self::Refused(reason) => f.write_str(reason),
            Self::Default { allow, implicit } => write!(
                f,
                "default:{}{}",
                if *allow { "allow" } else { "deny" },
                if *implicit { "(implicit)" } else { "" }
            ),
        }
    }
}

/// A decision and its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// ALLOW (true) or DENY.
    pub allow: bool,
    /// The deciding rule or default.
    pub reason: Reason,
}

/// The outcome of [`super::CompiledPolicy::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Enforced: ALLOW (true) or DENY.
    pub allow: bool,
    /// The deciding rule or default (logs and metrics; never sent to the peer).
    pub reason: Reason,
    /// The dry-run (shadow) decision, present only when it differs from `allow`.
    pub shadow: Option<Verdict>,
    /// Every matching audit rule, in canonical order.
    pub audit: Vec<RuleId>,
}

impl Decision {
    /// `"ALLOW"` or `"DENY"`.
    pub fn label(&self) -> &'static str {
        if self.allow {
            "ALLOW"
        } else {
            "DENY"
        }
    }
}
