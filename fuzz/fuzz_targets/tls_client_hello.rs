//! Arbitrary bytes from a would-be mesh peer into the inbound TLS server: the svidcar server
//! config (`svidcar_agent::tls::server_config`: TLS 1.3 only, mandatory SPIFFE client auth,
//! ALPN `svidcar/1`) built from the fixture SVID, fed through a rustls `ServerConnection`; and
//! the same bytes through rustls' ClientHello `Acceptor` (how SNI would be peeked before
//! choosing a config). Nothing may panic, and no input may complete a handshake without a
//! client certificate.
//!
//! Not covered yet: a dedicated SNI/Host peeking function in `proxy/src/detect.rs` (today it
//! only peeks the first byte); add it here when it exists.
#![no_main]

use std::io::{Cursor, Read};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use rustls::server::{Acceptor, ServerConnection};
use rustls::ServerConfig;
use svidcar_agent::tls::{server_config, ServerResumption};
use svidcar_agent::{Bundle, BundleSet, TrustDomain, X509Svid};

const CA: &[u8] = include_bytes!("../fixtures/ca.der");
const LEAF: &[u8] = include_bytes!("../fixtures/leaf.der");
const LEAF_KEY: &[u8] = include_bytes!("../fixtures/leaf-key.p8");

fn config() -> Arc<ServerConfig> {
    static C: OnceLock<Arc<ServerConfig>> = OnceLock::new();
    C.get_or_init(|| {
        let td = TrustDomain::parse("fuzz.test").expect("td");
        let mut bundles = BundleSet::new();
        bundles.insert(Bundle::from_x509_der_concat(td, CA).expect("ca"));
        let svid = X509Svid::from_der(LEAF, LEAF_KEY, "").expect("fixture SVID");
        let resumption = ServerResumption::new(16).expect("resumption");
        server_config(&svid, Arc::new(bundles), &resumption).expect("server config")
    })
    .clone()
}

fn drive(conn: &mut ServerConnection, data: &[u8]) {
    let mut input = Cursor::new(data);
    let mut sink = Vec::new();
    loop {
        match conn.read_tls(&mut input) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if conn.process_new_packets().is_err() {
            let _ = conn.write_tls(&mut sink);
            return;
        }
        while conn.wants_write() {
            sink.clear();
            if conn.write_tls(&mut sink).is_err() {
                break;
            }
        }
        let mut plain = [0u8; 1024];
        let _ = conn.reader().read(&mut plain);
    }
    if !conn.is_handshaking() {
        assert!(
            conn.peer_certificates().is_some_and(|c| !c.is_empty()),
            "handshake completed without a client certificate"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut acceptor = Acceptor::default();
    let mut input = Cursor::new(data);
    while let Ok(n) = acceptor.read_tls(&mut input) {
        if n == 0 {
            break;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                if let Some(sni) = hello.server_name() {
                    assert!(!sni.is_empty());
                }
                let _ = hello.alpn().map(|a| a.count());
                break;
            }
            Ok(None) => continue,
            Err(_) => break,
        }
    }
    if let Ok(mut conn) = ServerConnection::new(config()) {
        drive(&mut conn, data);
    }
});
