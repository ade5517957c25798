//! JWT-SVIDs: signing (ES256, P-256 key held in memory) and validation against the JWT
//! authorities of the bundle of the subject's own trust domain (JWT-SVID standard).
//!
//! Validation accepts `alg` ∈ {RS,ES,PS}{256,384,512} only (never `none`, HS*, EdDSA),
//! requires `kid`, `sub` (a SPIFFE ID), `aud` (string or array) and `exp`, and checks `nbf` when
//! present. Claims are parsed before the signature is checked only to pick the trust domain.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self as sig, EcdsaKeyPair, KeyPair};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::bundle::{BundleSet, JwtKey};
use crate::spiffe_id::SpiffeId;

/// Why a JWT-SVID could not be signed or is not valid. Messages never contain key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("algorithm {0:?} is not allowed for JWT-SVIDs (allowed: RS/ES/PS 256/384/512)")]
    DisallowedAlg(String),
    #[error("token header has no \"kid\"")]
    MissingKid,
    #[error("token has no \"sub\" claim")]
    MissingSubject,
    #[error("\"sub\" {0:?} is not a SPIFFE ID: {1}")]
    BadSubject(String, String),
    #[error("no JWT bundle for trust domain {0:?} (not our own and not federated)")]
    UnknownTrustDomain(String),
    #[error("key id {kid:?} is not a JWT authority of trust domain {trust_domain:?}")]
    UnknownKid { kid: String, trust_domain: String },
    #[error("JWT authority {kid:?} cannot verify {alg} tokens: {reason}")]
    KeyMismatch {
        kid: String,
        alg: String,
        reason: String,
    },
    #[error("signature does not verify")]
    BadSignature,
    #[error("token has no \"exp\" claim")]
    MissingExpiry,
    #[error("token expired at {0} (unix seconds)")]
    Expired(u64),
    #[error("token is not valid before {0} (unix seconds)")]
    NotYetValid(u64),
    #[error("token has no \"aud\" claim")]
    MissingAudience,
    #[error("audience {expected:?} is not among the token's audiences {actual:?}")]
    WrongAudience {
        expected: String,
        actual: Vec<String>,
    },
    #[error("cannot sign a JWT-SVID: {0}")]
    Signing(String),
}

/// A validated JWT-SVID: the subject's SPIFFE ID and all claims.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedJwt {
    /// The `sub` claim.
    pub id: SpiffeId,
    /// Every claim of the token (sub, aud, exp, iat, ...).
    pub claims: Map<String, Value>,
}

impl ValidatedJwt {
    /// The `exp` claim as a time (`None` when absent, negative or beyond what `SystemTime` holds).
    pub fn expiry(&self) -> Option<SystemTime> {
        let exp = self.claims.get("exp").and_then(Value::as_f64)?;
        let since_epoch = Duration::try_from_secs_f64(exp).ok()?; // None if negative or huge
        UNIX_EPOCH.checked_add(since_epoch)
    }
}

/// An ES256 JWT signing authority: a P-256 key held only in memory, and its key id.
pub struct JwtSigner {
    kid: String,
    key: EcdsaKeyPair,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl JwtSigner {
    /// Generates a new P-256 key with a random key id (32 hex digits).
    pub fn generate() -> Result<Self, JwtError> {
        let mut raw = [0u8; 16];
        aws_lc_rs::rand::fill(&mut raw)
            .map_err(|_| JwtError::Signing("random key id generation failed".into()))?;
        Self::generate_with_kid(raw.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }

    /// Generates a new P-256 key with key id `kid`.
    pub fn generate_with_kid(kid: impl Into<String>) -> Result<Self, JwtError> {
        let key = EcdsaKeyPair::generate(&sig::ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| JwtError::Signing("P-256 key generation failed".into()))?;
        Ok(Self {
            kid: kid.into(),
            key,
        })
    }

    /// Loads a P-256 PKCS#8 key (e.g. one saved with [`JwtSigner::to_pkcs8`]).
    pub fn from_pkcs8(kid: impl Into<String>, pkcs8: &[u8]) -> Result<Self, JwtError> {
        let key = EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8)
            .map_err(|_| JwtError::Signing("not a P-256 PKCS#8 private key".into()))?;
        Ok(Self {
            kid: kid.into(),
            key,
        })
    }

    /// The private key as PKCS#8 DER, for persisting it (never log it).
    pub fn to_pkcs8(&self) -> Result<Vec<u8>, JwtError> {
        let doc = self
            .key
            .to_pkcs8v1()
            .map_err(|_| JwtError::Signing("cannot serialize the key".into()))?;
        Ok(doc.as_ref().to_vec())
    }

    /// The key id written in every token's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a bundle entry: an EC JWK with `kid` (`kty`, `crv`, `x`, `y`, `kid`),
    /// ready for [`crate::bundle::Bundle::add_jwt_key`]; the JSON is its `jwk` field.
    pub fn public_jwk(&self) -> JwtKey {
        // Uncompressed point: 0x04 || x (32 bytes) || y (32 bytes).
        let point = self.key.public_key().as_ref();
        let coords = point.get(1..).unwrap_or_default();
        let (x, y) = coords.split_at(coords.len() / 2);
        JwtKey::new(json!({
            "kty": "EC",
            "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(x),
            "y": URL_SAFE_NO_PAD.encode(y),
            "kid": self.kid,
        }))
    }

    /// Same as [`JwtSigner::public_jwk`] (kept as an alias).
    pub fn jwt_key(&self) -> JwtKey {
        self.public_jwk()
    }

    /// Signs a JWT-SVID for `sub` valid for `audiences` (at least one) from now for `ttl`.
    /// One audience is written as a string, several as an array.
    pub fn sign(
        &self,
        sub: &SpiffeId,
        audiences: &[String],
        ttl: Duration,
    ) -> Result<String, JwtError> {
        self.sign_at(sub, audiences, ttl, SystemTime::now())
    }

    /// [`JwtSigner::sign`] with an explicit issue time.
    pub fn sign_at(
        &self,
        sub: &SpiffeId,
        audiences: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, JwtError> {
        let aud = match audiences {
            [] => {
                return Err(JwtError::Signing(
                    "at least one audience is required".into(),
                ))
            }
            [one] => json!(one),
            many => json!(many),
        };
        let iat = unix_secs(now);
        let claims = json!({
            "sub": sub.as_str(),
            "aud": aud,
            "exp": iat.saturating_add(ttl.as_secs().max(1)),
            "iat": iat,
        });
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        self.sign_parts(&header, &claims)
    }

    /// Signs arbitrary header and claims (the tests use it to build hostile tokens).
    fn sign_parts(&self, header: &Value, claims: &Value) -> Result<String, JwtError> {
        let signing_input = format!("{}.{}", b64_json(header), b64_json(claims));
        let signature = self
            .key
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| JwtError::Signing("ECDSA signing failed".into()))?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        ))
    }
}

