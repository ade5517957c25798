//! Tests of `jwt.rs`: one test per rejection rule, plus signing and RSA interop.

use std::time::{Duration, SystemTime};

use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::RsaKeyPair;
use serde_json::{json, Value};

use super::*;
use crate::bundle::Bundle;
use crate::spiffe_id::TrustDomain;

const SUB: &str = "spiffe://example.org/ns/a/sa/b";
const AUD: &str = "svc-b";

fn setup() -> (JwtSigner, BundleSet) {
    let signer = JwtSigner::generate_with_kid("key-1").expect("key");
    let mut bundle = Bundle::new(TrustDomain::parse("example.org").expect("td"));
    assert!(bundle.add_jwt_key(signer.jwt_key()));
    let mut set = BundleSet::new();
    set.insert(bundle);
    (signer, set)
}

fn sub() -> SpiffeId {
    SpiffeId::parse(SUB).expect("id")
}

fn now_secs() -> u64 {
    unix_secs(SystemTime::now())
}

fn header() -> Value {
    json!({"alg": "ES256", "typ": "JWT", "kid": "key-1"})
}

fn claims() -> Value {
    json!({"sub": SUB, "aud": [AUD], "exp": now_secs() + 300, "iat": now_secs()})
}

fn check(token: &str, bundles: &BundleSet) -> Result<ValidatedJwt, JwtError> {
    validate(token, AUD, bundles, SystemTime::now())
}

#[test]
fn signed_token_validates() {
    let (signer, bundles) = setup();
    let token = signer
        .sign(&sub(), &[AUD.to_string()], Duration::from_secs(300))
        .expect("sign");
    let v = check(&token, &bundles).expect("valid");
    assert_eq!(v.id, sub());
    assert_eq!(v.claims["aud"], json!(AUD));
    assert!(v.expiry().expect("exp") > SystemTime::now());
    let head: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').next().expect("h"))
            .expect("b64"),
    )
    .expect("json");
    assert_eq!(head, json!({"alg": "ES256", "typ": "JWT", "kid": "key-1"}));

    let many = [AUD.to_string(), "other".to_string()];
    let token = signer
        .sign(&sub(), &many, Duration::from_secs(60))
        .expect("sign");
    let v = validate(&token, "other", &bundles, SystemTime::now()).expect("valid");
    assert_eq!(v.claims["aud"], json!(many));
    assert!(matches!(
        signer.sign(&sub(), &[], Duration::from_secs(1)),
        Err(JwtError::Signing(_))
    ));
}

#[test]
fn public_jwk_is_an_ec_jwk_with_kid() {
    let (signer, _) = setup();
    let jwk = signer.public_jwk().jwk;
    assert_eq!(jwk["kty"], "EC");
    assert_eq!(jwk["crv"], "P-256");
    assert_eq!(jwk["kid"], "key-1");
    for c in ["x", "y"] {
        let bytes = URL_SAFE_NO_PAD
            .decode(jwk[c].as_str().expect("coord"))
            .expect("b64");
        assert_eq!(bytes.len(), 32);
    }
    // The JWK survives a bundle JWKS round trip and still verifies.
    let mut bundle = Bundle::new(TrustDomain::parse("example.org").expect("td"));
    bundle.add_jwt_key(signer.jwt_key());
    let back = Bundle::from_jwks(bundle.trust_domain.clone(), &bundle.to_jwks()).expect("jwks");
    let mut set = BundleSet::new();
    set.insert(back);
    let token = signer
        .sign(&sub(), &[AUD.to_string()], Duration::from_secs(60))
        .expect("sign");
    check(&token, &set).expect("valid after round trip");
    // The key survives PKCS#8 persistence.
    let again = JwtSigner::from_pkcs8("key-1", &signer.to_pkcs8().expect("pkcs8")).expect("load");
    assert_eq!(again.public_jwk().jwk, jwk);
    assert!(!format!("{signer:?}").contains("key:"));
    let random = JwtSigner::generate().expect("key");
    assert_eq!(random.kid().len(), 32);
    assert_ne!(random.kid(), JwtSigner::generate().expect("key").kid());
}

