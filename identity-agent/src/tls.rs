//! rustls verifiers and config builders for SPIFFE mTLS.
//!
//! - [`SpiffeServerVerifier`] (outbound, client side): verifies the server's chain with
//!   [`svid::verify_chain`] against the bundle of the server's own trust domain, then checks the
//!   server's SPIFFE ID against the [`ExpectedPeer`] (an exact ID or any ID of a trust domain).
//! - [`SpiffeClientVerifier`] (inbound, server side): a client certificate is mandatory; the chain
//!   is verified the same way and any ID whose trust domain has a bundle is accepted —
//!   authorization is the policy's job, not the handshake's.
//! - [`server_config`] / [`client_config`]: TLS 1.3 only, ALPN [`ALPN_SVIDCAR`], session
//!   resumption (server session cache + tickets, client resumption store), signatures verified
//!   with the aws-lc-rs provider.
//! - Resumption never skips verification ([`resume`]): the server resumes only tickets whose
//!   client chain still verifies now ([`ResumptionGuard`]), and [`recheck_resumed`] verifies the
//!   peer of a resumed connection again after the handshake (both sides).
//! - [`peer_spiffe_id`]: the SPIFFE ID of the peer of an established connection.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientSessionStore, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ProducesTickets, StoresServerSessions};
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, ServerConfig, SignatureScheme,
};

use crate::bundle::BundleSet;
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::svid::{self, SvidError, X509Svid};

#[path = "tls_resume.rs"]
pub mod resume;
pub use resume::{recheck_resumed, ResumptionGuard, VerifiedChains};

/// The ALPN protocol id spoken between svidcar proxies.
pub const ALPN_SVIDCAR: &[u8] = b"svidcar/1";
/// The ALPN protocol id of a multiplexed connection between svidcar proxies: HTTP/2 `CONNECT`
/// tunnels, one stream per application connection (pooled; see the proxy's `mux` module).
pub const ALPN_SVIDCAR_MUX: &[u8] = b"svidcar-mux/1";

/// Why a TLS config could not be built or a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the configuration (bad key, unsupported versions, ...).
    #[error("TLS configuration error: {0}")]
    Config(#[from] rustls::Error),
    /// The server presented a valid SVID with an unexpected identity.
    #[error("server presented {actual}, expected {expected}")]
    UnexpectedPeer {
        /// What we wanted.
        expected: ExpectedPeer,
        /// What the server showed.
        actual: SpiffeId,
    },
    /// The peer's chain is not a valid SVID for any trust domain we hold a bundle for.
    #[error("peer certificate rejected: {0}")]
    Svid(#[from] SvidError),
    /// No credentials (hence no bundles) are installed to verify a peer against.
    #[error("no trust bundles in force")]
    NoBundles,
}

/// The identity an outbound connection expects the server to present.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExpectedPeer {
    /// Exactly this SPIFFE ID.
    Id(SpiffeId),
    /// Any SPIFFE ID of this trust domain.
    TrustDomain(TrustDomain),
}

impl ExpectedPeer {
    /// Parses `spiffe://td/path` (exact ID) or `td` / `spiffe://td` (any ID of the trust domain).
    pub fn parse(s: &str) -> Result<Self, crate::spiffe_id::SpiffeIdError> {
        let s = s.trim();
        let rest = s.strip_prefix("spiffe://").unwrap_or(s);
        if rest.contains('/') && !rest.ends_with('/') {
            SpiffeId::parse(s).map(Self::Id)
        } else {
            TrustDomain::parse(rest.trim_end_matches('/')).map(Self::TrustDomain)
        }
    }

    /// True when `id` satisfies this expectation.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Id(want) => want == id,
            Self::TrustDomain(td) => id.trust_domain_name() == td.name(),
        }
    }
}

impl fmt::Display for ExpectedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id(id) => write!(f, "{id}"),
            Self::TrustDomain(td) => write!(f, "any ID of trust domain {}", td.name()),
        }
    }
}

/// The crypto provider used everywhere: aws-lc-rs.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The handshake-signature algorithms of [`provider`], for every verifier of the workspace.
pub(crate) fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
}

