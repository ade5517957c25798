use std::time::{Duration, SystemTime};

use svidcar_agent::SpiffeId;

use super::bucket::{CallerKey, LimitState};
use super::simulate::{parse_time_ms, simulate, Attempt};
use super::*;
use crate::policy::replay::Example;
use crate::policy::{Direction, PolicySet, Protocol, Request};

const HEAD: &str = "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies: []\n";

fn set(limits: &str) -> Result<PolicySet, String> {
    PolicySet::from_yaml("l.yaml", &format!("{HEAD}limits:\n{limits}")).map_err(|e| e.to_string())
}

fn compiled(limits: &str) -> crate::policy::CompiledPolicy {
    set(limits)
        .unwrap()
        .compile(&SpiffeId::parse("spiffe://td/api").unwrap())
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn req<'a>(peer: Option<&'a SpiffeId>, port: u16) -> Request<'a> {
    let mut r = Request::new(Direction::Inbound, Protocol::Http);
    r.peer = peer;
    r.source_ip = Some("10.0.0.1".parse().unwrap());
    r.destination_port = Some(port);
    r
}

const MS: Duration = Duration::from_millis(1);

#[test]
fn invalid_limits_reject_the_set() {
    for (yaml, needle) in [
        ("- {name: a}\n", "sets no limit"),
        ("- {name: a, burst: 3, connections: 1}\n", "`burst` belongs"),
        ("- {name: a, requestsPerSecond: 0}\n", "above 0"),
        ("- {name: a, requestsPerSecond: -1}\n", "above 0"),
        ("- {name: a, connections: 0}\n", "above 0"),
        ("- {name: 'a b', connections: 1}\n", "must be 1-253"),
        (
            "- {name: a, connections: 1, from: []}\n",
            "matches no caller",
        ),
        (
            "- {name: a, connections: 1, ports: []}\n",
            "matches no port",
        ),
        ("- {name: a, connections: 1, rps: 3}\n", "unknown field"),
        (
            "- {name: a, connections: 1}\n- {name: a, connections: 2}\n",
            "duplicate limit name",
        ),
    ] {
        let err = set(yaml).expect_err(yaml);
        assert!(err.contains(needle), "{yaml}: {err}");
    }
}

#[test]
fn the_first_matching_limit_of_each_kind_applies() {
    let p = compiled(
        r#"- name: web-override
  from: [{spiffeIds: ["spiffe://td/web"]}]
  requestsPerSecond: 100
- name: everyone
  connections: 2
  requestsPerSecond: 5
  burst: 5
- name: only-9090
  ports: [9090]
  connectionsPerSecond: 1
"#,
    );
    let (web, other) = (id("spiffe://td/web"), id("spiffe://td/other"));
    let l = p.limits();
    let names = |r: &Request| -> Vec<(String, LimitKind)> {
        l.describe(r)
            .into_iter()
            .map(|a| (a.name, a.kind))
            .collect()
    };
    assert_eq!(
        names(&req(Some(&web), 8080)),
        [
            ("everyone".into(), LimitKind::Connections),
            ("web-override".into(), LimitKind::RequestsPerSecond)
        ]
    );
    assert_eq!(
        names(&req(Some(&other), 9090)),
        [
            ("everyone".into(), LimitKind::Connections),
            ("only-9090".into(), LimitKind::ConnectionsPerSecond),
            ("everyone".into(), LimitKind::RequestsPerSecond)
        ]
    );
    let d = &l.describe(&req(Some(&other), 8080))[1];
    assert_eq!((d.value, d.burst), (5.0, Some(5)));
}

#[test]
fn request_bucket_holds_burst_then_refills_at_the_rate() {
    let p = compiled("- {name: rps, requestsPerSecond: 5, burst: 5}\n");
    let (a, b) = (id("spiffe://td/a"), id("spiffe://td/b"));
    let t0 = Duration::from_secs(10);
    let bucket = p.limits().request_bucket(&req(Some(&a), 80), t0).unwrap();
    for _ in 0..5 {
        bucket.take(t0).unwrap();
    }
    let e = bucket.take(t0).unwrap_err();
    assert_eq!((&*e.limit, e.kind), ("rps", LimitKind::RequestsPerSecond));
    assert_eq!(e.retry_after, 200 * MS);
    // Another caller has its own bucket.
    let other = p.limits().request_bucket(&req(Some(&b), 80), t0).unwrap();
    other.take(t0).unwrap();
    // One token per 200 ms.
    assert!(bucket.take(t0 + 199 * MS).is_err());
    bucket.take(t0 + 200 * MS).unwrap();
    assert!(bucket.take(t0 + 200 * MS).is_err());
    // After a quiet second the bucket is full again, not more.
    let t1 = t0 + Duration::from_secs(5);
    let allowed = (0..20).filter(|_| bucket.take(t1).is_ok()).count();
    assert_eq!(allowed, 5);
    // A connection looking the bucket up again gets the same counters.
    let again = p.limits().request_bucket(&req(Some(&a), 81), t1).unwrap();
    assert!(again.take(t1).is_err());
}

