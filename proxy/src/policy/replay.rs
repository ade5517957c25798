//! `svidcar policy replay`: every recorded connection and request of an access log decided again
//! by a candidate set, with the engine the proxy runs, and what would change — counted per
//! (old decision → new decision, new rule), with examples. The candidate's limits are played
//! over the recorded timestamps too ([`super::limits::simulate`]): what they would refuse is
//! counted per limit.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::limits::simulate::{parse_time_ms, simulate, Attempt, LimitOutcome};
use super::observe::{Recorded, Skip};
use super::{CompiledPolicy, Direction, PolicySet, Protocol};
use crate::access_log::{AccessRecord, Kind, Logged};

/// One recorded connection or request, for a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Example {
    /// `file:line` of the record.
    pub source: String,
    /// One line: direction, caller or destination, port, method and path or names.
    pub summary: String,
    /// The rule that decided it when it was recorded.
    pub old_rule: Option<String>,
}

/// Records with the same old decision, new decision and new deciding rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// Decision when recorded (`ALLOW` / `DENY`).
    pub old: &'static str,
    /// Decision of the candidate set.
    pub new: &'static str,
    /// The candidate's deciding rule or default.
    pub rule: String,
    /// How many records.
    pub count: usize,
    /// Up to the requested number of examples, in log order.
    pub examples: Vec<Example>,
}

/// The result of a replay.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Records read.
    pub records: usize,
    /// Records decided again.
    pub replayed: usize,
    /// Records not decided again, by reason.
    pub skipped: BTreeMap<Skip, usize>,
    /// Groups whose decision changes (ALLOW → DENY first).
    pub changed: Vec<Outcome>,
    /// Groups whose decision stays.
    pub unchanged: Vec<Outcome>,
    /// Header names the candidate's conditions use that no record carries (the log only holds
    /// the headers the policy in force named; such conditions see the header as absent).
    pub unrecorded_headers: Vec<String>,
    /// What the candidate's limits would refuse of what it allows, per limit and kind.
    pub limits: Vec<LimitOutcome>,
    /// Allowed records left out of the limit simulation (no readable `time`).
    pub limits_untimed: usize,
}

impl Report {
    /// Records that were allowed and the candidate would deny.
    pub fn newly_denied(&self) -> usize {
        self.changed
            .iter()
            .filter(|o| o.old == "ALLOW")
            .map(|o| o.count)
            .sum()
    }

    /// Records the candidate allows that one of its limits would refuse.
    pub fn limited(&self) -> usize {
        self.limits.iter().map(|l| l.exceeded).sum()
    }
}

/// The record as an attempt for the limit simulation (`None`: no readable time).
fn attempt(
    rec: &AccessRecord,
    peer: Option<svidcar_agent::SpiffeId>,
    source: &str,
) -> Option<Attempt> {
    let end = parse_time_ms(&rec.time)?;
    let start = end - i64::try_from(rec.duration_ms).unwrap_or(0);
    Some(Attempt {
        example: Example {
            source: source.to_string(),
            summary: summary(rec),
            old_rule: rec.rule.clone(),
        },
        peer,
        source_ip: rec.src_ip,
        port: rec.dst_port,
        start_ms: start,
        end_ms: (rec.kind == Kind::Connection).then_some(end),
    })
}

/// The connection record of an inbound `http` port that got past the handshake (decided per
/// request, so `Recorded` skips it): still a connection for the limits.
fn http_port_connection(rec: &AccessRecord) -> bool {
    rec.kind == Kind::Connection
        && rec.direction == Direction::Inbound
        && rec.decision.is_none()
        && rec.protocol.is_some_and(Protocol::is_http)
        && matches!(rec.outcome.as_str(), "allowed" | "limited")
}

/// A one-line description of a record.
pub fn summary(r: &AccessRecord) -> String {
    let port = r.dst_port.map(|p| format!(":{p}")).unwrap_or_default();
    let http = match (&r.method, &r.path) {
        (Some(m), Some(p)) => format!(" {m} {p}"),
        _ => String::new(),
    };
    let proto = match r.protocol {
        Some(Protocol::Http) => " (http)",
        Some(Protocol::Grpc) => " (grpc)",
        Some(Protocol::Tcp) => " (tcp)",
        Some(Protocol::Tls) => " (tls)",
        Some(Protocol::Connect) => " (connect)",
        None => "",
    };
    match r.direction {
        Direction::Inbound => {
            let from = match (&r.peer_id, r.src_ip) {
                (Some(id), _) => id.clone(),
                (None, Some(ip)) => format!("unauthenticated {ip}"),
                (None, None) => "unauthenticated".into(),
            };
            format!("inbound from {from} to {port}{http}{proto}")
        }
        Direction::Egress => {
            let mut names: Vec<&str> = [&r.connect, &r.sni, &r.host]
                .into_iter()
                .flatten()
                .map(String::as_str)
                .collect();
            names.dedup();
            let to = match (&r.dst_spiffe_id, names.is_empty(), r.dst_ip) {
                (Some(id), _, _) => id.clone(),
                (None, false, _) => names.join("+"),
                (None, true, Some(ip)) => ip.to_string(),
                (None, true, None) => "?".into(),
            };
            format!("egress to {to}{port}{http}{proto}")
        }
    }
}

