//! The value grammars of POLICY.md §4, one type per value kind: parsed (and validated) once at
//! load time, matched without allocation at decision time.

use std::fmt;

use svidcar_agent::{SpiffeId, TrustDomain};

/// One segment of a SPIFFE ID glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdSeg {
    /// A literal segment, compared case-sensitively.
    Lit(String),
    /// `*`: exactly one whole, non-empty segment.
    One,
}

/// What a SPIFFE ID pattern matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpiffeKind {
    /// Bare `*`: any authenticated peer.
    Any,
    /// An exact ID (scheme and trust domain lowercased).
    Exact(String),
    /// A segment glob: trust domain (`None` = `*`), segments, and whether a trailing `**`
    /// (zero or more further segments) follows.
    Glob {
        td: Option<String>,
        segs: Vec<IdSeg>,
        tail: bool,
    },
}

/// A SPIFFE ID pattern (`spiffe://td/a/*/b/**`, `*`, or `{prefix: ...}` sugar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffePattern {
    /// As written (for messages).
    pub raw: String,
    /// What it matches.
    pub kind: SpiffeKind,
    /// The scheme or trust domain was written with upper-case letters (lint L007).
    pub had_upper: bool,
}

impl SpiffePattern {
    /// Parses a pattern string (`*`, or `spiffe://<td|*>/<seg|*>/.../[**]`).
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw == "*" {
            return Ok(Self {
                raw: raw.into(),
                kind: SpiffeKind::Any,
                had_upper: false,
            });
        }
        let Some(colon) = raw.find("://") else {
            return Err(format!(
                "SPIFFE ID pattern {raw:?} must start with \"spiffe://\" or be \"*\""
            ));
        };
        let scheme = &raw[..colon];
        if !scheme.eq_ignore_ascii_case("spiffe") {
            return Err(format!(
                "SPIFFE ID pattern {raw:?} must start with \"spiffe://\""
            ));
        }
        let after = &raw[colon + 3..];
        let td_end = after.find('/').unwrap_or(after.len());
        let (td_raw, path) = after.split_at(td_end);
        let had_upper = scheme.bytes().any(|b| b.is_ascii_uppercase())
            || td_raw.bytes().any(|b| b.is_ascii_uppercase());
        let td = if td_raw == "*" {
            None
        } else {
            let td = TrustDomain::parse_lenient(td_raw)
                .map_err(|e| format!("SPIFFE ID pattern {raw:?}: {e}"))?;
            Some(td.name().to_string())
        };
        let mut segs = Vec::new();
        let mut tail = false;
        if !path.is_empty() {
            let parts: Vec<&str> = path[1..].split('/').collect();
            for (i, seg) in parts.iter().enumerate() {
                match *seg {
                    "" => return Err(format!("SPIFFE ID pattern {raw:?} has an empty segment")),
                    "**" if i + 1 == parts.len() => tail = true,
                    "**" => {
                        return Err(format!(
                            "SPIFFE ID pattern {raw:?}: \"**\" is allowed only as the last segment"
                        ))
                    }
                    "*" => segs.push(IdSeg::One),
                    s if s.contains('*') => {
                        return Err(format!(
                            "SPIFFE ID pattern {raw:?}: partial-segment wildcard {s:?} is not \
                             allowed; `*` must be a whole segment"
                        ))
                    }
                    "." | ".." => {
                        return Err(format!("SPIFFE ID pattern {raw:?} has a dot segment"))
                    }
                    s => {
                        if !s
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                        {
                            return Err(format!(
                                "SPIFFE ID pattern {raw:?}: segment {s:?} has a character \
                                 outside [a-zA-Z0-9.-_]"
                            ));
                        }
                        segs.push(IdSeg::Lit(s.to_string()));
                    }
                }
            }
        }
        let kind = match td {
            Some(td) if !tail && segs.iter().all(|s| matches!(s, IdSeg::Lit(_))) => {
                let id = SpiffeId::parse(&format!("spiffe://{td}{path}"))
                    .map_err(|e| format!("SPIFFE ID pattern {raw:?}: {e}"))?;
                SpiffeKind::Exact(id.as_str().to_string())
            }
            td => SpiffeKind::Glob { td, segs, tail },
        };
        Ok(Self {
            raw: raw.into(),
            kind,
            had_upper,
        })
    }

    /// `{prefix: "spiffe://td/a"}`: sugar for `spiffe://td/a/**`.
    pub fn parse_prefix(prefix: &str) -> Result<Self, String> {
        if prefix.contains('*') {
            return Err(format!("prefix {prefix:?} must not contain wildcards"));
        }
        let mut p = Self::parse(&format!("{}/**", prefix.trim_end_matches('/')))?;
        p.raw = format!("{{prefix: {prefix}}}");
        Ok(p)
    }

    /// Whether `id` matches this pattern.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match &self.kind {
            SpiffeKind::Any => true,
            SpiffeKind::Exact(s) => s == id.as_str(),
            SpiffeKind::Glob { td, segs, tail } => glob_matches(td.as_deref(), segs, *tail, id),
        }
    }
}

