//! Scenario S5 (BENCHMARKS.md): one in-process mutual TLS 1.3 handshake, both sides, no sockets.
//!
//! - `svidcar_full`: svidcar's own configs (`svidcar_agent::tls::{server_config, client_config}`:
//!   SPIFFE chain validation against the bundle of the peer's trust domain, expected server ID,
//!   ALPN) with resumption disabled on the client — a full handshake every time.
//! - `svidcar_resumed`: the same configs with the client's session store kept (TLS 1.3 tickets).
//! - `svidcar_full_aes128`: as `svidcar_full`, but the client offers only
//!   TLS_AES_128_GCM_SHA256 (SHA-256 transcript/HKDF instead of SHA-384) — what the suite
//!   preference costs on CPUs with SHA-NI but no SHA-512 instructions.
//! - `svidcar_full_x25519`: as `svidcar_full`, but the client offers only X25519 (a classical
//!   peer, and svidcar before the post-quantum default) — what `X25519MLKEM768` costs.
//! - `rustls_plain_full`: plain rustls mutual auth with the stock WebPKI verifiers (DNS name
//!   check, no SPIFFE rules) and the same P-256 keys — the baseline the SPIFFE layer is compared with.
//!
//! Run: `cargo bench --bench handshake_s5` (add `-- --quick` for a short run).
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use svidcar_agent::tls::{self, ExpectedPeer, ServerResumption};
use svidcar_agent::{Bundle, BundleSet, SpiffeId, TrustDomain, X509Svid};

const TD: &str = "bench.svidcar";

type BoxError = Box<dyn std::error::Error>;

struct Ca {
    cert: rcgen::Certificate,
    issuer: Issuer<'static, KeyPair>,
}

fn ca() -> Result<Ca, BoxError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.distinguished_name.push(DnType::CommonName, "bench CA");
    p.subject_alt_names = vec![SanType::URI(format!("spiffe://{TD}").try_into()?)];
    let cert = p.self_signed(&key)?;
    Ok(Ca {
        cert,
        issuer: Issuer::new(p, key),
    })
}

/// A leaf with one SAN (URI for SVIDs, DNS for the plain baseline): (cert DER, PKCS#8 key DER).
fn leaf(ca: &Ca, san: SanType) -> Result<(Vec<u8>, Vec<u8>), BoxError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.subject_alt_names = vec![san];
    let cert = p.signed_by(&key, &ca.issuer)?;
    Ok((cert.der().to_vec(), key.serialize_der()))
}

fn svid(ca: &Ca, path: &str) -> Result<X509Svid, BoxError> {
    let (cert, key) = leaf(
        ca,
        SanType::URI(format!("spiffe://{TD}/{path}").try_into()?),
    )?;
    Ok(X509Svid::from_der(&cert, &key, "")?)
}

/// Drives both sides to the end of the handshake through memory.
fn handshake(client: &mut ClientConnection, server: &mut ServerConnection) -> Result<(), BoxError> {
    let mut buf = Vec::with_capacity(8192);
    while client.is_handshaking() || server.is_handshaking() {
        buf.clear();
        while client.wants_write() {
            client.write_tls(&mut buf)?;
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd)?;
        }
        server.process_new_packets()?;
        buf.clear();
        while server.wants_write() {
            server.write_tls(&mut buf)?;
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd)?;
        }
        client.process_new_packets()?;
    }
    Ok(())
}

fn one(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
    name: &ServerName<'static>,
) -> Result<(), BoxError> {
    let mut c = ClientConnection::new(client.clone(), name.clone())?;
    let mut s = ServerConnection::new(server.clone())?;
    handshake(&mut c, &mut s)
}

struct Setup {
    svidcar_server: Arc<ServerConfig>,
    svidcar_client_full: Arc<ClientConfig>,
    svidcar_client_resume: Arc<ClientConfig>,
    svidcar_client_aes128: Arc<ClientConfig>,
    svidcar_client_x25519: Arc<ClientConfig>,
    plain_server: Arc<ServerConfig>,
    plain_client: Arc<ClientConfig>,
}

