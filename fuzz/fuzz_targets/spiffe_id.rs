//! SPIFFE ID and trust domain parsing (strict and lenient), and the outbound "expected peer"
//! parser built on them. Checks the invariants the rest of svidcar relies on: a parsed ID
//! re-parses to itself, its parts are consistent and within the standard's limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svidcar_agent::spiffe_id::{MAX_SPIFFE_ID_LEN, MAX_TRUST_DOMAIN_LEN};
use svidcar_agent::tls::ExpectedPeer;
use svidcar_agent::{SpiffeId, TrustDomain};

fn check_id(id: &SpiffeId) {
    let text = id.as_str();
    assert!(text.len() <= MAX_SPIFFE_ID_LEN);
    assert!(text.starts_with("spiffe://"));
    let td = id.trust_domain();
    assert!(!td.name().is_empty() && td.name().len() <= MAX_TRUST_DOMAIN_LEN);
    assert_eq!(td.name(), id.trust_domain_name());
    assert_eq!(format!("spiffe://{}{}", td.name(), id.path()), text);
    let again = SpiffeId::parse(text).expect("a parsed ID re-parses");
    assert_eq!(&again, id);
    assert_eq!(SpiffeId::from_parts(&td, id.path()).as_ref(), Ok(id));
    for seg in id.segments() {
        assert!(!seg.is_empty() && seg != "." && seg != "..");
        assert!(!seg.contains('/'));
    }
    if let Some((ns, sa)) = id.k8s_namespace_and_sa() {
        assert!(!ns.is_empty() && !sa.is_empty());
    }
    assert_eq!(TrustDomain::parse(&td.id_string()).as_ref(), Ok(&td));
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(s) {
        assert_eq!(id.as_str(), s, "strict parsing never rewrites the ID");
        check_id(&id);
    }
    if let Ok(id) = SpiffeId::parse_lenient(s) {
        check_id(&id);
    }
    if let Ok(td) = TrustDomain::parse(s) {
        assert_eq!(TrustDomain::parse(td.name()).as_ref(), Ok(&td));
    }
    let _ = TrustDomain::parse_lenient(s);
    if let Ok(ExpectedPeer::Id(id)) = ExpectedPeer::parse(s) {
        check_id(&id);
    }
});
