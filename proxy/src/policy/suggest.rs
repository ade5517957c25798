//! `svidcar policy suggest`: a least-privilege `PolicySet` that allows exactly what an access
//! log recorded as allowed — per local identity (selector), inbound grouped per caller identity
//! (methods and path templates per port; plain TCP by port), egress by hosts, mesh identities or
//! addresses per port — with `defaults: {inbound: deny, egress: deny}` and a comment per rule
//! saying how much traffic it covers.
//!
//! The text is checked before it is returned: it must load with the real loader, lint clean, and
//! allow every record it was built from when decided by the real engine.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use super::observe::Recorded;
use super::template::{cap_paths, collapse_hosts, template_path};
use super::{Direction, PolicySet};
use crate::access_log::{AccessRecord, Kind, Logged};

/// How `suggest` generalizes.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Path patterns per caller at most; past it, prefixes (`/a/{**}`) are used.
    pub max_paths: usize,
    /// Egress: `*.<parent>` once this many (≥ 2) names under one parent were seen; 0 = never.
    pub collapse_hosts: usize,
    /// Also allow what was recorded as denied.
    pub include_denied: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_paths: 20,
            collapse_hosts: 0,
            include_denied: false,
        }
    }
}

/// A suggested set.
#[derive(Debug, Clone)]
pub struct Suggestion {
    /// The `PolicySet` YAML, with comments.
    pub yaml: String,
    /// Records the set was built from (all of them are allowed by it).
    pub used: usize,
    /// Records left out, by reason.
    pub skipped: BTreeMap<&'static str, usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Caller {
    Id(String),
    Ip(IpAddr),
}

/// Connections and requests covered by a rule.
#[derive(Debug, Clone, Copy, Default)]
struct Count {
    conns: usize,
    reqs: usize,
}

impl Count {
    fn add(&mut self, kind: Kind) {
        match kind {
            Kind::Connection => self.conns += 1,
            Kind::Request => self.reqs += 1,
        }
    }
    fn plus(self, o: Count) -> Count {
        Count {
            conns: self.conns + o.conns,
            reqs: self.reqs + o.reqs,
        }
    }
}

impl fmt::Display for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        match (self.conns, self.reqs) {
            (c, 0) => f.write_str(&n(c, "connection")),
            (0, r) => f.write_str(&n(r, "request")),
            (c, r) => write!(f, "{}, {}", n(c, "connection"), n(r, "request")),
        }
    }
}

type PortMap<T> = BTreeMap<Option<u16>, BTreeMap<T, Count>>;

/// What one local identity was seen doing.
#[derive(Default)]
struct Local {
    /// caller → port → path template → method → count.
    http: BTreeMap<Caller, PortMap<(String, String)>>,
    /// caller → port → count.
    tcp: BTreeMap<Caller, BTreeMap<Option<u16>, Count>>,
    names: PortMap<String>,
    ips: PortMap<IpAddr>,
    ids: PortMap<String>,
    ports: BTreeMap<Option<u16>, Count>,
}

impl Local {
    fn add(&mut self, r: &Recorded<'_>) {
        let rec = r.record;
        let port = rec.dst_port;
        let kind = rec.kind;
        match rec.direction {
            Direction::Inbound => {
                let caller = match (r.peer(), rec.src_ip) {
                    (Some(id), _) => Caller::Id(id.as_str().to_string()),
                    (None, Some(ip)) => Caller::Ip(ip),
                    (None, None) => return,
                };
                match (&rec.method, &rec.path) {
                    (Some(m), Some(p)) if r.protocol().is_http() => {
                        let key = (template_path(p), m.clone());
                        let by_port = self.http.entry(caller).or_default();
                        by_port
                            .entry(port)
                            .or_default()
                            .entry(key)
                            .or_default()
                            .add(kind);
                    }
                    _ => {
                        let by_port = self.tcp.entry(caller).or_default();
                        by_port.entry(port).or_default().add(kind);
                    }
                }
            }
            Direction::Egress => {
                if let Some(id) = &rec.dst_spiffe_id {
                    let e = self.ids.entry(port).or_default();
                    return e.entry(id.clone()).or_default().add(kind);
                }
                let http = r.protocol().is_http();
                let host = rec.host.as_ref().filter(|_| http);
                let names: BTreeSet<&String> = [rec.connect.as_ref(), rec.sni.as_ref(), host]
                    .into_iter()
                    .flatten()
                    .collect();
                let mut by_ip = false;
                let mut any = false;
                for n in names {
                    any = true;
                    // IP literals only match `hosts: ["*"]`: allowed by their address instead.
                    if n.parse::<IpAddr>().is_ok() {
                        by_ip = true;
                    } else {
                        let e = self.names.entry(port).or_default();
                        e.entry(n.clone()).or_default().add(kind);
                    }
                }
                match rec.dst_ip {
                    Some(ip) if by_ip || !any => {
                        let e = self.ips.entry(port).or_default();
                        e.entry(ip).or_default().add(kind)
                    }
                    _ if !any => self.ports.entry(port).or_default().add(kind),
                    _ => {}
                }
            }
        }
    }
}

