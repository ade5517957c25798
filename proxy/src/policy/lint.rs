//! Load-time lint warnings (POLICY.md §6): not errors; each has a stable code, the rule id (or
//! policy name) and a one-line fix.

use std::fmt;

use svidcar_agent::SpiffeId;

use super::compile::selected;
use super::load::Loaded;
use super::model::{Action, Direction, Policy, Rule, WhenKey, WhenValues};

/// One lint warning.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LintWarning {
    /// Stable code, `L001`…`L013` (`L012`, `L013`: limits, see docs/policy-limits.md).
    pub code: &'static str,
    /// Rule id (`<policy>/rules[<i>]`), policy name, or the set for set-wide warnings.
    pub target: String,
    /// What is risky.
    pub message: String,
    /// One-line fix.
    pub fix: &'static str,
}

impl fmt::Display for LintWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {} (fix: {})",
            self.code, self.target, self.message, self.fix
        )
    }
}

fn has_not(r: &Rule) -> bool {
    r.from.iter().flatten().any(|f| {
        f.not_spiffe_ids.is_some()
            || f.not_trust_domains.is_some()
            || f.not_namespaces.is_some()
            || f.not_service_accounts.is_some()
            || f.not_ip_blocks.is_some()
    }) || r.to.iter().flatten().any(|t| {
        t.not_ports.is_some()
            || t.not_methods.is_some()
            || t.not_paths.is_some()
            || t.not_hosts.is_some()
            || t.not_cidrs.is_some()
            || t.not_spiffe_ids.is_some()
    }) || r.when.iter().flatten().any(|c| c.not_values.is_some())
}

fn http_fields(r: &Rule, dir: Direction) -> bool {
    r.to.iter().flatten().any(|t| {
        t.methods.is_some()
            || t.not_methods.is_some()
            || t.paths.is_some()
            || t.not_paths.is_some()
            || dir == Direction::Inbound && (t.hosts.is_some() || t.not_hosts.is_some())
    }) || r.when.iter().flatten().any(|c| c.key.http_only())
}

fn has_ports(r: &Rule) -> bool {
    r.to.iter()
        .flatten()
        .any(|t| t.ports.is_some() || t.not_ports.is_some())
        || r.when
            .iter()
            .flatten()
            .any(|c| c.key == WhenKey::DestinationPort)
}

/// A deny rule whose every present section is `{}` or absent: it matches everything.
fn matches_everything(r: &Rule) -> bool {
    let entry_empty_to = |t: &super::model::To| {
        t.ports.is_none()
            && t.not_ports.is_none()
            && t.methods.is_none()
            && t.not_methods.is_none()
            && t.paths.is_none()
            && t.not_paths.is_none()
            && t.hosts.is_none()
            && t.not_hosts.is_none()
            && t.cidrs.is_none()
            && t.not_cidrs.is_none()
            && t.spiffe_ids.is_none()
            && t.not_spiffe_ids.is_none()
    };
    r.from.as_ref().is_none_or(|v| v.iter().any(from_is_empty))
        && r.to.as_ref().is_none_or(|v| v.iter().any(entry_empty_to))
        && r.when.as_ref().is_none_or(Vec::is_empty)
}

fn from_is_empty(f: &super::model::From) -> bool {
    f.spiffe_ids.is_none()
        && f.not_spiffe_ids.is_none()
        && f.trust_domains.is_none()
        && f.not_trust_domains.is_none()
        && f.namespaces.is_none()
        && f.not_namespaces.is_none()
        && f.service_accounts.is_none()
        && f.not_service_accounts.is_none()
        && f.ip_blocks.is_none()
        && f.not_ip_blocks.is_none()
        && f.authenticated.is_none()
}

/// L009: no source constraint at all (`from` absent, or an entry `{}`), so plaintext peers
/// match too.
fn no_source_constraint(r: &Rule) -> bool {
    r.from.as_ref().is_none_or(|v| v.iter().any(from_is_empty))
}

/// A positive field given as an empty list matches nothing.
fn empty<T>(v: &Option<Vec<T>>) -> bool {
    v.as_ref().is_some_and(Vec::is_empty)
}

