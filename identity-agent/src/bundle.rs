//! SPIFFE trust bundles: X.509 authorities and JWT keys of one trust domain, their JWKS form
//! (`use` = `x509-svid` / `jwt-svid`, `spiffe_sequence`, `spiffe_refresh_hint`), and a set of
//! bundles keyed by trust domain that never merges domains.
//!
//! JWKS parsing follows the SPIFFE Trust Domain and Bundle standard: keys with an unknown `use`
//! are ignored, malformed keys are rejected, and an empty key list is a valid (revoked) bundle.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Map, Value};
use x509_parser::public_key::PublicKey;

use crate::spiffe_id::TrustDomain;

/// Why bytes are not a usable bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("bundle is not valid JSON: {0}")]
    Json(String),
    #[error("bundle JWKS key {index}: {reason}")]
    BadKey { index: usize, reason: String },
    #[error("bundle certificate is not valid DER: {0}")]
    BadCertificate(String),
}

/// A JWT signing authority's public key as found in a JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtKey {
    /// The JWK itself (kty, crv, x, y / n, e ...), kept verbatim for re-serialization.
    pub jwk: serde_json::Value,
}

impl JwtKey {
    /// Wraps a JWK (an object with `kty` and its key parameters; `kid`/`use` optional).
    pub fn new(jwk: serde_json::Value) -> Self {
        Self { jwk }
    }

    /// The key id (`kid`), if the JWK carries one.
    pub fn kid(&self) -> Option<&str> {
        self.jwk.get("kid").and_then(Value::as_str)
    }
}

/// The trust bundle of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The trust domain this bundle belongs to.
    pub trust_domain: TrustDomain,
    /// X.509 authorities (DER), oldest first.
    pub x509_authorities: Vec<CertificateDer<'static>>,
    /// JWT authorities by key id.
    pub jwt_authorities: BTreeMap<String, JwtKey>,
    /// `spiffe_sequence`.
    pub sequence: u64,
    /// `spiffe_refresh_hint`.
    pub refresh_hint: Option<Duration>,
}

