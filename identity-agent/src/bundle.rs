//! SPIFFE trust bundles: X.509 authorities and JWT keys of one trust domain, their JWKS form
//! (`use` = `x509-svid` / `jwt-svid`, `spiffe_sequence`, `spiffe_refresh_hint`), and a set of
//! bundles keyed by trust domain that never merges domains.
//!
//! CONTRACT (owned by the "identity model" helper; bodies to be filled in).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rustls::pki_types::CertificateDer;

use crate::spiffe_id::TrustDomain;

/// Why bytes are not a usable bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("bundle is not valid JSON: {0}")]
    Json(String),
    #[error("bundle JWKS key {index}: {reason}")]
    BadKey { index: usize, reason: String },
    #[error("bundle certificate is not valid DER: {0}")]
    BadCertificate(String),
}

/// A JWT signing authority's public key as found in a JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtKey {
    /// The JWK itself (kty, crv, x, y / n, e ...), kept verbatim for re-serialization.
    pub jwk: serde_json::Value,
}

/// The trust bundle of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub trust_domain: TrustDomain,
    /// X.509 authorities (DER), oldest first.
    pub x509_authorities: Vec<CertificateDer<'static>>,
    /// JWT authorities by key id.
    pub jwt_authorities: BTreeMap<String, JwtKey>,
    /// `spiffe_sequence`.
    pub sequence: u64,
    /// `spiffe_refresh_hint`.
    pub refresh_hint: Option<Duration>,
}

impl Bundle {
    /// An empty bundle (a revoked / unknown domain).
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: BTreeMap::new(),
            sequence: 0,
            refresh_hint: None,
        }
    }

    /// Parses a SPIFFE bundle (JWKS JSON) of trust domain `td`.
    pub fn from_jwks(td: TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        let _ = (td, json);
        todo!()
    }

    /// Serializes as a SPIFFE bundle (JWKS JSON).
    pub fn to_jwks(&self) -> Vec<u8> {
        todo!()
    }

    /// Parses concatenated DER certificates (Workload API `bundle` / `bundles` values).
    pub fn from_x509_der_concat(td: TrustDomain, der: &[u8]) -> Result<Self, BundleError> {
        let _ = (td, der);
        todo!()
    }

    /// The X.509 authorities as concatenated DER (Workload API form).
    pub fn x509_der_concat(&self) -> Vec<u8> {
        self.x509_authorities.iter().flat_map(|c| c.as_ref().iter().copied()).collect()
    }
}

/// Bundles by trust domain. Validation always picks the bundle of the peer's own domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleSet {
    bundles: HashMap<TrustDomain, Bundle>,
}

impl BundleSet {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn insert(&mut self, bundle: Bundle) {
        self.bundles.insert(bundle.trust_domain.clone(), bundle);
    }
    pub fn get(&self, td: &TrustDomain) -> Option<&Bundle> {
        self.bundles.get(td)
    }
    pub fn get_by_name(&self, td_name: &str) -> Option<&Bundle> {
        self.bundles.iter().find(|(k, _)| k.name() == td_name).map(|(_, v)| v)
    }
    pub fn iter(&self) -> impl Iterator<Item = &Bundle> {
        self.bundles.values()
    }
    pub fn len(&self) -> usize {
        self.bundles.len()
    }
    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }
}
