//! The authorization policy engine (POLICY.md). Pure: no I/O except loading files.
//!
//! How the proxy uses it:
//! 1. Load: [`PolicySet::load`] (a file or a directory; a bad set is rejected whole with errors
//!    naming file, line and field) or [`PolicySet::builtin`] when no policy path is configured.
//!    For hot reload use [`reload::spawn_watcher`] instead, which keeps the old set on error.
//! 2. Compile for this proxy's own SPIFFE ID: [`PolicySet::compile`] → [`CompiledPolicy`]
//!    (selectors applied; share as `Arc`).
//! 3. Per connection / HTTP request: normalize the path with
//!    [`EffectiveSettings::normalize_path`] (of [`CompiledPolicy::settings`]; a refused path is
//!    answered `400` and counted as [`PathError::reason`]) and names with [`normalize_name`], fill a [`Request`], call
//!    [`CompiledPolicy::decide`], then [`log_decision`]. Forward the normalized path.
//! 4. On reload, re-evaluate open non-HTTP connections when
//!    `settings().on_policy_change == OnPolicyChange::Reevaluate`.
//!
//! ```
//! use svidcar_agent::SpiffeId;
//! use svidcar_proxy::policy::{Direction, PolicySet, Protocol, Request};
//! let yaml = r#"
//! apiVersion: svidcar.io/v1alpha1
//! kind: PolicySet
//! policies:
//! - name: web
//!   direction: inbound
//!   action: allow
//!   rules: [{ from: [{ spiffeIds: ["spiffe://td/web"] }], to: [{ ports: [8080] }] }]
//! "#;
//! let set = PolicySet::from_yaml("p.yaml", yaml).unwrap();
//! let policy = set.compile(&SpiffeId::parse("spiffe://td/api").unwrap());
//! let web = SpiffeId::parse("spiffe://td/web").unwrap();
//! let mut req = Request::new(Direction::Inbound, Protocol::Tcp);
//! req.peer = Some(&web);
//! req.destination_port = Some(8080);
//! let d = policy.decide(&req);
//! assert!(d.allow);
//! assert_eq!(d.reason.to_string(), "web/rules[0]");
//! ```

mod cidr;
mod compile;
mod complete;
mod eval;
mod explain;
mod fxhash;
mod host_trie;
pub mod limits;
mod lint;
mod load;
mod log;
mod matchers;
pub mod model;
mod normalize;
mod observe;
mod pattern;
pub mod reload;
pub mod replay;
mod request;
pub mod suggest;
pub mod template;

use std::path::{Path, PathBuf};

use svidcar_agent::{SpiffeId, TrustDomain};

pub use compile::{CompiledPolicy, PolicySummary};
pub use explain::{Explanation, RuleCheck};
pub use lint::LintWarning;
pub use load::{EffectiveSettings, LoadIssue, PolicyLoadError, SourcedPolicy};
pub use log::log_decision;
pub use model::{DefaultAction, Direction, EscapedSlashes, OnPolicyChange, PathNormalization};
pub use normalize::{normalize_path, normalize_path_with, query_part, PathError};
pub use reload::{spawn_watcher, spawn_watcher_with, PolicyWatcher};
pub use request::{
    normalize_name, Decision, HeaderSource, NoHeaders, Protocol, Reason, Request, RuleId, Verdict,
};

use load::Loaded;
use model::{Action, Defaults, From, Policy, Rule, To};
use pattern::{PortRange, TdPattern};

/// A loaded and validated policy set (all policies, all selectors).
#[derive(Debug, Clone)]
pub struct PolicySet {
    loaded: Loaded,
    builtin: bool,
}