fn values_empty(v: &WhenValues) -> bool {
    match v {
        WhenValues::Principal(p) => p.is_empty(),
        WhenValues::TrustDomain(p) => p.is_empty(),
        WhenValues::Name(p) => p.is_empty(),
        WhenValues::Ip(p) => p.is_empty(),
        WhenValues::Port(p) => p.is_empty(),
        WhenValues::Host(p) => p.is_empty(),
        WhenValues::Header(p) => p.is_empty(),
    }
}

/// L010: the section (or condition) of `r` that can match nothing, if any.
fn never_matches(r: &Rule) -> Option<&'static str> {
    let from_never = |f: &super::model::From| {
        empty(&f.spiffe_ids)
            || empty(&f.trust_domains)
            || empty(&f.namespaces)
            || empty(&f.service_accounts)
            || empty(&f.ip_blocks)
    };
    let to_never = |t: &super::model::To| {
        empty(&t.ports)
            || empty(&t.methods)
            || empty(&t.paths)
            || empty(&t.hosts)
            || empty(&t.cidrs)
            || empty(&t.spiffe_ids)
    };
    if r.from.as_ref().is_some_and(|v| v.iter().all(from_never)) {
        return Some("from");
    }
    if r.to.as_ref().is_some_and(|v| v.iter().all(to_never)) {
        return Some("to");
    }
    let impossible = |c: &super::model::Condition| c.values.as_ref().is_some_and(values_empty);
    r.when.iter().flatten().any(impossible).then_some("when")
}

/// How far a section reaches for L011: `None` = some field narrows it; `Some(None)` = it
/// covers everything without naming a whole-space pattern (absent, or an entry `{}`);
/// `Some(Some(what))` = it covers everything through a whole-space pattern.
type Reach = Option<Option<&'static str>>;

/// The widest entry of a section (entries are OR-ed).
fn widest(entries: impl Iterator<Item = Reach>) -> Reach {
    entries.fold(None, |best, e| match (best, e) {
        (Some(Some(w)), _) | (_, Some(Some(w))) => Some(Some(w)),
        (Some(None), _) | (_, Some(None)) => Some(None),
        _ => None,
    })
}

/// Whether a present field is the whole space (any listed value is), or `None` if absent.
fn whole<T>(v: &Option<Vec<T>>, is_whole: impl Fn(&T) -> bool) -> Option<bool> {
    v.as_ref().map(|v| v.iter().any(is_whole))
}

fn from_reach(f: &super::model::From) -> Reach {
    use super::pattern::SpiffeKind;
    let narrowing = f.not_spiffe_ids.is_some()
        || f.not_trust_domains.is_some()
        || f.namespaces.is_some()
        || f.not_namespaces.is_some()
        || f.service_accounts.is_some()
        || f.not_service_accounts.is_some()
        || f.ip_blocks.is_some()
        || f.not_ip_blocks.is_some()
        || f.authenticated == Some(false);
    let ids = whole(&f.spiffe_ids, |p| match &p.kind {
        SpiffeKind::Any => true,
        SpiffeKind::Glob { td, segs, tail } => td.is_none() && segs.is_empty() && *tail,
        SpiffeKind::Exact(_) => false,
    });
    let tds = whole(&f.trust_domains, |t| t.name.is_none());
    if narrowing || ids == Some(false) || tds == Some(false) {
        return None;
    }
    let named = ids.is_some() || tds.is_some() || f.authenticated == Some(true);
    Some(named.then_some("every authenticated peer"))
}

fn to_reach(t: &super::model::To) -> Reach {
    use super::pattern::{HostPattern, MethodPattern, PathPattern, PathSeg, StrPattern};
    let narrowing = t.ports.is_some()
        || t.not_ports.is_some()
        || t.not_methods.is_some()
        || t.not_paths.is_some()
        || t.not_hosts.is_some()
        || t.cidrs.is_some()
        || t.not_cidrs.is_some()
        || t.spiffe_ids.is_some()
        || t.not_spiffe_ids.is_some();
    let methods = whole(&t.methods, |m| *m == MethodPattern::Any);
    let hosts = whole(&t.hosts, |h| *h == HostPattern::Any);
    let paths = whole(&t.paths, |p| match p {
        PathPattern::Str(StrPattern::Any) => true,
        PathPattern::Str(StrPattern::Prefix(s)) => s == "/",
        PathPattern::Template(segs) => {
            matches!(segs.as_slice(), [PathSeg::Lit(l), PathSeg::Rest] if l.is_empty())
        }
        PathPattern::Str(_) => false,
    });
    if narrowing || methods == Some(false) || hosts == Some(false) || paths == Some(false) {
        return None;
    }
    Some(paths.map(|_| "every HTTP path"))
}