impl Bundle {
    /// An empty bundle (a revoked / unknown domain).
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: BTreeMap::new(),
            sequence: 0,
            refresh_hint: None,
        }
    }

    /// Parses a SPIFFE bundle (JWKS JSON) of trust domain `td`.
    pub fn from_jwks(td: TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        let doc: Value =
            serde_json::from_slice(json).map_err(|e| BundleError::Json(e.to_string()))?;
        let obj = doc
            .as_object()
            .ok_or_else(|| BundleError::Json("not a JSON object".into()))?;
        let keys = match obj.get("keys") {
            Some(Value::Array(keys)) => keys.as_slice(),
            Some(_) => return Err(BundleError::Json("\"keys\" is not an array".into())),
            None => return Err(BundleError::Json("\"keys\" member is missing".into())),
        };
        let mut bundle = Bundle::new(td);
        (bundle.sequence, bundle.refresh_hint) = spiffe_members(obj)?;
        for (index, key) in keys.iter().enumerate() {
            let bad = |reason: &str| BundleError::BadKey {
                index,
                reason: reason.to_string(),
            };
            let key = key.as_object().ok_or_else(|| bad("not a JSON object"))?;
            match key.get("use").and_then(Value::as_str) {
                Some("x509-svid") => {
                    let cert = parse_x509_key(key).map_err(|r| bad(&r))?;
                    if !bundle.x509_authorities.contains(&cert) {
                        bundle.x509_authorities.push(cert);
                    }
                }
                Some("jwt-svid") => {
                    let kid = check_jwt_key(key).map_err(|r| bad(&r))?;
                    if bundle.jwt_authorities.contains_key(&kid) {
                        return Err(bad(&format!("duplicate kid {kid:?}")));
                    }
                    bundle
                        .jwt_authorities
                        .insert(kid, JwtKey::new(Value::Object(key.clone())));
                }
                None if key.get("use").is_some() => return Err(bad("\"use\" is not a string")),
                None => return Err(bad("\"use\" is missing")),
                Some(_) => {} // unknown use: ignored, as the standard requires
            }
        }
        Ok(bundle)
    }

    /// Serializes as a SPIFFE bundle (JWKS JSON). X.509 authorities whose public key type
    /// cannot be expressed as a JWK are written with `use` and `x5c` only. Serve
    /// [`Bundle::jwt_jwks`] (not this) on `FetchJWTBundles`: JWT bundle parsers require a `kid`
    /// on every key.
    pub fn to_jwks(&self) -> Vec<u8> {
        let mut keys = Vec::new();
        for cert in &self.x509_authorities {
            let mut key = cert_jwk_params(cert).unwrap_or_default();
            key.insert("use".into(), json!("x509-svid"));
            key.insert("x5c".into(), json!([STANDARD.encode(cert.as_ref())]));
            keys.push(Value::Object(key));
        }
        for (kid, key) in &self.jwt_authorities {
            let mut jwk = key.jwk.as_object().cloned().unwrap_or_default();
            jwk.insert("use".into(), json!("jwt-svid"));
            jwk.insert("kid".into(), json!(kid));
            keys.push(Value::Object(jwk));
        }
        let mut doc = Map::new();
        doc.insert("keys".into(), Value::Array(keys));
        doc.insert("spiffe_sequence".into(), json!(self.sequence));
        if let Some(hint) = self.refresh_hint {
            doc.insert("spiffe_refresh_hint".into(), json!(hint.as_secs()));
        }
        serde_json::to_vec(&Value::Object(doc)).unwrap_or_default()
    }

    /// Parses a plain JWT bundle (JWKS of `FetchJWTBundles`, as go-spiffe/SPIRE emit it: keys may
    /// lack `use`). Keys with no `use` or `use` = `jwt-svid` are JWT authorities (a `kid` is
    /// required); keys with another `use` are ignored. The result has no X.509 authorities;
    /// `spiffe_sequence` / `spiffe_refresh_hint` are read when present (as svidcar sends them).
    pub fn from_jwt_jwks(td: TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        let doc: Value =
            serde_json::from_slice(json).map_err(|e| BundleError::Json(e.to_string()))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| BundleError::Json("\"keys\" array is missing".into()))?;
        let mut bundle = Bundle::new(td);
        if let Some(obj) = doc.as_object() {
            (bundle.sequence, bundle.refresh_hint) = spiffe_members(obj)?;
        }
        for (index, key) in keys.iter().enumerate() {
            let bad = |reason: String| BundleError::BadKey { index, reason };
            let key = key
                .as_object()
                .ok_or_else(|| bad("not a JSON object".into()))?;
            if !matches!(
                key.get("use").and_then(Value::as_str),
                None | Some("jwt-svid")
            ) {
                continue;
            }
            let kid = check_jwt_key(key).map_err(bad)?;
            bundle
                .jwt_authorities
                .insert(kid, JwtKey::new(Value::Object(key.clone())));
        }
        Ok(bundle)
    }

    /// Parses concatenated DER certificates (Workload API `bundle` / `bundles` values).
    pub fn from_x509_der_concat(td: TrustDomain, der: &[u8]) -> Result<Self, BundleError> {
        let certs = crate::svid::split_der_chain(der).map_err(BundleError::BadCertificate)?;
        let mut bundle = Bundle::new(td);
        for cert in certs {
            if !bundle.x509_authorities.contains(&cert) {
                bundle.x509_authorities.push(cert);
            }
        }
        Ok(bundle)
    }

    /// Adds a JWT authority under its `kid` (taken from the JWK); returns false without a kid.
    pub fn add_jwt_key(&mut self, key: JwtKey) -> bool {
        match key.kid().map(str::to_string) {
            Some(kid) if !kid.is_empty() => {
                self.jwt_authorities.insert(kid, key);
                true
            }
            _ => false,
        }
    }

    /// True when the bundle has no key at all (a revoked trust domain).
    pub fn is_empty(&self) -> bool {
        self.x509_authorities.is_empty() && self.jwt_authorities.is_empty()
    }

    /// The JWT authorities as a bare JWKS (`{"keys":[...]}`), e.g. for JWT bundle consumers.
    pub fn jwt_jwks(&self) -> Vec<u8> {
        let mut only_jwt = self.clone();
        only_jwt.x509_authorities.clear();
        only_jwt.to_jwks()
    }

    /// The X.509 authorities as concatenated DER (Workload API form).
    pub fn x509_der_concat(&self) -> Vec<u8> {
        self.x509_authorities
            .iter()
            .flat_map(|c| c.as_ref().iter().copied())
            .collect()
    }
}