/// Matches a segment glob against an ID.
pub fn glob_matches(td: Option<&str>, segs: &[IdSeg], tail: bool, id: &SpiffeId) -> bool {
    if let Some(td) = td {
        if td != id.trust_domain_name() {
            return false;
        }
    }
    let mut it = id.segments();
    for seg in segs {
        match (seg, it.next()) {
            (_, None) => return false,
            (IdSeg::One, Some(_)) => {}
            (IdSeg::Lit(l), Some(s)) => {
                if l != s {
                    return false;
                }
            }
        }
    }
    tail || it.next().is_none()
}

/// Trust domain pattern: exact (lowercased) or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdPattern {
    /// `None` = `*`.
    pub name: Option<String>,
    /// Written with upper-case letters (lint L007).
    pub had_upper: bool,
}

impl TdPattern {
    /// Parses `*` or a trust domain name.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw == "*" {
            return Ok(Self {
                name: None,
                had_upper: false,
            });
        }
        let td =
            TrustDomain::parse_lenient(raw).map_err(|e| format!("trust domain {raw:?}: {e}"))?;
        Ok(Self {
            name: Some(td.name().to_string()),
            had_upper: raw.bytes().any(|b| b.is_ascii_uppercase()),
        })
    }
}

/// A namespace or service-account pattern: exact or `*` (= present).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamePattern {
    /// `*`.
    Any,
    /// Exact; for service accounts `ns/sa`.
    Exact(String),
}

impl NamePattern {
    /// Parses a namespace (`sa == false`) or `ns/sa` (`sa == true`) pattern.
    pub fn parse(raw: &str, sa: bool) -> Result<Self, String> {
        if raw == "*" {
            return Ok(Self::Any);
        }
        let ok_part = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        let valid = if sa {
            matches!(raw.split_once('/'), Some((n, s)) if ok_part(n) && ok_part(s))
        } else {
            ok_part(raw)
        };
        if !valid {
            return Err(if sa {
                format!("service account {raw:?} must be \"<namespace>/<name>\" or \"*\" (no wildcards)")
            } else {
                format!("namespace {raw:?} must be a name or \"*\" (no partial wildcards)")
            });
        }
        Ok(Self::Exact(raw.to_string()))
    }
}

/// An inclusive port range (`8080` or `"8000-8999"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// Lowest port.
    pub lo: u16,
    /// Highest port.
    pub hi: u16,
}

impl PortRange {
    /// Parses `N` or `LO-HI` (1..=65535, LO <= HI).
    pub fn parse(raw: &str) -> Result<Self, String> {
        let one = |s: &str| -> Result<u16, String> {
            match s.trim().parse::<u32>() {
                Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
                _ => Err(format!("port {raw:?} must be 1-65535 or \"LO-HI\"")),
            }
        };
        let (lo, hi) = match raw.split_once('-') {
            Some((a, b)) => (one(a)?, one(b)?),
            None => {
                let p = one(raw)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(format!("port range {raw:?} has LO > HI"));
        }
        Ok(Self { lo, hi })
    }

    /// Whether `p` is inside.
    pub fn contains(&self, p: u16) -> bool {
        self.lo <= p && p <= self.hi
    }
}

/// An HTTP method pattern: exact (case-sensitive) or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MethodPattern {
    /// `*`.
    Any,
    /// Exact method token.
    Exact(String),
}

impl MethodPattern {
    /// Parses a method token or `*`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw == "*" {
            return Ok(Self::Any);
        }
        if raw.is_empty()
            || !raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        {
            return Err(format!(
                "method {raw:?} must be an HTTP method token or \"*\""
            ));
        }
        Ok(Self::Exact(raw.to_string()))
    }

    /// Whether the method matches.
    pub fn matches(&self, m: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(e) => e == m,
        }
    }
}

/// A string pattern shared by paths and header values: exact, `abc*`, `*abc`, `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrPattern {
    /// `*`: present and non-empty.
    Any,
    /// Exact.
    Exact(String),
    /// `abc*`.
    Prefix(String),
    /// `*abc`.
    Suffix(String),
}

impl StrPattern {
    fn parse(raw: &str, what: &str) -> Result<Self, String> {
        if raw == "*" {
            return Ok(Self::Any);
        }
        let stars = raw.matches('*').count();
        let p = if stars == 0 {
            Self::Exact(raw.to_string())
        } else if stars == 1 && raw.ends_with('*') {
            Self::Prefix(raw[..raw.len() - 1].to_string())
        } else if stars == 1 && raw.starts_with('*') {
            Self::Suffix(raw[1..].to_string())
        } else {
            return Err(format!(
                "{what} {raw:?}: `*` is allowed only at the start or the end"
            ));
        };
        Ok(p)
    }

