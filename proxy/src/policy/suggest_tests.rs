use super::*;
use crate::access_log::{AccessRecord, Kind, Logged};
use crate::policy::{replay::replay, Protocol};

const API: &str = "spiffe://td/api";

fn http(peer: &str, method: &str, path: &str) -> AccessRecord {
    let mut r = AccessRecord::new(Kind::Request, Direction::Inbound);
    r.protocol = Some(Protocol::Http);
    r.local_id = Some(API.into());
    r.peer_id = Some(peer.into());
    r.src_ip = Some("10.0.0.9".parse().unwrap());
    r.dst_port = Some(8080);
    r.method = Some(method.into());
    r.path = Some(path.into());
    r.decision = Some(Logged::Allow);
    r.rule = Some("default:allow".into());
    r
}

fn egress(sni: Option<&str>, ip: &str, port: u16) -> AccessRecord {
    let mut r = AccessRecord::new(Kind::Connection, Direction::Egress);
    r.protocol = Some(if sni.is_some() {
        Protocol::Tls
    } else {
        Protocol::Tcp
    });
    r.local_id = Some(API.into());
    r.sni = sni.map(str::to_string);
    r.dst_ip = Some(ip.parse().unwrap());
    r.dst_port = Some(port);
    r.decision = Some(Logged::Allow);
    r.rule = Some("default:allow".into());
    r
}

fn load(yaml: &str) -> crate::policy::CompiledPolicy {
    let set = PolicySet::from_yaml("s.yaml", yaml).unwrap();
    set.compile(&svidcar_agent::SpiffeId::parse(API).unwrap())
}

fn allows(policy: &crate::policy::CompiledPolicy, r: &AccessRecord) -> bool {
    Recorded::parse(r).unwrap().decide(policy).allow
}

#[test]
fn allows_exactly_what_was_seen_per_caller() {
    let web = "spiffe://td/web";
    let jobs = "spiffe://td/jobs";
    let mut tcp = http(jobs, "", "");
    tcp.kind = Kind::Connection;
    tcp.protocol = Some(Protocol::Tcp);
    tcp.method = None;
    tcp.path = None;
    tcp.dst_port = Some(5432);
    let mut denied = http(web, "DELETE", "/users/1");
    denied.decision = Some(Logged::Deny);
    let recs = vec![
        http(web, "GET", "/users/123"),
        http(web, "GET", "/users/456"),
        http(web, "GET", "/healthz"),
        http(jobs, "POST", "/orders"),
        http(jobs, "GET", "/healthz"),
        tcp.clone(),
        denied.clone(),
        egress(Some("api.stripe.com"), "1.2.3.4", 443),
        egress(None, "10.20.0.5", 5432),
    ];
    let s = suggest(&recs, None, &Options::default()).unwrap();
    assert_eq!(s.used, 8, "{}", s.yaml);
    assert_eq!(s.skipped["denied when recorded"], 1);
    let y = &s.yaml;
    assert!(y.contains("defaults: {inbound: deny, egress: deny}"), "{y}");
    assert!(y.contains("- name: api-from-web\n"), "{y}");
    assert!(y.contains("\"/users/{*}\"  # 2 requests"), "{y}");
    assert!(y.contains("# rules[0]: 3 requests"), "{y}");
    assert!(y.contains("hosts: [\"api.stripe.com\"]"), "{y}");
    assert!(y.contains("cidrs: [\"10.20.0.5/32\"]"), "{y}");
    let p = load(y);
    for r in &recs[..6] {
        assert!(allows(&p, r), "{r:?}\n{y}");
    }
    // Not observed: another path, method, caller, port, or the denied request.
    assert!(allows(&p, &http(web, "GET", "/users/789")));
    assert!(!allows(&p, &http(web, "GET", "/admin")));
    assert!(
        !allows(&p, &http(web, "POST", "/orders")),
        "per caller: {y}"
    );
    assert!(!allows(&p, &http(web, "GET", "/users/1/x")));
    assert!(!allows(
        &p,
        &http("spiffe://td/intruder", "GET", "/healthz")
    ));
    assert!(!allows(&p, &denied));
    let mut other_port = http(web, "GET", "/healthz");
    other_port.dst_port = Some(9090);
    assert!(!allows(&p, &other_port));
    let mut tcp_web = tcp.clone();
    tcp_web.peer_id = Some(web.into());
    assert!(!allows(&p, &tcp_web));
    assert!(!allows(&p, &egress(Some("evil.example"), "1.2.3.4", 443)));
    assert!(!allows(&p, &egress(Some("api.stripe.com"), "1.2.3.4", 80)));

    // Replayed on its own log, the suggestion changes nothing.
    let set = PolicySet::from_yaml("s.yaml", y).unwrap();
    let report = replay(&set, recs[..6].iter().map(|r| (String::new(), r)), None, 3);
    assert!(report.changed.is_empty(), "{report:?}");

    // --include-denied allows the denied one too.
    let opts = Options {
        include_denied: true,
        ..Options::default()
    };
    let s = suggest(&recs, None, &opts).unwrap();
    assert!(allows(&load(&s.yaml), &denied), "{}", s.yaml);
}

