//! Tests of `tls_resume.rs` with real rustls handshakes in memory (rcgen-made SVIDs).

use std::sync::{Arc, Mutex};

use rustls::pki_types::{ServerName, UnixTime};
use rustls::server::ProducesTickets;
use rustls::{ClientConnection, HandshakeKind, ServerConnection};

use super::*;
use crate::svid::tests::{bundles_of, leaf, leaf_params, root_ca, TestCa};
use crate::tls::{client_config, client_session_store, server_config, ServerResumption};
use crate::X509Svid;

fn svid(ca: &TestCa, id: &str) -> X509Svid {
    let (der, key) = leaf(ca, &leaf_params(id));
    X509Svid::from_der(&der, &key, "").expect("svid")
}

/// Moves bytes between the two ends until neither has anything to say; the first error wins.
fn pump(c: &mut ClientConnection, s: &mut ServerConnection) -> Result<(), rustls::Error> {
    loop {
        let mut moved = false;
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).expect("write");
        }
        if !buf.is_empty() {
            moved = true;
            let mut r = &buf[..];
            while !r.is_empty() {
                s.read_tls(&mut r).expect("read");
            }
            s.process_new_packets()?;
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).expect("write");
        }
        if !buf.is_empty() {
            moved = true;
            let mut r = &buf[..];
            while !r.is_empty() {
                c.read_tls(&mut r).expect("read");
            }
            c.process_new_packets()?;
        }
        if !moved {
            return Ok(());
        }
    }
}

/// One handshake; the finished pair, or the first error.
fn handshake(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
) -> Result<(ClientConnection, ServerConnection), rustls::Error> {
    let name = ServerName::try_from("backend.test").expect("name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client");
    let mut s = ServerConnection::new(server.clone()).expect("server");
    pump(&mut c, &mut s)?;
    assert!(!c.is_handshaking() && !s.is_handshaking());
    Ok((c, s))
}

/// Remembers the plaintext of every ticket it issues.
#[derive(Debug)]
struct Capture {
    inner: Arc<dyn ProducesTickets>,
    seen: Mutex<Vec<Vec<u8>>>,
}

impl ProducesTickets for Capture {
    fn enabled(&self) -> bool {
        true
    }
    fn lifetime(&self) -> u32 {
        self.inner.lifetime()
    }
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seen.lock().unwrap().push(plain.to_vec());
        self.inner.encrypt(plain)
    }
    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.inner.decrypt(cipher)
    }
}

struct Setup {
    bundles: Arc<BundleSet>,
    resumption: ServerResumption,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    client_chain: Vec<CertificateDer<'static>>,
}

fn setup() -> Setup {
    let ca = root_ca("a.test");
    let bundles = Arc::new(bundles_of(&[("a.test", &ca)]));
    let resumption = ServerResumption::new(16).expect("resumption");
    let server_svid = svid(&ca, "spiffe://a.test/backend");
    let client_svid = svid(&ca, "spiffe://a.test/frontend");
    let server = server_config(&server_svid, bundles.clone(), &resumption).expect("server");
    let expected = ExpectedPeer::parse("spiffe://a.test/backend").expect("expected");
    let store = client_session_store(8);
    let client = client_config(&client_svid, bundles.clone(), expected, store).expect("client");
    Setup {
        bundles,
        resumption,
        server,
        client,
        client_chain: client_svid.chain.clone(),
    }
}

#[test]
fn the_client_chain_is_read_from_a_real_ticket() {
    let s = setup();
    let capture = Arc::new(Capture {
        inner: s.resumption.ticketer.clone(),
        seen: Mutex::new(Vec::new()),
    });
    let mut server = Arc::unwrap_or_clone(s.server.clone());
    server.ticketer = capture.clone();
    handshake(&s.client, &Arc::new(server)).expect("handshake");
    let seen = capture.seen.lock().unwrap();
    assert!(!seen.is_empty(), "no ticket issued");
    for plain in seen.iter() {
        assert_eq!(
            ticket_client_chain(plain).as_deref(),
            Some(&s.client_chain[..])
        );
        // Cut anywhere: unreadable or the whole chain, never a partial one.
        for cut in 0..plain.len() {
            let got = ticket_client_chain(&plain[..cut]);
            assert!(
                got.is_none() || got.as_deref() == Some(&s.client_chain[..]),
                "cut at {cut}"
            );
        }
        assert_eq!(ticket_client_chain(&plain[..plain.len() / 2]), None);
    }
    assert_eq!(ticket_client_chain(b""), None);
    assert_eq!(ticket_client_chain(&[0, 0x03, 0x04, 0, 0, 0, 0, 0]), None);
}

