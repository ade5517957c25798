//! The decision algorithm of POLICY.md §5: deny → allow → default, one shadow decision for
//! dry-run policies, audit matches, per-name evaluation for egress. No I/O; no allocation unless
//! an audit rule matches, a header condition meets a repeated header, or egress sees several names.

use std::net::IpAddr;

use svidcar_agent::SpiffeId;

use super::compile::{
    dir_index, CCond, CFrom, CRule, CTo, CValues, CompiledPolicy, Group, RuleIndex,
};
use super::matchers::peer_lookup_keys;
use super::model::{DefaultAction, Direction, WhenKey};
use super::request::{Decision, Reason, Request, RuleId, Verdict};

/// Why a rule did not match: section, entry index and field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Miss {
    pub section: &'static str,
    pub index: usize,
    pub field: &'static str,
}

/// Per-evaluation context: the request plus derived attributes.
pub(crate) struct Ctx<'a> {
    pub req: &'a Request<'a>,
    pub http: bool,
    /// Egress: the name of this evaluation.
    pub name: Option<&'a str>,
    pub ns_sa: Option<(&'a str, &'a str)>,
    pub source_ip: Option<IpAddr>,
    /// Index keys of the peer ID (see `peer_lookup_keys`).
    pub peer_keys: [Option<&'a str>; 4],
}

impl<'a> Ctx<'a> {
    pub fn new(req: &'a Request<'a>, name: Option<&'a str>) -> Self {
        Self {
            req,
            http: req.protocol.is_http(),
            name,
            ns_sa: req.peer.and_then(SpiffeId::k8s_namespace_and_sa),
            source_ip: req.source_ip,
            peer_keys: req.peer.map_or([None; 4], peer_lookup_keys),
        }
    }
}

/// Whether `rule` matches; `allow` selects the non-HTTP treatment of HTTP-only fields.
pub(crate) fn match_rule(rule: &CRule, c: &Ctx, allow: bool) -> Result<(), Miss> {
    if rule.http_only && !c.http && allow {
        return Err(Miss {
            section: "http",
            index: 0,
            field: "",
        });
    }
    if let Some(from) = &rule.from {
        any_entry(from, "from", |f| check_from(f, c))?;
    }
    if let Some(to) = &rule.to {
        any_entry(to, "to", |t| check_to(t, c, rule.direction))?;
    }
    if let Some(when) = &rule.when {
        for (k, cond) in when.iter().enumerate() {
            if let Err(field) = check_cond(cond, c) {
                return Err(Miss {
                    section: "when",
                    index: k,
                    field,
                });
            }
        }
    }
    Ok(())
}

fn any_entry<T>(
    entries: &[T],
    section: &'static str,
    f: impl Fn(&T) -> Result<(), &'static str>,
) -> Result<(), Miss> {
    let mut first = None;
    for e in entries {
        match f(e) {
            Ok(()) => return Ok(()),
            Err(field) => {
                first.get_or_insert(field);
            }
        }
    }
    Err(Miss {
        section,
        index: 0,
        field: first.unwrap_or(""),
    })
}

pub(crate) fn check_from(f: &CFrom, c: &Ctx) -> Result<(), &'static str> {
    let peer = c.req.peer;
    f.spiffe
        .check(peer, |s, id| s.matches(id), ("spiffeIds", "notSpiffeIds"))?;
    f.td.check(
        peer.map(SpiffeId::trust_domain_name),
        |s, t| s.matches(t),
        ("trustDomains", "notTrustDomains"),
    )?;
    f.ns.check(
        c.ns_sa.map(|x| x.0),
        |s, n| s.matches(n),
        ("namespaces", "notNamespaces"),
    )?;
    f.sa.check(
        c.ns_sa,
        |s, x| s.matches_sa(x),
        ("serviceAccounts", "notServiceAccounts"),
    )?;
    f.ip.check(
        c.source_ip,
        |s, ip| s.matches(ip),
        ("ipBlocks", "notIpBlocks"),
    )?;
    if let Some(a) = f.authenticated {
        if peer.is_some() != a {
            return Err("authenticated");
        }
    }
    Ok(())
}

