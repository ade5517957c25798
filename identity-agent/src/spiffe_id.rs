//! SPIFFE IDs and trust domains, parsed once and trusted after (SPIFFE-ID standard §2).
//!
//! `spiffe://<trust-domain>/<path>`: the trust domain is `[a-z0-9.-_]`, at most 255 bytes; path
//! segments are `[a-zA-Z0-9.-_]`, never empty, `.` or `..`; no trailing `/`, query, fragment,
//! port or userinfo; the whole ID is at most 2048 bytes. The scheme and the trust domain are
//! case-insensitive in the standard; [`SpiffeId::parse`] is strict (lowercase only, as every
//! conformant issuer emits), while [`SpiffeId::parse_lenient`] lowercases them first (used for
//! operator-written configuration and policy patterns).

use std::fmt;
use std::str::FromStr;

/// The URI scheme prefix of every SPIFFE ID.
pub const SCHEME_PREFIX: &str = "spiffe://";
/// Longest trust domain name accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest SPIFFE ID accepted, in bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Why a string is not a SPIFFE ID or trust domain. Messages are written for operators.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID must start with \"spiffe://\" (scheme is {0:?})")]
    WrongScheme(String),
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain {0:?} has a character outside [a-z0-9.-_] (upper case is not allowed)")]
    BadTrustDomainChar(String),
    #[error("trust domain is longer than 255 bytes")]
    TrustDomainTooLong,
    #[error("SPIFFE ID is longer than 2048 bytes")]
    TooLong,
    #[error("SPIFFE ID must not contain a port, userinfo, query or fragment")]
    ForbiddenComponent,
    #[error("path has an empty segment (\"//\" or a trailing \"/\")")]
    EmptySegment,
    #[error("path has a \".\" or \"..\" segment")]
    DotSegment,
    #[error("path segment {0:?} has a character outside [a-zA-Z0-9.-_]")]
    BadPathChar(String),
}

fn is_td_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
}

fn is_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
}

/// A validated trust domain name (lowercase, `[a-z0-9.-_]`, 1..=255 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a trust domain name. Also accepts `spiffe://<td>` (with no path), as the
    /// Workload API uses that form for bundle map keys.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        let name = match s.strip_prefix(SCHEME_PREFIX) {
            Some(rest) => {
                let id = SpiffeId::parse(s)?;
                if !id.path().is_empty() {
                    return Err(SpiffeIdError::BadTrustDomainChar(rest.to_string()));
                }
                return Ok(id.trust_domain());
            }
            None => s,
        };
        Self::validate_name(name)?;
        Ok(Self(name.to_string()))
    }

    /// Parses after lowercasing (for operator-written configuration).
    pub fn parse_lenient(s: &str) -> Result<Self, SpiffeIdError> {
        Self::parse(&s.to_ascii_lowercase())
    }

    fn validate_name(name: &str) -> Result<(), SpiffeIdError> {
        if name.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain);
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(SpiffeIdError::TrustDomainTooLong);
        }
        if name.contains(['@', ':']) {
            return Err(SpiffeIdError::ForbiddenComponent);
        }
        if !name.bytes().all(is_td_char) {
            return Err(SpiffeIdError::BadTrustDomainChar(name.to_string()));
        }
        Ok(())
    }

    /// The bare name, e.g. `example.org`.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://<td>` (the key of Workload API bundle maps).
    pub fn id_string(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A validated SPIFFE ID. Cheap to clone; compares byte-wise (the trust domain is lowercase).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// Full text, e.g. `spiffe://example.org/ns/a/sa/b`.
    text: String,
    /// Byte offset where the path starts (== text.len() when the path is empty).
    path_start: usize,
}

