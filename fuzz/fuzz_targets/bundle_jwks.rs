//! SPIFFE bundle parsing: the SPIFFE JWKS form (federation files, bundle endpoints), the plain
//! JWT JWKS form (`FetchJWTBundles`) and the concatenated-DER form (`FetchX509Bundles`).
//! Invariant: whatever we accept, we serialize back into something we accept again, unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svidcar_agent::{Bundle, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(td) = TrustDomain::parse("fuzz.test") else {
        return;
    };
    if let Ok(b) = Bundle::from_jwks(td.clone(), data) {
        let again = Bundle::from_jwks(td.clone(), &b.to_jwks())
            .expect("our own SPIFFE JWKS output parses back");
        assert_eq!(again.x509_authorities, b.x509_authorities);
        assert_eq!(
            again.jwt_authorities.keys().collect::<Vec<_>>(),
            b.jwt_authorities.keys().collect::<Vec<_>>()
        );
        assert_eq!(again.sequence, b.sequence);
        assert_eq!(again.refresh_hint, b.refresh_hint);
        let jwt_only = Bundle::from_jwt_jwks(td.clone(), &b.jwt_jwks())
            .expect("our own JWT JWKS output parses back");
        assert_eq!(
            jwt_only.jwt_authorities.keys().collect::<Vec<_>>(),
            b.jwt_authorities.keys().collect::<Vec<_>>()
        );
        let der = Bundle::from_x509_der_concat(td.clone(), &b.x509_der_concat())
            .expect("our own DER concatenation parses back");
        assert_eq!(der.x509_authorities, b.x509_authorities);
    }
    let _ = Bundle::from_jwt_jwks(td.clone(), data);
    let _ = Bundle::from_x509_der_concat(td, data);
});