/// Decides every record (`(source, record)`, in log order) with `set`; `local` keeps only the
/// records of that local ID; `examples` caps the examples per group.
pub fn replay<'a>(
    set: &PolicySet,
    records: impl IntoIterator<Item = (String, &'a AccessRecord)>,
    local: Option<&svidcar_agent::SpiffeId>,
    examples: usize,
) -> Report {
    let mut report = Report::default();
    let mut compiled: HashMap<String, CompiledPolicy> = HashMap::new();
    let mut groups: BTreeMap<(Logged, Logged, String), Outcome> = BTreeMap::new();
    let mut seen_headers: BTreeSet<String> = BTreeSet::new();
    let mut used_headers: BTreeSet<String> = BTreeSet::new();
    let mut attempts: BTreeMap<String, Vec<Attempt>> = BTreeMap::new();
    for (source, rec) in records {
        let rec: &AccessRecord = rec;
        if local.is_some_and(|l| rec.local_id.as_deref() != Some(l.as_str())) {
            continue;
        }
        report.records += 1;
        let r = match Recorded::parse(rec) {
            Ok(r) => r,
            Err(why) => {
                *report.skipped.entry(why).or_default() += 1;
                if http_port_connection(rec) {
                    let local = rec.local_id.as_deref().unwrap_or_default();
                    let peer = rec
                        .peer_id
                        .as_deref()
                        .map(svidcar_agent::SpiffeId::parse_lenient);
                    if let (false, Some(Ok(_)) | None) = (local.is_empty(), &peer) {
                        match attempt(rec, peer.and_then(Result::ok), &source) {
                            Some(a) => attempts.entry(local.to_string()).or_default().push(a),
                            None => report.limits_untimed += 1,
                        }
                    }
                }
                continue;
            }
        };
        let Some(old) = rec.decision else { continue };
        let policy = compiled
            .entry(r.local.as_str().to_string())
            .or_insert_with(|| set.compile(&r.local));
        used_headers.extend(policy.header_names().into_iter().map(str::to_string));
        seen_headers.extend(rec.headers.keys().cloned());
        let d = r.decide(policy);
        report.replayed += 1;
        if d.allow && rec.direction == Direction::Inbound && !policy.limits().is_empty() {
            match attempt(rec, r.peer().cloned(), &source) {
                Some(a) => attempts
                    .entry(r.local.as_str().to_string())
                    .or_default()
                    .push(a),
                None => report.limits_untimed += 1,
            }
        }
        let new = Logged::from_allow(d.allow);
        let rule = d.reason.to_string();
        let g = groups
            .entry((old, new, rule.clone()))
            .or_insert_with(|| Outcome {
                old: old.label(),
                new: new.label(),
                rule,
                count: 0,
                examples: Vec::new(),
            });
        g.count += 1;
        if g.examples.len() < examples {
            g.examples.push(Example {
                source,
                summary: summary(rec),
                old_rule: rec.rule.clone(),
            });
        }
    }
    for ((old, new, _), g) in groups {
        if old == new {
            report.unchanged.push(g);
        } else {
            report.changed.push(g);
        }
    }
    // ALLOW → DENY first, then the biggest groups.
    report
        .changed
        .sort_by_key(|g| (g.old != "ALLOW", std::cmp::Reverse(g.count)));
    report.unchanged.sort_by_key(|g| std::cmp::Reverse(g.count));
    report.unrecorded_headers = used_headers.difference(&seen_headers).cloned().collect();
    for (local, list) in attempts {
        let Ok(id) = svidcar_agent::SpiffeId::parse_lenient(&local) else {
            continue;
        };
        let policy = compiled.entry(local).or_insert_with(|| set.compile(&id));
        report
            .limits
            .extend(simulate(policy.limits(), &list, examples));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access_log::Kind;

    fn req(peer: &str, method: &str, path: &str) -> AccessRecord {
        let mut r = AccessRecord::new(Kind::Request, Direction::Inbound);
        r.protocol = Some(Protocol::Http);
        r.local_id = Some("spiffe://td/api".into());
        r.peer_id = Some(peer.into());
        r.dst_port = Some(8080);
        r.method = Some(method.into());
        r.path = Some(path.into());
        r.decision = Some(Logged::Allow);
        r.rule = Some("default:allow".into());
        r
    }

    #[test]
    fn counts_changes_per_old_new_and_rule() {
        let set = PolicySet::from_yaml(
            "p.yaml",
            r#"
apiVersion: svidcar.io/v1alpha1
kind: PolicySet
defaults: {inbound: deny}
policies:
- name: reads
  direction: inbound
  action: allow
  rules: [{from: [{spiffeIds: ["spiffe://td/web"]}], to: [{methods: ["GET"]}]}]
"#,
        )
        .unwrap();
        let recs = [
            req("spiffe://td/web", "GET", "/a"),
            req("spiffe://td/web", "POST", "/b"),
            req("spiffe://td/web", "POST", "/c"),
            req("spiffe://td/other", "GET", "/a"),
        ];
        let mut no_decision = req("spiffe://td/web", "GET", "/");
        no_decision.decision = None;
        let all: Vec<_> = recs.iter().chain([&no_decision]).collect();
        let report = replay(
            &set,
            all.iter()
                .enumerate()
                .map(|(i, r)| (format!("log:{}", i + 1), *r)),
            None,
            1,
        );
        assert_eq!((report.records, report.replayed), (5, 4));
        assert_eq!(report.skipped[&Skip::NoDecision], 1);
        assert_eq!(report.newly_denied(), 3);
        let g = &report.changed[0];
        assert_eq!(
            (g.old, g.new, g.rule.as_str(), g.count),
            ("ALLOW", "DENY", "default:deny", 3)
        );
        assert_eq!(g.examples.len(), 1);
        assert_eq!(g.examples[0].source, "log:2");
        assert!(
            g.examples[0].summary.contains("POST /b"),
            "{:?}",
            g.examples
        );
        assert_eq!(report.unchanged[0].rule, "reads/rules[0]");
    }
}