    /// Parses a header value pattern.
    pub fn parse_header_value(raw: &str) -> Result<Self, String> {
        Self::parse(raw, "header value")
    }

    /// Whether `v` matches.
    pub fn matches(&self, v: &str) -> bool {
        match self {
            Self::Any => !v.is_empty(),
            Self::Exact(e) => e == v,
            Self::Prefix(p) => v.starts_with(p.as_str()),
            Self::Suffix(s) => v.ends_with(s.as_str()),
        }
    }
}

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSeg {
    /// Literal.
    Lit(String),
    /// `{*}`: one segment.
    One,
    /// `{**}` (last): zero or more segments.
    Rest,
}

/// A path pattern: a [`StrPattern`] or a template with `{*}` / `{**}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    /// Exact / prefix / suffix / any.
    Str(StrPattern),
    /// Template, split on `/` (the first element is the empty string before the leading `/`).
    Template(Vec<PathSeg>),
}

impl PathPattern {
    /// Parses a path pattern. Escapes are put in the form normalization gives request paths
    /// (escaped unreserved characters decoded, hex upper-cased), so `/a%2fb` matches the
    /// request `/a%2Fb` under `escapedSlashes: keep` and `/%61dmin` means `/admin`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let canonical = super::normalize::canonical_escapes(raw).map_err(|()| {
            format!("path {raw:?} holds a malformed escape or a control character")
        })?;
        let raw: &str = &canonical;
        if !raw.contains('{') {
            let p = StrPattern::parse(raw, "path")?;
            if let StrPattern::Exact(s) | StrPattern::Prefix(s) = &p {
                if !s.starts_with('/') {
                    return Err(format!("path {raw:?} must start with \"/\""));
                }
            }
            return Ok(Self::Str(p));
        }
        if !raw.starts_with('/') {
            return Err(format!("path template {raw:?} must start with \"/\""));
        }
        let parts: Vec<&str> = raw.split('/').collect();
        let mut segs = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            segs.push(match *part {
                "{*}" => PathSeg::One,
                "{**}" if i + 1 == parts.len() => PathSeg::Rest,
                "{**}" => return Err(format!("path template {raw:?}: {{**}} must be last")),
                s if s.contains(['{', '}', '*']) => {
                    return Err(format!(
                        "path template {raw:?}: {s:?} must be a whole {{*}} or {{**}} segment"
                    ))
                }
                s => PathSeg::Lit(s.to_string()),
            });
        }
        Ok(Self::Template(segs))
    }

    /// Whether the (normalized) path matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Str(p) => p.matches(path),
            Self::Template(segs) => {
                let mut it = path.split('/');
                for seg in segs {
                    match seg {
                        PathSeg::Rest => return true,
                        PathSeg::One => match it.next() {
                            Some(s) if !s.is_empty() => {}
                            _ => return false,
                        },
                        PathSeg::Lit(l) => {
                            if it.next() != Some(l.as_str()) {
                                return false;
                            }
                        }
                    }
                }
                it.next().is_none()
            }
        }
    }
}

/// A host / name pattern: exact, `*.suffix` (one or more labels, not the apex) or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: any name, including IP literals.
    Any,
    /// Exact (lowercase, no trailing dot).
    Exact(String),
    /// `*.suffix`: the suffix (lowercase, without `*.`).
    Wildcard(String),
}

impl HostPattern {
    /// Parses a host pattern. IP literals are rejected (use `cidrs`).
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw == "*" {
            return Ok(Self::Any);
        }
        let lower = raw.to_ascii_lowercase();
        let lower = lower.strip_suffix('.').unwrap_or(&lower);
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower),
        };
        if name.parse::<std::net::IpAddr>().is_ok() {
            return Err(format!(
                "host {raw:?} is an IP literal; IP literals only match \"*\" (use cidrs)"
            ));
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        };
        if !name.split('.').all(label_ok) {
            return Err(format!(
                "host {raw:?} must be a DNS name, \"*.<suffix>\" or \"*\" (no other wildcards, no port)"
            ));
        }
        Ok(if wild {
            Self::Wildcard(name.to_string())
        } else {
            Self::Exact(name.to_string())
        })
    }
}

/// Whether a (normalized) name is an IP literal; IP literals only match the `*` host pattern.
pub fn is_ip_literal(name: &str) -> bool {
    name.parse::<std::net::IpAddr>().is_ok() || name.starts_with('[')
}

impl fmt::Display for SpiffePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}
