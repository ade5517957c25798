//! Lint for overlapping limits (docs/policy-limits.md): per kind only the first matching limit
//! applies, so for two limits that set the same kind
//! - `L012`: the later one never applies (the earlier covers every caller and port it matches);
//! - `L013`: they overlap partially (a caller may match both, neither covers the other), so
//!   which one applies depends on their order.
//!
//! An override written first and a catch-all after it (the later covers the earlier) is the
//! intended pattern and not reported. Coverage and disjointness are decided conservatively: when
//! in doubt two limits are taken to overlap and not to cover each other.

use svidcar_agent::SpiffeId;

use super::super::lint::LintWarning;
use super::super::model::{From, Namespace, ServiceAccount};
use super::super::pattern::{IdSeg, NamePattern, PortRange, SpiffeKind, SpiffePattern, TdPattern};
use super::{Limit, LimitKind, SourcedLimit};

fn sets(l: &Limit, k: LimitKind) -> bool {
    match k {
        LimitKind::Connections => l.connections.is_some(),
        LimitKind::ConnectionsPerSecond => l.connections_per_second.is_some(),
        LimitKind::RequestsPerSecond => l.requests_per_second.is_some(),
    }
}

/// Warnings for the limits of a set (only limits with the same selector are compared: others
/// may apply to different workloads).
pub(crate) fn lint_limits(limits: &[SourcedLimit]) -> Vec<LintWarning> {
    let mut out = Vec::new();
    for (j, b) in limits.iter().enumerate() {
        for kind in [
            LimitKind::Connections,
            LimitKind::ConnectionsPerSecond,
            LimitKind::RequestsPerSecond,
        ] {
            if !sets(&b.limit, kind) {
                continue;
            }
            let earlier = limits[..j]
                .iter()
                .filter(|a| sets(&a.limit, kind) && a.limit.selector == b.limit.selector);
            for a in earlier {
                let (a, bl) = (&a.limit, &b.limit);
                if disjoint(a, bl) {
                    continue;
                }
                if covers(a, bl) {
                    out.push(LintWarning {
                        code: "L012",
                        target: format!("limits/{}", bl.name),
                        message: format!(
                            "its `{}` never applies: limit {:?}, earlier in the set, matches every caller and port it does (the first matching limit of a kind applies)",
                            kind.as_str(),
                            a.name
                        ),
                        fix: "put the more specific limit first, or remove this one",
                    });
                    break;
                }
                if !covers(bl, a) {
                    out.push(LintWarning {
                        code: "L013",
                        target: format!("limits/{}", bl.name),
                        message: format!(
                            "its `{}` overlaps limit {:?}: a caller matching both is counted by {:?} only (the first matching limit of a kind applies)",
                            kind.as_str(),
                            a.name,
                            a.name
                        ),
                        fix: "make the limits' callers or ports disjoint, or nest them (specific first)",
                    });
                }
            }
        }
    }
    out
}

fn ports_cover(a: &Option<Vec<PortRange>>, b: &Option<Vec<PortRange>>) -> bool {
    match (a, b) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => b
            .iter()
            .all(|r| a.iter().any(|q| q.lo <= r.lo && r.hi <= q.hi)),
    }
}

fn ports_disjoint(a: &Option<Vec<PortRange>>, b: &Option<Vec<PortRange>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a
            .iter()
            .all(|q| b.iter().all(|r| q.hi < r.lo || r.hi < q.lo)),
        _ => false,
    }
}

/// Whether `a` matches every caller and port `b` does.
fn covers(a: &Limit, b: &Limit) -> bool {
    if !ports_cover(&a.ports, &b.ports) {
        return false;
    }
    match (&a.from, &b.from) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(fa), Some(fb)) => fb.iter().all(|eb| fa.iter().any(|ea| entry_covers(ea, eb))),
    }
}

/// Whether no caller and port match both.
fn disjoint(a: &Limit, b: &Limit) -> bool {
    if ports_disjoint(&a.ports, &b.ports) {
        return true;
    }
    match (&a.from, &b.from) {
        (Some(fa), Some(fb)) => fa
            .iter()
            .all(|ea| fb.iter().all(|eb| entries_disjoint(ea, eb))),
        _ => false,
    }
}

