//! Registration entries: which workloads (by selectors) get which SPIFFE IDs.
//!
//! An entry matches a workload when *all* its selectors are among the workload's selectors.
//! Several matching entries give several SVIDs, each with its hint.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::agent::attest::Selectors;
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// Why an entry is invalid.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EntryError {
    #[error("entry {0:?}: expected SPIFFE_ID=SELECTOR[,SELECTOR...]")]
    Syntax(String),
    #[error("entry SPIFFE ID {0:?}: {1}")]
    BadId(String, String),
    #[error("entry SPIFFE ID {id} is not in our trust domain {td}")]
    ForeignId { id: String, td: String },
    #[error("entry SPIFFE ID {0} has no path (a workload ID needs one)")]
    NoPath(String),
    #[error("entry {id}: selector {sel:?} is not TYPE:KEY:VALUE (e.g. unix:uid:1000)")]
    BadSelector { id: String, sel: String },
    #[error("entry {0}: at least one selector is required")]
    NoSelectors(String),
    #[error("entry {id}: federates_with {td:?}: {reason}")]
    BadFederatesWith {
        id: String,
        td: String,
        reason: String,
    },
}

/// One registration entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The identity issued to matching workloads.
    pub id: SpiffeId,
    /// All of these must be among the workload's selectors.
    pub selectors: BTreeSet<String>,
    /// SVID TTL for this entry (`None`: the agent's default).
    pub ttl: Option<Duration>,
    /// Workload API hint; defaults to the SPIFFE ID.
    pub hint: String,
    /// Foreign trust domains whose bundles the workload gets; empty means all.
    pub federates_with: BTreeSet<TrustDomain>,
}

impl Entry {
    /// Builds and validates an entry of trust domain `td`.
    pub fn new(
        td: &TrustDomain,
        id: &str,
        selectors: &[String],
        ttl: Option<Duration>,
        hint: Option<String>,
        federates_with: &[String],
    ) -> Result<Self, EntryError> {
        let parsed =
            SpiffeId::parse(id).map_err(|e| EntryError::BadId(id.to_string(), e.to_string()))?;
        if parsed.trust_domain() != *td {
            return Err(EntryError::ForeignId {
                id: id.to_string(),
                td: td.to_string(),
            });
        }
        if parsed.path().is_empty() {
            return Err(EntryError::NoPath(id.to_string()));
        }
        let mut sels = BTreeSet::new();
        for s in selectors {
            let s = s.trim();
            let mut parts = s.splitn(3, ':');
            let ok = matches!((parts.next(), parts.next(), parts.next()),
                (Some(a), Some(b), Some(c)) if !a.is_empty() && !b.is_empty() && !c.is_empty());
            if !ok {
                return Err(EntryError::BadSelector {
                    id: id.to_string(),
                    sel: s.to_string(),
                });
            }
            sels.insert(s.to_string());
        }
        if sels.is_empty() {
            return Err(EntryError::NoSelectors(id.to_string()));
        }
        let mut fw = BTreeSet::new();
        for t in federates_with {
            let parsed =
                TrustDomain::parse_lenient(t).map_err(|e| EntryError::BadFederatesWith {
                    id: id.to_string(),
                    td: t.clone(),
                    reason: e.to_string(),
                })?;
            fw.insert(parsed);
        }
        Ok(Self {
            hint: hint.unwrap_or_else(|| parsed.as_str().to_string()),
            id: parsed,
            selectors: sels,
            ttl,
            federates_with: fw,
        })
    }

    /// Parses the flag form `SPIFFE_ID=SELECTOR[,SELECTOR...]`.
    pub fn parse_flag(td: &TrustDomain, s: &str) -> Result<Self, EntryError> {
        let (id, sels) = s
            .split_once('=')
            .ok_or_else(|| EntryError::Syntax(s.to_string()))?;
        let sels: Vec<String> = sels
            .split(',')
            .filter(|x| !x.trim().is_empty())
            .map(str::to_string)
            .collect();
        Self::new(td, id, &sels, None, None, &[])
    }

    /// True when every selector of the entry is among `workload`.
    pub fn matches(&self, workload: &Selectors) -> bool {
        self.selectors.iter().all(|s| workload.contains(s))
    }
}

/// The entries matching a workload, in configuration order.
pub fn matching<'a>(entries: &'a [Entry], workload: &Selectors) -> Vec<&'a Entry> {
    entries.iter().filter(|e| e.matches(workload)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::parse("example.org").unwrap()
    }

    #[test]
    fn flag_and_matching() {
        let e =
            Entry::parse_flag(&td(), "spiffe://example.org/web=unix:uid:1000,unix:gid:50").unwrap();
        assert_eq!(e.hint, "spiffe://example.org/web");
        let mut w = Selectors::default();
        w.insert("unix:uid:1000".into());
        assert!(!e.matches(&w));
        w.insert("unix:gid:50".into());
        assert!(e.matches(&w));
        assert!(Entry::parse_flag(&td(), "spiffe://example.org/web").is_err());
        assert!(Entry::parse_flag(&td(), "spiffe://other.org/web=unix:uid:1").is_err());
        assert!(Entry::parse_flag(&td(), "spiffe://example.org=unix:uid:1").is_err());
        assert!(Entry::parse_flag(&td(), "spiffe://example.org/w=uid1000").is_err());
        assert!(Entry::parse_flag(&td(), "spiffe://example.org/w=").is_err());
    }
}
