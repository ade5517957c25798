//! Tests of `svid.rs`: certificates are built with rcgen here (the agent's CA is not used).

use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, UnixTime};

use super::*;
use crate::bundle::{Bundle, BundleSet};
use crate::spiffe_id::TrustDomain;

/// A test CA: its certificate and the issuer to sign with.
pub(crate) struct TestCa {
    pub cert: CertificateDer<'static>,
    pub issuer: Issuer<'static, KeyPair>,
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("ia5"))
}

pub(crate) fn ca_params(td: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![uri(&format!("spiffe://{td}"))];
    p
}

/// A self-signed root for `td`.
pub(crate) fn root_ca(td: &str) -> TestCa {
    let key = KeyPair::generate().expect("key");
    let params = ca_params(td);
    let cert = params.self_signed(&key).expect("self-signed").der().clone();
    TestCa {
        cert,
        issuer: Issuer::new(params, key),
    }
}

/// An intermediate of `parent` built from `params`.
pub(crate) fn sub_ca(parent: &TestCa, params: CertificateParams) -> TestCa {
    let key = KeyPair::generate().expect("key");
    let cert = params
        .signed_by(&key, &parent.issuer)
        .expect("signed")
        .der()
        .clone();
    TestCa {
        cert,
        issuer: Issuer::new(params, key),
    }
}

/// Leaf parameters that follow the X509-SVID rules.
pub(crate) fn leaf_params(id: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.subject_alt_names = vec![uri(id)];
    p
}

/// Signs a leaf; returns (leaf DER, PKCS#8 key DER).
pub(crate) fn leaf(ca: &TestCa, params: &CertificateParams) -> (CertificateDer<'static>, Vec<u8>) {
    let key = KeyPair::generate().expect("key");
    let cert = params
        .signed_by(&key, &ca.issuer)
        .expect("signed")
        .der()
        .clone();
    (cert, key.serialize_der())
}

pub(crate) fn bundles_of(cas: &[(&str, &TestCa)]) -> BundleSet {
    cas.iter()
        .map(|(td, ca)| {
            let mut b = Bundle::new(TrustDomain::parse(td).expect("td"));
            b.x509_authorities.push(ca.cert.clone());
            b
        })
        .collect()
}

fn now() -> UnixTime {
    UnixTime::now()
}

const ID: &str = "spiffe://example.org/ns/a/sa/b";

#[test]
fn good_leaf_parses_and_verifies() {
    let ca = root_ca("example.org");
    let (cert, key) = leaf(&ca, &leaf_params(ID));
    let svid = X509Svid::from_der(&cert, &key, "internal").expect("valid SVID");
    assert_eq!(svid.id.as_str(), ID);
    assert_eq!(svid.hint, "internal");
    assert_eq!(svid.chain.len(), 1);
    assert!(!svid.serial_hex().is_empty());
    assert!(svid.serial_hex().chars().all(|c| c.is_ascii_hexdigit()));
    assert!(svid.is_valid_at(SystemTime::now()));
    assert!(svid.not_before < svid.not_after);
    let bundles = bundles_of(&[("example.org", &ca)]);
    let id = verify_chain(&svid.chain, &bundles, now()).expect("verifies");
    assert_eq!(id.as_str(), ID);
    for role in [PeerRole::Server, PeerRole::Client] {
        verify_chain_for(&svid.chain, &bundles, now(), role).expect("verifies for role");
    }
    assert!(!format!("{svid:?}").contains("key:"));
}

#[test]
fn eku_role_is_enforced() {
    let ca = root_ca("example.org");
    let mut params = leaf_params(ID);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let (cert, _) = leaf(&ca, &params);
    let bundles = bundles_of(&[("example.org", &ca)]);
    let chain = [cert];
    verify_chain_for(&chain, &bundles, now(), PeerRole::Client).expect("client ok");
    verify_chain(&chain, &bundles, now()).expect("any ok");
    let err = verify_chain_for(&chain, &bundles, now(), PeerRole::Server).unwrap_err();
    assert!(matches!(err, SvidError::Untrusted(_, ref m) if m.contains("extended key usage")));
}

#[test]
fn two_uri_sans_rejected() {
    let ca = root_ca("example.org");
    let mut params = leaf_params(ID);
    params
        .subject_alt_names
        .push(uri("spiffe://example.org/other"));
    let (cert, key) = leaf(&ca, &params);
    assert_eq!(check_leaf(&cert), Err(SvidError::MultipleUriSans(2)));
    assert_eq!(
        X509Svid::from_der(&cert, &key, "").unwrap_err(),
        SvidError::MultipleUriSans(2)
    );
}