fn has_not(f: &From) -> bool {
    f.not_spiffe_ids.is_some()
        || f.not_trust_domains.is_some()
        || f.not_namespaces.is_some()
        || f.not_service_accounts.is_some()
        || f.not_ip_blocks.is_some()
}

/// An exact ID as a parsed SPIFFE ID.
fn exact(p: &SpiffePattern) -> Option<SpiffeId> {
    match &p.kind {
        SpiffeKind::Exact(s) => SpiffeId::parse(s).ok(),
        _ => None,
    }
}

/// Whether pattern `a` matches every ID pattern `b` does.
fn pattern_covers(a: &SpiffePattern, b: &SpiffePattern) -> bool {
    if let Some(id) = exact(b) {
        return a.matches(&id);
    }
    match (&a.kind, &b.kind) {
        (SpiffeKind::Any, _) => true,
        (
            SpiffeKind::Glob {
                td: ta,
                segs: sa,
                tail: la,
            },
            SpiffeKind::Glob {
                td: tb,
                segs: sb,
                tail: lb,
            },
        ) => {
            let td = ta.is_none() || ta == tb;
            let segs = sa.len() <= sb.len()
                && sa.iter().zip(sb).all(|(x, y)| match (x, y) {
                    (IdSeg::One, _) => true,
                    (IdSeg::Lit(x), IdSeg::Lit(y)) => x == y,
                    (IdSeg::Lit(_), IdSeg::One) => false,
                });
            let len = if sa.len() < sb.len() {
                *la
            } else {
                *la || !*lb
            };
            td && segs && len
        }
        _ => false,
    }
}

fn td_of(p: &SpiffePattern) -> Option<&str> {
    match &p.kind {
        SpiffeKind::Exact(s) => s
            .strip_prefix("spiffe://")
            .map(|r| r.split('/').next().unwrap_or(r)),
        SpiffeKind::Glob { td, .. } => td.as_deref(),
        SpiffeKind::Any => None,
    }
}

fn name_in(pats: &[NamePattern], v: &str) -> bool {
    pats.iter().any(|p| match p {
        NamePattern::Any => true,
        NamePattern::Exact(x) => x == v,
    })
}

fn names(v: &[Namespace]) -> Vec<NamePattern> {
    v.iter().map(|n| n.0.clone()).collect()
}

fn sas(v: &[ServiceAccount]) -> Vec<NamePattern> {
    v.iter().map(|n| n.0.clone()).collect()
}

/// The exact IDs of `b` when all its ID patterns are exact.
fn exact_ids(b: &From) -> Option<Vec<SpiffeId>> {
    b.spiffe_ids.as_ref()?.iter().map(exact).collect()
}

