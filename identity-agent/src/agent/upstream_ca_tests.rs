use super::*;
use crate::bundle::{Bundle, BundleSet};
use crate::spiffe_id::SpiffeId;
use crate::svid::{verify_chain, SvidError};
use rustls::pki_types::{CertificateDer, UnixTime};
use std::os::unix::fs::PermissionsExt;

const DAY: Duration = Duration::from_secs(86400);

fn td(s: &str) -> TrustDomain {
    TrustDomain::parse(s).unwrap()
}

fn der(pem_text: &str) -> CertificateDer<'static> {
    first_cert(pem_text).unwrap().into()
}

fn bundles(entries: &[(&str, &str)]) -> BundleSet {
    let mut set = BundleSet::new();
    for (name, root_pem) in entries {
        let mut b = Bundle::new(td(name));
        b.x509_authorities.push(der(root_pem));
        set.insert(b);
    }
    set
}

/// The agent's signing CA on top of a node intermediate, as `--upstream-cert` loads it.
fn node_ca(int: &CertAndKey) -> SigningCa {
    let c = der(&int.cert_pem);
    SigningCa::from_pem(c.clone(), &int.key_pem, vec![c]).unwrap()
}

fn chain(der_concat: &[u8]) -> Vec<CertificateDer<'static>> {
    let mut rest = der_concat;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (r, _) = x509_parser::parse_x509_certificate(rest).unwrap();
        out.push(rest[..rest.len() - r.len()].to_vec().into());
        rest = r;
    }
    out
}

fn verify(ca: &SigningCa, id: &str, set: &BundleSet) -> Result<SpiffeId, SvidError> {
    let now = SystemTime::now();
    let svid = ca
        .issue(
            &SpiffeId::parse(id).unwrap(),
            "t",
            Duration::from_secs(600),
            now,
        )
        .unwrap();
    verify_chain(&chain(&svid.chain_der), set, UnixTime::now())
}

#[test]
fn intermediate_shape_and_lifetime() {
    let now = SystemTime::now();
    let root = create_root(&td("example.org"), 10 * DAY, now).unwrap();
    let int = issue_intermediate(
        &root.cert_pem,
        &root.key_pem,
        &td("example.org"),
        "node-a",
        30 * DAY,
        now,
    )
    .unwrap();
    assert!(int.not_after <= root.not_after, "never outlives the root");
    let d = der(&int.cert_pem);
    let (_, c) = x509_parser::parse_x509_certificate(&d).unwrap();
    let bc = c.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    let ku = c.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
    assert!(!ku.value.digital_signature());
    assert_eq!(ca_trust_domain(&d).unwrap(), "example.org");
    assert!(c.subject().to_string().contains("node-a"));
    assert!(c.name_constraints().unwrap().is_none());
    // The root: CA, its own trust domain in the SAN, svidcar in the subject.
    let r = der(&root.cert_pem);
    assert_eq!(ca_trust_domain(&r).unwrap(), "example.org");
    let (_, rc) = x509_parser::parse_x509_certificate(&r).unwrap();
    assert!(rc
        .subject()
        .to_string()
        .contains("svidcar root example.org"));
}

#[test]
fn node_svids_verify_against_the_root_and_other_domains_are_refused() {
    let now = SystemTime::now();
    let root = create_root(&td("example.org"), 10 * DAY, now).unwrap();
    let other_root = create_root(&td("other.org"), 10 * DAY, now).unwrap();
    let int = issue_intermediate(
        &root.cert_pem,
        &root.key_pem,
        &td("example.org"),
        "node-a",
        30 * DAY,
        now,
    )
    .unwrap();
    let ca = node_ca(&int);
    let set = bundles(&[
        ("example.org", &root.cert_pem),
        ("other.org", &other_root.cert_pem),
    ]);
    let id = verify(&ca, "spiffe://example.org/ns/a/sa/web", &set).unwrap();
    assert_eq!(id.as_str(), "spiffe://example.org/ns/a/sa/web");
    // A node intermediate forging another domain's ID is checked against that domain's bundle.
    let err = verify(&ca, "spiffe://other.org/x", &set).unwrap_err();
    assert!(matches!(err, SvidError::Untrusted(..)), "{err}");
    // No bundle for the forged domain at all: refused too.
    let only_ours = bundles(&[("example.org", &root.cert_pem)]);
    assert!(verify(&ca, "spiffe://third.org/x", &only_ours).is_err());
    // pathLen 0: a CA below the node intermediate is refused.
    let sub = issue_sub_ca(&int);
    let sub_ca = SigningCa::from_pem(
        der(&sub.cert_pem),
        &sub.key_pem,
        vec![der(&sub.cert_pem), der(&int.cert_pem)],
    )
    .unwrap();
    let err = verify(&sub_ca, "spiffe://example.org/w", &set).unwrap_err();
    assert!(err.to_string().contains("path length"), "{err}");
}