fn check_to(t: &CTo, c: &Ctx, dir: Direction) -> Result<(), &'static str> {
    let r = c.req;
    t.ports.check(
        r.destination_port,
        |s, p| s.matches(p),
        ("ports", "notPorts"),
    )?;
    match dir {
        Direction::Egress => {
            t.hosts
                .check(c.name, |s, n| s.matches(n), ("hosts", "notHosts"))?;
            t.cidrs.check(
                r.destination_ip,
                |s, ip| s.matches(ip),
                ("cidrs", "notCidrs"),
            )?;
            t.spiffe.check(
                r.destination_spiffe_id,
                |s, id| s.matches(id),
                ("spiffeIds", "notSpiffeIds"),
            )?;
        }
        Direction::Inbound if c.http => {
            t.hosts
                .check(r.host, |s, n| s.matches(n), ("hosts", "notHosts"))?;
        }
        Direction::Inbound => {}
    }
    // HTTP-only fields: on non-HTTP traffic only deny/audit rules get here, and ignore them.
    if c.http {
        t.methods
            .check(r.method, |s, m| s.matches(m), ("methods", "notMethods"))?;
        t.paths
            .check(r.path, |s, p| s.matches(p), ("paths", "notPaths"))?;
    }
    Ok(())
}

fn key_name(k: &WhenKey) -> &'static str {
    match k {
        WhenKey::SourcePrincipal => "source.principal",
        WhenKey::SourceTrustDomain => "source.trustDomain",
        WhenKey::SourceNamespace => "source.namespace",
        WhenKey::SourceServiceAccount => "source.serviceAccount",
        WhenKey::SourceIp => "source.ip",
        WhenKey::DestinationIp => "destination.ip",
        WhenKey::DestinationPort => "destination.port",
        WhenKey::ConnectionSni => "connection.sni",
        WhenKey::RequestHost => "request.host",
        WhenKey::RequestHeader(_) => "request.headers",
    }
}

fn check_cond(cond: &CCond, c: &Ctx) -> Result<(), &'static str> {
    let r = c.req;
    let names = (key_name(&cond.key), "notValues");
    let f = &cond.field;
    match &cond.key {
        WhenKey::SourcePrincipal => f.check(
            r.peer,
            |v, id| matches!(v, CValues::Id(s) if s.matches(id)),
            names,
        ),
        WhenKey::SourceTrustDomain => f.check(
            r.peer.map(SpiffeId::trust_domain_name),
            |v, t| matches!(v, CValues::Name(s) if s.matches(t)),
            names,
        ),
        WhenKey::SourceNamespace => f.check(
            c.ns_sa.map(|x| x.0),
            |v, n| matches!(v, CValues::Name(s) if s.matches(n)),
            names,
        ),
        WhenKey::SourceServiceAccount => f.check(
            c.ns_sa,
            |v, x| matches!(v, CValues::Name(s) if s.matches_sa(x)),
            names,
        ),
        WhenKey::SourceIp => f.check(
            c.source_ip,
            |v, ip| matches!(v, CValues::Ip(s) if s.matches(ip)),
            names,
        ),
        WhenKey::DestinationIp => f.check(
            r.destination_ip,
            |v, ip| matches!(v, CValues::Ip(s) if s.matches(ip)),
            names,
        ),
        WhenKey::DestinationPort => f.check(
            r.destination_port,
            |v, p| matches!(v, CValues::Port(s) if s.matches(p)),
            names,
        ),
        WhenKey::ConnectionSni => f.check(
            r.sni,
            |v, n| matches!(v, CValues::Host(s) if s.matches(n)),
            names,
        ),
        // HTTP-only keys: on non-HTTP traffic only deny/audit rules get here, and ignore them.
        WhenKey::RequestHost if !c.http => Ok(()),
        WhenKey::RequestHeader(_) if !c.http => Ok(()),
        WhenKey::RequestHost => f.check(
            r.host,
            |v, n| matches!(v, CValues::Host(s) if s.matches(n)),
            names,
        ),
        WhenKey::RequestHeader(name) => {
            let value = r.headers.header(name);
            f.check(
                value.as_deref(),
                |v, h| matches!(v, CValues::Value(s) if s.matches(h)),
                names,
            )
        }
    }
}

impl RuleIndex {
    /// Calls `f` with every candidate list for this evaluation (at most a few hash lookups).
    #[inline]
    fn for_each_list<'s>(&'s self, c: &Ctx, mut f: impl FnMut(&'s [u32])) {
        if !self.by_peer.is_empty() {
            for key in c.peer_keys.iter().flatten() {
                if let Some(list) = self.by_peer.get(*key) {
                    f(list);
                }
            }
        }
        if let Some(name) = c.name {
            if let Some(list) = self.by_name.get(name) {
                f(list);
            }
            if !self.by_suffix.is_empty() {
                // `*.suffix` needs at least one label before the suffix.
                for (i, _) in name.match_indices('.') {
                    if let Some(list) = self.by_suffix.get(&name[i + 1..]) {
                        f(list);
                    }
                }
            }
        }
        f(&self.rest);
    }