fn b64_json(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn decode_part(part: &str, what: &str) -> Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|e| JwtError::Malformed(format!("{what} is not base64url: {e}")))
}

fn decode_json(part: &str, what: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = decode_part(part, what)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(JwtError::Malformed(format!("{what} is not a JSON object"))),
        Err(e) => Err(JwtError::Malformed(format!("{what} is not JSON: {e}"))),
    }
}

/// Validates a JWT-SVID for `audience` against the JWT authorities of the bundle of its
/// subject's trust domain, at time `now`.
pub fn validate(
    token: &str,
    audience: &str,
    bundles: &BundleSet,
    now: SystemTime,
) -> Result<ValidatedJwt, JwtError> {
    let mut parts = token.trim().split('.');
    let (Some(h64), Some(c64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let header = decode_json(h64, "header")?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let Some(verifier) = Verifier::for_alg(&alg) else {
        return Err(JwtError::DisallowedAlg(alg));
    };
    if let Some(typ) = header.get("typ") {
        if !matches!(typ.as_str(), Some("JWT" | "JOSE")) {
            return Err(JwtError::Malformed(format!(
                "header \"typ\" is {typ}, not \"JWT\""
            )));
        }
    }
    let kid = match header.get("kid").and_then(Value::as_str) {
        Some(kid) if !kid.is_empty() => kid.to_string(),
        _ => return Err(JwtError::MissingKid),
    };
    let claims = decode_json(c64, "claims")?;
    let sub = claims.get("sub").ok_or(JwtError::MissingSubject)?;
    let sub = sub
        .as_str()
        .ok_or_else(|| JwtError::BadSubject(sub.to_string(), "not a string".into()))?;
    let id =
        SpiffeId::parse(sub).map_err(|e| JwtError::BadSubject(sub.to_string(), e.to_string()))?;
    let td = id.trust_domain_name().to_string();
    let bundle = bundles
        .get_by_name(&td)
        .ok_or_else(|| JwtError::UnknownTrustDomain(td.clone()))?;
    let key = bundle
        .jwt_authorities
        .get(&kid)
        .ok_or_else(|| JwtError::UnknownKid {
            kid: kid.clone(),
            trust_domain: td,
        })?;
    let signature = decode_part(s64, "signature")?;
    let signing_input = &token.trim()[..h64.len() + 1 + c64.len()];
    verifier
        .verify(&key.jwk, signing_input.as_bytes(), &signature)
        .map_err(|e| match e {
            VerifyError::Key(reason) => JwtError::KeyMismatch {
                kid,
                alg: alg.clone(),
                reason,
            },
            VerifyError::Signature => JwtError::BadSignature,
        })?;
    check_times(&claims, now)?;
    check_audience(&claims, audience)?;
    Ok(ValidatedJwt { id, claims })
}

/// Latest NumericDate accepted: 9999-12-31T23:59:59Z. A JWT-SVID lives minutes; a time beyond
/// this is not a lifetime but a token that never expires, and could not be shown as a time.
const MAX_NUMERIC_DATE: f64 = 253_402_300_799.0;

fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(t) if (0.0..=MAX_NUMERIC_DATE).contains(&t) => Ok(Some(t)),
            Some(t) if t.is_finite() => Err(JwtError::Malformed(format!(
                "claim {name:?} is not a time between 1970 and 9999"
            ))),
            _ => Err(JwtError::Malformed(format!(
                "claim {name:?} is not a number"
            ))),
        },
    }
}