/// L011: what a deny rule covers when its every present field is the whole space and it
/// names at least one whole-space identity or path pattern (`spiffeIds: ["*"]`,
/// `trustDomains: ["*"]`, `authenticated: true`, `paths: ["*"]` / `"/*"` / `"/{**}"`).
/// `None` when some field narrows it (or it names none: that is L005).
fn covers_whole_space(r: &Rule) -> Option<String> {
    if r.when.as_ref().is_some_and(|w| !w.is_empty()) {
        return None;
    }
    let from = match &r.from {
        None => Some(None),
        Some(v) => widest(v.iter().map(from_reach)),
    }?;
    let to = match &r.to {
        None => Some(None),
        Some(v) => widest(v.iter().map(to_reach)),
    }?;
    match (from, to) {
        (Some(a), Some(b)) => Some(format!("{a} on {b}")),
        (Some(a), None) | (None, Some(a)) => Some(a.to_string()),
        (None, None) => None,
    }
}

fn upper_case_ids(r: &Rule) -> bool {
    let ids =
        |v: &Option<Vec<super::pattern::SpiffePattern>>| v.iter().flatten().any(|p| p.had_upper);
    let tds = |v: &Option<Vec<super::pattern::TdPattern>>| v.iter().flatten().any(|p| p.had_upper);
    r.from.iter().flatten().any(|f| {
        ids(&f.spiffe_ids)
            || ids(&f.not_spiffe_ids)
            || tds(&f.trust_domains)
            || tds(&f.not_trust_domains)
    }) || r
        .to
        .iter()
        .flatten()
        .any(|t| ids(&t.spiffe_ids) || ids(&t.not_spiffe_ids))
        || r.when.iter().flatten().any(|c| {
            [&c.values, &c.not_values]
                .into_iter()
                .flatten()
                .any(|v| match v {
                    WhenValues::Principal(p) => p.iter().any(|p| p.had_upper),
                    WhenValues::TrustDomain(p) => p.iter().any(|p| p.had_upper),
                    _ => false,
                })
        })
}

