//! The fuzzing fixtures and seed corpora (`fuzz/fixtures`, `fuzz/corpus/<target>`) stay
//! meaningful: the fixture SVID verifies against the fixture CA, the seed JWT validates, the
//! seed bundles, policies, configs and ClientHello parse — so every fuzz target starts from
//! inputs that reach deep into the code, not from inputs rejected at the first byte.
//!
//! Regenerate everything (after an API change) with
//! `SVIDCAR_WRITE_FUZZ_SEEDS=1 cargo test --test hostile_fuzz_seeds`, then commit `fuzz/`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, UnixTime};
use svidcar_agent::jwt::{self, JwtSigner};
use svidcar_agent::{svid, Bundle, BundleSet, SpiffeId, TrustDomain, X509Svid};
use svidcar_proxy::policy::PolicySet;
use svidcar_proxy::ProxyConfig;

/// The fuzz targets' fixed clock (2030-03-17), inside every fixture's validity.
const NOW: u64 = 1_900_000_000;
const KID: &str = "fuzz-kid";
const AUDIENCE: &str = "fuzz-aud";

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn read(rel: &str) -> Vec<u8> {
    let p = fuzz_dir().join(rel);
    std::fs::read(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (regenerate: see this file's doc)", p.display()))
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("seed-"))
        .map(|e| {
            let data = std::fs::read(e.path()).expect("read seed");
            (e.file_name().to_string_lossy().into_owned(), data)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("ia5"))
}

fn validity(p: &mut CertificateParams) {
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2035, 1, 1);
}

fn leaf_params(uris: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.subject_alt_names = uris.iter().map(|u| uri(u)).collect();
    validity(&mut p);
    p
}

/// Generates fixtures and seeds into `fuzz/` (only with SVIDCAR_WRITE_FUZZ_SEEDS=1).
fn generate() {
    let write = |rel: &str, data: &[u8]| {
        let p = fuzz_dir().join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, data).expect("write");
    };
    // Fixtures: a CA for fuzz.test, an SVID it signed, a JWT signing key.
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.subject_alt_names = vec![uri("spiffe://fuzz.test")];
    validity(&mut ca);
    let ca_der = ca.self_signed(&ca_key).expect("ca").der().to_vec();
    let issuer = Issuer::new(ca.clone(), ca_key);
    let sign = |p: &CertificateParams| -> (Vec<u8>, Vec<u8>) {
        let k = KeyPair::generate().expect("key");
        (
            p.signed_by(&k, &issuer).expect("sign").der().to_vec(),
            k.serialize_der(),
        )
    };
    let (leaf, leaf_key) = sign(&leaf_params(&["spiffe://fuzz.test/ns/prod/sa/web"]));
    let jwt_key = KeyPair::generate().expect("key").serialize_der();
    write("fixtures/ca.der", &ca_der);
    write("fixtures/leaf.der", &leaf);
    write("fixtures/leaf-key.p8", &leaf_key);
    write("fixtures/jwt-key.p8", &jwt_key);

    // x509_svid: the leaf, leaf+CA, the CA, and structurally bad certificates.
    let (two_sans, _) = sign(&leaf_params(&[
        "spiffe://fuzz.test/a",
        "spiffe://fuzz.test/b",
    ]));
    let mut ca_leaf = leaf_params(&["spiffe://fuzz.test/ca-leaf"]);
    ca_leaf.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let (ca_leaf, _) = sign(&ca_leaf);
    let (foreign, _) = sign(&leaf_params(&["spiffe://other.test/x"]));
    write("corpus/x509_svid/seed-leaf", &leaf);
    write(
        "corpus/x509_svid/seed-chain",
        &[leaf.clone(), ca_der.clone()].concat(),
    );
    write("corpus/x509_svid/seed-ca", &ca_der);
    write("corpus/x509_svid/seed-two-uri-sans", &two_sans);
    write("corpus/x509_svid/seed-ca-as-leaf", &ca_leaf);
    write("corpus/x509_svid/seed-foreign-td", &foreign);

    // bundle_jwks: our SPIFFE bundle (x509 + jwt keys) and the plain JWT JWKS.
    let signer = JwtSigner::from_pkcs8(KID, &jwt_key).expect("jwt key");
    let td = TrustDomain::parse("fuzz.test").expect("td");
    let mut bundle = Bundle::from_x509_der_concat(td, &ca_der).expect("bundle");
    bundle.add_jwt_key(signer.public_jwk());
    bundle.sequence = 7;
    bundle.refresh_hint = Some(Duration::from_secs(300));
    write(
        "corpus/bundle_jwks/seed-spiffe-bundle.json",
        &bundle.to_jwks(),
    );
    write(
        "corpus/bundle_jwks/seed-jwt-bundle.json",
        &bundle.jwt_jwks(),
    );
    write("corpus/bundle_jwks/seed-empty.json", br#"{"keys":[]}"#);

    // jwt_validate: mode byte 0 = token as is; 1 = header\nclaims signed by the harness.
    let sub = SpiffeId::parse("spiffe://fuzz.test/ns/prod/sa/web").expect("id");
    let issued = UNIX_EPOCH + Duration::from_secs(1_735_689_600); // 2025-01-01
    let ten_years = Duration::from_secs(10 * 365 * 86_400);
    let token = signer
        .sign_at(&sub, &[AUDIENCE.to_string()], ten_years, issued)
        .expect("sign");
    let two_aud = signer
        .sign_at(
            &sub,
            &[AUDIENCE.to_string(), "other".into()],
            ten_years,
            issued,
        )
        .expect("sign");
    write(
        "corpus/jwt_validate/seed-token",
        &[b"\0", token.as_bytes()].concat(),
    );
    write(
        "corpus/jwt_validate/seed-token-two-aud",
        &[b"\0", two_aud.as_bytes()].concat(),
    );
    let alg_none = "eyJhbGciOiJub25lIiwia2lkIjoiZnV6ei1raWQifQ.eyJzdWIiOiJzcGlmZmU6Ly9mdXp6LnRlc3QveCIsImF1ZCI6ImZ1enotYXVkIiwiZXhwIjoyMDAwMDAwMDAwfQ.";
    write(
        "corpus/jwt_validate/seed-alg-none",
        &[b"\0", alg_none.as_bytes()].concat(),
    );
    let claims = format!(
        "\x01{{\"alg\":\"ES256\",\"typ\":\"JWT\",\"kid\":\"{KID}\"}}\n{{\"sub\":\"{}\",\"aud\":[\"{AUDIENCE}\"],\"exp\":2000000000,\"nbf\":1700000000,\"iat\":1700000000}}",
        sub.as_str()
    );
    write("corpus/jwt_validate/seed-claims", claims.as_bytes());

    // spiffe_id
    for (i, s) in [
        "spiffe://example.org/ns/default/sa/web",
        "spiffe://svidcar.local",
        "spiffe://a.b-c_d.example/x/Y.z-1_2",
        "example.org",
        "SPIFFE://Example.Org/Path",
        "spiffe://td/a/../b",
        "spiffe://td:8080/x",
        "spiffe://td/x?q#f",
    ]
    .iter()
    .enumerate()
    {
        write(&format!("corpus/spiffe_id/seed-{i}"), s.as_bytes());
    }

    // http_path
    for (i, s) in [
        "/api/v1/items?x=1#frag",
        "/a/./b/../../c/",
        "/a//b%2F..%5Cc%2f%2e%2e",
        "\\admin\\..\\x",
        "Example.COM:8443",
        "[::1]:80",
        "api.svc.cluster.local.",
        "/public/%2e%2e/admin",
        "/%61dm%69n/%252e;x=1/%zz%00",
    ]
    .iter()
    .enumerate()
    {
        write(&format!("corpus/http_path/seed-{i}"), s.as_bytes());
    }

    // policy_yaml: every suite of tests/policy_data/decisions.yaml, as a full document.
    let table = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policy_data/decisions.yaml"),
    )
    .expect("policy table");
    let table: serde_yaml_ng::Value = serde_yaml_ng::from_str(&table).expect("yaml");
    let suites = table["suites"].as_sequence().expect("suites");
    for (i, s) in suites.iter().enumerate() {
        let Some(policy) = s["policy"].as_str() else {
            continue;
        };
        let doc = format!("apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\n{policy}");
        write(
            &format!("corpus/policy_yaml/seed-{i:02}.yaml"),
            doc.as_bytes(),
        );
    }

    // proxy_config: the documented schema.
    write("corpus/proxy_config/seed-full.yaml", PROXY_YAML.as_bytes());
    write(
        "corpus/proxy_config/seed-flags",
        b"127.0.0.1:8443=8080:permissive\n:9000=backend:8443,spiffe://ex.org/b\n500ms\n",
    );

    // tls_client_hello: ClientHellos as a mesh peer (TLS 1.3, ALPN svidcar/1, SNI) and as a
    // TLS 1.2 client would send them.
    write(
        "corpus/tls_client_hello/seed-mesh-hello",
        &client_hello(true),
    );
    write(
        "corpus/tls_client_hello/seed-tls12-hello",
        &client_hello(false),
    );

    // sni_peek: the same ClientHellos, whole and split over several TLS records (the egress
    // reader reassembles them).
    write("corpus/sni_peek/seed-mesh-hello", &client_hello(true));
    write("corpus/sni_peek/seed-tls12-hello", &client_hello(false));
    write(
        "corpus/sni_peek/seed-split-records",
        &split_records(&client_hello(true), &[1, 3, 40]),
    );
}

