//! The policy engine behind the inbound sidecar (L4): a denied peer is reset before any byte
//! reaches the app and the log names the deciding rule; a policy edit is picked up live.

mod common;

use std::time::{Duration, Instant};

use common::proxy::{http_get, Mesh, TestApp, TD};

fn policy(allowed: &str) -> String {
    format!(
        "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n- name: only-{name}\n  direction: inbound\n  action: allow\n  rules: [{{ from: [{{ spiffeIds: [\"spiffe://{TD}/{allowed}\"] }}] }}]\n",
        name = allowed
    )
}

#[test]
fn policy_denies_with_rule_then_hot_reload_allows() {
    let mesh = Mesh::start("proxy-policy", &[]);
    let app = TestApp::start("app");
    let (backend, in_port) = mesh.policy_backend(&policy("web"), app.port, "strict");
    let file = mesh.dir.path().join("policy.yaml");
    let (_frontend, out_port) = mesh.frontend(in_port, &format!("spiffe://{TD}/backend"));
    let addr = ([127, 0, 0, 1], out_port).into();

    let r = http_get(addr, "/");
    // The backend's reset travels back through the frontend to the app as a reset.
    let kind = r.as_ref().err().map(|e| e.kind());
    assert_eq!(kind, Some(std::io::ErrorKind::ConnectionReset), "{r:?}");
    assert!(
        !matches!(r, Ok((200, _))),
        "frontend is not allowed by the policy, got {r:?}"
    );
    let line = backend.wait_log(&["outcome=\"denied\"", "rule=\"default:deny(implicit)\""]);
    assert!(
        line.contains(&format!("peer_id=\"spiffe://{TD}/frontend\"")),
        "{line}"
    );
    assert!(
        backend.metric_sum(&[
            "svidcar_proxy_decisions_total",
            "deny",
            "default:deny(implicit)"
        ]) >= 1.0
    );

    std::fs::write(&file, policy("frontend")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok((200, body)) = http_get(addr, "/") {
            assert_eq!(body, "hello from app\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "policy reload did not admit frontend:\n{}",
            backend.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    backend.wait_log(&["outcome=\"allowed\"", "rule=\"only-frontend/rules[0]\""]);
}

/// An `http` port: each request is decided on its own; a denied request gets `403 RBAC: access
/// denied` and the connection stays usable.
#[test]
fn http_port_decides_per_request_with_403() {
    let mesh = Mesh::start("proxy-l7", &[]);
    let app = TestApp::start("app");
    let policy = format!(
        "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n- name: public-get\n  direction: inbound\n  action: allow\n  rules:\n  - from: [{{ spiffeIds: [\"spiffe://{TD}/frontend\"] }}]\n    to: [{{ methods: [\"GET\"], paths: [\"/public/*\"] }}]\n"
    );
    let (backend, in_port) = mesh.l7_backend(&policy, app.port);
    let (_frontend, out_port) = mesh.frontend(in_port, &format!("spiffe://{TD}/backend"));
    let mut conn = common::proxy::KeepAlive::connect(([127, 0, 0, 1], out_port).into()).unwrap();
    assert_eq!(
        conn.get("/public/a").unwrap(),
        (200, "hello from app\n".to_string())
    );
    assert_eq!(
        conn.get("/secret").unwrap(),
        (403, "RBAC: access denied".to_string())
    );
    // Normalized before matching: /public/../secret is /secret.
    assert_eq!(conn.get("/public/../secret").unwrap().0, 403);
    assert_eq!(
        conn.get("/public//b").unwrap(),
        (200, "hello from app\n".to_string())
    );
    // The normalized path is what is forwarded (POLICY.md §3), the query kept.
    assert_eq!(
        conn.get("/public/./x/..//echo?q=1").unwrap(),
        (200, "/public/echo?q=1\n".to_string())
    );
    let line = backend.wait_log(&["request denied", "path=/secret"]);
    assert!(line.contains("rule=default:deny(implicit)"), "{line}");
    backend.wait_log(&[
        "outcome=\"allowed\"",
        "rule=public-get/rules[0]",
        "status=200",
    ]);
    assert!(backend.metric_sum(&["svidcar_proxy_decisions_total", "deny"]) >= 2.0);
    let (status, policy) = http_get(backend.admin, "/policy").unwrap();
    assert_eq!(status, 200);
    assert!(
        policy.contains("public-get") && policy.contains("policy.yaml"),
        "{policy}"
    );
}

/// Mesh egress: the policy sees the expected SPIFFE ID of a route before it is dialed; a route
/// whose expected identity no rule allows is refused with the rule in the log.
#[test]
fn egress_policy_on_mesh_routes() {
    let mesh = Mesh::start("proxy-egress", &[]);
    let app = TestApp::start("app");
    let (_backend, in_port) = mesh.backend(app.port, "strict");
    let file = mesh.dir.path().join("egress.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n- name: to-backend\n  direction: egress\n  action: allow\n  rules: [{{ to: [{{ spiffeIds: [\"spiffe://{TD}/backend\"] }}] }}]\n"
        ),
    )
    .unwrap();
    let (ok_port, td_port) = (common::free_port(), common::free_port());
    let frontend = mesh.sidecar(
        "frontend",
        &mesh.frontend_bin.clone(),
        &[
            "--policy".into(),
            file.display().to_string(),
            "--outbound".into(),
            format!("127.0.0.1:{ok_port}=127.0.0.1:{in_port},spiffe://{TD}/backend"),
            "--outbound".into(),
            format!("127.0.0.1:{td_port}=127.0.0.1:{in_port},{TD}"),
        ],
    );
    assert_eq!(
        http_get(([127, 0, 0, 1], ok_port).into(), "/").unwrap(),
        (200, "hello from app\n".into())
    );
    frontend.wait_log(&[
        "direction=\"outbound\"",
        "rule=\"to-backend/rules[0]\"",
        "outcome=\"allowed\"",
    ]);
    let r = http_get(([127, 0, 0, 1], td_port).into(), "/");
    assert!(
        !matches!(r, Ok((200, _))),
        "egress without an allowed identity went through: {r:?}"
    );
    frontend.wait_log(&["outcome=\"denied\"", "default:deny(implicit)"]);
}
