//! Compiled value sets, one per field: exact SPIFFE IDs in hash sets, globs as segment matchers,
//! hosts in a reversed-label trie, ports as ranges, CIDRs as prefix lists.

use std::net::IpAddr;

use svidcar_agent::SpiffeId;

use super::cidr::Cidr;
use super::fxhash::FxHashSet;
use super::pattern::{
    glob_matches, IdSeg, MethodPattern, NamePattern, PathPattern, PortRange, SpiffeKind,
    SpiffePattern, StrPattern, TdPattern,
};

/// A positive (`x`) and a negative (`notX`) set for one attribute.
#[derive(Debug)]
pub struct Field<M> {
    /// `x`: the attribute must be present and match one value.
    pub pos: Option<M>,
    /// `notX`: the attribute must be absent or match no value.
    pub neg: Option<M>,
}

impl<M> Field<M> {
    /// Builds both sides with `f`.
    pub fn new<T>(pos: &Option<Vec<T>>, neg: &Option<Vec<T>>, f: impl Fn(&[T]) -> M) -> Self {
        Self {
            pos: pos.as_deref().map(&f),
            neg: neg.as_deref().map(&f),
        }
    }

    /// Checks the attribute (absent attribute: positive = no match, negative = match).
    /// On a miss, returns the failing side's field name.
    #[inline]
    pub fn check<A: Copy>(
        &self,
        attr: Option<A>,
        m: impl Fn(&M, A) -> bool,
        names: (&'static str, &'static str),
    ) -> Result<(), &'static str> {
        if let Some(set) = &self.pos {
            if !attr.is_some_and(|a| m(set, a)) {
                return Err(names.0);
            }
        }
        if let Some(set) = &self.neg {
            if attr.is_some_and(|a| m(set, a)) {
                return Err(names.1);
            }
        }
        Ok(())
    }
}

/// How many leading literal segments of a glob are used as its index key.
pub const INDEX_SEGMENTS: usize = 2;

/// The index keys to look up for a peer ID: `spiffe://td`, the ID cut after 1 and after
/// [`INDEX_SEGMENTS`] segments, and the full ID (consecutive duplicates removed).
pub fn peer_lookup_keys(id: &SpiffeId) -> [Option<&str>; 4] {
    let s = id.as_str();
    let td_end = s.len() - id.path().len();
    let mut cuts = s[td_end..]
        .match_indices('/')
        .map(|(i, _)| td_end + i)
        .skip(1);
    let one = cuts.next().unwrap_or(s.len());
    let two = cuts.next().unwrap_or(s.len());
    let mut keys = [
        Some(&s[..td_end]),
        Some(&s[..one]),
        Some(&s[..two]),
        Some(s),
    ];
    for i in (1..4).rev() {
        if keys[i] == keys[i - 1] {
            keys[i] = None;
        }
    }
    keys
}

/// SPIFFE ID patterns.
#[derive(Debug, Default)]
pub struct IdSet {
    any: bool,
    exact: FxHashSet<Box<str>>,
    globs: Vec<(Option<String>, Vec<IdSeg>, bool)>,
}

impl IdSet {
    /// Compiles patterns.
    pub fn new(pats: &[SpiffePattern]) -> Self {
        let mut s = Self::default();
        for p in pats {
            match &p.kind {
                SpiffeKind::Any => s.any = true,
                SpiffeKind::Exact(e) => {
                    s.exact.insert(e.as_str().into());
                }
                SpiffeKind::Glob { td, segs, tail } => {
                    s.globs.push((td.clone(), segs.clone(), *tail))
                }
            }
        }
        s
    }

    /// Keys under which a rule needing this set can be indexed, if every pattern has one: the
    /// exact ID, or for a glob `spiffe://<td>` plus up to [`INDEX_SEGMENTS`] leading literal
    /// segments. `None` for `*` or a `*` trust domain.
    pub fn index_keys(&self) -> Option<Vec<String>> {
        if self.any {
            return None;
        }
        let mut keys: Vec<String> = self.exact.iter().map(|s| s.to_string()).collect();
        for (td, segs, _) in &self.globs {
            let mut key = format!("spiffe://{}", td.as_ref()?);
            for seg in segs.iter().take(INDEX_SEGMENTS) {
                match seg {
                    IdSeg::Lit(l) => {
                        key.push('/');
                        key.push_str(l);
                    }
                    IdSeg::One => break,
                }
            }
            keys.push(key);
        }
        Some(keys)
    }