fn q(s: &str) -> String {
    // A JSON string is a YAML double-quoted scalar.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn ports(p: Option<u16>) -> String {
    p.map(|p| format!("ports: [{p}], ")).unwrap_or_default()
}

fn slug(id: &str) -> String {
    let rest = id.strip_prefix("spiffe://").unwrap_or(id);
    let path = rest.split_once('/').map_or(rest, |(_, p)| p);
    let path = if path.is_empty() { rest } else { path };
    let s: String = path
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches('-');
    let s = if s.is_empty() { "id" } else { s };
    s.chars().take(100).collect()
}

struct Writer {
    out: String,
    names: BTreeSet<String>,
}

impl Writer {
    fn policy(&mut self, name: String, direction: &str, local: &str) {
        let mut unique = name.clone();
        let mut i = 2;
        while !self.names.insert(unique.clone()) {
            unique = format!("{name}-{i}");
            i += 1;
        }
        let _ = write!(
            self.out,
            "- name: {unique}\n  direction: {direction}\n  action: allow\n  selector: {{spiffeIds: [{}]}}\n  rules:\n",
            q(local)
        );
    }
}

fn from(caller: &Caller) -> String {
    match caller {
        Caller::Id(id) => format!("from: [{{spiffeIds: [{}]}}]", q(id)),
        Caller::Ip(ip) => format!("from: [{{ipBlocks: [{}]}}]", q(&ip.to_string())),
    }
}

fn inbound(w: &mut Writer, local: &str, l: &Local, opts: &Options) {
    let callers: BTreeSet<&Caller> = l.http.keys().chain(l.tcp.keys()).collect();
    for caller in callers {
        let who = match caller {
            Caller::Id(id) => slug(id),
            Caller::Ip(ip) => format!("ip-{}", slug(&ip.to_string())),
        };
        w.policy(format!("{}-from-{who}", slug(local)), "inbound", local);
        let mut n = 0;
        if let Some(by_port) = l.http.get(caller) {
            let templates: BTreeSet<String> = by_port
                .values()
                .flat_map(|m| m.keys().map(|(t, _)| t.clone()))
                .collect();
            let cap = cap_paths(&templates, opts.max_paths);
            for (port, seen) in by_port {
                // pattern → (methods, count); then one rule per method set.
                let mut paths: BTreeMap<&str, (BTreeSet<&str>, Count)> = BTreeMap::new();
                for ((t, m), c) in seen {
                    let e = paths.entry(cap[t].as_str()).or_default();
                    e.0.insert(m.as_str());
                    e.1 = e.1.plus(*c);
                }
                let mut rules: BTreeMap<BTreeSet<&str>, Vec<(&str, Count)>> = BTreeMap::new();
                for (p, (methods, c)) in paths {
                    rules.entry(methods).or_default().push((p, c));
                }
                for (methods, paths) in rules {
                    let total = paths.iter().fold(Count::default(), |a, (_, c)| a.plus(*c));
                    let methods: Vec<String> = methods.iter().map(|m| q(m)).collect();
                    let _ = write!(
                        w.out,
                        "  # rules[{n}]: {total}\n  - {}\n    to:\n    - {}methods: [{}]\n      paths:\n",
                        from(caller),
                        ports(*port).replace(", ", "\n      "),
                        methods.join(", ")
                    );
                    for (p, c) in paths {
                        let _ = writeln!(w.out, "      - {}  # {c}", q(p));
                    }
                    n += 1;
                }
            }
        }
        if let Some(by_port) = l.tcp.get(caller) {
            for (port, c) in by_port {
                let to = match port {
                    Some(p) => format!("to: [{{ports: [{p}]}}]"),
                    None => String::new(),
                };
                let _ = writeln!(w.out, "  # rules[{n}]: {c}\n  - {}\n    {to}", from(caller));
                n += 1;
            }
        }
    }
}