#[test]
fn alg_none_rejected() {
    let (_, bundles) = setup();
    let token = format!(
        "{}.{}.",
        b64_json(&json!({"alg": "none", "kid": "key-1"})),
        b64_json(&claims())
    );
    assert_eq!(
        check(&token, &bundles),
        Err(JwtError::DisallowedAlg("none".into()))
    );
}

#[test]
fn hs256_and_eddsa_rejected() {
    let (signer, bundles) = setup();
    for alg in ["HS256", "EdDSA", ""] {
        let mut h = header();
        h["alg"] = json!(alg);
        let token = signer.sign_parts(&h, &claims()).expect("sign");
        assert_eq!(
            check(&token, &bundles),
            Err(JwtError::DisallowedAlg(alg.into()))
        );
    }
}

#[test]
fn wrong_audience_rejected() {
    let (signer, bundles) = setup();
    let token = signer
        .sign(&sub(), &["svc-c".to_string()], Duration::from_secs(60))
        .expect("sign");
    assert_eq!(
        check(&token, &bundles),
        Err(JwtError::WrongAudience {
            expected: AUD.into(),
            actual: vec!["svc-c".into()]
        })
    );
}

#[test]
fn expired_rejected() {
    let (signer, bundles) = setup();
    let past = SystemTime::now() - Duration::from_secs(600);
    let token = signer
        .sign_at(&sub(), &[AUD.to_string()], Duration::from_secs(60), past)
        .expect("sign");
    assert!(matches!(check(&token, &bundles), Err(JwtError::Expired(_))));
    let mut c = claims();
    c["nbf"] = json!(now_secs() + 100);
    let token = signer.sign_parts(&header(), &c).expect("sign");
    assert!(matches!(
        check(&token, &bundles),
        Err(JwtError::NotYetValid(_))
    ));
}

#[test]
fn unknown_kid_and_domain_rejected() {
    let (signer, bundles) = setup();
    let mut h = header();
    h["kid"] = json!("key-2");
    let token = signer.sign_parts(&h, &claims()).expect("sign");
    assert_eq!(
        check(&token, &bundles),
        Err(JwtError::UnknownKid {
            kid: "key-2".into(),
            trust_domain: "example.org".into()
        })
    );
    let mut c = claims();
    c["sub"] = json!("spiffe://other.org/x");
    let token = signer.sign_parts(&header(), &c).expect("sign");
    assert_eq!(
        check(&token, &bundles),
        Err(JwtError::UnknownTrustDomain("other.org".into()))
    );
}

#[test]
fn missing_kid_rejected() {
    let (signer, bundles) = setup();
    let mut h = header();
    h.as_object_mut().expect("obj").remove("kid");
    let token = signer.sign_parts(&h, &claims()).expect("sign");
    assert_eq!(check(&token, &bundles), Err(JwtError::MissingKid));
}

#[test]
fn bad_signature_rejected() {
    let (signer, bundles) = setup();
    // Same kid, different key.
    let impostor = JwtSigner::generate_with_kid("key-1").expect("key");
    let token = impostor
        .sign(&sub(), &[AUD.to_string()], Duration::from_secs(60))
        .expect("sign");
    assert_eq!(check(&token, &bundles), Err(JwtError::BadSignature));
    // Claims changed after signing.
    let token = signer
        .sign(&sub(), &[AUD.to_string()], Duration::from_secs(60))
        .expect("sign");
    let parts: Vec<&str> = token.split('.').collect();
    let mut c = claims();
    c["sub"] = json!("spiffe://example.org/admin");
    let forged = format!("{}.{}.{}", parts[0], b64_json(&c), parts[2]);
    assert_eq!(check(&forged, &bundles), Err(JwtError::BadSignature));
    // ES384 header with a P-256 key: the key cannot verify it.
    let mut h = header();
    h["alg"] = json!("ES384");
    let token = signer.sign_parts(&h, &claims()).expect("sign");
    assert!(matches!(
        check(&token, &bundles),
        Err(JwtError::KeyMismatch { .. })
    ));
}

