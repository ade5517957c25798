//! Compiling a loaded set for one local SPIFFE ID: selectors applied, rules turned into
//! matchers, and per-direction indexes (deny / allow / shadow / audit) so a decision looks at
//! few rules even with 10k of them.

use std::sync::Arc;

use svidcar_agent::SpiffeId;

use super::fxhash::FxHashMap;
use super::host_trie::HostSet;
use super::load::{EffectiveSettings, Loaded};
use super::matchers::{CidrSet, Field, IdSet, MethodSet, NameSet, PathSet, PortSet, ValueSet};
use super::model::{
    Action, Condition, DefaultAction, Direction, From, Policy, Rule, To, WhenKey, WhenValues,
};

/// A compiled `from` entry.
#[derive(Debug)]
pub(crate) struct CFrom {
    pub spiffe: Field<IdSet>,
    pub td: Field<NameSet>,
    pub ns: Field<NameSet>,
    pub sa: Field<NameSet>,
    pub ip: Field<CidrSet>,
    pub authenticated: Option<bool>,
}

/// A compiled `to` entry.
#[derive(Debug)]
pub(crate) struct CTo {
    pub ports: Field<PortSet>,
    pub methods: Field<MethodSet>,
    pub paths: Field<PathSet>,
    /// Inbound: HTTP Host (HTTP-only). Egress: the observed name.
    pub hosts: Field<HostSet>,
    pub cidrs: Field<CidrSet>,
    pub spiffe: Field<IdSet>,
}

/// Compiled `when` values.
#[derive(Debug)]
pub(crate) enum CValues {
    Id(IdSet),
    Name(NameSet),
    Ip(CidrSet),
    Port(PortSet),
    Host(HostSet),
    Value(ValueSet),
}

/// A compiled `when` condition.
#[derive(Debug)]
pub(crate) struct CCond {
    pub key: WhenKey,
    pub field: Field<CValues>,
}

/// A compiled rule.
#[derive(Debug)]
pub(crate) struct CRule {
    /// `<policy>/rules[<i>]`.
    pub id: Arc<str>,
    pub direction: Direction,
    pub from: Option<Vec<CFrom>>,
    pub to: Option<Vec<CTo>>,
    pub when: Option<Vec<CCond>>,
    /// Uses an HTTP-only field (methods, paths, inbound hosts, `request.*`).
    pub http_only: bool,
}

/// Rule ordinals of one group. A rule that can only match a peer under some exact ID or ID
/// prefix is filed under those keys (`by_peer`); an egress rule that can only match some exact
/// names or `*.suffix` names under those (`by_name`, `by_suffix`); the others go to `rest`.
/// Every list ascends, so the first match in canonical order is the minimum over the lists.
#[derive(Debug, Default)]
pub(crate) struct RuleIndex {
    pub by_peer: FxHashMap<Box<str>, Vec<u32>>,
    pub by_name: FxHashMap<Box<str>, Vec<u32>>,
    pub by_suffix: FxHashMap<Box<str>, Vec<u32>>,
    pub rest: Vec<u32>,
    pub len: usize,
}

impl RuleIndex {
    fn push(&mut self, ord: u32, rule: &CRule) {
        self.len += 1;
        if let Some(keys) = peer_keys(rule) {
            for k in keys {
                self.by_peer.entry(k.into()).or_default().push(ord);
            }
        } else if let Some((names, suffixes)) = name_keys(rule) {
            for n in names {
                self.by_name.entry(n.into()).or_default().push(ord);
            }
            for n in suffixes {
                self.by_suffix.entry(n.into()).or_default().push(ord);
            }
        } else {
            self.rest.push(ord);
        }
    }

    fn finish(&mut self) {
        let maps = [&mut self.by_peer, &mut self.by_name, &mut self.by_suffix];
        for m in maps {
            for v in m.values_mut() {
                v.sort_unstable();
                v.dedup();
            }
        }
    }
}

/// Index keys (exact peer IDs, ID prefixes, `spiffe://td`) one of which a rule needs.
fn peer_keys(rule: &CRule) -> Option<Vec<String>> {
    let from = rule.from.as_ref()?;
    let mut keys = Vec::new();
    for f in from {
        if let Some(ids) = &f.spiffe.pos {
            keys.extend(ids.index_keys()?);
        } else if let Some(tds) = &f.td.pos {
            keys.extend(tds.only_exact()?.map(|td| format!("spiffe://{td}")));
        } else {
            return None;
        }
    }
    Some(keys)
}