/// The optional `spiffe_sequence` (default 0) and `spiffe_refresh_hint` members.
fn spiffe_members(obj: &Map<String, Value>) -> Result<(u64, Option<Duration>), BundleError> {
    let sequence = match obj.get("spiffe_sequence") {
        None | Some(Value::Null) => 0,
        Some(v) => v.as_u64().ok_or_else(|| {
            BundleError::Json("\"spiffe_sequence\" is not a non-negative integer".into())
        })?,
    };
    let refresh_hint = match obj.get("spiffe_refresh_hint") {
        None | Some(Value::Null) => None,
        Some(v) => Some(Duration::from_secs(v.as_u64().ok_or_else(|| {
            BundleError::Json("\"spiffe_refresh_hint\" is not a non-negative integer".into())
        })?)),
    };
    Ok((sequence, refresh_hint))
}

/// Validates a `use: x509-svid` key and returns its certificate.
fn parse_x509_key(key: &Map<String, Value>) -> Result<CertificateDer<'static>, String> {
    let x5c = match key.get("x5c") {
        Some(Value::Array(x5c)) => x5c,
        Some(_) => return Err("\"x5c\" is not an array".into()),
        None => return Err("x509-svid key has no \"x5c\"".into()),
    };
    let [b64] = x5c.as_slice() else {
        return Err(format!(
            "\"x5c\" must hold exactly one certificate, has {}",
            x5c.len()
        ));
    };
    let b64 = b64.as_str().ok_or("\"x5c\" entry is not a string")?;
    let der = STANDARD
        .decode(b64)
        .map_err(|e| format!("\"x5c\" is not base64: {e}"))?;
    match x509_parser::parse_x509_certificate(&der) {
        Ok(([], _)) => Ok(CertificateDer::from(der)),
        Ok(_) => Err("\"x5c\" certificate has trailing bytes".into()),
        Err(e) => Err(format!("\"x5c\" is not a DER certificate: {e}")),
    }
}

/// Validates a `use: jwt-svid` key (kid, and the parameters of its kty) and returns the kid.
fn check_jwt_key(key: &Map<String, Value>) -> Result<String, String> {
    let kid = match key.get("kid").and_then(Value::as_str) {
        Some(kid) if !kid.is_empty() => kid.to_string(),
        _ => return Err("jwt-svid key has no \"kid\"".into()),
    };
    let need = |names: &[&str]| -> Result<(), String> {
        for name in names {
            let v = key.get(*name).and_then(Value::as_str);
            let v = v.ok_or_else(|| format!("key {kid:?} lacks string member {name:?}"))?;
            URL_SAFE_NO_PAD
                .decode(v.trim_end_matches('='))
                .map_err(|e| format!("key {kid:?} member {name:?} is not base64url: {e}"))?;
        }
        Ok(())
    };
    match key.get("kty").and_then(Value::as_str) {
        Some("EC") => {
            let crv = key.get("crv").and_then(Value::as_str);
            if !matches!(crv, Some("P-256" | "P-384" | "P-521")) {
                return Err(format!("key {kid:?} has unsupported curve {crv:?}"));
            }
            need(&["x", "y"])?;
        }
        Some("RSA") => need(&["n", "e"])?,
        Some("OKP") => need(&["crv", "x"])?,
        Some(other) => return Err(format!("key {kid:?} has unsupported kty {other:?}")),
        None => return Err(format!("key {kid:?} has no \"kty\"")),
    }
    Ok(kid)
}