#[test]
fn no_uri_san_and_bad_ids_rejected() {
    let ca = root_ca("example.org");
    let mut params = leaf_params(ID);
    params.subject_alt_names = vec![SanType::DnsName("a.example.org".try_into().expect("dns"))];
    assert_eq!(check_leaf(&leaf(&ca, &params).0), Err(SvidError::NoUriSan));
    let (cert, _) = leaf(&ca, &leaf_params("https://example.org/x"));
    assert!(matches!(check_leaf(&cert), Err(SvidError::BadSpiffeId(_))));
    let (cert, _) = leaf(&ca, &leaf_params("spiffe://example.org"));
    assert_eq!(check_leaf(&cert), Err(SvidError::LeafIdWithoutPath));
}

#[test]
fn ca_leaf_rejected() {
    let ca = root_ca("example.org");
    let mut params = leaf_params(ID);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    assert_eq!(check_leaf(&leaf(&ca, &params).0), Err(SvidError::LeafIsCa));
}

#[test]
fn missing_basic_constraints_rejected() {
    let ca = root_ca("example.org");
    let mut params = leaf_params(ID);
    params.is_ca = IsCa::NoCa; // rcgen writes no BasicConstraints extension
    assert_eq!(
        check_leaf(&leaf(&ca, &params).0),
        Err(SvidError::MissingBasicConstraints)
    );
}

#[test]
fn key_usage_rules() {
    let ca = root_ca("example.org");
    // Non-critical KeyUsage with digitalSignature (BIT STRING 0x80).
    let mut params = leaf_params(ID);
    params.key_usages.clear();
    params.custom_extensions = vec![CustomExtension::from_oid_content(
        &[2, 5, 29, 15],
        vec![0x03, 0x02, 0x07, 0x80],
    )];
    let err = check_leaf(&leaf(&ca, &params).0).unwrap_err();
    assert!(
        matches!(err, SvidError::BadKeyUsage(ref m) if m.contains("critical")),
        "{err}"
    );

    let mut params = leaf_params(ID);
    params.key_usages.clear();
    let err = check_leaf(&leaf(&ca, &params).0).unwrap_err();
    assert!(
        matches!(err, SvidError::BadKeyUsage(ref m) if m.contains("missing")),
        "{err}"
    );

    let mut params = leaf_params(ID);
    params.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    let err = check_leaf(&leaf(&ca, &params).0).unwrap_err();
    assert!(matches!(err, SvidError::BadKeyUsage(ref m) if m.contains("digitalSignature")));

    for extra in [KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign] {
        let mut params = leaf_params(ID);
        params.key_usages.push(extra);
        let err = check_leaf(&leaf(&ca, &params).0).unwrap_err();
        assert!(
            matches!(err, SvidError::BadKeyUsage(ref m) if m.contains("Sign")),
            "{err}"
        );
    }
}

#[test]
fn expired_and_not_yet_valid_rejected() {
    let ca = root_ca("example.org");
    let bundles = bundles_of(&[("example.org", &ca)]);
    let mut params = leaf_params(ID);
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(2);
    params.not_after = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    let (cert, key) = leaf(&ca, &params);
    // Parsing does not check time; verification does.
    let svid = X509Svid::from_der(&cert, &key, "").expect("parses");
    assert!(!svid.is_valid_at(SystemTime::now()));
    assert_eq!(
        verify_chain(&svid.chain, &bundles, now()),
        Err(SvidError::Expired)
    );

    let mut params = leaf_params(ID);
    params.not_before = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(2);
    let (cert, _) = leaf(&ca, &params);
    assert_eq!(
        verify_chain(&[cert], &bundles, now()),
        Err(SvidError::Expired)
    );
}

#[test]
fn expired_bundle_root_rejected() {
    let key = KeyPair::generate().expect("key");
    let mut params = ca_params("example.org");
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let cert = params.self_signed(&key).expect("root").der().clone();
    let ca = TestCa {
        cert,
        issuer: Issuer::new(params, key),
    };
    let (leaf_cert, _) = leaf(&ca, &leaf_params(ID));
    let bundles = bundles_of(&[("example.org", &ca)]);
    assert_eq!(
        verify_chain(&[leaf_cert], &bundles, now()),
        Err(SvidError::Expired)
    );
}

#[test]
fn verification_uses_only_the_peers_own_trust_domain() {
    let ours = root_ca("example.org");
    let theirs = root_ca("other.org");
    let (cert, _) = leaf(&theirs, &leaf_params("spiffe://other.org/svc"));
    let chain = [cert];
    // other.org unknown: never fall back to example.org's bundle.
    let only_ours = bundles_of(&[("example.org", &ours)]);
    assert_eq!(
        verify_chain(&chain, &only_ours, now()),
        Err(SvidError::UnknownTrustDomain("other.org".into()))
    );
    // other.org's bundle holds the wrong root; example.org's bundle holding the signer must not help.
    let swapped = bundles_of(&[("other.org", &ours), ("example.org", &theirs)]);
    let err = verify_chain(&chain, &swapped, now()).unwrap_err();
    assert!(
        matches!(err, SvidError::Untrusted(ref td, _) if td == "other.org"),
        "{err}"
    );
    let right = bundles_of(&[("other.org", &theirs), ("example.org", &ours)]);
    assert_eq!(
        verify_chain(&chain, &right, now()).expect("ok").as_str(),
        "spiffe://other.org/svc"
    );
}