/// Whether entry `a` matches every caller entry `b` does.
fn entry_covers(a: &From, b: &From) -> bool {
    if has_not(a) || a.ip_blocks.is_some() && a.ip_blocks != b.ip_blocks {
        return false;
    }
    let b_authenticated = b.authenticated == Some(true)
        || b.spiffe_ids.is_some()
        || b.trust_domains.is_some()
        || b.namespaces.is_some()
        || b.service_accounts.is_some();
    match a.authenticated {
        Some(true) if !b_authenticated => return false,
        Some(false) if b.authenticated != Some(false) => return false,
        _ => {}
    }
    if let Some(pa) = &a.spiffe_ids {
        let Some(pb) = &b.spiffe_ids else {
            return false;
        };
        if !pb.iter().all(|y| pa.iter().any(|x| pattern_covers(x, y))) {
            return false;
        }
    }
    if let Some(ta) = &a.trust_domains {
        let in_a = |td: Option<&str>| {
            ta.iter()
                .any(|t: &TdPattern| t.name.is_none() || td.is_some() && t.name.as_deref() == td)
        };
        let ok = match (&b.trust_domains, &b.spiffe_ids) {
            (Some(tb), _) => tb.iter().all(|t| in_a(t.name.as_deref())),
            (None, Some(pb)) => pb.iter().all(|p| in_a(td_of(p))),
            (None, None) => false,
        };
        if !ok {
            return false;
        }
    }
    if let Some(na) = &a.namespaces {
        let na = names(na);
        let ok = match (&b.namespaces, &b.service_accounts, exact_ids(b)) {
            (Some(nb), _, _) => names(nb).iter().all(|n| match n {
                NamePattern::Any => na.contains(&NamePattern::Any),
                NamePattern::Exact(x) => name_in(&na, x),
            }),
            (None, Some(sb), _) => sas(sb).iter().all(|s| match s {
                NamePattern::Any => na.contains(&NamePattern::Any),
                NamePattern::Exact(x) => name_in(&na, x.split('/').next().unwrap_or(x)),
            }),
            (None, None, Some(ids)) => ids.iter().all(|id| {
                id.k8s_namespace_and_sa()
                    .is_some_and(|(ns, _)| name_in(&na, ns))
            }),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    if let Some(sa) = &a.service_accounts {
        let sa = sas(sa);
        let ok = match (&b.service_accounts, exact_ids(b)) {
            (Some(sb), _) => sas(sb).iter().all(|s| match s {
                NamePattern::Any => sa.contains(&NamePattern::Any),
                NamePattern::Exact(x) => name_in(&sa, x),
            }),
            (None, Some(ids)) => ids.iter().all(|id| {
                id.k8s_namespace_and_sa()
                    .is_some_and(|(ns, s)| name_in(&sa, &format!("{ns}/{s}")))
            }),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Whether no caller matches both entries.
fn entries_disjoint(a: &From, b: &From) -> bool {
    let unauth = |f: &From| f.authenticated == Some(false);
    let auth = |f: &From| {
        f.authenticated == Some(true)
            || f.spiffe_ids.is_some()
            || f.trust_domains.is_some()
            || f.namespaces.is_some()
            || f.service_accounts.is_some()
    };
    if unauth(a) && auth(b) || auth(a) && unauth(b) {
        return true;
    }
    let ids_apart = |x: &From, y: &From| match (exact_ids(x), &y.spiffe_ids) {
        (Some(ids), Some(py)) => ids.iter().all(|id| !py.iter().any(|p| p.matches(id))),
        (Some(ids), None) => {
            let ns_apart = y.namespaces.as_ref().is_some_and(|n| {
                let n = names(n);
                ids.iter().all(|id| {
                    id.k8s_namespace_and_sa()
                        .is_none_or(|(ns, _)| !name_in(&n, ns))
                })
            });
            let td_apart = y.trust_domains.as_ref().is_some_and(|t| {
                ids.iter().all(|id| {
                    !t.iter().any(|p| {
                        p.name.is_none() || p.name.as_deref() == Some(id.trust_domain_name())
                    })
                })
            });
            ns_apart || td_apart
        }
        _ => false,
    };
    if ids_apart(a, b) || ids_apart(b, a) {
        return true;
    }
    let exact_apart = |x: &Option<Vec<NamePattern>>, y: &Option<Vec<NamePattern>>| match (x, y) {
        (Some(x), Some(y)) => x.iter().all(|p| match p {
            NamePattern::Any => false,
            NamePattern::Exact(v) => !name_in(y, v),
        }),
        _ => false,
    };
    let ns = |f: &From| f.namespaces.as_deref().map(names);
    let sa = |f: &From| f.service_accounts.as_deref().map(sas);
    if exact_apart(&ns(a), &ns(b)) || exact_apart(&sa(a), &sa(b)) {
        return true;
    }
    let tds = |f: &From| {
        f.trust_domains.as_ref().map(|t| {
            t.iter()
                .map(|p| match &p.name {
                    None => NamePattern::Any,
                    Some(n) => NamePattern::Exact(n.clone()),
                })
                .collect::<Vec<_>>()
        })
    };
    exact_apart(&tds(a), &tds(b))
}