fn check_times(claims: &Map<String, Value>, now: SystemTime) -> Result<(), JwtError> {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let exp = numeric_date(claims, "exp")?.ok_or(JwtError::MissingExpiry)?;
    if now >= exp {
        return Err(JwtError::Expired(exp.max(0.0) as u64));
    }
    if let Some(nbf) = numeric_date(claims, "nbf")? {
        if now < nbf {
            return Err(JwtError::NotYetValid(nbf.max(0.0) as u64));
        }
    }
    Ok(())
}

fn check_audience(claims: &Map<String, Value>, audience: &str) -> Result<(), JwtError> {
    let actual: Vec<String> = match claims.get("aud") {
        None | Some(Value::Null) => return Err(JwtError::MissingAudience),
        Some(Value::String(one)) => vec![one.clone()],
        Some(Value::Array(many)) => many
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| JwtError::Malformed("\"aud\" holds a non-string".into()))?,
        Some(_) => {
            return Err(JwtError::Malformed(
                "\"aud\" is not a string or array".into(),
            ))
        }
    };
    if actual.is_empty() {
        return Err(JwtError::MissingAudience);
    }
    if actual.iter().any(|a| a == audience) {
        Ok(())
    } else {
        Err(JwtError::WrongAudience {
            expected: audience.to_string(),
            actual,
        })
    }
}

enum VerifyError {
    Key(String),
    Signature,
}

/// The verification algorithm of an allowed `alg`.
enum Verifier {
    Ec {
        crv: &'static str,
        coord_len: usize,
        alg: &'static sig::EcdsaVerificationAlgorithm,
    },
    Rsa(&'static sig::RsaParameters),
}

impl Verifier {
    fn for_alg(alg: &str) -> Option<Self> {
        Some(match alg {
            "ES256" => Self::Ec {
                crv: "P-256",
                coord_len: 32,
                alg: &sig::ECDSA_P256_SHA256_FIXED,
            },
            "ES384" => Self::Ec {
                crv: "P-384",
                coord_len: 48,
                alg: &sig::ECDSA_P384_SHA384_FIXED,
            },
            "ES512" => Self::Ec {
                crv: "P-521",
                coord_len: 66,
                alg: &sig::ECDSA_P521_SHA512_FIXED,
            },
            "RS256" => Self::Rsa(&sig::RSA_PKCS1_2048_8192_SHA256),
            "RS384" => Self::Rsa(&sig::RSA_PKCS1_2048_8192_SHA384),
            "RS512" => Self::Rsa(&sig::RSA_PKCS1_2048_8192_SHA512),
            "PS256" => Self::Rsa(&sig::RSA_PSS_2048_8192_SHA256),
            "PS384" => Self::Rsa(&sig::RSA_PSS_2048_8192_SHA384),
            "PS512" => Self::Rsa(&sig::RSA_PSS_2048_8192_SHA512),
            _ => return None,
        })
    }

    fn verify(&self, jwk: &Value, msg: &[u8], signature: &[u8]) -> Result<(), VerifyError> {
        let member = |name: &str| -> Result<Vec<u8>, VerifyError> {
            let v = jwk.get(name).and_then(Value::as_str);
            let v = v.ok_or_else(|| VerifyError::Key(format!("JWK has no {name:?}")))?;
            URL_SAFE_NO_PAD
                .decode(v.trim_end_matches('='))
                .map_err(|_| VerifyError::Key(format!("JWK member {name:?} is not base64url")))
        };
        let kty = jwk.get("kty").and_then(Value::as_str).unwrap_or_default();
        match self {
            Self::Ec {
                crv,
                coord_len,
                alg,
            } => {
                let key_crv = jwk.get("crv").and_then(Value::as_str).unwrap_or_default();
                if kty != "EC" || key_crv != *crv {
                    return Err(VerifyError::Key(format!(
                        "key is {kty} {key_crv}, not EC {crv}"
                    )));
                }
                let (x, y) = (member("x")?, member("y")?);
                if x.len() != *coord_len || y.len() != *coord_len {
                    return Err(VerifyError::Key(
                        "EC coordinates have the wrong length".into(),
                    ));
                }
                let point = [&[0x04][..], &x, &y].concat();
                sig::UnparsedPublicKey::new(*alg, point)
                    .verify(msg, signature)
                    .map_err(|_| VerifyError::Signature)
            }
            Self::Rsa(params) => {
                if kty != "RSA" {
                    return Err(VerifyError::Key(format!("key is {kty}, not RSA")));
                }
                let key = sig::RsaPublicKeyComponents {
                    n: member("n")?,
                    e: member("e")?,
                };
                key.verify(params, msg, signature)
                    .map_err(|_| VerifyError::Signature)
            }
        }
    }
}

#[cfg(test)]
#[path = "jwt_tests.rs"]
mod tests;