#[test]
fn caps_paths_and_collapses_hosts_on_request() {
    let web = "spiffe://td/web";
    let mut recs: Vec<AccessRecord> = (0..5)
        .map(|i| http(web, "GET", &format!("/api/v1/item-{i}")))
        .collect();
    recs.push(http(web, "GET", "/healthz"));
    for h in [
        "a.cdn.example.net",
        "b.cdn.example.net",
        "c.cdn.example.net",
    ] {
        recs.push(egress(Some(h), "1.2.3.4", 443));
    }
    let opts = Options {
        max_paths: 2,
        collapse_hosts: 3,
        include_denied: false,
    };
    let s = suggest(&recs, None, &opts).unwrap();
    assert!(
        s.yaml.contains("\"/api/v1/{**}\"  # 5 requests"),
        "{}",
        s.yaml
    );
    assert!(
        s.yaml.contains("hosts: [\"*.cdn.example.net\"]"),
        "{}",
        s.yaml
    );
    let p = load(&s.yaml);
    assert!(allows(&p, &http(web, "GET", "/api/v1/other")));
    assert!(!allows(&p, &http(web, "GET", "/api/v2")));
    assert!(allows(
        &p,
        &egress(Some("d.cdn.example.net"), "1.2.3.4", 443)
    ));
    // Without the flags: exact paths and hosts.
    let s = suggest(&recs, None, &Options::default()).unwrap();
    assert!(s.yaml.contains("\"/api/v1/item-4\""), "{}", s.yaml);
    let p = load(&s.yaml);
    assert!(!allows(
        &p,
        &egress(Some("d.cdn.example.net"), "1.2.3.4", 443)
    ));
}

#[test]
fn selectors_per_local_identity_and_unauthenticated_callers_by_address() {
    let mut plain = http("x", "GET", "/public");
    plain.peer_id = None;
    let mut other = http("spiffe://td/web", "GET", "/b");
    other.local_id = Some("spiffe://td/billing".into());
    let recs = [plain.clone(), other.clone()];
    let s = suggest(&recs, None, &Options::default()).unwrap();
    assert!(s.yaml.contains("ipBlocks: [\"10.0.0.9\"]"), "{}", s.yaml);
    assert!(
        s.yaml
            .contains("selector: {spiffeIds: [\"spiffe://td/billing\"]}"),
        "{}",
        s.yaml
    );
    let p = load(&s.yaml);
    assert!(allows(&p, &plain));
    assert!(
        !allows(&p, &http("spiffe://td/web", "GET", "/b")),
        "billing's rule is not api's"
    );
    let mut elsewhere = plain.clone();
    elsewhere.src_ip = Some("10.0.0.10".parse().unwrap());
    assert!(!allows(&p, &elsewhere));
    // --local-id keeps one identity.
    let api = svidcar_agent::SpiffeId::parse(API).unwrap();
    let s = suggest(&recs, Some(&api), &Options::default()).unwrap();
    assert!(!s.yaml.contains("billing"), "{}", s.yaml);
    assert!(suggest(&[other], Some(&api), &Options::default()).is_err());
}