#[test]
fn connection_slots_are_released_on_drop_and_per_caller() {
    let p = compiled("- {name: conns, connections: 2, connectionsPerSecond: 100}\n");
    let (a, b) = (id("spiffe://td/a"), id("spiffe://td/b"));
    let now = Duration::from_secs(1);
    let one = p.limits().admit(&req(Some(&a), 1), now).unwrap();
    let two = p.limits().admit(&req(Some(&a), 1), now).unwrap();
    let e = p.limits().admit(&req(Some(&a), 1), now).unwrap_err();
    assert_eq!(e.kind, LimitKind::Connections);
    let _b = p.limits().admit(&req(Some(&b), 1), now).unwrap();
    drop(one);
    let three = p.limits().admit(&req(Some(&a), 1), now).unwrap();
    drop((two, three));
    // Unauthenticated callers are counted by source IP.
    let mut plain = req(None, 1);
    let _p1 = p.limits().admit(&plain, now).unwrap();
    let _p2 = p.limits().admit(&plain, now).unwrap();
    assert!(p.limits().admit(&plain, now).is_err());
    plain.source_ip = Some("10.0.0.2".parse().unwrap());
    assert!(p.limits().admit(&plain, now).is_ok());
}

#[test]
fn connection_rate_refuses_past_one_seconds_worth() {
    let p = compiled("- {name: cps, connectionsPerSecond: 2}\n");
    let a = id("spiffe://td/a");
    let now = Duration::from_secs(3);
    assert!(p.limits().admit(&req(Some(&a), 1), now).is_ok());
    assert!(p.limits().admit(&req(Some(&a), 1), now).is_ok());
    let e = p.limits().admit(&req(Some(&a), 1), now).unwrap_err();
    assert_eq!(
        (e.kind, e.retry_after),
        (LimitKind::ConnectionsPerSecond, 500 * MS)
    );
}

#[test]
fn state_is_bounded_and_callers_at_rest_are_evicted() {
    let s = LimitState::new(1024);
    let g = bucket::Gcra::new(1.0, 1);
    let t = Duration::from_secs(1);
    // 10,000 callers that each took a token: active, so the cap holds them off.
    let mut shared = 0;
    for i in 0..10_000u32 {
        let e = s.entry(&CallerKey::Ip(std::net::IpAddr::from(i.to_be_bytes())), t);
        if g.take(&e.req_tat, t).is_err() {
            shared += 1; // the overflow entry is shared: limited together
        }
    }
    assert!(s.len() <= 1024, "{}", s.len());
    assert!(s.overflowed() >= 8_900);
    assert!(shared >= 8_900);
    // Later, all at rest: new callers evict them and are counted on their own again.
    let later = t + Duration::from_secs(5);
    for i in 0..100u32 {
        let e = s.entry(&CallerKey::Id(format!("spiffe://td/{i}").into()), later);
        assert!(g.take(&e.req_tat, later).is_ok(), "caller {i}");
    }
    assert!(s.len() <= 1024);
}

#[test]
fn counters_of_an_unchanged_limit_survive_a_reload() {
    let a = id("spiffe://td/a");
    let now = Duration::from_secs(1);
    let old = compiled("- {name: c, connections: 1}\n- {name: r, requestsPerSecond: 1}\n");
    let _held = old.limits().admit(&req(Some(&a), 1), now).unwrap();
    old.limits()
        .request_bucket(&req(Some(&a), 1), now)
        .unwrap()
        .take(now)
        .unwrap();
    // Numbers changed, scope unchanged: counters carry over.
    let mut new = compiled("- {name: c, connections: 1}\n- {name: r, requestsPerSecond: 2}\n");
    new.adopt_limits(&old);
    assert_ne!(new.limits().generation(), old.limits().generation());
    assert!(new.limits().admit(&req(Some(&a), 1), now).is_err());
    let b = new.limits().request_bucket(&req(Some(&a), 1), now).unwrap();
    assert!(b.take(now).is_err(), "bucket level carried over");
    // Another scope (ports added): fresh counters.
    let mut moved = compiled("- {name: c, connections: 1, ports: [1]}\n");
    moved.adopt_limits(&old);
    assert!(moved.limits().admit(&req(Some(&a), 1), now).is_ok());
}