impl SpiffeId {
    /// Parses a SPIFFE ID strictly, per the SPIFFE-ID standard.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = match s.strip_prefix(SCHEME_PREFIX) {
            Some(rest) => rest,
            None => {
                let scheme = s.split("://").next().unwrap_or(s);
                return Err(SpiffeIdError::WrongScheme(scheme.to_string()));
            }
        };
        if rest.contains(['?', '#']) {
            return Err(SpiffeIdError::ForbiddenComponent);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        TrustDomain::validate_name(td)?;
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                if seg.is_empty() {
                    return Err(SpiffeIdError::EmptySegment);
                }
                if seg == "." || seg == ".." {
                    return Err(SpiffeIdError::DotSegment);
                }
                if !seg.bytes().all(is_path_char) {
                    return Err(SpiffeIdError::BadPathChar(seg.to_string()));
                }
            }
        }
        Ok(Self {
            text: s.to_string(),
            path_start: SCHEME_PREFIX.len() + td.len(),
        })
    }

    /// Parses after lowercasing the scheme and trust domain (the path stays as written).
    pub fn parse_lenient(s: &str) -> Result<Self, SpiffeIdError> {
        let Some(colon) = s.find("://") else {
            return Self::parse(s);
        };
        let after = &s[colon + 3..];
        let td_end = after.find('/').unwrap_or(after.len());
        let lowered = format!(
            "{}://{}{}",
            s[..colon].to_ascii_lowercase(),
            after[..td_end].to_ascii_lowercase(),
            &after[td_end..]
        );
        Self::parse(&lowered)
    }

    /// Builds `spiffe://<td><path>`; `path` must be empty or start with `/`.
    pub fn from_parts(td: &TrustDomain, path: &str) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!("{SCHEME_PREFIX}{}{path}", td.name()))
    }

    /// The full ID text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The trust domain name, e.g. `example.org`.
    pub fn trust_domain_name(&self) -> &str {
        &self.text[SCHEME_PREFIX.len()..self.path_start]
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_string())
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.text[self.path_start..]
    }

    /// Path segments (none for a trust-domain ID).
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        let p = self.path();
        p.get(1..)
            .unwrap_or("")
            .split('/')
            .filter(|s| !s.is_empty())
    }

    /// Kubernetes convention `/ns/<ns>/sa/<sa>[/...]`: returns `(namespace, service_account)`.
    pub fn k8s_namespace_and_sa(&self) -> Option<(&str, &str)> {
        let mut it = self.segments();
        match (it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa)) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse_lenient(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse_lenient(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap();
        assert_eq!(id.trust_domain_name(), "example.org");
        assert_eq!(id.path(), "/ns/prod/sa/web");
        assert_eq!(id.k8s_namespace_and_sa(), Some(("prod", "web")));
        let td = SpiffeId::parse("spiffe://a-b_c.9").unwrap();
        assert_eq!(td.path(), "");
        assert_eq!(td.segments().count(), 0);
        assert!(SpiffeId::parse("spiffe://td/A.b-c_D").is_ok());
    }

    #[test]
    fn invalid_ids() {
        use SpiffeIdError::*;
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", Empty),
            ("http://example.org/a", WrongScheme("http".into())),
            ("spiffe://", MissingTrustDomain),
            ("spiffe:///a", MissingTrustDomain),
            (
                "spiffe://Example.org/a",
                BadTrustDomainChar("Example.org".into()),
            ),
            ("spiffe://example.org:80/a", ForbiddenComponent),
            ("spiffe://u@example.org/a", ForbiddenComponent),
            ("spiffe://example.org/a?x=1", ForbiddenComponent),
            ("spiffe://example.org/a#f", ForbiddenComponent),
            ("spiffe://example.org/a//b", EmptySegment),
            ("spiffe://example.org/a/", EmptySegment),
            ("spiffe://example.org/", EmptySegment),
            ("spiffe://example.org/a/./b", DotSegment),
            ("spiffe://example.org/..", DotSegment),
            ("spiffe://example.org/a%20b", BadPathChar("a%20b".into())),
        ];
        for (s, want) in cases {
            assert_eq!(SpiffeId::parse(s).unwrap_err(), *want, "{s}");
        }
        let long_td = format!("spiffe://{}/a", "a".repeat(256));
        assert_eq!(SpiffeId::parse(&long_td).unwrap_err(), TrustDomainTooLong);
        let long = format!("spiffe://td/{}", "a".repeat(2048));
        assert_eq!(SpiffeId::parse(&long).unwrap_err(), TooLong);
        let max = format!("spiffe://td/{}", "a".repeat(2048 - 12));
        assert!(SpiffeId::parse(&max).is_ok());
    }

    #[test]
    fn lenient_lowercases_scheme_and_td_only() {
        let id = SpiffeId::parse_lenient("SPIFFE://Prod.Example.com/Ns/A").unwrap();
        assert_eq!(id.as_str(), "spiffe://prod.example.com/Ns/A");
    }

    #[test]
    fn trust_domain_forms() {
        assert_eq!(
            TrustDomain::parse("example.org").unwrap().name(),
            "example.org"
        );
        assert_eq!(
            TrustDomain::parse("spiffe://example.org")
                .unwrap()
                .id_string(),
            "spiffe://example.org"
        );
        assert!(TrustDomain::parse("spiffe://example.org/a").is_err());
        assert!(TrustDomain::parse("Example.org").is_err());
        assert!(TrustDomain::parse_lenient("Example.org").is_ok());
    }
}