fn cert_error(e: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The handshake-signature half of both SPIFFE verifiers (the same three methods in
/// `ServerCertVerifier` and `ClientCertVerifier`): SVIDs are only spoken over TLS 1.3, so TLS
/// 1.2 signatures are refused and TLS 1.3 ones checked with `self.algs`.
macro_rules! tls13_only_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General(
                "TLS 1.2 is not supported by svidcar".into(),
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

/// Verifies the peer's chain as an SVID for `role`; a refusal reads as a certificate error.
fn verify_peer(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundles: &BundleSet,
    now: UnixTime,
    role: svid::PeerRole,
) -> Result<SpiffeId, rustls::Error> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    svid::verify_chain_for(&chain, bundles, now, role).map_err(|e| cert_error(TlsError::Svid(e)))
}

/// Outbound verifier: SPIFFE chain validation plus the expected server identity.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundles: Arc<BundleSet>,
    expected: ExpectedPeer,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// A verifier that accepts only servers presenting an SVID matching `expected`.
    pub fn new(bundles: Arc<BundleSet>, expected: ExpectedPeer) -> Self {
        Self {
            bundles,
            expected,
            algs: algorithms(),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let role = svid::PeerRole::Server;
        let id = verify_peer(end_entity, intermediates, &self.bundles, now, role)?;
        if !self.expected.matches(&id) {
            return Err(cert_error(TlsError::UnexpectedPeer {
                expected: self.expected.clone(),
                actual: id,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    tls13_only_signatures!();
}

/// Inbound verifier: a client SVID is mandatory and must chain to the bundle of its own trust
/// domain. Which IDs may talk to us is decided later by the authorizer.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundles: Arc<BundleSet>,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    /// A verifier accepting any valid SVID of a trust domain present in `bundles`.
    pub fn new(bundles: Arc<BundleSet>) -> Self {
        Self {
            bundles,
            algs: algorithms(),
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let role = svid::PeerRole::Client;
        verify_peer(end_entity, intermediates, &self.bundles, now, role)?;
        Ok(ClientCertVerified::assertion())
    }

    tls13_only_signatures!();
}

/// Resumption state that outlives one SVID: kept across rotations so that a rotation does not
/// force every peer back to a full handshake. Both the cache and the ticketer resume a session
/// only when its client chain still verifies against the bundles of the last config built with
/// this state, at the current time ([`ResumptionGuard`]).
#[derive(Clone)]
pub struct ServerResumption {
    /// Stateful TLS 1.3 session cache.
    pub cache: Arc<dyn StoresServerSessions>,
    /// Stateless tickets (keys rotate inside the ticketer).
    pub ticketer: Arc<dyn ProducesTickets>,
    /// Checks every session before it is resumed.
    pub guard: Arc<ResumptionGuard>,
}

impl fmt::Debug for ServerResumption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerResumption").finish_non_exhaustive()
    }
}

impl ServerResumption {
    /// A session cache of `capacity` entries and an aws-lc-rs ticketer, both behind a
    /// [`ResumptionGuard`].
    pub fn new(capacity: usize) -> Result<Self, TlsError> {
        let guard = Arc::new(ResumptionGuard::new(capacity));
        Ok(Self {
            cache: Arc::new(resume::GuardedSessions {
                inner: rustls::server::ServerSessionMemoryCache::new(capacity),
                guard: guard.clone(),
            }),
            ticketer: Arc::new(resume::GuardedTicketer {
                inner: rustls::crypto::aws_lc_rs::Ticketer::new()?,
                guard: guard.clone(),
            }),
            guard,
        })
    }
}

/// Builds the inbound (server) config: our SVID, mandatory SPIFFE client auth, TLS 1.3,
/// ALPN `svidcar/1`, session resumption. From now on `resumption` resumes only sessions whose
/// client chain verifies against `bundles` (the newest config's bundles are the ones in force).
pub fn server_config(
    svid: &X509Svid,
    bundles: Arc<BundleSet>,
    resumption: &ServerResumption,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(bundles.clone())))
        .with_single_cert(svid.chain.clone(), svid.private_key())?;
    config.alpn_protocols = vec![ALPN_SVIDCAR.to_vec()];
    config.session_storage = resumption.cache.clone();
    config.ticketer = resumption.ticketer.clone();
    resumption.guard.set_bundles(bundles);
    Ok(Arc::new(config))
}

/// A client resumption store (one per expected peer, so that a resumed session can never skip
/// the identity check of another route).
pub fn client_session_store(capacity: usize) -> Arc<dyn ClientSessionStore> {
    Arc::new(rustls::client::ClientSessionMemoryCache::new(capacity))
}

/// Builds an outbound (client) config: our SVID as client certificate, the server must present
/// an SVID matching `expected`; TLS 1.3, ALPN `svidcar/1`, resumption through `store`.
pub fn client_config(
    svid: &X509Svid,
    bundles: Arc<BundleSet>,
    expected: ExpectedPeer,
    store: Arc<dyn ClientSessionStore>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(bundles, expected)))
        .with_client_auth_cert(svid.chain.clone(), svid.private_key())?;
    config.alpn_protocols = vec![ALPN_SVIDCAR.to_vec()];
    config.resumption = Resumption::store(store);
    Ok(Arc::new(config))
}

/// The first instant at which the peer's leaf certificate of an established connection is no
/// longer valid (`None` without a parsable peer certificate). X.509 times have whole seconds and
/// the handshake's verification (webpki) compares whole seconds, so a `notAfter` of `T` is valid
/// through `T.999`: this returns `T + 1 s`, so that a later check agrees with the handshake's
/// instead of refusing a peer in the last second the handshake accepted.
pub fn peer_not_after(conn: &CommonState) -> Option<std::time::SystemTime> {
    let leaf = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let secs = cert.validity().not_after.timestamp();
    let secs = u64::try_from(secs).ok()?.checked_add(1)?;
    std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(secs))
}

