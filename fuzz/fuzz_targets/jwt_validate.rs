//! JWT-SVID validation against a fixed bundle (trust domain `fuzz.test`, one ES256 key with kid
//! `fuzz-kid`) at a fixed time.
//!
//! First input byte even: the rest is a token, validated as received (header, alg, kid, sub,
//! base64 and JSON handling before the signature check).
//! First byte odd: the rest is `HEADER_JSON \n CLAIMS_JSON`, which the harness signs with the
//! bundle's key, so that the claim checks after the signature (exp, nbf, aud, sub) are reached
//! with arbitrary claims. Invariant: an accepted token has an allowed alg, a SPIFFE `sub` equal
//! to the returned ID, our audience and an `exp` in the future.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use svidcar_agent::jwt::{self, JwtSigner};
use svidcar_agent::{Bundle, BundleSet, TrustDomain};

const KEY: &[u8] = include_bytes!("../fixtures/jwt-key.p8");
const KID: &str = "fuzz-kid";
const AUDIENCE: &str = "fuzz-aud";
/// 2030-03-17: the seed tokens are valid from 2025 to 2035.
const NOW: u64 = 1_900_000_000;

struct Fixture {
    bundles: BundleSet,
    key: EcdsaKeyPair,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let signer = JwtSigner::from_pkcs8(KID, KEY).expect("fixture key");
        let mut bundle = Bundle::new(TrustDomain::parse("fuzz.test").expect("td"));
        assert!(bundle.add_jwt_key(signer.public_jwk()));
        let mut bundles = BundleSet::new();
        bundles.insert(bundle);
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, KEY).expect("key");
        Fixture { bundles, key }
    })
}

fn check(token: &str) {
    let f = fixture();
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    let Ok(v) = jwt::validate(token, AUDIENCE, &f.bundles, now) else {
        return;
    };
    assert_eq!(v.id.trust_domain_name(), "fuzz.test");
    assert_eq!(
        v.claims.get("sub").and_then(|s| s.as_str()),
        Some(v.id.as_str())
    );
    let exp = v.claims.get("exp").and_then(|e| e.as_f64()).expect("exp");
    assert!(exp > NOW as f64, "accepted an expired token");
    let aud = v.claims.get("aud").expect("aud");
    let has_aud = aud.as_str() == Some(AUDIENCE)
        || aud
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(AUDIENCE)));
    assert!(has_aud, "accepted a token for another audience");
    let header = token.trim().split('.').next().unwrap_or_default();
    let header = URL_SAFE_NO_PAD.decode(header).expect("header b64");
    let header: serde_json::Value = serde_json::from_slice(&header).expect("header json");
    assert_eq!(header["alg"], "ES256", "the only key is ES256");
    assert!(v.expiry().is_some_and(|e| e > SystemTime::UNIX_EPOCH));
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if mode % 2 == 0 {
        return check(text);
    }
    let (header, claims) = text.split_once('\n').unwrap_or((text, "{}"));
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let Ok(sig) = fixture().key.sign(&SystemRandom::new(), input.as_bytes()) else {
        return;
    };
    check(&format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())));
});