/// Exact egress names and wildcard suffixes one of which a rule needs.
fn name_keys(rule: &CRule) -> Option<(Vec<&str>, Vec<&str>)> {
    if rule.direction != Direction::Egress {
        return None;
    }
    let to = rule.to.as_ref()?;
    let (mut names, mut suffixes) = (Vec::new(), Vec::new());
    for t in to {
        let (n, s) = t.hosts.pos.as_ref()?.index_keys()?;
        names.extend(n);
        suffixes.extend(s);
    }
    Some((names, suffixes))
}

/// Deny and allow indexes of one evaluation set (enforced, or enforced + dry-run).
#[derive(Debug, Default)]
pub(crate) struct Group {
    pub deny: RuleIndex,
    pub allow: RuleIndex,
    /// The set contains an allow policy (for the implicit default).
    pub has_allow_policy: bool,
}

/// Everything for one direction.
#[derive(Debug, Default)]
pub(crate) struct DirTables {
    pub default: Option<DefaultAction>,
    pub enforced: Group,
    /// `None` when there is no dry-run policy (the shadow decision equals the actual one).
    pub shadow: Option<Group>,
    pub audit: RuleIndex,
    pub uses_http: bool,
}

/// A policy as seen by `explain` and `/policy`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySummary {
    /// Name.
    pub name: String,
    /// Direction.
    pub direction: Direction,
    /// Action.
    pub action: Action,
    /// Dry run.
    pub dry_run: bool,
    /// Whether the selector matches this proxy's ID.
    pub selected: bool,
    /// Source file.
    pub file: String,
    /// Rule ids in order.
    pub rules: Vec<String>,
}

/// The compiled policy for one local SPIFFE ID. Immutable; share it as `Arc<CompiledPolicy>`.
#[derive(Debug)]
pub struct CompiledPolicy {
    pub(crate) local_id: SpiffeId,
    pub(crate) rules: Vec<CRule>,
    pub(crate) dirs: [DirTables; 2],
    pub(crate) settings: EffectiveSettings,
    pub(crate) summary: Vec<PolicySummary>,
    pub(crate) builtin: bool,
    /// Per-caller limits (empty: unlimited).
    pub(crate) limits: super::limits::CompiledLimits,
}

pub(crate) fn dir_index(d: Direction) -> usize {
    match d {
        Direction::Inbound => 0,
        Direction::Egress => 1,
    }
}

/// Whether a policy's selector matches `local`.
pub(crate) fn selected(p: &Policy, local: &SpiffeId) -> bool {
    match p.selector.as_ref().and_then(|s| s.spiffe_ids.as_ref()) {
        None => true,
        Some(pats) => pats.iter().any(|pat| pat.matches(local)),
    }
}

/// Compiles `loaded` for `local`.
pub(crate) fn compile(loaded: &Loaded, local: &SpiffeId, builtin: bool) -> CompiledPolicy {
    let mut rules = Vec::new();
    let mut dirs: [DirTables; 2] = Default::default();
    dirs[0].default = loaded.defaults.inbound;
    dirs[1].default = loaded.defaults.egress;
    let mut shadow: [Group; 2] = Default::default();
    let mut has_dry: [bool; 2] = [false, false];
    let mut summary = Vec::new();
    for sp in &loaded.policies {
        let p = &sp.policy;
        let sel = selected(p, local);
        let dry = p.dry_run == Some(true);
        summary.push(PolicySummary {
            name: p.name.clone(),
            direction: p.direction,
            action: p.action,
            dry_run: dry,
            selected: sel,
            file: sp.file.display().to_string(),
            rules: (0..p.rules.as_ref().map_or(0, Vec::len))
                .map(|i| format!("{}/rules[{i}]", p.name))
                .collect(),
        });
        if !sel {
            continue;
        }
        let d = dir_index(p.direction);
        let t = &mut dirs[d];
        if p.action == Action::Allow {
            shadow[d].has_allow_policy = true;
            if !dry {
                t.enforced.has_allow_policy = true;
            }
        }
        has_dry[d] |= dry;
        for (i, rule) in p.rules.iter().flatten().enumerate() {
            let c = compile_rule(p, i, rule);
            let ord = rules.len() as u32;
            t.uses_http |= c.http_only;
            match p.action {
                Action::Audit => t.audit.push(ord, &c),
                Action::Allow => {
                    shadow[d].allow.push(ord, &c);
                    if !dry {
                        t.enforced.allow.push(ord, &c);
                    }
                }
                Action::Deny => {
                    shadow[d].deny.push(ord, &c);
                    if !dry {
                        t.enforced.deny.push(ord, &c);
                    }
                }
            }
            rules.push(c);
        }
    }
    for (d, mut g) in shadow.into_iter().enumerate() {
        let t = &mut dirs[d];
        t.enforced.deny.finish();
        t.enforced.allow.finish();
        t.audit.finish();
        if has_dry[d] {
            g.deny.finish();
            g.allow.finish();
            t.shadow = Some(g);
        }
    }
    CompiledPolicy {
        local_id: local.clone(),
        rules,
        dirs,
        settings: loaded.settings,
        summary,
        builtin,
        limits: super::limits::CompiledLimits::compile(&loaded.limits, local),
    }
}