    /// The first matching rule (lowest ordinal) of this index.
    pub(crate) fn first_match(&self, rules: &[CRule], c: &Ctx, allow: bool) -> Option<u32> {
        if self.len == 0 {
            return None;
        }
        let mut best: Option<u32> = None;
        self.for_each_list(c, |list| {
            for &i in list {
                if best.is_some_and(|b| i >= b) {
                    return;
                }
                if match_rule(&rules[i as usize], c, allow).is_ok() {
                    best = Some(i);
                    return;
                }
            }
        });
        best
    }

    /// Every matching rule, ascending, appended to `out`.
    pub(crate) fn all_matches(&self, rules: &[CRule], c: &Ctx, out: &mut Vec<u32>) {
        if self.len == 0 {
            return;
        }
        let start = out.len();
        self.for_each_list(c, |list| {
            out.extend(
                list.iter()
                    .copied()
                    .filter(|&i| match_rule(&rules[i as usize], c, false).is_ok()),
            )
        });
        out[start..].sort_unstable();
        let mut seen = start;
        for i in start..out.len() {
            if i == start || out[i] != out[seen - 1] {
                out[seen] = out[i];
                seen += 1;
            }
        }
        out.truncate(seen);
    }
}

impl CompiledPolicy {
    /// Decides one connection or request (POLICY.md §5). Pure and allocation-free in the common
    /// case; safe to call concurrently.
    pub fn decide(&self, req: &Request<'_>) -> Decision {
        let t = &self.dirs[dir_index(req.direction)];
        let names = req.egress_names();
        let multi = req.direction == Direction::Egress && names.iter().flatten().count() > 1;
        if !multi {
            let name = match req.direction {
                Direction::Egress => names.iter().flatten().next().copied(),
                Direction::Inbound => None,
            };
            let c = Ctx::new(req, name);
            let actual = self.decide_group(&t.enforced, t.default, &c);
            let shadow = t
                .shadow
                .as_ref()
                .map(|g| self.decide_group(g, t.default, &c));
            let mut audit = Vec::new();
            let mut ords = Vec::new();
            t.audit.all_matches(&self.rules, &c, &mut ords);
            audit.extend(ords.iter().map(|&i| self.rules[i as usize].id.clone()));
            return finish(actual, shadow, audit);
        }
        // Several names: one evaluation per name; every one must allow.
        let mut actual: Option<Verdict> = None;
        let mut shadow: Option<Verdict> = None;
        let mut ords = Vec::new();
        for name in names.iter().flatten() {
            let c = Ctx::new(req, Some(name));
            combine(&mut actual, self.decide_group(&t.enforced, t.default, &c));
            if let Some(g) = &t.shadow {
                combine(&mut shadow, self.decide_group(g, t.default, &c));
            }
            t.audit.all_matches(&self.rules, &c, &mut ords);
        }
        ords.sort_unstable();
        ords.dedup();
        let audit = ords
            .iter()
            .map(|&i| self.rules[i as usize].id.clone())
            .collect();
        let actual = actual.unwrap_or(Verdict {
            allow: false,
            reason: Reason::Default {
                allow: false,
                implicit: true,
            },
        });
        finish(actual, shadow, audit)
    }

    /// `decide(set)` of §5 for one evaluation set.
    pub(crate) fn decide_group(
        &self,
        g: &Group,
        default: Option<DefaultAction>,
        c: &Ctx,
    ) -> Verdict {
        if let Some(i) = g.deny.first_match(&self.rules, c, false) {
            return Verdict {
                allow: false,
                reason: Reason::Rule(self.rule_id(i)),
            };
        }
        if let Some(i) = g.allow.first_match(&self.rules, c, true) {
            return Verdict {
                allow: true,
                reason: Reason::Rule(self.rule_id(i)),
            };
        }
        let (allow, implicit) = match default {
            Some(DefaultAction::Allow) => (true, false),
            Some(DefaultAction::Deny) => (false, false),
            None => (!g.has_allow_policy, true),
        };
        Verdict {
            allow,
            reason: Reason::Default { allow, implicit },
        }
    }

    fn rule_id(&self, i: u32) -> RuleId {
        self.rules[i as usize].id.clone()
    }
}

/// Egress names: the first denying evaluation decides; when all allow, the first one.
fn combine(acc: &mut Option<Verdict>, v: Verdict) {
    match acc {
        None => *acc = Some(v),
        Some(a) if a.allow && !v.allow => *acc = Some(v),
        Some(_) => {}
    }
}

fn finish(actual: Verdict, shadow: Option<Verdict>, audit: Vec<RuleId>) -> Decision {
    Decision {
        allow: actual.allow,
        reason: actual.reason,
        shadow: shadow.filter(|s| s.allow != actual.allow),
        audit,
    }
}
