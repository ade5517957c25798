//! X.509-SVIDs: the structure rules of the X509-SVID standard, and chain validation against
//! the bundle of the peer's own trust domain.
//!
//! Parsing uses `x509-parser`; path building and signatures use `rustls-webpki` with aws-lc-rs,
//! and the SPIFFE structure rules are checked on top.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{self as sig, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, TrustAnchor, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

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
    /// Checks the leaf's SVID structure, the signing certificates of the chain, and that the
    /// key matches the leaf. Does not check validity times or trust (see [`verify_chain`]).
    pub fn from_der(chain_concat: &[u8], key_pkcs8: &[u8], hint: &str) -> Result<Self, SvidError> {
        let chain = split_der_chain(chain_concat).map_err(SvidError::Malformed)?;
        let leaf_der = chain.first().ok_or(SvidError::EmptyChain)?;
        let id = check_leaf(leaf_der)?;
        for cert in &chain[1..] {
            check_signing_cert(cert)?;
        }
        let leaf = parse_cert(leaf_der)?;
        check_key_matches(&leaf, key_pkcs8)?;
        let not_before = to_system_time(leaf.validity().not_before.timestamp());
        let not_after = to_system_time(leaf.validity().not_after.timestamp());
        drop(leaf);
        Ok(Self {
            id,
            chain,
            key: PrivatePkcs8KeyDer::from(key_pkcs8.to_vec()),
            not_before,
            not_after,
            hint: hint.to_string(),
        })
    }

    /// The key in the form rustls wants.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The chain as concatenated DER, leaf first (Workload API form).
    pub fn chain_der_concat(&self) -> Vec<u8> {
        self.chain
            .iter()
            .flat_map(|c| c.as_ref().iter().copied())
            .collect()
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        // `from_der` never builds an empty chain; fields are public, so stay total.
        static EMPTY: CertificateDer<'static> = CertificateDer::from_slice(&[]);
        self.chain.first().unwrap_or(&EMPTY)
    }

    /// Serial number of the leaf, lowercase hex without separators (for `/config` and logs).
    /// Empty if the leaf does not parse (only possible if `chain` was replaced by hand).
    pub fn serial_hex(&self) -> String {
        match x509_parser::parse_x509_certificate(self.leaf()) {
            Ok((_, cert)) => cert
                .raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            Err(_) => String::new(),
        }
    }

    /// Whether the leaf is within its validity window at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

/// Splits concatenated DER certificates (Workload API form) into single certificates.
/// Each one must parse as an X.509 certificate; the error names the failing index.
pub fn split_der_chain(concat: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut certs = Vec::new();
    let mut rest = concat;
    while !rest.is_empty() {
        match x509_parser::parse_x509_certificate(rest) {
            Ok((remaining, _)) => {
                let len = rest.len() - remaining.len();
                certs.push(CertificateDer::from(rest[..len].to_vec()));
                rest = remaining;
            }
            Err(e) => return Err(format!("certificate #{}: {e}", certs.len())),
        }
    }
    Ok(certs)
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, SvidError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(SvidError::Malformed(
            "trailing bytes after the certificate".into(),
        )),
        Err(e) => Err(SvidError::Malformed(e.to_string())),
    }
}

fn to_system_time(ts: i64) -> SystemTime {
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    }
}

fn malformed(e: impl std::fmt::Display) -> SvidError {
    SvidError::Malformed(e.to_string())
}

/// Checks the X509-SVID structure rules of a leaf (one URI SAN that is a SPIFFE ID with a path,
/// BasicConstraints present with cA=false, critical KeyUsage with digitalSignature and without
/// keyCertSign/cRLSign). Returns the SPIFFE ID.
pub fn check_leaf(leaf_der: &[u8]) -> Result<SpiffeId, SvidError> {
    let cert = parse_cert(leaf_der)?;
    let uris: Vec<&str> = match cert.subject_alternative_name().map_err(malformed)? {
        Some(san) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    };
    let uri = match uris.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [one] => *one,
        many => return Err(SvidError::MultipleUriSans(many.len())),
    };
    let id = SpiffeId::parse(uri).map_err(|e| SvidError::BadSpiffeId(format!("{uri:?}: {e}")))?;
    if id.path().is_empty() {
        return Err(SvidError::LeafIdWithoutPath);
    }
    match cert.basic_constraints().map_err(malformed)? {
        None => return Err(SvidError::MissingBasicConstraints),
        Some(bc) if bc.value.ca => return Err(SvidError::LeafIsCa),
        Some(_) => {}
    }
    let ku = cert
        .key_usage()
        .map_err(malformed)?
        .ok_or_else(|| SvidError::BadKeyUsage("extension is missing".into()))?;
    if !ku.critical {
        return Err(SvidError::BadKeyUsage(
            "extension is not marked critical".into(),
        ));
    }
    if !ku.value.digital_signature() {
        return Err(SvidError::BadKeyUsage("digitalSignature is not set".into()));
    }
    if ku.value.key_cert_sign() {
        return Err(SvidError::BadKeyUsage(
            "keyCertSign is set on a leaf".into(),
        ));
    }
    if ku.value.crl_sign() {
        return Err(SvidError::BadKeyUsage("cRLSign is set on a leaf".into()));
    }
    Ok(id)
}