fn egress(w: &mut Writer, local: &str, l: &Local, opts: &Options) {
    if l.names.is_empty() && l.ips.is_empty() && l.ids.is_empty() && l.ports.is_empty() {
        return;
    }
    w.policy(format!("{}-egress", slug(local)), "egress", local);
    let mut n = 0;
    let mut rule = |out: &mut String, c: Count, to: String, note: &str| {
        let _ = writeln!(out, "  # rules[{n}]: {c}{note}\n  - to: [{{{to}}}]");
        n += 1;
    };
    for (port, names) in &l.names {
        let set: BTreeSet<String> = names.keys().cloned().collect();
        let patterns = collapse_hosts(&set, opts.collapse_hosts);
        let mut grouped: BTreeMap<&str, Count> = BTreeMap::new();
        for (h, c) in names {
            let e = grouped.entry(patterns[h].as_str()).or_default();
            *e = e.plus(*c);
        }
        let total = grouped.values().fold(Count::default(), |a, c| a.plus(*c));
        let hosts: Vec<String> = grouped.keys().map(|h| q(h)).collect();
        let detail: Vec<String> = grouped.iter().map(|(h, c)| format!("{h}: {c}")).collect();
        let to = format!("{}hosts: [{}]", ports(*port), hosts.join(", "));
        rule(&mut w.out, total, to, &format!(" ({})", detail.join("; ")));
    }
    for (port, ids) in &l.ids {
        let total = ids.values().fold(Count::default(), |a, c| a.plus(*c));
        let list: Vec<String> = ids.keys().map(|i| q(i)).collect();
        let to = format!("{}spiffeIds: [{}]", ports(*port), list.join(", "));
        rule(&mut w.out, total, to, " (mesh)");
    }
    for (port, ips) in &l.ips {
        let total = ips.values().fold(Count::default(), |a, c| a.plus(*c));
        let list: Vec<String> = ips
            .keys()
            .map(|ip| q(&format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 })))
            .collect();
        let to = format!("{}cidrs: [{}]", ports(*port), list.join(", "));
        rule(&mut w.out, total, to, " (no name seen)");
    }
    for (port, c) in &l.ports {
        let to = ports(*port).trim_end_matches(", ").to_string();
        rule(
            &mut w.out,
            *c,
            to,
            " (mesh destination known only by trust domain)",
        );
    }
}

/// Builds the suggested set from `records` (those of `local` only, if given).
pub fn suggest<'a>(
    records: impl IntoIterator<Item = &'a AccessRecord>,
    local: Option<&svidcar_agent::SpiffeId>,
    opts: &Options,
) -> Result<Suggestion, String> {
    let mut locals: BTreeMap<String, Local> = BTreeMap::new();
    let mut used: Vec<&AccessRecord> = Vec::new();
    let mut skipped: BTreeMap<&'static str, usize> = BTreeMap::new();
    for rec in records {
        if local.is_some_and(|l| rec.local_id.as_deref() != Some(l.as_str())) {
            continue;
        }
        let r = match Recorded::parse(rec) {
            Ok(r) => r,
            Err(why) => {
                *skipped.entry(why.label()).or_default() += 1;
                continue;
            }
        };
        if rec.decision == Some(Logged::Deny) && !opts.include_denied {
            *skipped.entry("denied when recorded").or_default() += 1;
            continue;
        }
        locals
            .entry(r.local.as_str().to_string())
            .or_default()
            .add(&r);
        used.push(rec);
    }
    if used.is_empty() {
        return Err("no allowed connection or request in the log: nothing to suggest".into());
    }
    let mut w = Writer {
        out: String::new(),
        names: BTreeSet::new(),
    };
    let _ = write!(
        w.out,
        "# Suggested by `svidcar policy suggest` from {} access-log records: allows exactly what\n\
         # was observed (review it; anything not observed, egress included, is denied).\n\
         apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\n\
         defaults: {{inbound: deny, egress: deny}}\npolicies:\n",
        used.len()
    );
    for (id, l) in &locals {
        let _ = writeln!(w.out, "# ---------- {id} ----------");
        inbound(&mut w, id, l, opts);
        egress(&mut w, id, l, opts);
    }
    check(&w.out, &used)?;
    Ok(Suggestion {
        yaml: w.out,
        used: used.len(),
        skipped,
    })
}

/// The suggestion must load, lint clean and allow every record it was built from.
fn check(yaml: &str, used: &[&AccessRecord]) -> Result<(), String> {
    let set = PolicySet::from_yaml("suggested.yaml", yaml)
        .map_err(|e| format!("internal error: the suggested set does not load: {e}\n{yaml}"))?;
    let report = super::replay::replay(&set, used.iter().map(|r| (String::new(), *r)), None, 1);
    let denied: Vec<String> = report
        .changed
        .iter()
        .chain(&report.unchanged)
        .filter(|g| g.new == "DENY")
        .flat_map(|g| g.examples.iter().map(|e| e.summary.clone()))
        .collect();
    if !denied.is_empty() {
        return Err(format!(
            "internal error: the suggested set denies recorded traffic: {denied:?}\n{yaml}"
        ));
    }
    let ids: Vec<svidcar_agent::SpiffeId> = used
        .iter()
        .filter_map(|r| r.local_id.as_deref())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter_map(|s| svidcar_agent::SpiffeId::parse_lenient(s).ok())
        .collect();
    let lints = set.lint(&ids);
    if !lints.is_empty() {
        let l: Vec<String> = lints.iter().map(ToString::to_string).collect();
        return Err(format!(
            "internal error: the suggested set has lint warnings: {l:?}\n{yaml}"
        ));
    }
    Ok(())
}

#[cfg(test)]
#[path = "suggest_tests.rs"]
mod tests;
