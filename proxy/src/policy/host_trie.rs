//! Host name sets compiled into a reversed-label trie: `api.example.com` is stored as
//! `com → example → api`; `*.example.com` marks the `example` node as matching any name with at
//! least one more label. Lookups walk the request name's labels right to left, no allocation.

use super::fxhash::FxHashMap;
use super::pattern::{is_ip_literal, HostPattern};

#[derive(Debug, Default)]
struct Node {
    children: FxHashMap<Box<str>, Node>,
    /// An exact name ends here.
    exact: bool,
    /// `*.<this>`: one or more further labels match.
    wildcard: bool,
}

/// A compiled set of host patterns.
#[derive(Debug, Default)]
pub struct HostSet {
    any: bool,
    exact: Vec<Box<str>>,
    suffixes: Vec<Box<str>>,
    root: Node,
}

impl HostSet {
    /// Compiles patterns.
    pub fn new<'a>(patterns: impl IntoIterator<Item = &'a HostPattern>) -> Self {
        let mut set = Self::default();
        for p in patterns {
            let (name, wild) = match p {
                HostPattern::Any => {
                    set.any = true;
                    continue;
                }
                HostPattern::Exact(n) => {
                    set.exact.push(n.as_str().into());
                    (n, false)
                }
                HostPattern::Wildcard(n) => {
                    set.suffixes.push(n.as_str().into());
                    (n, true)
                }
            };
            let mut node = &mut set.root;
            for label in name.rsplit('.') {
                node = node.children.entry(label.into()).or_default();
            }
            if wild {
                node.wildcard = true;
            } else {
                node.exact = true;
            }
        }
        set
    }

    /// Index keys: `(exact names, wildcard suffixes)`; `None` when the set holds `*`.
    pub fn index_keys(&self) -> Option<(Vec<&str>, Vec<&str>)> {
        if self.any {
            return None;
        }
        Some((
            self.exact.iter().map(|s| &**s).collect(),
            self.suffixes.iter().map(|s| &**s).collect(),
        ))
    }

    /// Whether the (normalized: lowercase, no port, no trailing dot) name matches.
    pub fn matches(&self, name: &str) -> bool {
        if self.any {
            return true;
        }
        if is_ip_literal(name) {
            return false;
        }
        let mut node = &self.root;
        let mut labels = name.rsplit('.').peekable();
        while let Some(label) = labels.next() {
            match node.children.get(label) {
                Some(n) => node = n,
                None => return false,
            }
            if node.wildcard && labels.peek().is_some() {
                return true;
            }
        }
        node.exact
    }
}
