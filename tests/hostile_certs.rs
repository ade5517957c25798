//! Hostile client certificates against a real `svidcar proxy` inbound port (real agent, real
//! TLS). Each certificate is signed by the agent's *real* CA key (loaded from its state dir), so
//! the chain is cryptographically valid and only the defect under test can cause the refusal:
//! two URI SANs, a CA certificate as leaf, expired, not yet valid, and an ID of a trust domain
//! that is not federated. A well-formed certificate made the same way gets through (control).
//! Every refusal must show up as a handshake failure with a specific reason in the log and in
//! `svidcar_proxy_handshake_failures{reason=...}`, and the app must never answer.

mod common;

use common::hostile::{mtls_get, AgentCa, Leaf};
use common::proxy::{Mesh, TestApp, TD};

#[test]
fn forged_client_certificates_are_refused_each_for_its_own_reason() {
    let mesh = Mesh::start("hostile-certs", &[]);
    let app = TestApp::start("backend");
    let (backend, port) = mesh.backend(app.port, "strict");
    let ca = AgentCa::load(&mesh.agent.state_dir);

    // Control: a well-formed SVID forged with the same CA is admitted.
    let (chain, key) = ca.forge(&Leaf::svid(&format!("spiffe://{TD}/frontend")));
    let ok = mtls_get(port, chain, key).expect("a well-formed SVID is admitted");
    assert!(ok.contains("hello from backend"), "control call: {ok}");

    struct Case {
        what: &'static str,
        leaf: Leaf,
        /// `reason` label of svidcar_proxy_handshake_failures.
        label: &'static str,
        /// Must appear in the access log line.
        says: &'static str,
    }
    let id = |p: &str| format!("spiffe://{TD}/{p}");
    let cases = [
        Case {
            what: "two URI SANs",
            leaf: Leaf {
                uris: vec![id("a"), id("b")],
                ..Leaf::svid("")
            },
            label: "invalid_svid",
            says: "leaf certificate has 2 URI SANs",
        },
        Case {
            what: "CA certificate as leaf",
            leaf: Leaf {
                is_ca: true,
                ..Leaf::svid(&id("ca-leaf"))
            },
            label: "invalid_svid",
            says: "leaf certificate is a CA",
        },
        Case {
            what: "expired SVID",
            leaf: Leaf {
                years: (2020, 2021),
                ..Leaf::svid(&id("expired"))
            },
            label: "certificate_expired",
            says: "certificate expired or not yet valid",
        },
        Case {
            what: "not-yet-valid SVID",
            leaf: Leaf {
                years: (2090, 2091),
                ..Leaf::svid(&id("future"))
            },
            label: "certificate_expired",
            says: "certificate expired or not yet valid",
        },
        Case {
            what: "foreign trust domain, not federated (signed by our own CA)",
            leaf: Leaf::svid("spiffe://evil.example/intruder"),
            label: "unknown_trust_domain",
            says: "no trust bundle for trust domain \\\"evil.example\\\"",
        },
    ];

    for c in &cases {
        let before = backend.metric_sum(&[
            "svidcar_proxy_handshake_failures",
            "direction=\"inbound\"",
            &format!("reason=\"{}\"", c.label),
        ]);
        let (chain, key) = ca.forge(&c.leaf);
        let r = mtls_get(port, chain, key);
        assert!(
            !r.as_deref().unwrap_or("").contains("hello from"),
            "{}: the app answered: {r:?}",
            c.what
        );
        assert!(
            r.is_err(),
            "{}: expected a failed handshake, got {r:?}",
            c.what
        );
        let line = backend.wait_log(&["outcome=\"handshake_failed\"", c.label, c.says]);
        assert!(line.contains("connection refused"), "{}: {line}", c.what);
        // The log line and the counter are written one after the other: give the counter a
        // moment to catch up (it must still move by exactly one).
        let reason = format!("reason=\"{}\"", c.label);
        let read = || {
            backend.metric_sum(&[
                "svidcar_proxy_handshake_failures",
                "direction=\"inbound\"",
                &reason,
            ])
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let mut after = read();
        while after < before + 1.0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            after = read();
        }
        assert_eq!(
            after,
            before + 1.0,
            "{}: handshake_failures{{reason={}}} must count it",
            c.what,
            c.label
        );
    }
}
