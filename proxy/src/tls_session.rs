//! TLS sessions with any SPIFFE peer, not only our own sidecars.
//!
//! - **One server config per ALPN profile** ([`ServerConfigs`]), built once per credential
//!   install from one base config (so all share the verifier, the session cache and the guarded
//!   ticketer), and **chosen per ClientHello** ([`accept`]): a peer that offers `svidcar-mux/1`
//!   or `svidcar/1` gets the sidecar protocols; otherwise an `http` port answers `h2` or
//!   `http/1.1` when offered, and everything else (any `tcp` port, any other list) is served
//!   with no ALPN at all. A handshake is never refused for its ALPN list alone.
//! - [`TlsFacts`]: the negotiated protocol version, cipher suite and key-exchange group, for the
//!   access log and `svidcar_proxy_tls_handshakes_total`.
//! - [`peer_refusal`]: in TLS 1.3 a server verifies the client certificate after the client has
//!   finished its handshake, so a rejection arrives as an alert on the first read; this tells it
//!   apart from a connection that ran.

use std::sync::Arc;

use rustls::{CommonState, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

/// ALPN id of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN id of HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Which inbound server config a ClientHello gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlpnProfile {
    /// `svidcar-mux/1` (when pooling is on) and `svidcar/1`: a peer sidecar.
    Mesh,
    /// `h2`, `http/1.1`: another SPIFFE client on an `http` port.
    Http,
    /// No ALPN: any other client, and every non-sidecar client of a `tcp` port.
    Plain,
}

/// The inbound server configs of one credential generation, one per [`AlpnProfile`].
pub struct ServerConfigs {
    /// Sidecar protocols.
    pub mesh: Arc<ServerConfig>,
    /// `h2`, `http/1.1`.
    pub http: Arc<ServerConfig>,
    /// No ALPN.
    pub plain: Arc<ServerConfig>,
}

impl ServerConfigs {
    /// The three profiles from `base` (whose verifier, certificate, session cache and ticketer
    /// they all share), with `mesh_alpn` for sidecars.
    pub fn new(base: Arc<ServerConfig>, mesh_alpn: Vec<Vec<u8>>) -> Self {
        let with = |alpn: Vec<Vec<u8>>| {
            let mut c = (*base).clone();
            c.alpn_protocols = alpn;
            Arc::new(c)
        };
        Self {
            mesh: with(mesh_alpn),
            http: with(vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()]),
            plain: with(Vec::new()),
        }
    }

    /// The config of `profile`.
    pub fn get(&self, profile: AlpnProfile) -> &Arc<ServerConfig> {
        match profile {
            AlpnProfile::Mesh => &self.mesh,
            AlpnProfile::Http => &self.http,
            AlpnProfile::Plain => &self.plain,
        }
    }
}

/// The profile for a ClientHello offering `offered` (`None`: no ALPN extension) on a port that
/// is `http` or not; `mesh` is what the sidecar profile answers.
pub fn choose<'a>(
    offered: Option<impl Iterator<Item = &'a [u8]>>,
    mesh: &[Vec<u8>],
    http_port: bool,
) -> AlpnProfile {
    let Some(offered) = offered else {
        return AlpnProfile::Plain;
    };
    let mut http = false;
    for p in offered {
        if mesh.iter().any(|m| m.as_slice() == p) {
            return AlpnProfile::Mesh;
        }
        http |= p == ALPN_H2 || p == ALPN_HTTP11;
    }
    if http && http_port {
        AlpnProfile::Http
    } else {
        AlpnProfile::Plain
    }
}

/// Reads the ClientHello on `stream`, picks the profile ([`choose`]) and runs the handshake on
/// its config. Errors are rustls errors inside `io::Error`, as from `TlsAcceptor::accept`.
pub async fn accept(
    stream: TcpStream,
    servers: &ServerConfigs,
    http_port: bool,
) -> std::io::Result<(TlsStream<TcpStream>, AlpnProfile)> {
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream).await?;
    let profile = choose(
        start.client_hello().alpn(),
        &servers.mesh.alpn_protocols,
        http_port,
    );
    let tls = start.into_stream(servers.get(profile).clone()).await?;
    Ok((tls, profile))
}

/// The negotiated parameters of an established TLS session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TlsFacts {
    /// `TLSv1_3`.
    pub protocol: &'static str,
    /// e.g. `TLS13_AES_128_GCM_SHA256`.
    pub cipher: &'static str,
    /// e.g. `X25519MLKEM768` (post-quantum hybrid) or `X25519`.
    pub group: &'static str,
}

impl TlsFacts {
    /// What `conn` negotiated (`unknown` for what it does not say).
    pub fn of(conn: &CommonState) -> Self {
        const UNKNOWN: &str = "unknown";
        Self {
            protocol: conn
                .protocol_version()
                .and_then(|v| v.as_str())
                .unwrap_or(UNKNOWN),
            cipher: conn
                .negotiated_cipher_suite()
                .and_then(|c| c.suite().as_str())
                .unwrap_or(UNKNOWN),
            group: conn
                .negotiated_key_exchange_group()
                .and_then(|g| g.name().as_str())
                .unwrap_or(UNKNOWN),
        }
    }
}

/// After a copy on an outbound connection ended with an error: the alert the server sent, if
/// it refused us (a fatal alert before it sent a byte of application data, e.g. `BadCertificate`
/// or `CertificateRequired` for a client certificate it does not accept). rustls keeps the error
/// that ended the connection, so it is read back here rather than parsed from a message.
pub fn peer_refusal(
    conn: &mut rustls::ClientConnection,
    bytes_from_peer: u64,
) -> Option<rustls::AlertDescription> {
    if bytes_from_peer > 0 {
        return None;
    }
    match conn.process_new_packets() {
        Err(rustls::Error::AlertReceived(a)) if a != rustls::AlertDescription::CloseNotify => {
            Some(a)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(offered: Option<&[&[u8]]>, mux: bool, http: bool) -> AlpnProfile {
        let mut mesh = vec![svidcar_agent::tls::ALPN_SVIDCAR.to_vec()];
        if mux {
            mesh.insert(0, svidcar_agent::tls::ALPN_SVIDCAR_MUX.to_vec());
        }
        choose(offered.map(|o| o.iter().copied()), &mesh, http)
    }

    #[test]
    fn sidecars_get_the_sidecar_protocols() {
        let ours: &[&[u8]] = &[b"svidcar-mux/1", b"svidcar/1"];
        assert_eq!(pick(Some(ours), true, false), AlpnProfile::Mesh);
        assert_eq!(pick(Some(ours), false, true), AlpnProfile::Mesh);
        assert_eq!(
            pick(Some(&[b"h2", b"svidcar/1"]), false, true),
            AlpnProfile::Mesh
        );
    }

    #[test]
    fn other_clients_are_never_refused_for_their_alpn() {
        let web: &[&[u8]] = &[b"h2", b"http/1.1"];
        assert_eq!(pick(Some(web), true, true), AlpnProfile::Http);
        assert_eq!(pick(Some(&[b"http/1.1"]), true, true), AlpnProfile::Http);
        // tcp ports: no ALPN at all.
        assert_eq!(pick(Some(web), true, false), AlpnProfile::Plain);
        assert_eq!(pick(None, true, true), AlpnProfile::Plain);
        assert_eq!(pick(Some(&[b"imap"]), true, true), AlpnProfile::Plain);
        // Only the multiplexed protocol, which this proxy does not serve: no ALPN, not refused.
        assert_eq!(
            pick(Some(&[b"svidcar-mux/1"]), false, false),
            AlpnProfile::Plain
        );
    }
}