/// Checks a signing (intermediate CA) certificate of an SVID chain: BasicConstraints cA=true
/// and KeyUsage with keyCertSign.
pub fn check_signing_cert(der: &[u8]) -> Result<(), SvidError> {
    let cert = parse_cert(der)?;
    let is_ca = matches!(cert.basic_constraints().map_err(malformed)?, Some(bc) if bc.value.ca);
    let cert_sign =
        matches!(cert.key_usage().map_err(malformed)?, Some(ku) if ku.value.key_cert_sign());
    if is_ca && cert_sign {
        Ok(())
    } else {
        Err(SvidError::BadSigningCert)
    }
}

/// Loads the PKCS#8 key with aws-lc-rs and compares its public key with the leaf's
/// SubjectPublicKeyInfo. Error messages never contain key material.
fn check_key_matches(leaf: &X509Certificate<'_>, key_pkcs8: &[u8]) -> Result<(), SvidError> {
    let public = pkcs8_public_key(key_pkcs8)?;
    if public.as_slice() == leaf.public_key().subject_public_key.data.as_ref() {
        Ok(())
    } else {
        Err(SvidError::BadKey(
            "the public key of the private key differs from the leaf's".into(),
        ))
    }
}

fn pkcs8_public_key(pkcs8: &[u8]) -> Result<Vec<u8>, SvidError> {
    for alg in [
        &sig::ECDSA_P256_SHA256_ASN1_SIGNING,
        &sig::ECDSA_P384_SHA384_ASN1_SIGNING,
        &sig::ECDSA_P521_SHA512_ASN1_SIGNING,
    ] {
        if let Ok(kp) = sig::EcdsaKeyPair::from_pkcs8(alg, pkcs8) {
            return Ok(kp.public_key().as_ref().to_vec());
        }
    }
    if let Ok(kp) = sig::RsaKeyPair::from_pkcs8(pkcs8) {
        return Ok(kp.public_key().as_ref().to_vec());
    }
    if let Ok(kp) = sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8) {
        return Ok(kp.public_key().as_ref().to_vec());
    }
    Err(SvidError::BadKey(
        "not an unencrypted PKCS#8 ECDSA, RSA or Ed25519 key".into(),
    ))
}

/// Which extended key usage the peer's leaf must allow (when it has an EKU extension at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// serverAuth or clientAuth (SVIDs normally carry both).
    Any,
    /// The peer is a TLS server: serverAuth.
    Server,
    /// The peer is a TLS client: clientAuth.
    Client,
}

const EKU_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
const EKU_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

impl webpki::ExtendedKeyUsageValidator for PeerRole {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let server = webpki::KeyPurposeId::new(EKU_SERVER_AUTH);
        let client = webpki::KeyPurposeId::new(EKU_CLIENT_AUTH);
        let mut present = Vec::new();
        for id in iter {
            let id = id?;
            let ok = match self {
                PeerRole::Any => id == server || id == client,
                PeerRole::Server => id == server,
                PeerRole::Client => id == client,
            };
            if ok {
                return Ok(());
            }
            present.push(id.to_decoded_oid());
        }
        if present.is_empty() {
            return Ok(()); // no EKU extension: any usage
        }
        let required = match self {
            PeerRole::Client => webpki::KeyUsage::client_auth(),
            _ => webpki::KeyUsage::server_auth(),
        };
        Err(webpki::Error::RequiredEkuNotFoundContext(
            webpki::RequiredEkuNotFoundContext { required, present },
        ))
    }
}

