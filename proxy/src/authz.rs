//! The authorization seam of the data plane: every inbound connection is decided here after the
//! handshake and before any byte is forwarded in either direction.
//!
//! [`Authorizer`] is the interface; [`DefaultAuthorizer`] is the built-in posture of POLICY.md
//! §9 used when no policy path is configured: admit authenticated peers of our own trust domain,
//! refuse other trust domains; plaintext (which only reaches the authorizer on ports marked
//! permissive) is admitted as unauthenticated. The policy engine plugs in by implementing
//! [`Authorizer`] over `CompiledPolicy::decide`.

use std::net::SocketAddr;

use svidcar_agent::SpiffeId;

/// Everything known about an inbound connection when it is decided (L4).
#[derive(Debug, Clone, Copy)]
pub struct ConnAttrs<'a> {
    /// The peer's verified SPIFFE ID; `None` for plaintext (unauthenticated) connections.
    pub peer: Option<&'a SpiffeId>,
    /// Our own SPIFFE ID (the SVID currently served).
    pub own: &'a SpiffeId,
    /// The connecting socket address.
    pub src: SocketAddr,
    /// The destination as the peer saw it (original destination in transparent mode, the
    /// listener address in explicit mode).
    pub dst: SocketAddr,
    /// The application port the connection will be forwarded to.
    pub app_port: u16,
    /// True when the connection is mTLS.
    pub tls: bool,
}

/// Everything known about an outbound connection before it is dialed.
#[derive(Debug, Clone, Copy)]
pub struct EgressAttrs<'a> {
    /// Our own SPIFFE ID.
    pub own: &'a SpiffeId,
    /// The application's socket address.
    pub src: SocketAddr,
    /// Destination IP, when known (transparent mode, or an IP upstream).
    pub dst_ip: Option<std::net::IpAddr>,
    /// Destination port.
    pub dst_port: u16,
    /// Mesh destination: the exact SPIFFE ID the server must present (from the outbound config).
    pub destination_id: Option<&'a SpiffeId>,
    /// TLS SNI seen in the application's ClientHello (passthrough egress).
    pub sni: Option<&'a str>,
    /// True for mesh destinations (mTLS originated by us).
    pub mesh: bool,
    /// Explicit-proxy `CONNECT` authority host (port removed), when the app used `CONNECT`.
    pub connect: Option<&'a str>,
    /// Plaintext HTTP egress request (per-request decision), if any.
    pub http: Option<EgressHttp<'a>>,
}

/// One plaintext HTTP request on an egress connection.
#[derive(Debug, Clone, Copy)]
pub struct EgressHttp<'a> {
    /// `Host` header (or absolute-form authority), as received.
    pub host: Option<&'a str>,
    /// Method as sent.
    pub method: &'a str,
    /// Path without query, already normalized by [`Authorizer::normalize_path`].
    pub path: &'a str,
}

/// An authorization decision with the rule (or default) that made it, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Forward the connection?
    pub allow: bool,
    /// `<policy>/rules[<i>]` or `default:<...>`.
    pub rule: String,
}

impl Verdict {
    /// An allow by `rule`.
    pub fn allow(rule: impl Into<String>) -> Self {
        Self {
            allow: true,
            rule: rule.into(),
        }
    }
    /// A deny by `rule`.
    pub fn deny(rule: impl Into<String>) -> Self {
        Self {
            allow: false,
            rule: rule.into(),
        }
    }
}

