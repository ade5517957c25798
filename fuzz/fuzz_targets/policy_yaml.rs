//! The policy file parser and compiler (POLICY.md): arbitrary YAML through
//! `PolicySet::from_yaml`, then, when accepted, lint, compile for a fixed local ID, describe, and
//! decide a few fixed requests. Nothing accepted may panic later in the pipeline.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svidcar_agent::SpiffeId;
use svidcar_proxy::policy::{Direction, PolicySet, Protocol, Request};

fuzz_target!(|data: &[u8]| {
    // The loader contains a panic of serde_yaml_ng (undefined alias) with catch_unwind; the
    // abort-on-panic hook of libfuzzer-sys would count that as a crash. Restore the default hook:
    // a panic that escapes the target still aborts (libfuzzer-sys checks catch_unwind itself).
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| drop(std::panic::take_hook()));
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(set) = PolicySet::from_yaml("fuzz.yaml", text) else {
        return;
    };
    let (Ok(local), Ok(peer)) = (
        SpiffeId::parse("spiffe://fuzz.test/ns/prod/sa/api"),
        SpiffeId::parse("spiffe://fuzz.test/ns/prod/sa/web"),
    ) else {
        return;
    };
    let _ = set.lint(std::slice::from_ref(&local));
    let _ = set.settings();
    let policy = set.compile(&local);
    let _ = policy.describe();
    let mut req = Request::new(Direction::Inbound, Protocol::Tcp);
    req.peer = Some(&peer);
    req.destination_port = Some(8080);
    let d = policy.decide(&req);
    assert!(!d.label().is_empty());
    let _ = policy.explain(&req);
    let mut http = Request::new(Direction::Inbound, Protocol::Http);
    http.peer = Some(&peer);
    http.destination_port = Some(8080);
    http.method = Some("GET");
    http.path = Some("/api/v1/items");
    http.host = Some("api.fuzz.test");
    let _ = policy.decide(&http);
    let mut egress = Request::new(Direction::Egress, Protocol::Tls);
    egress.sni = Some("example.com");
    egress.destination_port = Some(443);
    let _ = policy.decide(&egress);
});