/// All warnings for `loaded`; `local_ids` enables L006.
pub(crate) fn lint(loaded: &Loaded, local_ids: &[SpiffeId]) -> Vec<LintWarning> {
    let mut out = Vec::new();
    let mut warn = |code, target: String, message: String, fix| {
        out.push(LintWarning {
            code,
            target,
            message,
            fix,
        })
    };
    if loaded.policies.is_empty() {
        warn(
            "L008",
            "set".into(),
            "the policy set holds no policies: implicit defaults allow everything".into(),
            "add policies or set defaults, or remove the policy path to use the built-in policy",
        );
    }
    let deny_all: Vec<&Policy> = loaded
        .policies
        .iter()
        .map(|s| &s.policy)
        .filter(|p| {
            p.action == Action::Deny
                && p.dry_run != Some(true)
                && p.rules.iter().flatten().any(matches_everything)
        })
        .collect();
    // Directions with at least one enforced allow rule (L011).
    let has_allow = |d: Direction| {
        loaded.policies.iter().map(|s| &s.policy).any(|p| {
            p.direction == d
                && p.action == Action::Allow
                && p.dry_run != Some(true)
                && p.rules.as_ref().is_some_and(|r| !r.is_empty())
        })
    };
    for sp in &loaded.policies {
        let p = &sp.policy;
        if p.action == Action::Deny && p.rules.as_ref().is_none_or(Vec::is_empty) {
            warn(
                "L010",
                p.name.clone(),
                "deny policy without rules: it can never fire".into(),
                "add rules, or remove the policy",
            );
        }
        if !local_ids.is_empty() && !local_ids.iter().any(|id| selected(p, id)) {
            warn(
                "L006",
                p.name.clone(),
                "the selector matches none of the given --local-id values".into(),
                "fix the selector's spiffeIds or drop the policy",
            );
        }
        if p.selector
            .iter()
            .flat_map(|s| s.spiffe_ids.iter().flatten())
            .any(|s| s.had_upper)
        {
            warn(
                "L007",
                p.name.clone(),
                "selector SPIFFE ID written with upper-case letters (accepted, lowercased)".into(),
                "write scheme and trust domain in lower case",
            );
        }
        for (i, r) in p.rules.iter().flatten().enumerate() {
            let id = format!("{}/rules[{i}]", p.name);
            let allow = p.action == Action::Allow;
            if allow && has_not(r) {
                warn(
                    "L001",
                    id.clone(),
                    "a `not…` field in an allow rule also matches an absent attribute".into(),
                    "use positive fields in allow rules, or put the exclusion in a deny rule",
                );
            }
            if p.action == Action::Deny && http_fields(r, p.direction) && !has_ports(r) {
                warn("L002", id.clone(), "deny rule with HTTP-only fields and no `ports`: on TCP those fields are ignored, so it denies every TCP connection its other sections match".into(), "add `ports` naming the HTTP ports");
            }
            let inbound_hosts = p.direction == Direction::Inbound
                && (r
                    .to
                    .iter()
                    .flatten()
                    .any(|t| t.hosts.is_some() || t.not_hosts.is_some())
                    || r.when
                        .iter()
                        .flatten()
                        .any(|c| c.key == WhenKey::RequestHost));
            if allow && inbound_hosts {
                warn("L003", id.clone(), "inbound `hosts` / `request.host` in an allow rule: the Host header is chosen by the client".into(), "authorize on the peer identity instead");
            }
            if allow
                && r.from
                    .iter()
                    .flatten()
                    .any(|f| f.authenticated == Some(false))
            {
                warn(
                    "L004",
                    id.clone(),
                    "`authenticated: false` in an allow rule admits plaintext peers".into(),
                    "require mTLS (`authenticated: true` or spiffeIds)",
                );
            }
            if allow {
                let shadowed = deny_all.iter().find(|d| {
                    d.direction == p.direction && (d.selector.is_none() || d.selector == p.selector)
                });
                if let Some(d) = shadowed {
                    warn(
                        "L005",
                        id.clone(),
                        format!(
                            "can never decide: deny policy {:?} matches everything it does",
                            d.name
                        ),
                        "narrow the deny rule or remove this allow rule",
                    );
                }
            }
            if allow && p.direction == Direction::Inbound && no_source_constraint(r) {
                warn(
                    "L009",
                    id.clone(),
                    "allow rule without a source constraint (`from` absent or an entry `{}`): it admits unauthenticated (plaintext) peers too, wider than `authenticated: false`".into(),
                    "add `from: [{authenticated: true}]`, spiffeIds or trustDomains",
                );
            }
            if p.action == Action::Deny {
                if let Some(section) = never_matches(r) {
                    warn(
                        "L010",
                        id.clone(),
                        format!("deny rule can never fire: its `{section}` section matches nothing (an empty list)"),
                        "fill in the empty list, or remove the rule",
                    );
                }
            }
            if p.action == Action::Deny && p.dry_run != Some(true) && has_allow(p.direction) {
                if let Some(what) = covers_whole_space(r) {
                    warn(
                        "L011",
                        id.clone(),
                        format!("deny rule covers {what}: the allow rules of this direction can never decide what it covers"),
                        "narrow the deny rule (paths, ports, identities), or remove the allow rules it shadows",
                    );
                }
            }
            if upper_case_ids(r) {
                warn("L007", id, "trust domain or SPIFFE ID written with upper-case letters (accepted, lowercased)".into(), "write scheme and trust domain in lower case");
            }
        }
    }
    out.extend(super::limits::lint_limits(&loaded.limits));
    out
}