#[test]
fn a_session_resumes_only_while_its_client_chain_verifies() {
    let s = setup();
    let (c, _) = handshake(&s.client, &s.server).expect("full");
    assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full));
    let (c, srv) = handshake(&s.client, &s.server).expect("resumed");
    assert_eq!(c.handshake_kind(), Some(HandshakeKind::Resumed));
    assert_eq!(srv.handshake_kind(), Some(HandshakeKind::Resumed));
    assert_eq!(
        srv.peer_certificates().map(|c| c.to_vec()),
        Some(s.client_chain.clone())
    );

    // The client's trust domain leaves the bundles in force: its tickets are not resumed (this
    // server config's own verifier still knows the old bundles, so the fallback is a full
    // handshake that succeeds — what matters is that the ticket did not decide).
    s.resumption.guard.set_bundles(Arc::new(BundleSet::new()));
    let (c, srv) = handshake(&s.client, &s.server).expect("full again");
    assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full));
    assert_eq!(srv.handshake_kind(), Some(HandshakeKind::Full));

    // Back under bundles that hold it: resumed again.
    s.resumption.guard.set_bundles(s.bundles.clone());
    let (c, _) = handshake(&s.client, &s.server).expect("resumed again");
    assert_eq!(c.handshake_kind(), Some(HandshakeKind::Resumed));
}

#[test]
fn a_guard_without_bundles_resumes_nothing() {
    let s = setup();
    let fresh = ServerResumption::new(4).expect("resumption");
    let mut server = Arc::unwrap_or_clone(s.server.clone());
    server.ticketer = fresh.ticketer.clone();
    server.session_storage = fresh.cache.clone();
    let server = Arc::new(server);
    handshake(&s.client, &server).expect("full");
    let (c, _) = handshake(&s.client, &server).expect("not resumed");
    assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full));
}

#[test]
fn recheck_verifies_the_restored_chain_of_a_resumed_connection() {
    let s = setup();
    let chains = VerifiedChains::new(8);
    let empty = Arc::new(BundleSet::new());
    let backend = ExpectedPeer::parse("spiffe://a.test/backend").unwrap();
    let other = ExpectedPeer::parse("spiffe://a.test/payments").unwrap();

    let (c, srv) = handshake(&s.client, &s.server).expect("full");
    // A full handshake was verified by the verifier: nothing to do, whatever the bundles.
    recheck_resumed(&c, &empty, PeerRole::Server, Some(&other), &chains).expect("full");
    recheck_resumed(&srv, &empty, PeerRole::Client, None, &chains).expect("full");

    let (c, srv) = handshake(&s.client, &s.server).expect("resumed");
    assert_eq!(c.handshake_kind(), Some(HandshakeKind::Resumed));
    recheck_resumed(&c, &s.bundles, PeerRole::Server, Some(&backend), &chains).expect("valid");
    recheck_resumed(&srv, &s.bundles, PeerRole::Client, None, &chains).expect("valid");
    let e = recheck_resumed(&c, &empty, PeerRole::Server, Some(&backend), &chains).unwrap_err();
    assert!(
        matches!(e, TlsError::Svid(SvidError::UnknownTrustDomain(_))),
        "{e}"
    );
    let e = recheck_resumed(&srv, &empty, PeerRole::Client, None, &chains).unwrap_err();
    assert!(
        matches!(e, TlsError::Svid(SvidError::UnknownTrustDomain(_))),
        "{e}"
    );
    let e = recheck_resumed(&c, &s.bundles, PeerRole::Server, Some(&other), &chains).unwrap_err();
    assert!(matches!(e, TlsError::UnexpectedPeer { .. }), "{e}");
}

#[test]
fn a_cached_verification_ends_with_the_chain_and_the_bundle_set() {
    let ca = root_ca("a.test");
    let bundles = Arc::new(bundles_of(&[("a.test", &ca)]));
    let id = "spiffe://a.test/frontend";
    let mut params = leaf_params(id);
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2090, 1, 1);
    let (der, _) = leaf(&ca, &params);
    let chain = [der];
    let chains = VerifiedChains::new(8);
    let now = UnixTime::now();
    let got = chains.verify(&chain, &bundles, now, PeerRole::Client);
    assert_eq!(got.unwrap().as_str(), id);
    // Cached, but not past the leaf's notAfter.
    let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(4_000_000_000)); // 2096
    let e = chains.verify(&chain, &bundles, later, PeerRole::Client);
    assert!(matches!(e, Err(SvidError::Expired)), "{e:?}");
    // Not under another bundle set (the trust domain left it).
    let e = chains.verify(&chain, &Arc::new(BundleSet::new()), now, PeerRole::Client);
    assert!(matches!(e, Err(SvidError::UnknownTrustDomain(_))), "{e:?}");
    // A chain that failed is not remembered as good.
    let other = root_ca("a.test");
    let foreign = Arc::new(bundles_of(&[("a.test", &other)]));
    assert!(chains
        .verify(&chain, &foreign, now, PeerRole::Client)
        .is_err());
    assert!(chains
        .verify(&chain, &foreign, now, PeerRole::Client)
        .is_err());
    // Full capacity: emptied, still correct.
    let small = VerifiedChains::new(1);
    for _ in 0..3 {
        let (der, _) = leaf(&ca, &leaf_params(id));
        assert!(small
            .verify(&[der], &bundles, now, PeerRole::Client)
            .is_ok());
    }
}
