//! `svidcar policy check` / `svidcar policy lint` as a real process (POLICY.md §10): output
//! forms and exit codes 0 / 1 / 2.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

const SET: &str = r#"apiVersion: svidcar.io/v1alpha1
kind: PolicySet
defaults: {inbound: deny, egress: deny}
policies:
- name: catalog-read
  direction: inbound
  action: allow
  rules:
  - from: [{spiffeIds: ["spiffe://td/ns/shop/sa/frontend"]}]
    to: [{ports: [8080], methods: ["GET"], paths: ["/catalog/*"]}]
- name: no-admin
  direction: inbound
  action: deny
  rules: [{to: [{ports: [8080], paths: ["/admin*"]}]}]
- name: try-partner
  direction: inbound
  action: allow
  dryRun: true
  rules: [{from: [{trustDomains: ["partner.example"]}]}]
- name: audit-all
  direction: inbound
  action: audit
  rules: [{}]
- name: saas
  direction: egress
  action: allow
  rules: [{to: [{hosts: ["api.example.com"], ports: [443]}]}]
"#;

fn dir_with(tag: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("svidcar-policy-cli-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

fn svidcar(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_svidcar"))
        .args(args)
        .output()
        .expect("run svidcar")
}

/// `policy check -f <dir>` for the frontend calling `GET <path>` on the catalog's port 8080.
fn frontend_get<'a>(dir: &'a str, path: &'a str) -> Vec<&'a str> {
    vec![
        "policy",
        "check",
        "-f",
        dir,
        "--local-id",
        "spiffe://td/ns/shop/sa/catalog",
        "--direction",
        "inbound",
        "--peer",
        "spiffe://td/ns/shop/sa/frontend",
        "--port",
        "8080",
        "--method",
        "GET",
        "--path",
        path,
    ]
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn check_text_names_decision_rule_and_per_rule_reasons() {
    let dir = dir_with("text", &[("p.yaml", SET)]);
    let d = dir.to_str().unwrap();
    let o = svidcar(&frontend_get(d, "/catalog//x"));
    assert_eq!(
        o.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = stdout(&o);
    assert!(out.starts_with("ALLOW by catalog-read/rules[0]"), "{out}");
    assert!(
        !out.contains("dry-run:"),
        "same shadow decision is not shown: {out}"
    );
    assert!(out.contains("audit: audit-all/rules[0]"), "{out}");
    assert!(
        out.contains("not matched no-admin/rules[0]: to[0].paths: did not match"),
        "{out}"
    );

    // A denial is still a decision: exit 0.
    let o = svidcar(&[
        "policy",
        "check",
        "-f",
        d,
        "--local-id",
        "spiffe://td/ns/shop/sa/catalog",
        "--direction",
        "inbound",
        "--plaintext",
        "--port",
        "8080",
        "--method",
        "GET",
        "--path",
        "/x/../admin",
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        stdout(&o).starts_with("DENY by no-admin/rules[0]"),
        "{}",
        stdout(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_json_has_the_documented_shape() {
    let dir = dir_with("json", &[("p.yaml", SET)]);
    let d = dir.to_str().unwrap();
    let o = svidcar(&[
        "policy",
        "check",
        "-f",
        d,
        "--local-id",
        "spiffe://td/ns/shop/sa/catalog",
        "--direction",
        "inbound",
        "--peer",
        "spiffe://partner.example/x",
        "--port",
        "9000",
        "--output",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["decision"], "DENY");
    assert_eq!(v["rule"], "default:deny");
    assert_eq!(v["shadow"]["decision"], "ALLOW");
    assert_eq!(v["shadow"]["rule"], "try-partner/rules[0]");
    assert_eq!(v["audit"], serde_json::json!(["audit-all/rules[0]"]));
    let rules = v["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 4, "inbound rules only: {rules:?}");
    assert_eq!(rules[0]["id"], "catalog-read/rules[0]");
    assert_eq!(rules[0]["matched"], false);
    assert_eq!(
        rules[0]["reason"],
        "HTTP-only field on non-HTTP traffic: an allow rule cannot match"
    );

    // Egress with CONNECT and SNI: both names evaluated, the SNI one denies.
    let o = svidcar(&[
        "policy",
        "check",
        "-f",
        d,
        "--local-id",
        "spiffe://td/ns/shop/sa/catalog",
        "--direction",
        "egress",
        "--protocol",
        "connect",
        "--connect",
        "api.example.com:443",
        "--sni",
        "other.example",
        "--output",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["decision"], "DENY");
    assert_eq!(v["rule"], "default:deny");
    assert_eq!(v["shadow"], serde_json::Value::Null);
    let rules = v["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[0]["name"], "api.example.com");
    assert_eq!(rules[0]["matched"], true);
    assert_eq!(rules[1]["name"], "other.example");
    assert_eq!(rules[1]["matched"], false);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn broken_set_exits_2_with_file_line_and_field() {
    let broken = "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n- name: a\n  direction: egress\n  action: allow\n  rules:\n  - from: [{spiffeIds: [\"*\"]}]\n";
    let dir = dir_with("broken", &[("a.yaml", SET), ("b.yaml", broken)]);
    let d = dir.to_str().unwrap();
    for args in [
        vec![
            "policy",
            "check",
            "-f",
            d,
            "--local-id",
            "spiffe://td/x",
            "--direction",
            "inbound",
        ],
        vec!["policy", "lint", "-f", d],
    ] {
        let o = svidcar(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("b.yaml:8: policies[0].rules[0].from: `from` is not allowed"),
            "{err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lint_exit_codes() {
    let dir = dir_with("lint", &[("p.yaml", SET)]);
    let clean = dir.join("p.yaml");
    let o = svidcar(&["policy", "lint", "-f", clean.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert_eq!(stdout(&o).trim(), "no warnings");

    let risky = SET.replace(
        "spiffeIds: [\"spiffe://td/ns/shop/sa/frontend\"]",
        "notSpiffeIds: [\"spiffe://td/x\"]",
    );
    std::fs::write(&clean, risky).unwrap();
    let o = svidcar(&[
        "policy",
        "lint",
        "-f",
        clean.to_str().unwrap(),
        "--local-id",
        "spiffe://td/ns/shop/sa/catalog",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.starts_with("L001 catalog-read/rules[0]:"), "{out}");
    assert!(out.contains("(fix: "), "{out}");

    let o = svidcar(&[
        "policy",
        "lint",
        "-f",
        clean.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["code"], "L001");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A path the proxy refuses is reported as the proxy answers it: `DENY by normalize:<reason>`
/// (exit 0, no rule evaluated); escaped unreserved characters are decoded before matching.
#[test]
fn check_reports_normalize_refusals_like_the_proxy() {
    let keep = SET.replace(
        "defaults: {inbound: deny, egress: deny}",
        "defaults: {inbound: deny, egress: deny}\nsettings: {escapedSlashes: keep}",
    );
    let dir = dir_with("normalize", &[("p.yaml", SET)]);
    let keep_dir = dir_with("normalize-keep", &[("p.yaml", &keep)]);
    let check = |d: &PathBuf, path: &str, json: bool| {
        let mut args = frontend_get(d.to_str().unwrap(), path);
        if json {
            args.extend(["--output", "json"]);
        }
        let o = svidcar(&args);
        assert_eq!(o.status.code(), Some(0), "{path}: {o:?}");
        stdout(&o)
    };
    for (path, want) in [
        ("/catalog/%2e%2e/admin", "DENY by no-admin/rules[0]"),
        ("/catalog/.%2E/%61dmin", "DENY by no-admin/rules[0]"),
        ("/catalog/%2561", "ALLOW by catalog-read/rules[0]"),
        ("/catalog/..%2Fadmin", "DENY by normalize:escaped-slash"),
        ("/catalog/%5c", "DENY by normalize:escaped-slash"),
        ("/catalog/%zz", "DENY by normalize:bad-escape"),
        ("/catalog/%00", "DENY by normalize:bad-escape"),
        ("catalog/x", "DENY by normalize:not-absolute"),
    ] {
        let out = check(&dir, path, false);
        assert_eq!(out.lines().next(), Some(want), "{path}: {out}");
        if want.contains("normalize:") {
            assert!(out.contains("none evaluated"), "{path}: {out}");
        }
    }
    let v: serde_json::Value =
        serde_json::from_str(&check(&dir, "/catalog/%2fx", true)).expect("json");
    assert_eq!(v["decision"], "DENY");
    assert_eq!(v["rule"], "normalize:escaped-slash");
    assert_eq!(v["rules"], serde_json::json!([]));
    // `escapedSlashes: keep`: matched literally.
    let out = check(&keep_dir, "/catalog/a%2fb", false);
    assert!(out.starts_with("ALLOW by catalog-read/rules[0]"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&keep_dir);
}

/// `--host` gets the proxy's authority checks: a Host the proxy answers `400` is
/// `DENY by authority:<reason>` (no rule evaluated), whatever a rule would have said about the
/// name in it; an accepted one is canonicalized (case, trailing dot, port) like the proxy.
#[test]
fn check_host_is_refused_like_the_proxy() {
    let dir = dir_with("host", &[("p.yaml", SET)]);
    let check = |direction: &str, host: &str, json: bool| {
        let mut args = vec![
            "policy",
            "check",
            "-f",
            dir.to_str().unwrap(),
            "--local-id",
            "spiffe://td/ns/shop/sa/catalog",
            "--direction",
            direction,
            "--protocol",
            "http",
            "--method",
            "GET",
            "--path",
            "/catalog/x",
            "--host",
            host,
        ];
        if direction == "egress" {
            args.extend(["--port", "443"]);
        } else {
            args.extend([
                "--port",
                "8080",
                "--peer",
                "spiffe://td/ns/shop/sa/frontend",
            ]);
        }
        if json {
            args.extend(["--output", "json"]);
        }
        let o = svidcar(&args);
        assert_eq!(o.status.code(), Some(0), "{host}: {o:?}");
        stdout(&o)
    };
    for (direction, host, want) in [
        ("egress", "API.Example.COM.:443", "ALLOW by saas/rules[0]"),
        ("egress", "api.example.com", "ALLOW by saas/rules[0]"),
        // Each of these names api.example.com to a lax reader; the proxy answers 400.
        ("egress", "api.example.com:x", "DENY by authority:invalid"),
        ("egress", "api.example.com:", "DENY by authority:invalid"),
        (
            "egress",
            "api.example.com,evil.test",
            "DENY by authority:invalid",
        ),
        ("egress", "api.example.com/x", "DENY by authority:invalid"),
        ("egress", "api.example.com%2e", "DENY by authority:invalid"),
        (
            "egress",
            "evil.test@api.example.com",
            "DENY by authority:userinfo",
        ),
        ("inbound", "Catalog.Shop.", "ALLOW by catalog-read/rules[0]"),
        ("inbound", "", "DENY by authority:invalid"),
        ("inbound", "a b", "DENY by authority:invalid"),
    ] {
        let out = check(direction, host, false);
        assert_eq!(
            out.lines().next(),
            Some(want),
            "{direction} {host:?}: {out}"
        );
        if want.contains("authority:") {
            assert!(out.contains("none evaluated"), "{host}: {out}");
        }
    }
    let v: serde_json::Value =
        serde_json::from_str(&check("egress", "api.example.com:x", true)).expect("json");
    assert_eq!(v["decision"], "DENY");
    assert_eq!(v["rule"], "authority:invalid");
    assert_eq!(v["rules"], serde_json::json!([]));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lint_reports_l009_to_l011() {
    let set = r#"apiVersion: svidcar.io/v1alpha1
kind: PolicySet
policies:
- name: open
  direction: inbound
  action: allow
  rules: [{to: [{ports: [8080]}]}]
- name: never
  direction: inbound
  action: deny
  rules: [{from: [], to: [{ports: [8080]}]}]
- name: everyone
  direction: inbound
  action: deny
  rules: [{from: [{spiffeIds: ["*"]}]}]
"#;
    let dir = dir_with("lint-l9", &[("p.yaml", set)]);
    let o = svidcar(&["policy", "lint", "-f", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let codes: Vec<String> = stdout(&o)
        .lines()
        .map(|l| l.split(':').next().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        codes,
        [
            "L009 open/rules[0]",
            "L010 never/rules[0]",
            "L011 everyone/rules[0]"
        ],
        "{}",
        stdout(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