#[test]
fn missing_exp_and_aud_rejected() {
    let (signer, bundles) = setup();
    let mut c = claims();
    c.as_object_mut().expect("obj").remove("exp");
    let token = signer.sign_parts(&header(), &c).expect("sign");
    assert_eq!(check(&token, &bundles), Err(JwtError::MissingExpiry));
    let mut c = claims();
    c.as_object_mut().expect("obj").remove("aud");
    let token = signer.sign_parts(&header(), &c).expect("sign");
    assert_eq!(check(&token, &bundles), Err(JwtError::MissingAudience));
    let mut c = claims();
    c["aud"] = json!([]);
    let token = signer.sign_parts(&header(), &c).expect("sign");
    assert_eq!(check(&token, &bundles), Err(JwtError::MissingAudience));
}

#[test]
fn non_spiffe_sub_rejected() {
    let (signer, bundles) = setup();
    for bad in [
        json!("user@example.org"),
        json!("https://example.org/x"),
        json!(7),
    ] {
        let mut c = claims();
        c["sub"] = bad.clone();
        let token = signer.sign_parts(&header(), &c).expect("sign");
        assert!(
            matches!(check(&token, &bundles), Err(JwtError::BadSubject(..))),
            "{bad}"
        );
    }
    let mut c = claims();
    c.as_object_mut().expect("obj").remove("sub");
    let token = signer.sign_parts(&header(), &c).expect("sign");
    assert_eq!(check(&token, &bundles), Err(JwtError::MissingSubject));
}

#[test]
fn malformed_tokens_rejected() {
    let (_, bundles) = setup();
    for token in ["", "a.b", "a.b.c.d", "!!.e30.", "e30.e30.e30"] {
        let err = check(token, &bundles).unwrap_err();
        assert!(
            matches!(err, JwtError::Malformed(_) | JwtError::DisallowedAlg(_)),
            "{token}: {err}"
        );
    }
}

#[test]
fn rs256_and_ps256_verify_with_rsa_jwk() {
    let rsa = RsaKeyPair::generate(KeySize::Rsa2048).expect("rsa");
    let components = rsa.public_key();
    let n = aws_lc_rs::signature::RsaPublicKeyComponents::<Vec<u8>>::from(components);
    let jwk = json!({"kty": "RSA", "kid": "rsa-1", "n": URL_SAFE_NO_PAD.encode(&n.n),
                     "e": URL_SAFE_NO_PAD.encode(&n.e)});
    let mut bundle = Bundle::new(TrustDomain::parse("example.org").expect("td"));
    bundle.add_jwt_key(JwtKey::new(jwk));
    let mut set = BundleSet::new();
    set.insert(bundle);
    for (alg, padding) in [
        (
            "RS256",
            &aws_lc_rs::signature::RSA_PKCS1_SHA256 as &dyn aws_lc_rs::signature::RsaEncoding,
        ),
        ("PS256", &aws_lc_rs::signature::RSA_PSS_SHA256),
    ] {
        let input = format!(
            "{}.{}",
            b64_json(&json!({"alg": alg, "kid": "rsa-1"})),
            b64_json(&claims())
        );
        let mut sig = vec![0; rsa.public_modulus_len()];
        rsa.sign(padding, &SystemRandom::new(), input.as_bytes(), &mut sig)
            .expect("sign");
        let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&sig));
        check(&token, &set).unwrap_or_else(|e| panic!("{alg}: {e}"));
    }
}

/// Regression (fuzz/jwt_validate): a validly signed token with an `exp` beyond what `SystemTime`
/// can hold made `ValidatedJwt::expiry` panic, then (after a first fix) validated as a token that
/// never expires. A time outside 1970..=9999 is now malformed, so every validated token has a
/// representable expiry.
#[test]
fn out_of_range_exp_is_malformed() {
    let (signer, bundles) = setup();
    for exp in [
        json!(1e300),
        json!(20_999_999_999_999_900_000_000u128 as f64),
        json!(-5),
    ] {
        let mut c = claims();
        c["exp"] = exp.clone();
        let token = signer.sign_parts(&header(), &c).expect("sign");
        match check(&token, &bundles) {
            Err(JwtError::Malformed(m)) => assert!(m.contains("\"exp\""), "{m}"),
            other => panic!("exp {exp}: expected Malformed, got {other:?}"),
        }
    }
    let v = check(
        &signer.sign_parts(&header(), &claims()).expect("sign"),
        &bundles,
    )
    .expect("a normal token validates");
    assert!(v.expiry().is_some());
}