#[test]
fn revoked_bundle_rejects_everything() {
    let ca = root_ca("example.org");
    let (cert, _) = leaf(&ca, &leaf_params(ID));
    let mut bundles = BundleSet::new();
    bundles.insert(Bundle::new(TrustDomain::parse("example.org").expect("td")));
    let err = verify_chain(&[cert], &bundles, now()).unwrap_err();
    assert!(
        matches!(err, SvidError::Untrusted(_, ref m) if m.contains("revoked")),
        "{err}"
    );
}

#[test]
fn chain_via_intermediate() {
    let root = root_ca("example.org");
    let mut params = ca_params("example.org");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "intermediate");
    let inter = sub_ca(&root, params);
    let (cert, key) = leaf(&inter, &leaf_params(ID));
    let concat: Vec<u8> = [cert.as_ref(), inter.cert.as_ref()].concat();
    let svid = X509Svid::from_der(&concat, &key, "").expect("parses");
    assert_eq!(svid.chain.len(), 2);
    assert_eq!(svid.chain_der_concat(), concat);
    let bundles = bundles_of(&[("example.org", &root)]);
    verify_chain(&svid.chain, &bundles, now()).expect("verifies through the intermediate");
    // Without the intermediate there is no path.
    let err = verify_chain(&svid.chain[..1], &bundles, now()).unwrap_err();
    assert!(
        matches!(err, SvidError::Untrusted(_, ref m) if m.contains("no path")),
        "{err}"
    );
}

#[test]
fn intermediate_without_cert_sign_rejected() {
    let root = root_ca("example.org");
    let mut params = ca_params("example.org");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let inter = sub_ca(&root, params);
    let (cert, key) = leaf(&inter, &leaf_params(ID));
    let concat: Vec<u8> = [cert.as_ref(), inter.cert.as_ref()].concat();
    assert_eq!(
        X509Svid::from_der(&concat, &key, "").unwrap_err(),
        SvidError::BadSigningCert
    );
    let bundles = bundles_of(&[("example.org", &root)]);
    let chain = [cert, inter.cert.clone()];
    assert_eq!(
        verify_chain(&chain, &bundles, now()),
        Err(SvidError::BadSigningCert)
    );
}

#[test]
fn forged_signature_rejected() {
    let real = root_ca("example.org");
    let forger = root_ca("example.org"); // same name, different key
    let (cert, _) = leaf(&forger, &leaf_params(ID));
    let bundles = bundles_of(&[("example.org", &real)]);
    assert!(matches!(
        verify_chain(&[cert], &bundles, now()),
        Err(SvidError::Untrusted(..))
    ));
}

#[test]
fn key_must_match_leaf() {
    let ca = root_ca("example.org");
    let (cert, _) = leaf(&ca, &leaf_params(ID));
    let (_, other_key) = leaf(&ca, &leaf_params(ID));
    let err = X509Svid::from_der(&cert, &other_key, "").unwrap_err();
    assert!(matches!(err, SvidError::BadKey(_)), "{err}");
    let err = X509Svid::from_der(&cert, b"not a key", "").unwrap_err();
    assert!(matches!(err, SvidError::BadKey(_)), "{err}");
}

#[test]
fn p384_and_rsa_keys_match() {
    let ca = root_ca("example.org");
    for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_RSA_SHA256] {
        let key = KeyPair::generate_for(alg).expect("key");
        let cert = leaf_params(ID)
            .signed_by(&key, &ca.issuer)
            .expect("signed")
            .der()
            .clone();
        X509Svid::from_der(&cert, &key.serialize_der(), "").expect("key matches");
    }
}

#[test]
fn malformed_input_rejected() {
    assert_eq!(
        X509Svid::from_der(&[], &[], "").unwrap_err(),
        SvidError::EmptyChain
    );
    assert!(matches!(
        X509Svid::from_der(b"garbage", &[], ""),
        Err(SvidError::Malformed(_))
    ));
    let ca = root_ca("example.org");
    let (cert, key) = leaf(&ca, &leaf_params(ID));
    let mut trailing = cert.to_vec();
    trailing.extend_from_slice(&[0x30, 0x03, 0x01]);
    assert!(matches!(
        X509Svid::from_der(&trailing, &key, ""),
        Err(SvidError::Malformed(_))
    ));
    assert_eq!(
        verify_chain(&[], &BundleSet::new(), now()),
        Err(SvidError::EmptyChain)
    );
    assert!(split_der_chain(&[]).expect("empty ok").is_empty());
}