/// Decides inbound connections. Implementations must be cheap: this runs once per connection
/// on the data-plane runtime.
pub trait Authorizer: Send + Sync + 'static {
    /// Decides an inbound connection.
    fn authorize_inbound(&self, conn: &ConnAttrs<'_>) -> Verdict;
    /// One line for the startup log saying which policy is in force.
    fn describe(&self) -> String;
    /// Decides one HTTP request on an `http` port (the connection was authenticated, not
    /// authorized). Default: the connection-level decision.
    fn authorize_request(&self, conn: &ConnAttrs<'_>, req: &crate::http::HttpAttrs<'_>) -> Verdict {
        let _ = req;
        self.authorize_inbound(conn)
    }
    /// Decides an outbound connection (mesh or passthrough egress) before dialing.
    /// Default (no policy, POLICY.md §9): allowed and logged.
    fn authorize_egress(&self, conn: &EgressAttrs<'_>) -> Verdict {
        let _ = conn;
        Verdict::allow("default:egress-allow")
    }
    /// Decides an inbound connection that stays open as a byte stream (not an `http` port).
    /// An authorizer whose policy can change (hot reload) registers the connection *before*
    /// deciding and returns the guard; the caller copies until
    /// [`crate::conn_registry::OpenConn::revoked`] and then resets (POLICY.md §6).
    /// Default: [`Self::authorize_inbound`], never revoked.
    fn authorize_inbound_open(
        &self,
        conn: &ConnAttrs<'_>,
    ) -> (Verdict, Option<crate::conn_registry::OpenConn>) {
        (self.authorize_inbound(conn), None)
    }
    /// [`Self::authorize_inbound_open`] for outbound connections (mesh or passthrough egress).
    fn authorize_egress_open(
        &self,
        conn: &EgressAttrs<'_>,
    ) -> (Verdict, Option<crate::conn_registry::OpenConn>) {
        (self.authorize_egress(conn), None)
    }
    /// Admits a new inbound connection (or `svidcar-mux/1` stream) that the policy allows,
    /// under its caller's `connections` and `connectionsPerSecond` limits; `Err`: reset it
    /// (counted). Keep the [`crate::limits::Admission`] for the connection's life. Default:
    /// unlimited.
    fn admit(
        &self,
        conn: &ConnAttrs<'_>,
    ) -> Result<crate::limits::Admission, crate::policy::limits::Exceeded> {
        let _ = conn;
        Ok(crate::limits::Admission::unlimited())
    }
    /// Takes one allowed HTTP request of an admitted connection from its caller's
    /// `requestsPerSecond` bucket; `Err`: answer `429` (counted). Must stay cheap: no lock, no
    /// allocation. Default: unlimited.
    fn limit_request(
        &self,
        conn: &ConnAttrs<'_>,
        admission: &crate::limits::Admission,
    ) -> Result<(), crate::policy::limits::Exceeded> {
        let _ = (conn, admission);
        Ok(())
    }
    /// Metrics of the authorizer, under their full names (rendered after the proxy's).
    fn metrics_registry(&self) -> Option<&prometheus_client::registry::Registry> {
        None
    }
    /// The request path (query and fragment dropped) as the policy in force normalizes it.
    /// POLICY.md §3: the normalized path is what is evaluated **and** forwarded, so callers
    /// normalize once, decide on the result and forward the same string. `Ok(None)`: no
    /// normalization (evaluate and forward as received); `Err(reason)`: a path the policy
    /// refuses, with its stable reason (`normalize:escaped-slash`, `normalize:bad-escape`,
    /// `normalize:not-absolute`; never the raw path, it becomes a metric label).
    fn normalize_path(&self, raw: &str) -> Result<Option<String>, &'static str> {
        let _ = raw;
        Ok(None)
    }
    /// The request headers that the JSON access log records: those named by a
    /// `request.headers[<name>]` condition of the policy in force, nothing else (so
    /// `Authorization` or `Cookie` only when a rule names them). Default: none.
    fn recorded_headers(
        &self,
        headers: &http::HeaderMap,
    ) -> std::collections::BTreeMap<String, String> {
        let _ = headers;
        std::collections::BTreeMap::new()
    }
    /// The effective policy for the admin `/policy` endpoint.
    fn policy_json(&self) -> serde_json::Value {
        serde_json::json!({ "builtin": true, "description": self.describe() })
    }
    /// False until the policy is loaded (gates `/ready`).
    fn ready(&self) -> bool {
        true
    }
}

/// The built-in posture when no policy is configured (POLICY.md §9).
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultAuthorizer;

impl Authorizer for DefaultAuthorizer {
    fn authorize_inbound(&self, conn: &ConnAttrs<'_>) -> Verdict {
        match conn.peer {
            Some(peer) if peer.trust_domain_name() == conn.own.trust_domain_name() => {
                Verdict::allow("default:own-trust-domain")
            }
            Some(_) => Verdict::deny("default:foreign-trust-domain"),
            None => Verdict::allow("default:permissive-plaintext"),
        }
    }

    fn describe(&self) -> String {
        "no policy configured: the built-in policy is in force (inbound admits authenticated peers \
         of our own trust domain; plaintext only on permissive ports)"
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_admits_own_trust_domain_only() {
        let own = SpiffeId::parse("spiffe://a.org/me").unwrap();
        let same = SpiffeId::parse("spiffe://a.org/you").unwrap();
        let other = SpiffeId::parse("spiffe://b.org/you").unwrap();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mk = |peer| ConnAttrs {
            peer,
            own: &own,
            src: addr,
            dst: addr,
            app_port: 1,
            tls: true,
        };
        assert!(DefaultAuthorizer.authorize_inbound(&mk(Some(&same))).allow);
        assert!(!DefaultAuthorizer.authorize_inbound(&mk(Some(&other))).allow);
        assert!(DefaultAuthorizer.authorize_inbound(&mk(None)).allow);
    }
}