    /// Whether `id` matches.
    #[inline]
    pub fn matches(&self, id: &SpiffeId) -> bool {
        self.any
            || self.exact.contains(id.as_str())
            || self
                .globs
                .iter()
                .any(|(td, segs, tail)| glob_matches(td.as_deref(), segs, *tail, id))
    }
}

/// Trust domains, or namespaces (a list of exact names, or `*`).
#[derive(Debug, Default)]
pub struct NameSet {
    any: bool,
    names: Vec<Box<str>>,
}

impl NameSet {
    /// From trust-domain patterns.
    pub fn trust_domains(pats: &[TdPattern]) -> Self {
        let mut s = Self::default();
        for p in pats {
            match &p.name {
                None => s.any = true,
                Some(n) => s.names.push(n.as_str().into()),
            }
        }
        s
    }

    /// The exact names, if the set holds nothing else.
    pub fn only_exact(&self) -> Option<impl Iterator<Item = &str>> {
        (!self.any).then(|| self.names.iter().map(|s| &**s))
    }

    /// From namespace or `ns/sa` patterns.
    pub fn names<'a>(pats: impl IntoIterator<Item = &'a NamePattern>) -> Self {
        let mut s = Self::default();
        for p in pats {
            match p {
                NamePattern::Any => s.any = true,
                NamePattern::Exact(n) => s.names.push(n.as_str().into()),
            }
        }
        s
    }

    /// Whether `v` matches.
    #[inline]
    pub fn matches(&self, v: &str) -> bool {
        self.any || self.names.iter().any(|n| **n == *v)
    }

    /// Whether `ns/sa` matches, without building the string.
    #[inline]
    pub fn matches_sa(&self, (ns, sa): (&str, &str)) -> bool {
        self.any
            || self.names.iter().any(|n| {
                n.len() == ns.len() + 1 + sa.len()
                    && n.starts_with(ns)
                    && n.as_bytes()[ns.len()] == b'/'
                    && n.ends_with(sa)
            })
    }
}

/// Port ranges.
#[derive(Debug, Default)]
pub struct PortSet(Vec<PortRange>);

impl PortSet {
    /// Compiles ranges.
    pub fn new(r: &[PortRange]) -> Self {
        Self(r.to_vec())
    }
    /// Whether `p` is in a range.
    #[inline]
    pub fn matches(&self, p: u16) -> bool {
        self.0.iter().any(|r| r.contains(p))
    }
}

/// CIDR prefixes.
#[derive(Debug, Default)]
pub struct CidrSet(Vec<Cidr>);

impl CidrSet {
    /// Compiles prefixes.
    pub fn new(c: &[Cidr]) -> Self {
        Self(c.to_vec())
    }
    /// Whether `ip` is inside a prefix.
    #[inline]
    pub fn matches(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }
}

/// Methods.
#[derive(Debug, Default)]
pub struct MethodSet(Vec<MethodPattern>);

impl MethodSet {
    /// Compiles patterns.
    pub fn new(m: &[MethodPattern]) -> Self {
        Self(m.to_vec())
    }
    /// Whether `m` matches.
    #[inline]
    pub fn matches(&self, m: &str) -> bool {
        self.0.iter().any(|p| p.matches(m))
    }
}

/// Paths.
#[derive(Debug, Default)]
pub struct PathSet(Vec<PathPattern>);

impl PathSet {
    /// Compiles patterns.
    pub fn new(p: &[PathPattern]) -> Self {
        Self(p.to_vec())
    }
    /// Whether the normalized path matches.
    #[inline]
    pub fn matches(&self, path: &str) -> bool {
        self.0.iter().any(|p| p.matches(path))
    }
}

/// Header values.
#[derive(Debug, Default)]
pub struct ValueSet(Vec<StrPattern>);

impl ValueSet {
    /// Compiles patterns.
    pub fn new(p: &[StrPattern]) -> Self {
        Self(p.to_vec())
    }
    /// Whether `v` matches.
    #[inline]
    pub fn matches(&self, v: &str) -> bool {
        self.0.iter().any(|p| p.matches(v))
    }
}
