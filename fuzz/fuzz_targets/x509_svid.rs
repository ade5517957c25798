//! X.509-SVID validation on arbitrary DER: the leaf structure rules (`check_leaf`), parsing of
//! a Workload API SVID (`X509Svid::from_der` with the fixture key), and chain verification
//! against a fixed bundle (`verify_chain`, trust domain `fuzz.test`, fixture CA, fixed time).
//! Invariant: a chain that verifies has a leaf that passes `check_leaf` with the same ID, in a
//! trust domain we hold a bundle for.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rustls::pki_types::{CertificateDer, UnixTime};
use svidcar_agent::svid::{self, X509Svid};
use svidcar_agent::{Bundle, BundleSet, TrustDomain};

const CA: &[u8] = include_bytes!("../fixtures/ca.der");
const LEAF_KEY: &[u8] = include_bytes!("../fixtures/leaf-key.p8");
/// 2030-03-17, inside the fixture certificates' validity.
const NOW: u64 = 1_900_000_000;

fn bundles() -> &'static BundleSet {
    static B: OnceLock<BundleSet> = OnceLock::new();
    B.get_or_init(|| {
        let td = TrustDomain::parse("fuzz.test").expect("td");
        let bundle = Bundle::from_x509_der_concat(td, CA).expect("fixture CA");
        let mut set = BundleSet::new();
        set.insert(bundle);
        set
    })
}

fuzz_target!(|data: &[u8]| {
    let leaf_id = svid::check_leaf(data).ok();
    if let Some(id) = &leaf_id {
        assert!(id.path().len() > 1, "a leaf ID always has a path");
    }
    let _ = svid::check_signing_cert(data);
    if let Ok(s) = X509Svid::from_der(data, LEAF_KEY, "") {
        assert_eq!(s.id, svid::check_leaf(s.chain[0].as_ref()).expect("leaf"));
        assert_eq!(s.chain_der_concat(), data);
    }
    let Ok(chain) = svid::split_der_chain(data) else {
        return;
    };
    let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(NOW));
    let chain: Vec<CertificateDer<'_>> = chain;
    if let Ok(id) = svid::verify_chain(&chain, bundles(), now) {
        assert_eq!(id.trust_domain_name(), "fuzz.test");
        assert_eq!(
            svid::check_leaf(chain[0].as_ref()).as_ref(),
            Ok(&id),
            "verified leaf passes the structure rules"
        );
    }
});