/// The SPIFFE ID of the peer of an established connection (its leaf's URI SAN), if the peer
/// presented a certificate. The chain was verified during the handshake.
pub fn peer_spiffe_id(conn: &CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    svid::check_leaf(leaf.as_ref()).ok()
}

/// What an operator reads when a peer does not speak TLS 1.3 (see [`classify_handshake_error`]).
pub const OLD_TLS_VERSION: &str = "the peer offers only TLS 1.2 or older; svidcar speaks TLS 1.3 \
only: set the peer's maximum TLS version to 1.3 (Envoy: common_tls_context.tls_params \
tls_maximum_protocol_version: TLSv1_3, which Envoy's upstream TLS does not default to)";

/// True for the handshake errors of a peer without TLS 1.3: a TLS 1.2 ClientHello (no
/// `supported_versions`, or one without 1.3), or a server answering our TLS 1.3-only hello with
/// a `protocol_version` alert.
fn is_old_tls_version(e: &rustls::Error) -> bool {
    use rustls::PeerIncompatible as P;
    matches!(
        e,
        rustls::Error::PeerIncompatible(
            P::SupportedVersionsExtensionRequired
                | P::Tls12NotOfferedOrEnabled
                | P::Tls12NotOffered
        ) | rustls::Error::AlertReceived(rustls::AlertDescription::ProtocolVersion)
    )
}

/// A readable reason for a failed handshake (for logs and metric labels): a short, stable
/// `label` and the full message.
pub fn classify_handshake_error(err: &std::io::Error) -> (&'static str, String) {
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    // rustls prints `CertificateError::Other` with Debug; use our operator message instead.
    let msg = match inner {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(o))) => {
            o.0.downcast_ref::<TlsError>()
                .map_or_else(|| err.to_string(), |t| t.to_string())
        }
        Some(e) if is_old_tls_version(e) => OLD_TLS_VERSION.to_string(),
        _ => err.to_string(),
    };
    let label = match inner {
        Some(e) if is_old_tls_version(e) => "peer_tls12_only",
        Some(rustls::Error::NoCertificatesPresented) => "no_client_certificate",
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(o))) => {
            match o.0.downcast_ref::<TlsError>() {
                Some(TlsError::UnexpectedPeer { .. }) => "unexpected_peer_id",
                Some(TlsError::Svid(SvidError::UnknownTrustDomain(_))) => "unknown_trust_domain",
                Some(TlsError::Svid(SvidError::Expired)) => "certificate_expired",
                Some(TlsError::Svid(SvidError::Untrusted(..))) => "untrusted_chain",
                Some(_) => "invalid_svid",
                None => "invalid_certificate",
            }
        }
        Some(rustls::Error::InvalidCertificate(_)) => "invalid_certificate",
        Some(rustls::Error::AlertReceived(_)) => "alert_received",
        Some(rustls::Error::PeerIncompatible(_)) => "peer_incompatible",
        Some(rustls::Error::NoApplicationProtocol) => "no_application_protocol",
        Some(_) => "tls_error",
        None if err.kind() == std::io::ErrorKind::UnexpectedEof => "peer_closed",
        None if err.kind() == std::io::ErrorKind::TimedOut => "timeout",
        None => "io_error",
    };
    (label, msg)
}

#[cfg(test)]
mod classify_tests {
    use super::*;

    #[test]
    fn certificate_rejections_read_as_operator_messages() {
        let e = cert_error(TlsError::Svid(SvidError::MultipleUriSans(2)));
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let (label, msg) = classify_handshake_error(&io);
        assert_eq!(label, "invalid_svid");
        assert_eq!(
            msg,
            "peer certificate rejected: leaf certificate has 2 URI SANs (exactly one is allowed)"
        );
    }

    #[test]
    fn a_tls12_only_peer_reads_as_the_fix() {
        for e in [
            rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::SupportedVersionsExtensionRequired,
            ),
            rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOfferedOrEnabled),
            rustls::Error::AlertReceived(rustls::AlertDescription::ProtocolVersion),
        ] {
            let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
            let (label, msg) = classify_handshake_error(&io);
            assert_eq!(label, "peer_tls12_only");
            assert!(
                msg.contains("tls_maximum_protocol_version: TLSv1_3"),
                "{msg}"
            );
        }
    }

    #[test]
    fn post_quantum_hybrid_is_preferred_and_x25519_kept() {
        let p = provider();
        let names: Vec<_> = p.kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(names[0], rustls::NamedGroup::X25519MLKEM768, "{names:?}");
        assert!(names.contains(&rustls::NamedGroup::X25519), "{names:?}");
    }
}
