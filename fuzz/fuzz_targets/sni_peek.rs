//! The egress ClientHello reader (`svidcar_proxy::client_hello`, what egress policy decides on
//! for TLS passthrough and CONNECT tunnels) against rustls' own ClientHello parser as the
//! reference. Input: the first bytes of a connection as received (any number of TLS records).
//! Invariants: no panic; feeding the bytes in two pieces gives the same result as in one; when
//! rustls accepts the bytes as a complete ClientHello with a server name, the reader either
//! refuses them (stricter: the connection is denied) or read that same name — policy must never
//! decide on a name other than the one the TLS server will see, nor on "no name" when there is
//! one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls::server::Acceptor;
use svidcar_proxy::client_hello::{read_all, sniff, HelloReader, Progress};
use svidcar_proxy::policy::normalize_name;

fuzz_target!(|data: &[u8]| {
    let _ = sniff(data, false);
    let _ = sniff(data, true);
    let ours = read_all(data);
    if let Some(&b) = data.first() {
        let cut = usize::from(b) % data.len();
        let mut r = HelloReader::new();
        let _ = r.feed(&data[..cut]);
        assert_eq!(r.feed(&data[cut..]), ours, "split at {cut}");
        if ours == Progress::NeedMore {
            assert_eq!(r.bytes(), data, "every byte is kept for the replay");
        }
    }

    // The reference: rustls, given the same bytes.
    let mut acceptor = Acceptor::default();
    let mut input = data;
    let accepted = loop {
        match acceptor.read_tls(&mut input) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => break accepted,
            Ok(None) => continue,
            Err(_) => return,
        }
    };
    if let Some(theirs) = accepted.client_hello().server_name() {
        match &ours {
            Progress::Bad(_) => {}
            Progress::Done(Some(name)) => assert_eq!(
                normalize_name(name),
                normalize_name(theirs),
                "the reader's SNI differs from the one the TLS server sees"
            ),
            other => panic!("rustls sees SNI {theirs:?}, the reader says {other:?}"),
        }
    }
});
