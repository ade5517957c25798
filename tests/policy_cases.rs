//! The table-driven policy suite (POLICY.md §1–§10): decision cases, whole-set rejections and
//! lint codes from `tests/policy_data/*.yaml`, path normalization from a compact table. Every
//! decision case asserts the decision AND the reported rule (and the shadow/audit results).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use svidcar_agent::{SpiffeId, TrustDomain};
use svidcar_proxy::policy::{
    normalize_name, normalize_path, normalize_path_with, Decision, Direction, EscapedSlashes,
    Explanation, PathNormalization, PolicySet, Protocol, Request,
};

const DEFAULT_LOCAL: &str = "spiffe://td/ns/shop/sa/api";
const HEADER: &str = "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\n";

fn data(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/policy_data")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Writes a suite's files into a fresh temp dir and returns it.
fn write_files(tag: &str, policy: &Option<String>, files: &BTreeMap<String, String>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("svidcar-policy-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut all = files.clone();
    if let Some(p) = policy {
        all.insert("policy.yaml".into(), p.clone());
    }
    for (name, text) in all {
        let text = if text.contains("apiVersion") {
            text
        } else {
            format!("{HEADER}{text}")
        };
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

#[derive(Deserialize)]
struct Decisions {
    suites: Vec<Suite>,
}

#[derive(Deserialize)]
struct Suite {
    name: String,
    local: Option<String>,
    policy: Option<String>,
    #[serde(default)]
    files: BTreeMap<String, String>,
    builtin: Option<String>,
    cases: Vec<Case>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Case {
    d: String,
    p: Option<String>,
    peer: Option<String>,
    src: Option<IpAddr>,
    dip: Option<IpAddr>,
    port: Option<u16>,
    dest_id: Option<String>,
    sni: Option<String>,
    connect: Option<String>,
    host: Option<String>,
    method: Option<String>,
    path: Option<String>,
    #[serde(default)]
    headers: Vec<(String, String)>,
    want: String,
    rule: String,
    shadow: Option<String>,
    #[serde(default)]
    audit: Vec<String>,
}

fn protocol(c: &Case) -> Protocol {
    match c.p.as_deref() {
        Some("http") => Protocol::Http,
        Some("grpc") => Protocol::Grpc,
        Some("tcp") => Protocol::Tcp,
        Some("tls") => Protocol::Tls,
        Some("connect") => Protocol::Connect,
        Some(other) => panic!("bad protocol {other}"),
        None if c.method.is_some() || c.path.is_some() => Protocol::Http,
        None => Protocol::Tcp,
    }
}

/// Runs one case; returns a failure description.
fn run_case(set: &PolicySet, local: &SpiffeId, c: &Case) -> Result<(), String> {
    let policy = set.compile(local);
    let direction = match c.d.as_str() {
        "in" => Direction::Inbound,
        "eg" => Direction::Egress,
        d => return Err(format!("bad direction {d}")),
    };
    let peer = c.peer.as_deref().map(|p| SpiffeId::parse(p).unwrap());
    let dest_id = c.dest_id.as_deref().map(|p| SpiffeId::parse(p).unwrap());
    // A path normalization refuses is `DENY normalize:<reason>` with no rule evaluated, as
    // `policy check` reports it and the proxy answers it (`400`).
    let path = match c
        .path
        .as_deref()
        .map(|p| policy.settings().normalize_path(p))
    {
        Some(Err(e)) => {
            let d = Explanation::refused(&e).decision;
            return check_decision(c, &d);
        }
        Some(Ok(p)) => Some(p),
        None => None,
    };
    let (connect, connect_port) = match c.connect.as_deref() {
        Some(a) => {
            let (h, p) = a.rsplit_once(':').unwrap();
            (
                Some(normalize_name(h).into_owned()),
                Some(p.parse::<u16>().unwrap()),
            )
        }
        None => (None, None),
    };
    let host = c.host.as_deref().map(|h| normalize_name(h).into_owned());
    let sni = c.sni.as_deref().map(|h| normalize_name(h).into_owned());
    let headers = c.headers.clone();
    let mut req = Request::new(direction, protocol(c));
    req.peer = peer.as_ref();
    req.source_ip = c.src;
    req.destination_ip = c.dip;
    req.destination_port = c.port.or(connect_port);
    req.destination_spiffe_id = dest_id.as_ref();
    req.sni = sni.as_deref();
    req.connect_authority = connect.as_deref();
    req.host = host.as_deref();
    req.method = c.method.as_deref();
    req.path = path.as_deref();
    req.headers = &headers;
    let d = policy.decide(&req);
    check_decision(c, &d)?;
    // `explain` must agree with `decide`.
    let ex = policy.explain(&req);
    if ex.decision != d {
        return Err("explain() disagrees with decide()".into());
    }
    Ok(())
}

fn check_decision(c: &Case, d: &Decision) -> Result<(), String> {
    let got = format!("{} {}", d.label(), d.reason);
    let want = format!("{} {}", c.want, c.rule);
    if got != want {
        return Err(format!("decision: got `{got}`, want `{want}`"));
    }
    let got_shadow = d
        .shadow
        .as_ref()
        .map(|s| format!("{} {}", if s.allow { "ALLOW" } else { "DENY" }, s.reason));
    if got_shadow != c.shadow {
        return Err(format!("shadow: got {got_shadow:?}, want {:?}", c.shadow));
    }
    let got_audit: Vec<String> = d.audit.iter().map(|a| a.to_string()).collect();
    if got_audit != c.audit {
        return Err(format!("audit: got {got_audit:?}, want {:?}", c.audit));
    }
    Ok(())
}

#[test]
fn decision_table() {
    let t: Decisions = serde_yaml_ng::from_str(&data("decisions.yaml")).unwrap();
    let mut failures = Vec::new();
    let mut n = 0;
    for (si, s) in t.suites.iter().enumerate() {
        let local = SpiffeId::parse(s.local.as_deref().unwrap_or(DEFAULT_LOCAL)).unwrap();
        let set = match &s.builtin {
            Some(td) => PolicySet::builtin(&TrustDomain::parse(td).unwrap()),
            None => {
                let dir = write_files(&format!("d{si}"), &s.policy, &s.files);
                let set = PolicySet::load(&dir);
                let _ = std::fs::remove_dir_all(&dir);
                match set {
                    Ok(set) => set,
                    Err(e) => {
                        failures.push(format!("suite {}: did not load: {e}", s.name));
                        continue;
                    }
                }
            }
        };
        for (ci, c) in s.cases.iter().enumerate() {
            n += 1;
            if let Err(e) = run_case(&set, &local, c) {
                failures.push(format!("suite {} case {ci} {c:?}: {e}", s.name));
            }
        }
    }
    println!("{n} decision cases, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "{} of {n} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        n >= 80,
        "the table must hold at least 80 decision cases, has {n}"
    );
}

#[derive(Deserialize)]
struct Rejects {
    rejects: Vec<Reject>,
}

#[derive(Deserialize)]
struct Reject {
    name: String,
    policy: Option<String>,
    #[serde(default)]
    files: BTreeMap<String, String>,
    want: Vec<String>,
    line: Option<usize>,
    file: Option<String>,
}

#[test]
fn rejected_sets() {
    let t: Rejects = serde_yaml_ng::from_str(&data("rejects.yaml")).unwrap();
    let mut failures = Vec::new();
    for (i, r) in t.rejects.iter().enumerate() {
        let dir = write_files(&format!("r{i}"), &r.policy, &r.files);
        let result = PolicySet::load(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        let err = match result {
            Ok(_) => {
                failures.push(format!("{}: loaded, but must be rejected", r.name));
                continue;
            }
            Err(e) => e,
        };
        let text = err.to_string();
        for w in &r.want {
            if !text.contains(w.as_str()) {
                failures.push(format!("{}: {w:?} not in: {text}", r.name));
            }
        }
        let first = &err.issues[0];
        let want_file = r.file.as_deref().unwrap_or("policy.yaml");
        if first.file.file_name().and_then(|f| f.to_str()) != Some(want_file) {
            failures.push(format!(
                "{}: first issue names {}, want {want_file}",
                r.name,
                first.file.display()
            ));
        }
        if first.line.is_none() {
            failures.push(format!("{}: first issue has no line: {first}", r.name));
        }
        if let Some(line) = r.line {
            if first.line != Some(line) {
                failures.push(format!(
                    "{}: line {:?}, want {line}: {first}",
                    r.name, first.line
                ));
            }
        }
    }
    println!(
        "{} rejection cases, {} failed",
        t.rejects.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[derive(Deserialize)]
struct Lints {
    lints: Vec<LintCase>,
}

#[derive(Deserialize)]
struct LintCase {
    name: String,
    policy: String,
    #[serde(default)]
    local_ids: Vec<String>,
    want: Vec<String>,
}

#[test]
fn lint_codes() {
    let t: Lints = serde_yaml_ng::from_str(&data("lints.yaml")).unwrap();
    let mut failures = Vec::new();
    for l in &t.lints {
        let set = match PolicySet::from_yaml("lint.yaml", &format!("{HEADER}{}", l.policy)) {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!("{}: did not load: {e}", l.name));
                continue;
            }
        };
        let ids: Vec<SpiffeId> = l
            .local_ids
            .iter()
            .map(|s| SpiffeId::parse(s).unwrap())
            .collect();
        let got: Vec<String> = set
            .lint(&ids)
            .iter()
            .map(|w| format!("{} {}", w.code, w.target))
            .collect();
        if got != l.want {
            failures.push(format!("{}: got {got:?}, want {:?}", l.name, l.want));
        }
    }
    println!("{} lint cases, {} failed", t.lints.len(), failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn path_normalization_table() {
    use PathNormalization::*;
    let table: &[(PathNormalization, &str, &str)] = &[
        (None, "/a//b/../c?q=1#f", "/a//b/../c"),
        (None, "/a%2Fb", "/a%2Fb"),
        (Base, "/a\\b", "/a/b"),
        (Base, "/a/./b/../c", "/a/c"),
        (Base, "/a//b", "/a//b"),
        (Base, "/../../x", "/x"),
        (Base, "/a/b/..", "/a/"),
        (Base, "/a/.", "/a/"),
        (MergeSlashes, "//a///b", "/a/b"),
        (MergeSlashes, "/a//../b", "/b"),
        (MergeSlashes, "/", "/"),
        (DecodeAndMergeSlashes, "/a%2F..%2Fb", "/b"),
        (DecodeAndMergeSlashes, "/a%2f%2fb", "/a/b"),
        (DecodeAndMergeSlashes, "/a%5C..%5cb", "/b"),
        // `%41` is `A` (unreserved): decoded in every mode but `none`.
        (DecodeAndMergeSlashes, "/a%41", "/aA"),
        (DecodeAndMergeSlashes, "/ü%2F", "/ü/"),
        // Step (1) of `base`: escaped unreserved characters decoded before dot segments.
        (Base, "/public/%2e%2e/admin", "/admin"),
        (Base, "/public/%2E%2E/admin", "/admin"),
        (Base, "/public/.%2e/admin", "/admin"),
        (Base, "/public/%2e./admin", "/admin"),
        (Base, "/public/%2e/admin", "/public/admin"),
        (MergeSlashes, "/%61dmin", "/admin"),
        (MergeSlashes, "/adm%69n", "/admin"),
        (
            MergeSlashes,
            "/%41%5a%61%7a%30%39%2d%2e%5f%7e",
            "/AZaz09-._~",
        ),
        // Decoded once: `%25` (`%`) is not unreserved, so `%252e` is never `.`.
        (
            MergeSlashes,
            "/public/%252e%252e/admin",
            "/public/%252e%252e/admin",
        ),
        (
            MergeSlashes,
            "/public/%25%32%65/admin",
            "/public/%252e/admin",
        ),
        // Escapes that stay get upper-case hex (mixed case in, one form out).
        (MergeSlashes, "/a%3fb%3Fc%c3%BC", "/a%3Fb%3Fc%C3%BC"),
        // `;` parameters are ordinary segment characters, not stripped.
        (MergeSlashes, "/public;x=1/../admin", "/admin"),
        (MergeSlashes, "/admin;jsessionid=1", "/admin;jsessionid=1"),
        (MergeSlashes, "/a%3b/../b", "/b"),
        (None, "/a/%2e%2e/b", "/a/%2e%2e/b"),
    ];
    for (mode, raw, want) in table {
        assert_eq!(
            normalize_path(*mode, raw).as_deref(),
            Ok(*want),
            "{mode:?} {raw}"
        );
    }
    // `escapedSlashes: keep`: the escape stays (upper-cased) and is matched literally.
    let keep: &[(PathNormalization, &str, &str)] = &[
        (MergeSlashes, "/a%2F..%2Fb", "/a%2F..%2Fb"),
        (MergeSlashes, "/a%2f..%2fb", "/a%2F..%2Fb"),
        (Base, "/a%5c%5Cb", "/a%5C%5Cb"),
        (DecodeAndMergeSlashes, "/a%2f..%2fb", "/b"),
    ];
    for (mode, raw, want) in keep {
        assert_eq!(
            normalize_path_with(*mode, EscapedSlashes::Keep, raw).as_deref(),
            Ok(*want),
            "keep {mode:?} {raw}"
        );
    }
    // Refusals and their reasons (default `escapedSlashes: reject`).
    let refused: &[(PathNormalization, &str, &str)] = &[
        (MergeSlashes, "example.com/x", "normalize:not-absolute"),
        (MergeSlashes, "*", "normalize:not-absolute"),
        (MergeSlashes, "", "normalize:not-absolute"),
        (MergeSlashes, "/a%2F..%2Fb", "normalize:escaped-slash"),
        (MergeSlashes, "/a%2fb", "normalize:escaped-slash"),
        (Base, "/a%5Cb", "normalize:escaped-slash"),
        (Base, "/a%5c", "normalize:escaped-slash"),
        (MergeSlashes, "/a%zz", "normalize:bad-escape"),
        (MergeSlashes, "/a%4", "normalize:bad-escape"),
        (MergeSlashes, "/a%", "normalize:bad-escape"),
        (MergeSlashes, "/a%%32%65", "normalize:bad-escape"),
        (MergeSlashes, "/a%00", "normalize:bad-escape"),
        (
            MergeSlashes,
            "/a%0d%0aX-Injected:%201",
            "normalize:bad-escape",
        ),
        (MergeSlashes, "/a%1F", "normalize:bad-escape"),
        (MergeSlashes, "/a%7f", "normalize:bad-escape"),
        (DecodeAndMergeSlashes, "/a%00%2F", "normalize:bad-escape"),
        (Base, "/a\u{0}b", "normalize:bad-escape"),
    ];
    for (mode, raw, want) in refused {
        let got = normalize_path(*mode, raw).map_err(|e| e.reason());
        assert_eq!(got, Err(*want), "{mode:?} {raw:?}");
    }
    // `none` refuses only what is not a path.
    assert_eq!(
        normalize_path(None, "/a%00%2F%zz").as_deref(),
        Ok("/a%00%2F%zz")
    );
}

#[test]
fn host_names_are_normalized() {
    let table = [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("example.com:8443", "example.com"),
        ("[::1]:80", "::1"),
        ("::1", "::1"),
        ("10.0.0.1:443", "10.0.0.1"),
    ];
    for (raw, want) in table {
        assert_eq!(normalize_name(raw), want, "{raw}");
    }
}
