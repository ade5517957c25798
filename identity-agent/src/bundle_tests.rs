//! Tests of `bundle.rs`: JWKS parsing and serialization.

use std::time::Duration;

use serde_json::{json, Value};

use super::*;
use crate::svid::tests::root_ca;

fn td() -> TrustDomain {
    TrustDomain::parse("example.org").expect("td")
}

fn ec_jwk(kid: &str) -> Value {
    json!({"kty": "EC", "crv": "P-256", "kid": kid,
           "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
           "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"})
}

fn sample() -> Bundle {
    let mut b = Bundle::new(td());
    b.x509_authorities.push(root_ca("example.org").cert);
    b.x509_authorities.push(root_ca("example.org").cert);
    assert!(b.add_jwt_key(JwtKey::new(ec_jwk("k1"))));
    assert!(b.add_jwt_key(JwtKey::new(
        json!({"kty": "RSA", "kid": "k2", "n": "AQAB", "e": "AQAB"})
    )));
    b.sequence = 42;
    b.refresh_hint = Some(Duration::from_secs(300));
    b
}

#[test]
fn jwks_round_trip() {
    let b = sample();
    let json = b.to_jwks();
    let doc: Value = serde_json::from_slice(&json).expect("json");
    assert_eq!(doc["spiffe_sequence"], 42);
    assert_eq!(doc["spiffe_refresh_hint"], 300);
    let keys = doc["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 4);
    let x509: Vec<&Value> = keys.iter().filter(|k| k["use"] == "x509-svid").collect();
    assert_eq!(x509.len(), 2);
    for k in &x509 {
        assert_eq!(k["kty"], "EC");
        assert_eq!(k["crv"], "P-256");
        assert!(k["x"].is_string() && k["y"].is_string());
        assert_eq!(k["x5c"].as_array().expect("x5c").len(), 1);
        assert!(k.get("kid").is_none());
    }
    let jwt: Vec<&Value> = keys.iter().filter(|k| k["use"] == "jwt-svid").collect();
    assert_eq!(jwt.len(), 2);
    assert!(jwt.iter().all(|k| k["kid"].is_string()));

    let back = Bundle::from_jwks(td(), &json).expect("parses");
    assert_eq!(back.x509_authorities, b.x509_authorities);
    assert_eq!(back.sequence, 42);
    assert_eq!(back.refresh_hint, Some(Duration::from_secs(300)));
    assert_eq!(
        back.jwt_authorities.keys().collect::<Vec<_>>(),
        ["k1", "k2"]
    );
    // Serializing again gives the same document.
    assert_eq!(back.to_jwks(), json);
}

#[test]
fn der_concat_round_trip() {
    let b = sample();
    let concat = b.x509_der_concat();
    let back = Bundle::from_x509_der_concat(td(), &concat).expect("parses");
    assert_eq!(back.x509_authorities, b.x509_authorities);
    assert!(matches!(
        Bundle::from_x509_der_concat(td(), b"nope"),
        Err(BundleError::BadCertificate(_))
    ));
    assert!(Bundle::from_x509_der_concat(td(), &[])
        .expect("empty")
        .is_empty());
}

#[test]
fn empty_key_list_is_a_revoked_bundle() {
    let b = Bundle::from_jwks(td(), br#"{"keys": [], "spiffe_sequence": 7}"#).expect("valid");
    assert!(b.is_empty());
    assert_eq!(b.sequence, 7);
    assert_eq!(b.refresh_hint, None);
}

#[test]
fn unknown_use_is_ignored() {
    let json = json!({"keys": [
        {"use": "wit-svid", "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "w"},
        ec_jwk("k1").as_object().map(|o| {
            let mut o = o.clone();
            o.insert("use".into(), json!("jwt-svid"));
            Value::Object(o)
        }).expect("obj"),
    ]});
    let b = Bundle::from_jwks(td(), json.to_string().as_bytes()).expect("valid");
    assert_eq!(b.jwt_authorities.len(), 1);
    assert!(b.jwt_authorities.contains_key("k1"));
}

#[test]
fn malformed_documents_rejected() {
    for doc in [&b"not json"[..], b"[]", b"{}", br#"{"keys": {}}"#] {
        assert!(
            matches!(Bundle::from_jwks(td(), doc), Err(BundleError::Json(_))),
            "{doc:?}"
        );
    }
    for doc in [
        r#"{"keys": [], "spiffe_sequence": -1}"#,
        r#"{"keys": [], "spiffe_refresh_hint": "5m"}"#,
    ] {
        assert!(matches!(
            Bundle::from_jwks(td(), doc.as_bytes()),
            Err(BundleError::Json(_))
        ));
    }
}

#[test]
fn malformed_keys_rejected_with_index() {
    let cert = STANDARD.encode(root_ca("example.org").cert.as_ref());
    let good = json!({"use": "x509-svid", "kty": "EC", "x5c": [cert]});
    let cases = [
        (json!("string"), "object"),
        (json!({"kty": "EC"}), "\"use\" is missing"),
        (json!({"use": "x509-svid", "kty": "EC"}), "x5c"),
        (
            json!({"use": "x509-svid", "x5c": [cert, cert]}),
            "exactly one",
        ),
        (json!({"use": "x509-svid", "x5c": ["!!!"]}), "base64"),
        (json!({"use": "x509-svid", "x5c": ["AAAA"]}), "DER"),
        (
            json!({"use": "jwt-svid", "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}),
            "kid",
        ),
        (
            json!({"use": "jwt-svid", "kid": "a", "crv": "P-256", "x": "AA", "y": "AA"}),
            "kty",
        ),
        (
            json!({"use": "jwt-svid", "kid": "a", "kty": "EC", "crv": "P-256", "x": "AA"}),
            "\"y\"",
        ),
        (
            json!({"use": "jwt-svid", "kid": "a", "kty": "EC", "crv": "P-9", "x": "A", "y": "A"}),
            "curve",
        ),
        (
            json!({"use": "jwt-svid", "kid": "a", "kty": "RSA", "n": "AQAB"}),
            "\"e\"",
        ),
        (
            json!({"use": "jwt-svid", "kid": "a", "kty": "oct", "k": "AA"}),
            "kty",
        ),
    ];
    for (bad, reason) in cases {
        let doc = json!({"keys": [good, bad]}).to_string();
        match Bundle::from_jwks(td(), doc.as_bytes()) {
            Err(BundleError::BadKey {
                index: 1,
                reason: r,
            }) => {
                assert!(r.contains(reason), "{r:?} should mention {reason:?}")
            }
            other => panic!("{bad}: expected BadKey at 1, got {other:?}"),
        }
    }
    let mut k = ec_jwk("dup");
    k["use"] = json!("jwt-svid");
    let doc = json!({"keys": [k, k]}).to_string();
    assert!(matches!(
        Bundle::from_jwks(td(), doc.as_bytes()),
        Err(BundleError::BadKey { index: 1, .. })
    ));
}

#[test]
fn bundle_set_keeps_domains_apart() {
    let mut set: BundleSet = [
        sample(),
        Bundle::new(TrustDomain::parse("other.org").expect("td")),
    ]
    .into_iter()
    .collect();
    assert_eq!(set.len(), 2);
    assert_eq!(set.get(&td()).map(|b| b.sequence), Some(42));
    assert!(set.get_by_name("other.org").expect("present").is_empty());
    assert!(set.remove(&td()).is_some());
    assert!(set.get(&td()).is_none());
}

#[test]
fn jwt_only_jwks() {
    let doc: Value = serde_json::from_slice(&sample().jwt_jwks()).expect("json");
    let keys = doc["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().all(|k| k["use"] == "jwt-svid"));
}

#[test]
fn plain_jwt_jwks_without_use() {
    // go-spiffe / SPIRE JWT bundles: no "use", kid on every key.
    let doc = json!({"keys": [ec_jwk("a"), {"use": "x509-svid", "x5c": []}]}).to_string();
    let b = Bundle::from_jwt_jwks(td(), doc.as_bytes()).expect("valid");
    assert_eq!(b.jwt_authorities.keys().collect::<Vec<_>>(), ["a"]);
    assert!(b.x509_authorities.is_empty());
    let doc = json!({"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}).to_string();
    assert!(matches!(
        Bundle::from_jwt_jwks(td(), doc.as_bytes()),
        Err(BundleError::BadKey { index: 0, .. })
    ));
    // Our own jwt_jwks output parses back.
    let back = Bundle::from_jwt_jwks(td(), &sample().jwt_jwks()).expect("valid");
    assert_eq!(
        back.jwt_authorities.keys().collect::<Vec<_>>(),
        ["k1", "k2"]
    );
    assert_eq!(back.jwt_authorities["k1"].jwk["x"], ec_jwk("k1")["x"]);
    // ... with its spiffe_sequence and refresh hint (svidcar's agent sends them on
    // FetchJWTBundles; SPIRE's does not, and then they stay 0 / none).
    assert_eq!(back.sequence, sample().sequence);
    assert_eq!(back.refresh_hint, sample().refresh_hint);
}
