//! The SPIFFE rustls verifiers and config builders (identity-agent/src/tls.rs), in-process over
//! real TCP sockets with rcgen-made SVIDs: mutual authentication and peer IDs, ALPN and TLS 1.3,
//! expected-ID enforcement (exact and trust domain), foreign trust domains refused, and session
//! resumption that survives a server credential rotation.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::HandshakeKind;
use svidcar_agent::tls::{self, ExpectedPeer, ServerResumption};
use svidcar_agent::{Bundle, BundleSet, SpiffeId, TrustDomain, X509Svid};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Ca {
    td: String,
    der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(td: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
    let cert = p.self_signed(&key).unwrap();
    Ca {
        td: td.into(),
        der: cert.der().to_vec(),
        issuer: Issuer::new(p, key),
    }
}

fn svid(ca: &Ca, path: &str) -> X509Svid {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{}/{path}", ca.td).try_into().unwrap(),
    )];
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    X509Svid::from_der(cert.der(), &key.serialize_der(), "").unwrap()
}

fn bundles(cas: &[&Ca]) -> Arc<BundleSet> {
    let mut set = BundleSet::new();
    for ca in cas {
        set.insert(
            Bundle::from_x509_der_concat(TrustDomain::parse(&ca.td).unwrap(), &ca.der).unwrap(),
        );
    }
    Arc::new(set)
}

/// Serves one connection with `config`; returns (peer id, error label).
async fn serve_one(
    listener: &TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> Result<Option<SpiffeId>, &'static str> {
    let (tcp, _) = listener.accept().await.unwrap();
    match tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
        Ok(mut tls) => {
            let peer = tls::peer_spiffe_id(tls.get_ref().1);
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(tls::ALPN_SVIDCAR));
            assert_eq!(
                tls.get_ref().1.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            tls.write_all(b"hi").await.unwrap();
            tls.shutdown().await.unwrap();
            Ok(peer)
        }
        Err(e) => Err(tls::classify_handshake_error(&e).0),
    }
}

/// Connects with `config`; returns (server id, handshake kind) or the error label.
async fn connect(
    port: u16,
    config: Arc<rustls::ClientConfig>,
) -> Result<(Option<SpiffeId>, Option<HandshakeKind>), &'static str> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("backend.test").unwrap();
    match tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
    {
        Ok(mut tls) => {
            let mut buf = Vec::new();
            tls.read_to_end(&mut buf)
                .await
                .map_err(|e| tls::classify_handshake_error(&e).0)?;
            assert_eq!(buf, b"hi");
            let c = tls.get_ref().1;
            Ok((tls::peer_spiffe_id(c), c.handshake_kind()))
        }
        Err(e) => Err(tls::classify_handshake_error(&e).0),
    }
}

#[tokio::test]
async fn mutual_spiffe_auth_expected_ids_and_resumption() {
    let a = ca("a.test");
    let (server_svid, client_svid) = (svid(&a, "backend"), svid(&a, "frontend"));
    let set = bundles(&[&a]);
    let resumption = ServerResumption::new(64).unwrap();
    let server = tls::server_config(&server_svid, set.clone(), &resumption).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();

    let backend = SpiffeId::parse("spiffe://a.test/backend").unwrap();
    let store = tls::client_session_store(16);
    let client = tls::client_config(
        &client_svid,
        set.clone(),
        ExpectedPeer::Id(backend.clone()),
        store.clone(),
    )
    .unwrap();

    // Full handshake, both IDs seen.
    let (s, c) = tokio::join!(
        serve_one(&listener, server.clone()),
        connect(port, client.clone())
    );
    assert_eq!(
        s.unwrap(),
        Some(SpiffeId::parse("spiffe://a.test/frontend").unwrap())
    );
    assert_eq!(
        c.unwrap(),
        (Some(backend.clone()), Some(HandshakeKind::Full))
    );

    // Resumed, also after the server's credentials rotated (same resumption state).
    let rotated = tls::server_config(&svid(&a, "backend"), set.clone(), &resumption).unwrap();
    let (s, c) = tokio::join!(serve_one(&listener, rotated), connect(port, client.clone()));
    assert!(
        s.unwrap().is_some(),
        "resumed session lost the client identity"
    );
    assert_eq!(c.unwrap().1, Some(HandshakeKind::Resumed));

    // A trust-domain expectation accepts; another exact ID is a failed call.
    let td = ExpectedPeer::parse("a.test").unwrap();
    let client_td =
        tls::client_config(&client_svid, set.clone(), td, tls::client_session_store(4)).unwrap();
    let (_, c) = tokio::join!(
        serve_one(&listener, server.clone()),
        connect(port, client_td)
    );
    assert_eq!(c.unwrap().0, Some(backend));
    let other = ExpectedPeer::parse("spiffe://a.test/payments").unwrap();
    let client_other = tls::client_config(
        &client_svid,
        set.clone(),
        other,
        tls::client_session_store(4),
    )
    .unwrap();
    let (_, c) = tokio::join!(
        serve_one(&listener, server.clone()),
        connect(port, client_other)
    );
    assert_eq!(c.unwrap_err(), "unexpected_peer_id");

    // A client of a trust domain we have no bundle for is refused by the server.
    let b = ca("b.test");
    let intruder = svid(&b, "intruder");
    let both = bundles(&[&a, &b]);
    let client_b = tls::client_config(
        &intruder,
        both,
        ExpectedPeer::parse("a.test").unwrap(),
        tls::client_session_store(4),
    )
    .unwrap();
    let (s, c) = tokio::join!(
        serve_one(&listener, server.clone()),
        connect(port, client_b)
    );
    assert_eq!(s.unwrap_err(), "unknown_trust_domain");
    assert!(c.is_err());
}

#[test]
fn expected_peer_parsing() {
    assert!(matches!(
        ExpectedPeer::parse("spiffe://td.org/ns/a/sa/b").unwrap(),
        ExpectedPeer::Id(_)
    ));
    assert!(matches!(
        ExpectedPeer::parse("spiffe://td.org").unwrap(),
        ExpectedPeer::TrustDomain(_)
    ));
    assert!(matches!(
        ExpectedPeer::parse("td.org").unwrap(),
        ExpectedPeer::TrustDomain(_)
    ));
    assert!(ExpectedPeer::parse("spiffe://TD/x y").is_err());
    let id = SpiffeId::parse("spiffe://td.org/x").unwrap();
    assert!(ExpectedPeer::parse("td.org").unwrap().matches(&id));
    assert!(!ExpectedPeer::parse("other.org").unwrap().matches(&id));
}