/// Verifies a peer's chain (leaf first) against the bundle of the leaf's own trust domain in
/// `bundles` at time `now`: leaf structure, validity, signatures up to an authority of that
/// bundle (never a bundle of another trust domain). Returns the peer's SPIFFE ID.
/// Accepts a leaf whose EKU allows serverAuth or clientAuth; see [`verify_chain_for`].
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    bundles: &BundleSet,
    now: UnixTime,
) -> Result<SpiffeId, SvidError> {
    verify_chain_for(chain, bundles, now, PeerRole::Any)
}

/// [`verify_chain`] with the extended key usage the peer's role requires.
pub fn verify_chain_for(
    chain: &[CertificateDer<'_>],
    bundles: &BundleSet,
    now: UnixTime,
    role: PeerRole,
) -> Result<SpiffeId, SvidError> {
    let leaf = chain.first().ok_or(SvidError::EmptyChain)?;
    let id = check_leaf(leaf)?;
    let intermediates = &chain[1..];
    for cert in intermediates {
        check_signing_cert(cert)?;
    }
    let td = id.trust_domain();
    let td_name = td.name().to_string();
    let bundle = bundles
        .get(&td)
        .ok_or_else(|| SvidError::UnknownTrustDomain(td_name.clone()))?;
    let untrusted = |why: &str| SvidError::Untrusted(td_name.clone(), why.to_string());
    if bundle.x509_authorities.is_empty() {
        return Err(untrusted(
            "the bundle has no X.509 authorities (trust domain revoked?)",
        ));
    }
    // Trust anchors with the validity of the authority certificate (webpki ignores it).
    let authorities: Vec<(TrustAnchor<'_>, i64, i64)> = bundle
        .x509_authorities
        .iter()
        .filter_map(|der| {
            let anchor = webpki::anchor_from_trusted_cert(der).ok()?;
            let cert = parse_cert(der).ok()?;
            let validity = cert.validity();
            Some((
                anchor,
                validity.not_before.timestamp(),
                validity.not_after.timestamp(),
            ))
        })
        .collect();
    if authorities.is_empty() {
        return Err(untrusted(
            "no authority of the bundle is a usable certificate",
        ));
    }
    let anchors: Vec<TrustAnchor<'_>> = authorities.iter().map(|(a, _, _)| a.clone()).collect();
    let now_secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let anchor_valid = |path: &webpki::VerifiedPath<'_>| -> Result<(), webpki::Error> {
        let valid = authorities
            .iter()
            .any(|(a, nb, na)| a == path.anchor() && *nb <= now_secs && now_secs <= *na);
        if valid {
            Ok(())
        } else {
            Err(webpki::Error::CertExpired {
                time: now,
                not_after: now,
            })
        }
    };
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| malformed(webpki_reason(&e)))?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        intermediates,
        now,
        role,
        None,
        Some(&anchor_valid),
    )
    .map_err(|e| map_webpki_error(&e, &td_name))?;
    Ok(id)
}

fn map_webpki_error(e: &webpki::Error, td: &str) -> SvidError {
    use webpki::Error as E;
    match e {
        E::CertExpired { .. } | E::CertNotValidYet { .. } | E::InvalidCertValidity => {
            SvidError::Expired
        }
        E::CaUsedAsEndEntity => SvidError::LeafIsCa,
        E::EndEntityUsedAsCa => SvidError::BadSigningCert,
        E::BadDer | E::BadDerTime | E::TrailingData(_) | E::MalformedExtensions => {
            SvidError::Malformed(webpki_reason(e))
        }
        _ => SvidError::Untrusted(td.to_string(), webpki_reason(e)),
    }
}

fn webpki_reason(e: &webpki::Error) -> String {
    use webpki::Error as E;
    match e {
        E::UnknownIssuer => "no path from the leaf to an X.509 authority of the bundle".into(),
        E::InvalidSignatureForPublicKey => "a certificate signature does not verify".into(),
        E::RequiredEkuNotFoundContext(_) => {
            "the leaf's extended key usage does not allow this TLS role".into()
        }
        E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            "unsupported signature algorithm in the chain".into()
        }
        E::PathLenConstraintViolated => "a CA path length constraint is violated".into(),
        E::NameConstraintViolation => "a CA name constraint is violated".into(),
        other => format!("{other}"),
    }
}

#[cfg(test)]
#[path = "svid_tests.rs"]
pub(crate) mod tests;
