//! SNI peeking (`svidcar_proxy::detect::client_hello_sni`, what egress policy decides on for TLS
//! passthrough) against rustls' own ClientHello parser as the reference. Input: the first TLS
//! record as received. Invariants: no panic; when rustls accepts the record as a complete
//! ClientHello with a server name, the peeked SNI is that same name — policy must never decide
//! on a name other than the one the TLS server will see.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls::server::Acceptor;
use svidcar_proxy::detect::client_hello_sni;
use svidcar_proxy::policy::normalize_name;

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        let _ = client_hello_sni(data);
        return;
    }
    let record_len = 5 + usize::from(u16::from_be_bytes([data[3], data[4]]));
    let first = &data[5..data.len().min(record_len)];
    let ours = client_hello_sni(first);

    // The reference: rustls, given only this one record.
    if data.len() < record_len || data[0] != 0x16 {
        return;
    }
    let mut acceptor = Acceptor::default();
    let mut input = &data[..record_len];
    if acceptor.read_tls(&mut input).is_err() {
        return;
    }
    let Ok(Some(accepted)) = acceptor.accept() else {
        return;
    };
    if let Some(theirs) = accepted.client_hello().server_name() {
        let ours = ours.expect("rustls sees an SNI that the peek missed");
        assert_eq!(
            normalize_name(&ours),
            normalize_name(theirs),
            "peeked SNI differs from the one the TLS server sees"
        );
    }
});