fn issue_sub_ca(int: &CertAndKey) -> CertAndKey {
    let issuer = Issuer::from_ca_cert_der(
        &der(&int.cert_pem),
        KeyPair::from_pem(&int.key_pem).unwrap(),
    )
    .unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.distinguished_name.push(DnType::CommonName, "sub");
    let cert = p.signed_by(&key, &issuer).unwrap();
    CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after: SystemTime::now(),
    }
}

/// Why the intermediates carry no NameConstraints: rustls-webpki fails closed on URI name
/// constraints, refusing even an SVID inside the permitted trust domain. If this test starts
/// failing, webpki learned URI constraints and `issue_intermediate` can add them.
#[test]
fn uri_name_constraints_are_refused_by_webpki() {
    let now = SystemTime::now();
    let root = create_root(&td("example.org"), 10 * DAY, now).unwrap();
    let issuer = Issuer::from_ca_cert_der(
        &der(&root.cert_pem),
        KeyPair::from_pem(&root.key_pem).unwrap(),
    )
    .unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
    // NameConstraints (2.5.29.30) ::= SEQUENCE { permittedSubtrees [0] SEQUENCE OF
    // GeneralSubtree }, GeneralSubtree ::= SEQUENCE { base GeneralName }, base =
    // uniformResourceIdentifier [6] IA5String "example.org" (RFC 5280: a host matches URIs
    // of exactly that host). Short-form lengths only.
    let host = b"example.org";
    let uri = [&[0x86, host.len() as u8][..], host].concat();
    let subtree = [&[0x30, uri.len() as u8][..], &uri].concat();
    let permitted = [&[0xa0, subtree.len() as u8][..], &subtree].concat();
    let nc = [&[0x30, permitted.len() as u8][..], &permitted].concat();
    let mut ext = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 30], nc);
    ext.set_criticality(true);
    p.custom_extensions = vec![ext];
    let cert = p.signed_by(&key, &issuer).unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
    assert!(parsed.name_constraints().unwrap().is_some(), "well-formed");
    let int = CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after: now,
    };
    let set = bundles(&[("example.org", &root.cert_pem)]);
    let err = verify(&node_ca(&int), "spiffe://example.org/w", &set).unwrap_err();
    assert!(err.to_string().contains("name constraint"), "{err}");
}

#[test]
fn wrong_trust_domain_and_bad_names_are_refused() {
    let now = SystemTime::now();
    let root = create_root(&td("example.org"), DAY, now).unwrap();
    let err = issue_intermediate(
        &root.cert_pem,
        &root.key_pem,
        &td("other.org"),
        "n",
        DAY,
        now,
    )
    .unwrap_err();
    assert!(matches!(err, UpstreamCaError::WrongTrustDomain { .. }));
    assert!(err.to_string().contains("\"example.org\""), "{err}");
    for bad in ["", "../x", "a/b", ".hidden", &"n".repeat(64)] {
        assert!(
            issue_intermediate(
                &root.cert_pem,
                &root.key_pem,
                &td("example.org"),
                bad,
                DAY,
                now
            )
            .is_err(),
            "{bad:?}"
        );
    }
    // A key that is not the root's.
    let other = create_root(&td("example.org"), DAY, now).unwrap();
    assert!(issue_intermediate(
        &root.cert_pem,
        &other.key_pem,
        &td("example.org"),
        "n",
        DAY,
        now
    )
    .is_err());
    // Expired root.
    assert!(matches!(
        issue_intermediate(
            &root.cert_pem,
            &root.key_pem,
            &td("example.org"),
            "n",
            DAY,
            now + 2 * DAY
        ),
        Err(UpstreamCaError::RootExpired)
    ));
}

#[test]
fn files_are_private_and_not_overwritten() {
    let dir = std::env::temp_dir().join(format!("svidcar-upca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sub = dir.join("ca");
    create_private_dir(&sub).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sub), 0o700);
    let f = sub.join("k.pem");
    write_file(&f, b"one", 0o600, false).unwrap();
    assert_eq!(mode(&f), 0o600);
    let err = write_file(&f, b"two", 0o600, false).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(std::fs::read(&f).unwrap(), b"one");
    write_file(&f, b"two", 0o600, true).unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"two");
    let _ = std::fs::remove_dir_all(&dir);
}