impl PolicySet {
    /// Loads a policy file or a directory of `*.yaml`/`*.yml` files (lexicographic order).
    /// Any error rejects the whole set; every issue names file, line and field.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, PolicyLoadError> {
        Ok(Self {
            loaded: load::load_path(path.as_ref())?,
            builtin: false,
        })
    }

    /// Loads one in-memory file (`name` is used in error messages).
    pub fn from_yaml(name: &str, text: &str) -> Result<Self, PolicyLoadError> {
        Self::from_files(&[(PathBuf::from(name), text.to_string())])
    }

    /// Loads in-memory files given as `(name, text)`, in canonical (file-name) order.
    pub fn from_files(files: &[(PathBuf, String)]) -> Result<Self, PolicyLoadError> {
        Ok(Self {
            loaded: load::load_texts(files)?,
            builtin: false,
        })
    }

    /// The built-in policy used when no policy path is configured (POLICY.md §9): inbound admits
    /// any authenticated peer of `own_td` (`defaults.inbound: deny`), egress is allowed and
    /// logged (an audit rule matching everything).
    pub fn builtin(own_td: &TrustDomain) -> Self {
        Self::builtin_with_permissive_ports(own_td, &[])
    }

    /// [`Self::builtin`], also admitting plaintext (unauthenticated) peers on the given
    /// inbound ports, which the proxy configuration marks `permissive`.
    pub fn builtin_with_permissive_ports(own_td: &TrustDomain, permissive_ports: &[u16]) -> Self {
        let td = TdPattern {
            name: Some(own_td.name().to_string()),
            had_upper: false,
        };
        let mut rules = vec![Rule {
            from: Some(vec![From {
                trust_domains: Some(vec![td]),
                ..From::default()
            }]),
            ..Rule::default()
        }];
        if !permissive_ports.is_empty() {
            rules.push(Rule {
                from: Some(vec![From {
                    authenticated: Some(false),
                    ..From::default()
                }]),
                to: Some(vec![To {
                    ports: Some(
                        permissive_ports
                            .iter()
                            .map(|&p| PortRange { lo: p, hi: p })
                            .collect(),
                    ),
                    ..To::default()
                }]),
                when: None,
            });
        }
        let policy = |name: &str, direction, action, rules| SourcedPolicy {
            policy: Policy {
                name: name.into(),
                direction,
                action,
                dry_run: None,
                selector: None,
                rules: Some(rules),
            },
            file: PathBuf::from("<builtin>"),
            line: None,
        };
        let loaded = Loaded {
            policies: vec![
                policy(
                    "builtin-same-trust-domain",
                    Direction::Inbound,
                    Action::Allow,
                    rules,
                ),
                policy(
                    "builtin-egress-log",
                    Direction::Egress,
                    Action::Audit,
                    vec![Rule::default()],
                ),
            ],
            defaults: Defaults {
                inbound: Some(DefaultAction::Deny),
                egress: Some(DefaultAction::Allow),
            },
            settings: EffectiveSettings::default(),
            files: Vec::new(),
            limits: Vec::new(),
        };
        Self {
            loaded,
            builtin: true,
        }
    }

    /// Compiles the set for this proxy's own SPIFFE ID (selectors applied).
    pub fn compile(&self, local_id: &SpiffeId) -> CompiledPolicy {
        compile::compile(&self.loaded, local_id, self.builtin)
    }

    /// Lint warnings (POLICY.md §6); `local_ids` enables `L006`.
    pub fn lint(&self, local_ids: &[SpiffeId]) -> Vec<LintWarning> {
        lint::lint(&self.loaded, local_ids)
    }

    /// Settings with defaults applied.
    pub fn settings(&self) -> EffectiveSettings {
        self.loaded.settings
    }

    /// Policies in canonical order.
    pub fn policies(&self) -> &[SourcedPolicy] {
        &self.loaded.policies
    }

    /// Files the set was read from, in canonical order.
    pub fn files(&self) -> &[PathBuf] {
        &self.loaded.files
    }

    /// Whether this is the built-in policy.
    pub fn is_builtin(&self) -> bool {
        self.builtin
    }
}

impl CompiledPolicy {
    /// The local SPIFFE ID this policy was compiled for.
    pub fn local_id(&self) -> &SpiffeId {
        &self.local_id
    }

    /// Settings (path normalization, policy-change behavior).
    pub fn settings(&self) -> EffectiveSettings {
        self.settings
    }

    /// Whether any applicable rule of `direction` uses an HTTP-only field (methods, paths,
    /// inbound hosts, `request.*` conditions).
    pub fn uses_http_fields(&self, direction: Direction) -> bool {
        self.dirs[compile::dir_index(direction)].uses_http
    }

    /// Whether this was compiled from the built-in policy.
    pub fn is_builtin(&self) -> bool {
        self.builtin
    }

    /// The per-caller limits (empty: unlimited).
    pub fn limits(&self) -> &limits::CompiledLimits {
        &self.limits
    }

    /// Takes over the limit counters of `prev` (hot reload, see
    /// [`limits::CompiledLimits::adopt`]).
    pub fn adopt_limits(&mut self, prev: &CompiledPolicy) {
        self.limits.adopt(&prev.limits);
    }

    /// The effective default of a direction, as reported in reasons (`allow`, `deny`,
    /// `allow(implicit)`, `deny(implicit)`).
    pub fn effective_default(&self, direction: Direction) -> String {
        let t = &self.dirs[compile::dir_index(direction)];
        match t.default {
            Some(DefaultAction::Allow) => "allow".into(),
            Some(DefaultAction::Deny) => "deny".into(),
            None if t.enforced.has_allow_policy => "deny(implicit)".into(),
            None => "allow(implicit)".into(),
        }
    }

    /// Policies of the set (selected or not) with their rule ids, in canonical order.
    pub fn policies(&self) -> &[PolicySummary] {
        &self.summary
    }

    /// The compiled set for the admin `/policy` endpoint, including effective defaults.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "localId": self.local_id.as_str(),
            "builtin": self.builtin,
            "defaults": {
                "inbound": self.effective_default(Direction::Inbound),
                "egress": self.effective_default(Direction::Egress),
            },
            "settings": self.settings,
            "policies": self.summary,
            "limits": self.limits.tracked().into_iter().map(|(name, callers, overflowed)| {
                serde_json::json!({ "name": name, "trackedCallers": callers, "overflowed": overflowed })
            }).collect::<Vec<_>>(),
        })
    }
}