/// The one-record ClientHello `record` re-cut into records of the given payload sizes (the last
/// takes the rest).
fn split_records(record: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = &record[5..];
    let mut sizes = sizes.iter();
    while !rest.is_empty() {
        let n = sizes.next().copied().unwrap_or(rest.len()).min(rest.len());
        out.extend_from_slice(&[0x16, 3, 1]);
        out.extend_from_slice(&u16::try_from(n).expect("record size").to_be_bytes());
        out.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

const PROXY_YAML: &str = "agent_socket: /run/svidcar/agent.sock
admin_addr: 127.0.0.1:15000
inbound:
  - listen: 0.0.0.0:8443
    app_port: 8080
    mode: strict
outbound:
  - listen: 127.0.0.1:9000
    upstream: backend.example:8443
    expect: spiffe://example.org/backend
transparent:
  enabled: false
  inbound_addr: 0.0.0.0:15006
  outbound_addr: 0.0.0.0:15001
  default_mode: strict
  ports: { 8080: permissive }
  destinations:
    - dst: 10.0.0.0/8
      port: 8443
      expect: example.org
limits:
  max_connections: 10000
  handshake_timeout: 10s
  idle_timeout: 1h
  drain_timeout: 20s
";

/// The first flight of a rustls client (a real ClientHello record).
fn client_hello(mesh: bool) -> Vec<u8> {
    let versions: &[&rustls::SupportedProtocolVersion] = if mesh {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS12]
    };
    let mut config = rustls::ClientConfig::builder_with_provider(svidcar_agent::tls::provider())
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    if mesh {
        config.alpn_protocols = vec![b"svidcar/1".to_vec()];
    }
    let name = "backend.fuzz.test".try_into().expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write");
    }
    out
}

