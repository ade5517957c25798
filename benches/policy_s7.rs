//! S7 (BENCHMARKS.md): the cost of one policy decision at 10, 1k and 10k rules.
//!
//! The generated sets mimic a large mesh-wide policy: most rules keyed on exact peer IDs
//! (allow with ports/methods/paths, deny on `/admin*`), every tenth an ID glob
//! (`spiffe://td/ns/<ns>/sa/*`), every tenth a trust-domain + namespace rule, plus a fixed
//! dozen rules that cannot be indexed (ipBlocks, `notSpiffeIds`, `{}`-like audit). Measured:
//! an HTTP request allowed by a rule in the middle of the set, an unknown peer falling to the
//! default, a TCP connection allowed through a glob, and an egress TLS SNI decision.
//!
//! Run: `cargo bench --bench policy_s7`.

use std::fmt::Write;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use svidcar_agent::SpiffeId;
use svidcar_proxy::policy::{Direction, PolicySet, Protocol, Request};

fn policy_yaml(n: usize) -> String {
    let mut y = String::from(
        "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\ndefaults: {inbound: deny, egress: deny}\npolicies:\n",
    );
    // Unindexable rules, fixed count.
    y.push_str("- {name: nets, direction: inbound, action: allow, rules: [");
    for k in 0..8 {
        let _ = write!(
            y,
            "{{from: [{{ipBlocks: [\"10.{k}.0.0/16\"]}}], to: [{{ports: [6000]}}]}},"
        );
    }
    y.push_str("]}\n");
    y.push_str("- {name: ops-only, direction: inbound, action: deny, rules: [{from: [{notSpiffeIds: [\"spiffe://td/ns/ops/**\"]}], to: [{ports: [8080], paths: [\"/ops*\"]}]}]}\n");
    y.push_str("- {name: audit-export, direction: inbound, action: audit, rules: [{to: [{paths: [\"/export*\"]}]}]}\n");
    y.push_str("- {name: saas, direction: egress, action: allow, rules: [{to: [{hosts: [\"api.stripe.com\", \"*.s3.amazonaws.com\"], ports: [443]}]}]}\n");
    let per_policy = 5;
    let mut i = 0;
    let mut p = 0;
    while i < n {
        let _ = write!(
            y,
            "- name: gen-{p}\n  direction: inbound\n  action: {}\n  rules:\n",
            if p % 10 == 7 { "deny" } else { "allow" }
        );
        for _ in 0..per_policy.min(n - i) {
            let ns = i % 50;
            let _ = match (p % 10, i % 10) {
                (7, _) => writeln!(y, "  - {{from: [{{spiffeIds: [\"spiffe://td/ns/ns{ns}/sa/bad{i}\"]}}], to: [{{ports: [8080], paths: [\"/admin*\"]}}]}}"),
                (_, 6) => writeln!(y, "  - {{from: [{{spiffeIds: [\"spiffe://td/ns/g{i}/sa/*\"]}}], to: [{{ports: [{}]}}]}}", 9000 + i % 100),
                (_, 8) => writeln!(y, "  - {{from: [{{trustDomains: [\"partner{}.example\"], namespaces: [\"ns{}\"]}}], to: [{{ports: [7000]}}]}}", i % 20, i % 7),
                _ => writeln!(y, "  - {{from: [{{spiffeIds: [\"spiffe://td/ns/ns{ns}/sa/sa{i}\"]}}], to: [{{ports: [8080], methods: [\"GET\", \"HEAD\"], paths: [\"/api/v{i}/*\", \"/healthz\"]}}]}}"),
            };
            i += 1;
        }
        p += 1;
    }
    y
}

fn bench(c: &mut Criterion) {
    let local = SpiffeId::parse("spiffe://td/ns/shop/sa/api").unwrap();
    let mut g = c.benchmark_group("s7_policy_decision");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(30);
    for n in [10usize, 1_000, 10_000] {
        let set = PolicySet::from_yaml("s7.yaml", &policy_yaml(n)).expect("generated set loads");
        let policy = set.compile(&local);
        // A rule in the middle of the set (an exact-ID allow rule: i % 10 == 1 in an allow policy).
        let mid = (n / 2) / 10 * 10 + 1;
        let mid = if (mid / 5) % 10 == 7 { mid + 10 } else { mid }.min(n.saturating_sub(1));
        let hit = SpiffeId::parse(&format!("spiffe://td/ns/ns{}/sa/sa{mid}", mid % 50)).unwrap();
        let path = format!("/api/v{mid}/items");
        let unknown = SpiffeId::parse("spiffe://td/ns/nobody/sa/x").unwrap();
        let glob_i = (n / 2) / 10 * 10 + 6;
        let glob_i = if (glob_i / 5) % 10 == 7 {
            glob_i + 10
        } else {
            glob_i
        };
        let glob_peer = SpiffeId::parse(&format!("spiffe://td/ns/g{glob_i}/sa/worker")).unwrap();

        let mut http = Request::new(Direction::Inbound, Protocol::Http);
        http.peer = Some(&hit);
        http.destination_port = Some(8080);
        http.method = Some("GET");
        http.path = Some(&path);
        let d = policy.decide(&http);
        assert!(d.allow, "n={n}: {d:?}");
        g.bench_function(format!("{n}_rules/http_allow_mid"), |b| {
            b.iter(|| black_box(policy.decide(black_box(&http))))
        });

        let mut deny = http;
        deny.peer = Some(&unknown);
        assert!(!policy.decide(&deny).allow);
        g.bench_function(format!("{n}_rules/http_unknown_peer_default"), |b| {
            b.iter(|| black_box(policy.decide(black_box(&deny))))
        });

        let mut tcp = Request::new(Direction::Inbound, Protocol::Tcp);
        tcp.peer = Some(&glob_peer);
        tcp.destination_port = Some(9000 + (glob_i % 100) as u16);
        if glob_i < n {
            let d = policy.decide(&tcp);
            assert!(d.allow, "n={n}: {d:?}");
        }
        g.bench_function(format!("{n}_rules/tcp_glob"), |b| {
            b.iter(|| black_box(policy.decide(black_box(&tcp))))
        });

        let mut eg = Request::new(Direction::Egress, Protocol::Tls);
        eg.sni = Some("bucket.s3.amazonaws.com");
        eg.destination_port = Some(443);
        assert!(policy.decide(&eg).allow);
        g.bench_function(format!("{n}_rules/egress_sni_wildcard"), |b| {
            b.iter(|| black_box(policy.decide(black_box(&eg))))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