fn compile_rule(p: &Policy, i: usize, r: &Rule) -> CRule {
    let inbound = p.direction == Direction::Inbound;
    let from = r
        .from
        .as_ref()
        .map(|v| v.iter().map(compile_from).collect::<Vec<_>>());
    let to =
        r.to.as_ref()
            .map(|v| v.iter().map(compile_to).collect::<Vec<_>>());
    let when = r
        .when
        .as_ref()
        .map(|v| v.iter().map(compile_cond).collect::<Vec<_>>());
    let to_http = r.to.iter().flatten().any(|t| {
        t.methods.is_some()
            || t.not_methods.is_some()
            || t.paths.is_some()
            || t.not_paths.is_some()
            || inbound && (t.hosts.is_some() || t.not_hosts.is_some())
    });
    let when_http = r.when.iter().flatten().any(|c| c.key.http_only());
    CRule {
        id: format!("{}/rules[{i}]", p.name).into(),
        direction: p.direction,
        from,
        to,
        when,
        http_only: to_http || when_http,
    }
}

pub(crate) fn compile_from(f: &From) -> CFrom {
    CFrom {
        spiffe: Field::new(&f.spiffe_ids, &f.not_spiffe_ids, IdSet::new),
        td: Field::new(
            &f.trust_domains,
            &f.not_trust_domains,
            NameSet::trust_domains,
        ),
        ns: Field::new(&f.namespaces, &f.not_namespaces, |v| {
            NameSet::names(v.iter().map(|n| &n.0))
        }),
        sa: Field::new(&f.service_accounts, &f.not_service_accounts, |v| {
            NameSet::names(v.iter().map(|n| &n.0))
        }),
        ip: Field::new(&f.ip_blocks, &f.not_ip_blocks, CidrSet::new),
        authenticated: f.authenticated,
    }
}

fn compile_to(t: &To) -> CTo {
    CTo {
        ports: Field::new(&t.ports, &t.not_ports, PortSet::new),
        methods: Field::new(&t.methods, &t.not_methods, MethodSet::new),
        paths: Field::new(&t.paths, &t.not_paths, PathSet::new),
        hosts: Field::new(&t.hosts, &t.not_hosts, |v| HostSet::new(v.iter())),
        cidrs: Field::new(&t.cidrs, &t.not_cidrs, CidrSet::new),
        spiffe: Field::new(&t.spiffe_ids, &t.not_spiffe_ids, IdSet::new),
    }
}

fn compile_values(v: &WhenValues) -> CValues {
    match v {
        WhenValues::Principal(p) => CValues::Id(IdSet::new(p)),
        WhenValues::TrustDomain(p) => CValues::Name(NameSet::trust_domains(p)),
        WhenValues::Name(p) => CValues::Name(NameSet::names(p.iter())),
        WhenValues::Ip(p) => CValues::Ip(CidrSet::new(p)),
        WhenValues::Port(p) => CValues::Port(PortSet::new(p)),
        WhenValues::Host(p) => CValues::Host(HostSet::new(p.iter())),
        WhenValues::Header(p) => CValues::Value(ValueSet::new(p)),
    }
}

fn compile_cond(c: &Condition) -> CCond {
    CCond {
        key: c.key.clone(),
        field: Field {
            pos: c.values.as_ref().map(compile_values),
            neg: c.not_values.as_ref().map(compile_values),
        },
    }
}