#[test]
fn lint_reports_shadowed_and_overlapping_limits_only() {
    let codes = |yaml: &str| -> Vec<(&'static str, String)> {
        set(yaml)
            .unwrap()
            .lint(&[])
            .into_iter()
            .filter(|w| w.code == "L012" || w.code == "L013")
            .map(|w| (w.code, w.target))
            .collect()
    };
    // Override first, catch-all after: intended.
    assert!(codes("- {name: web, from: [{spiffeIds: [\"spiffe://td/ns/a/sa/web\"]}], requestsPerSecond: 9}\n- {name: all, requestsPerSecond: 1}\n").is_empty());
    // Catch-all first: the override never applies.
    assert_eq!(
        codes("- {name: all, requestsPerSecond: 1}\n- {name: web, from: [{spiffeIds: [\"spiffe://td/ns/a/sa/web\"]}], requestsPerSecond: 9}\n"),
        [("L012", "limits/web".to_string())]
    );
    assert_eq!(
        codes("- {name: ns, from: [{namespaces: [a]}], connections: 1}\n- {name: web, from: [{spiffeIds: [\"spiffe://td/ns/a/sa/web\"]}], connections: 9}\n"),
        [("L012", "limits/web".to_string())]
    );
    // Partial overlap: a namespace and a trust domain.
    assert_eq!(
        codes("- {name: ns, from: [{namespaces: [a]}], connections: 1}\n- {name: td, from: [{trustDomains: [td]}], connections: 9}\n"),
        [("L013", "limits/td".to_string())]
    );
    // Disjoint callers, disjoint ports, other kinds: nothing.
    assert!(codes("- {name: a, from: [{spiffeIds: [\"spiffe://td/a\"]}], connections: 1}\n- {name: b, from: [{spiffeIds: [\"spiffe://td/b\"]}], connections: 9}\n").is_empty());
    assert!(codes("- {name: a, ports: [80], connections: 1}\n- {name: b, ports: [\"81-90\"], connections: 9}\n").is_empty());
    assert!(codes("- {name: a, connections: 1}\n- {name: b, requestsPerSecond: 9}\n").is_empty());
    assert!(codes("- {name: a, from: [{namespaces: [x]}], connections: 1}\n- {name: b, from: [{spiffeIds: [\"spiffe://td/ns/y/sa/z\"]}], connections: 9}\n").is_empty());
}

#[test]
fn replay_times_parse_back_and_the_bucket_runs_on_them() {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_738_000_123_456);
    let text = crate::access_log::rfc3339(t);
    assert_eq!(parse_time_ms(&text), Some(1_738_000_123_456), "{text}");
    assert_eq!(
        parse_time_ms("2024-02-29T00:00:00Z"),
        Some(1_709_164_800_000)
    );
    assert_eq!(parse_time_ms("yesterday"), None);
    let p =
        compiled("- {name: rps, requestsPerSecond: 5, burst: 5}\n- {name: two, connections: 2}\n");
    let a = id("spiffe://td/a");
    let at = |ms: i64, end: Option<i64>| Attempt {
        example: Example {
            source: format!("log:{ms}"),
            summary: String::new(),
            old_rule: None,
        },
        peer: Some(a.clone()),
        source_ip: None,
        port: Some(8080),
        start_ms: ms,
        end_ms: end,
    };
    // 20 requests within 100 ms: 5 pass; then 3 overlapping connections and a later one.
    let mut list: Vec<Attempt> = (0..20).map(|i| at(1000 + i * 5, None)).collect();
    list.extend([
        at(0, Some(500)),
        at(10, Some(500)),
        at(20, Some(30)),
        at(600, Some(700)),
    ]);
    let out = simulate(p.limits(), &list, 2);
    let rps = out.iter().find(|o| o.limit == "rps").unwrap();
    assert_eq!((rps.applied, rps.exceeded), (20, 15));
    assert_eq!(rps.examples.len(), 2);
    let conns = out.iter().find(|o| o.limit == "two").unwrap();
    assert_eq!((conns.applied, conns.exceeded), (4, 1));
    assert_eq!(conns.examples[0].source, "log:20");
}
