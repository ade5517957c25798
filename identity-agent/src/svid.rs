//! X.509-SVIDs: the structure rules of the X509-SVID standard, and chain validation against
//! the bundle of the peer's own trust domain.
//!
//! CONTRACT (owned by the "identity model" helper; bodies to be filled in).

use std::time::SystemTime;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};

use crate::bundle::BundleSet;
use crate::spiffe_id::SpiffeId;

/// Why a certificate is not an acceptable X.509-SVID (messages for operators; never key bytes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("certificate is not valid DER: {0}")]
    Malformed(String),
    #[error("SVID chain is empty")]
    EmptyChain,
    #[error("leaf certificate has no URI SAN")]
    NoUriSan,
    #[error("leaf certificate has {0} URI SANs (exactly one is allowed)")]
    MultipleUriSans(usize),
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(String),
    #[error("leaf SPIFFE ID has no path (a trust-domain ID is not a workload identity)")]
    LeafIdWithoutPath,
    #[error("leaf certificate lacks the BasicConstraints extension")]
    MissingBasicConstraints,
    #[error("leaf certificate is a CA (cA=true)")]
    LeafIsCa,
    #[error("leaf certificate KeyUsage: {0}")]
    BadKeyUsage(String),
    #[error("signing certificate in the chain is not a CA or lacks keyCertSign")]
    BadSigningCert,
    #[error("no trust bundle for trust domain {0:?} (not our own and not federated)")]
    UnknownTrustDomain(String),
    #[error("certificate expired or not yet valid")]
    Expired,
    #[error("chain does not verify against the trust bundle of {0:?}: {1}")]
    Untrusted(String, String),
    #[error("private key does not match the leaf certificate or is not PKCS#8: {0}")]
    BadKey(String),
}

/// An X.509-SVID with its private key, as received from the Workload API.
/// The key lives only in memory; `Debug` never prints it.
pub struct X509Svid {
    /// The SPIFFE ID in the leaf's URI SAN.
    pub id: SpiffeId,
    /// DER chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Unencrypted PKCS#8 DER private key of the leaf.
    pub key: PrivatePkcs8KeyDer<'static>,
    /// Validity window of the leaf.
    pub not_before: SystemTime,
    /// Validity window of the leaf.
    pub not_after: SystemTime,
    /// Workload API `hint` (may be empty).
    pub hint: String,
}

impl Clone for X509Svid {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_before: self.not_before,
            not_after: self.not_after,
            hint: self.hint.clone(),
        }
    }
}

impl std::fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Svid")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl X509Svid {
    /// Parses the Workload API form: concatenated DER chain (leaf first) and PKCS#8 key.
    /// Checks the leaf's SVID structure and that the key matches the leaf.
    pub fn from_der(chain_concat: &[u8], key_pkcs8: &[u8], hint: &str) -> Result<Self, SvidError> {
        let _ = (chain_concat, key_pkcs8, hint);
        todo!()
    }

    /// The key in the form rustls wants.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// Serial number of the leaf, hex (for `/config` and logs).
    pub fn serial_hex(&self) -> String {
        todo!()
    }
}

/// Checks the X509-SVID structure rules of a leaf (one URI SAN that is a SPIFFE ID with a path,
/// BasicConstraints present with cA=false, critical KeyUsage with digitalSignature and without
/// keyCertSign/cRLSign). Returns the SPIFFE ID.
pub fn check_leaf(leaf_der: &[u8]) -> Result<SpiffeId, SvidError> {
    let _ = leaf_der;
    todo!()
}

/// Verifies a peer's chain (leaf first) against the bundle of the leaf's own trust domain in
/// `bundles` at time `now`: leaf structure, validity, signatures up to an authority of that
/// bundle (never a bundle of another trust domain). Returns the peer's SPIFFE ID.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    bundles: &BundleSet,
    now: UnixTime,
) -> Result<SpiffeId, SvidError> {
    let _ = (chain, bundles, now);
    todo!()
}