/// The JWK public-key members (`kty`, `crv`/`x`/`y` or `n`/`e`) of a certificate's key.
pub fn cert_jwk_params(cert: &[u8]) -> Option<Map<String, Value>> {
    use x509_parser::oid_registry as oids;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let spki = parsed.public_key();
    let b64 = |b: &[u8]| json!(URL_SAFE_NO_PAD.encode(b));
    let mut out = Map::new();
    match spki.parsed().ok()? {
        PublicKey::EC(point) => {
            let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
            let (crv, len) = if curve == oids::OID_EC_P256 {
                ("P-256", 32)
            } else if curve == oids::OID_NIST_EC_P384 {
                ("P-384", 48)
            } else if curve == oids::OID_NIST_EC_P521 {
                ("P-521", 66)
            } else {
                return None;
            };
            let data = point.data();
            if data.len() != 1 + 2 * len || data[0] != 0x04 {
                return None; // compressed or malformed point
            }
            out.insert("kty".into(), json!("EC"));
            out.insert("crv".into(), json!(crv));
            out.insert("x".into(), b64(&data[1..=len]));
            out.insert("y".into(), b64(&data[1 + len..]));
        }
        PublicKey::RSA(rsa) => {
            let strip = |b: &[u8]| -> Vec<u8> {
                let start = b
                    .iter()
                    .position(|&x| x != 0)
                    .unwrap_or(b.len().saturating_sub(1));
                b[start..].to_vec()
            };
            out.insert("kty".into(), json!("RSA"));
            out.insert("n".into(), b64(&strip(rsa.modulus)));
            out.insert("e".into(), b64(&strip(rsa.exponent)));
        }
        PublicKey::Unknown(raw) if spki.algorithm.algorithm == oids::OID_SIG_ED25519 => {
            out.insert("kty".into(), json!("OKP"));
            out.insert("crv".into(), json!("Ed25519"));
            out.insert("x".into(), b64(raw));
        }
        _ => return None,
    }
    Some(out)
}

/// Bundles by trust domain. Validation always picks the bundle of the peer's own domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleSet {
    bundles: HashMap<TrustDomain, Bundle>,
}

impl BundleSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds or replaces the bundle of `bundle.trust_domain`.
    pub fn insert(&mut self, bundle: Bundle) {
        self.bundles.insert(bundle.trust_domain.clone(), bundle);
    }
    /// The bundle of `td`, if known.
    pub fn get(&self, td: &TrustDomain) -> Option<&Bundle> {
        self.bundles.get(td)
    }
    /// The bundle of the trust domain named `td_name` (bare name, e.g. `example.org`).
    pub fn get_by_name(&self, td_name: &str) -> Option<&Bundle> {
        self.bundles
            .iter()
            .find(|(k, _)| k.name() == td_name)
            .map(|(_, v)| v)
    }
    /// All bundles, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Bundle> {
        self.bundles.values()
    }
    /// Number of trust domains.
    pub fn len(&self) -> usize {
        self.bundles.len()
    }
    /// True when no trust domain is known.
    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }
    /// Removes the bundle of `td`, returning it.
    pub fn remove(&mut self, td: &TrustDomain) -> Option<Bundle> {
        self.bundles.remove(td)
    }
}

impl FromIterator<Bundle> for BundleSet {
    fn from_iter<I: IntoIterator<Item = Bundle>>(iter: I) -> Self {
        let mut set = Self::new();
        for bundle in iter {
            set.insert(bundle);
        }
        set
    }
}

#[cfg(test)]
#[path = "bundle_tests.rs"]
mod tests;
