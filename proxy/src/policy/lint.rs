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
    /// Stable code, `L001`…`L008`.
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
    let entry_empty_from = |f: &super::model::From| {
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
    };
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
    r.from
        .as_ref()
        .is_none_or(|v| v.iter().any(entry_empty_from))
        && r.to.as_ref().is_none_or(|v| v.iter().any(entry_empty_to))
        && r.when.as_ref().is_none_or(Vec::is_empty)
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
    for sp in &loaded.policies {
        let p = &sp.policy;
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
            if upper_case_ids(r) {
                warn("L007", id, "trust domain or SPIFFE ID written with upper-case letters (accepted, lowercased)".into(), "write scheme and trust domain in lower case");
            }
        }
    }
    out
}