fn setup() -> Result<Setup, BoxError> {
    let ca = ca()?;
    let mut bundle = Bundle::new(TrustDomain::parse(TD)?);
    bundle.x509_authorities.push(ca.cert.der().clone());
    let mut set = BundleSet::new();
    set.insert(bundle);
    let bundles = Arc::new(set);
    let server_svid = svid(&ca, "server")?;
    let client_svid = svid(&ca, "client")?;
    let expected = ExpectedPeer::Id(SpiffeId::parse(&format!("spiffe://{TD}/server"))?);
    let svidcar_server =
        tls::server_config(&server_svid, bundles.clone(), &ServerResumption::new(4096)?)?;
    let svidcar_client_resume = tls::client_config(
        &client_svid,
        bundles.clone(),
        expected.clone(),
        tls::client_session_store(256),
    )?;
    let mut full = (*tls::client_config(
        &client_svid,
        bundles.clone(),
        expected.clone(),
        tls::client_session_store(256),
    )?)
    .clone();
    full.resumption = Resumption::disabled();
    // svidcar's client config on a provider of its own, without resumption.
    let custom = |p: rustls::crypto::CryptoProvider| -> Result<ClientConfig, BoxError> {
        let mut c = ClientConfig::builder_with_provider(Arc::new(p))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(tls::SpiffeServerVerifier::new(
                bundles.clone(),
                expected.clone(),
            )))
            .with_client_auth_cert(client_svid.chain.clone(), client_svid.private_key())?;
        c.alpn_protocols = vec![tls::ALPN_SVIDCAR.to_vec()];
        c.resumption = Resumption::disabled();
        Ok(c)
    };
    let mut aes128_provider = (*tls::provider()).clone();
    aes128_provider
        .cipher_suites
        .retain(|cs| cs.suite() == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let aes128 = custom(aes128_provider)?;
    let mut x25519_provider = (*tls::provider()).clone();
    x25519_provider
        .kx_groups
        .retain(|g| g.name() == rustls::NamedGroup::X25519);
    let x25519 = custom(x25519_provider)?;

    let provider = tls::provider();
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert.der().clone())?;
    let roots = Arc::new(roots);
    let (scert, skey) = leaf(&ca, SanType::DnsName("server.bench".try_into()?))?;
    let (ccert, ckey) = leaf(&ca, SanType::DnsName("client.bench".try_into()?))?;
    let key = |k: Vec<u8>| PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k));
    let cv = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()?;
    let plain_server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(cv)
        .with_single_cert(vec![CertificateDer::from(scert)], key(skey))?;
    let mut plain_client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![CertificateDer::from(ccert)], key(ckey))?;
    plain_client.resumption = Resumption::disabled();
    Ok(Setup {
        svidcar_server,
        svidcar_client_full: Arc::new(full),
        svidcar_client_resume,
        svidcar_client_aes128: Arc::new(aes128),
        svidcar_client_x25519: Arc::new(x25519),
        plain_server: Arc::new(plain_server),
        plain_client: Arc::new(plain_client),
    })
}

fn bench(c: &mut Criterion) {
    let s = match setup() {
        Ok(s) => s,
        Err(e) => panic!("S5 setup failed: {e}"),
    };
    let ip = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let dns: ServerName<'static> = match ServerName::try_from("server.bench") {
        Ok(n) => n,
        Err(e) => panic!("{e}"),
    };
    // Each case must work before it is timed.
    for (name, cc, sc, n) in [
        (
            "svidcar_full",
            &s.svidcar_client_full,
            &s.svidcar_server,
            &ip,
        ),
        (
            "svidcar_resumed",
            &s.svidcar_client_resume,
            &s.svidcar_server,
            &ip,
        ),
        (
            "svidcar_full_aes128",
            &s.svidcar_client_aes128,
            &s.svidcar_server,
            &ip,
        ),
        (
            "svidcar_full_x25519",
            &s.svidcar_client_x25519,
            &s.svidcar_server,
            &ip,
        ),
        ("rustls_plain_full", &s.plain_client, &s.plain_server, &dns),
    ] {
        if let Err(e) = one(cc, sc, n) {
            panic!("{name}: handshake failed: {e}");
        }
    }
    let mut g = c.benchmark_group("S5_mutual_handshake");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("svidcar_full", |b| {
        b.iter(|| one(&s.svidcar_client_full, &s.svidcar_server, &ip).is_ok())
    });
    g.bench_function("svidcar_resumed", |b| {
        b.iter(|| one(&s.svidcar_client_resume, &s.svidcar_server, &ip).is_ok())
    });
    g.bench_function("svidcar_full_aes128", |b| {
        b.iter(|| one(&s.svidcar_client_aes128, &s.svidcar_server, &ip).is_ok())
    });
    g.bench_function("svidcar_full_x25519", |b| {
        b.iter(|| one(&s.svidcar_client_x25519, &s.svidcar_server, &ip).is_ok())
    });
    g.bench_function("rustls_plain_full", |b| {
        b.iter(|| one(&s.plain_client, &s.plain_server, &dns).is_ok())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