#[test]
fn fuzz_fixtures_and_seeds_are_meaningful() {
    if std::env::var("SVIDCAR_WRITE_FUZZ_SEEDS").as_deref() == Ok("1") {
        generate();
    }
    let now = UnixTime::since_unix_epoch(Duration::from_secs(NOW));
    let ca = read("fixtures/ca.der");
    let leaf = read("fixtures/leaf.der");
    let leaf_key = read("fixtures/leaf-key.p8");
    let jwt_key = read("fixtures/jwt-key.p8");

    // The fixture SVID is a valid X509-SVID of fuzz.test at the fuzzers' clock.
    let td = TrustDomain::parse("fuzz.test").unwrap();
    let mut bundles = BundleSet::new();
    let mut bundle = Bundle::from_x509_der_concat(td, &ca).unwrap();
    let signer = JwtSigner::from_pkcs8(KID, &jwt_key).unwrap();
    bundle.add_jwt_key(signer.public_jwk());
    bundles.insert(bundle);
    let s = X509Svid::from_der(&leaf, &leaf_key, "").unwrap();
    let id = svid::verify_chain(&s.chain, &bundles, now).unwrap();
    assert_eq!(id.as_str(), "spiffe://fuzz.test/ns/prod/sa/web");

    // x509 seeds: the good ones verify, each bad one is refused for its own reason.
    let x509: Vec<_> = corpus("x509_svid");
    let get = |name: &str| -> Vec<u8> {
        x509.iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("seed {name}"))
            .1
            .clone()
    };
    let chain = svid::split_der_chain(&get("seed-chain")).unwrap();
    assert_eq!(svid::verify_chain(&chain, &bundles, now).unwrap(), id);
    let one = |name: &str| vec![CertificateDer::from(get(name))];
    assert!(matches!(
        svid::verify_chain(&one("seed-two-uri-sans"), &bundles, now),
        Err(svid::SvidError::MultipleUriSans(2))
    ));
    assert_eq!(
        svid::verify_chain(&one("seed-ca-as-leaf"), &bundles, now),
        Err(svid::SvidError::LeafIsCa)
    );
    assert_eq!(
        svid::verify_chain(&one("seed-foreign-td"), &bundles, now),
        Err(svid::SvidError::UnknownTrustDomain("other.test".into()))
    );

    // bundle seeds parse, and hold the fixture keys.
    for (name, data) in corpus("bundle_jwks") {
        let td = TrustDomain::parse("fuzz.test").unwrap();
        let b = Bundle::from_jwks(td.clone(), &data)
            .or_else(|_| Bundle::from_jwt_jwks(td, &data))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if name == "seed-spiffe-bundle.json" {
            assert_eq!(b.x509_authorities.len(), 1);
            assert!(b.jwt_authorities.contains_key(KID));
        }
    }

    // jwt seeds: the signed tokens validate at the fuzzers' clock; alg none is refused.
    let when = UNIX_EPOCH + Duration::from_secs(NOW);
    for (name, data) in corpus("jwt_validate") {
        let text = std::str::from_utf8(&data[1..]).unwrap();
        let r = match data[0] {
            0 => jwt::validate(text, AUDIENCE, &bundles, when),
            _ => continue,
        };
        match name.as_str() {
            "seed-alg-none" => {
                assert!(matches!(r, Err(jwt::JwtError::DisallowedAlg(a)) if a == "none"))
            }
            _ => assert_eq!(r.unwrap_or_else(|e| panic!("{name}: {e}")).id, id),
        }
    }

    for (name, data) in corpus("spiffe_id") {
        assert!(std::str::from_utf8(&data).is_ok(), "{name}");
    }
    let policies = corpus("policy_yaml");
    assert!(
        policies.len() >= 10,
        "policy seeds from tests/policy_data/decisions.yaml"
    );
    let mut loaded = 0;
    for (name, data) in &policies {
        if PolicySet::from_yaml(name, std::str::from_utf8(data).unwrap()).is_ok() {
            loaded += 1;
        }
    }
    assert!(
        loaded * 10 >= policies.len() * 9,
        "most policy seeds load ({loaded}/{})",
        policies.len()
    );
    let configs = corpus("proxy_config");
    let (_, cfg) = configs
        .iter()
        .find(|(n, _)| n == "seed-full.yaml")
        .expect("config seed");
    let cfg = ProxyConfig::from_yaml(std::str::from_utf8(cfg).unwrap()).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.inbound.len(), 1);

    // The ClientHello seeds are accepted by a rustls server as ClientHellos with our SNI.
    let hellos = [corpus("tls_client_hello"), corpus("sni_peek")].concat();
    for (name, data) in hellos {
        let mut acceptor = rustls::server::Acceptor::default();
        let mut input = data.as_slice();
        let accepted = loop {
            acceptor.read_tls(&mut input).unwrap();
            match acceptor.accept() {
                Ok(Some(a)) => break a,
                Ok(None) => assert!(!input.is_empty(), "{name}: incomplete ClientHello"),
                Err(e) => panic!("{name}: {e:?}"),
            }
        };
        assert_eq!(
            accepted.client_hello().server_name(),
            Some("backend.fuzz.test"),
            "{name}"
        );
        assert_eq!(
            svidcar_proxy::client_hello::read_all(&data),
            svidcar_proxy::client_hello::Progress::Done(Some("backend.fuzz.test".into())),
            "{name}: the proxy's ClientHello reader"
        );
    }
}
