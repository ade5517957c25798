//! Attacks on the inbound L7 (`http`) port through the real binaries (agent, backend sidecar
//! with a policy, frontend sidecar or a raw mTLS / plaintext client) against apps that record
//! exactly what they received, and the stock `python3 -m http.server`, which decodes paths.
//! Every case asserts what the APP received (or that it received nothing), not only the status.
//!
//! Issue #13: item 1 (percent-encoded dot segments and unreserved characters, escaped slashes;
//! `svidcar policy check` must give the proxy's answer), item 2 (one authority per request;
//! `x-forwarded-client-cert` is the sidecar's own).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::l7::{raw_h2, raw_http, H2Outcome, RecordingApp, RecordingH2App};
use common::proxy::{Mesh, Sidecar, TD};

const POLICY: &str = r#"apiVersion: svidcar.io/v1alpha1
kind: PolicySet
defaults: {inbound: deny}
policies:
- name: public
  direction: inbound
  action: allow
  rules: [{to: [{paths: ["/public/*"]}]}]
- name: xfcc
  direction: inbound
  action: allow
  rules:
  - to: [{paths: ["/xfcc-admin"]}]
    when: [{key: "request.headers[x-forwarded-client-cert]", values: ["By=spiffe://svidcar.local/backend;URI=spiffe://svidcar.local/admin"]}]
  - to: [{paths: ["/xfcc-frontend"]}]
    when: [{key: "request.headers[x-forwarded-client-cert]", values: ["By=spiffe://svidcar.local/backend;URI=spiffe://svidcar.local/frontend"]}]
- name: no-admin
  direction: inbound
  action: deny
  rules:
  - to: [{paths: ["/admin*"]}]
  - to: [{hosts: ["admin.internal"]}]
"#;

const OWN_XFCC: &str =
    "x-forwarded-client-cert: By=spiffe://svidcar.local/backend;URI=spiffe://svidcar.local/frontend";

/// A backend sidecar with an `http` inbound listener (`mode` e.g. `strict:http`) to
/// `app_port`, under `yaml` written to its own file `file` (so two backends of one mesh do
/// not share, and hot-reload, one policy file). Returns it, its port and the policy path.
fn backend(mesh: &Mesh, file: &str, yaml: &str, app_port: u16, mode: &str) -> (Sidecar, u16) {
    let path = mesh.dir.path().join(file);
    std::fs::write(&path, yaml).unwrap();
    let port = common::free_port();
    let sc = mesh.sidecar(
        "backend",
        &mesh.backend_bin.clone(),
        &[
            "--inbound".into(),
            format!("127.0.0.1:{port}={app_port}:{mode}"),
            "--policy".into(),
            path.display().to_string(),
        ],
    );
    (sc, port)
}

/// `GET target` with `Host: public.example` and `extra` header lines.
fn get(port: u16, target: &str, extra: &str) -> (u16, String) {
    raw_http(
        port,
        &format!(
            "GET {target} HTTP/1.1\r\nHost: public.example\r\n{extra}Connection: close\r\n\r\n"
        ),
    )
}

/// `svidcar policy check` for the frontend calling `path` on the backend: `ALLOW by …` /
/// `DENY by …` (first line).
fn check(policy: &Path, path: &str) -> String {
    let (ok, out, err) = common::svidcar(&[
        "policy",
        "check",
        "-f",
        policy.to_str().unwrap(),
        "--local-id",
        &format!("spiffe://{TD}/backend"),
        "--direction",
        "inbound",
        "--peer",
        &format!("spiffe://{TD}/frontend"),
        "--method",
        "GET",
        "--host",
        "public.example",
        "--path",
        path,
    ]);
    assert!(ok, "policy check failed: {err}");
    out.lines().next().unwrap_or_default().to_string()
}

/// The header lines named `name` in a recorded HTTP/1.1 head or HTTP/2 request.
fn header_lines<'a>(seen: &'a str, name: &str) -> Vec<&'a str> {
    seen.lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(k, _)| k.eq_ignore_ascii_case(name))
        })
        .collect()
}

#[test]
fn encoded_paths_reach_the_app_normalized_or_not_at_all_h1() {
    let mesh = Mesh::start("attack-l7-paths", &[]);
    let app = RecordingApp::start();
    let (backend, in_port) = backend(&mesh, "paths.yaml", POLICY, app.port, "strict:http");
    let (_frontend, out) = mesh.frontend(in_port, &format!("spiffe://{TD}/backend"));
    let policy = mesh.dir.path().join("paths.yaml");
    // (target, status, the request line the app must receive; None = nothing).
    let cases: &[(&str, u16, Option<&str>)] = &[
        ("/public/ok", 200, Some("GET /public/ok HTTP/1.1")),
        ("/public/%2e%2e/admin", 403, None),
        ("/public/%2E%2E/admin", 403, None),
        ("/public/.%2e/admin", 403, None),
        ("/public/%2e./admin", 403, None),
        ("/%61dmin", 403, None),
        ("/adm%69n", 403, None),
        ("/public/../%61dm%69n/x", 403, None),
        ("/public;x=1/../admin", 403, None),
        ("/admin;jsessionid=1", 403, None),
        // Escaped slashes are refused by default; so are bad escapes and control characters.
        ("/public/..%2Fadmin", 400, None),
        ("/public/..%2fadmin", 400, None),
        ("/public/..%5Cadmin", 400, None),
        ("/public/%2e%2e%2fadmin", 400, None),
        ("/public/%zz", 400, None),
        ("/public/%4", 400, None),
        ("/public/%00", 400, None),
        ("/public/a%0d%0aX-Injected:%201", 400, None),
        ("/public/%7f", 400, None),
        // Decoded once: the app decoding `%252e` gets `%2e`, never `..`.
        (
            "/public/%252e%252e/admin",
            200,
            Some("GET /public/%252e%252e/admin HTTP/1.1"),
        ),
        // What is evaluated is forwarded: dot segments gone, unreserved decoded, hex upper-cased,
        // the query untouched.
        (
            "/public/./x/..//%7euser/a%3fb%c3%bc?q=%2f%2e%2e&r=%zz",
            200,
            Some("GET /public/~user/a%3Fb%C3%BC?q=%2f%2e%2e&r=%zz HTTP/1.1"),
        ),
        ("/public/%41", 200, Some("GET /public/A HTTP/1.1")),
    ];
    for (target, status, want) in cases {
        app.clear();
        let (got, body) = get(out, target, "");
        assert_eq!(got, *status, "{target}: {body}");
        let seen = app.seen();
        match want {
            Some(line) => {
                assert_eq!(seen.len(), 1, "{target}: app saw {seen:?}");
                assert_eq!(seen[0].lines().next(), Some(*line), "{target}");
                assert_eq!(body, seen[0], "{target}: the app's echo");
            }
            None => assert!(seen.is_empty(), "{target}: reached the app: {seen:?}"),
        }
        // `policy check` gives the proxy's answer: 400 = a normalize refusal, 403 = a rule.
        let verdict = check(&policy, target);
        let agrees = match status {
            200 => verdict.starts_with("ALLOW by "),
            400 => verdict.starts_with("DENY by normalize:"),
            _ => verdict.starts_with("DENY by ") && !verdict.contains("normalize:"),
        };
        assert!(agrees, "{target}: proxy {status}, policy check `{verdict}`");
    }
    assert_eq!(
        check(&policy, "/public/..%2Fadmin"),
        "DENY by normalize:escaped-slash"
    );
    assert_eq!(
        check(&policy, "/public/%zz"),
        "DENY by normalize:bad-escape"
    );
    assert_eq!(
        check(&policy, "/public/%2e%2e/admin"),
        "DENY by no-admin/rules[0]"
    );
    // Not origin-form: `OPTIONS *` and an authority-form CONNECT never reach the app.
    for req in [
        "OPTIONS * HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n",
        "CONNECT admin.internal:80 HTTP/1.1\r\nHost: admin.internal:80\r\nConnection: close\r\n\r\n",
    ] {
        app.clear();
        let (status, _) = raw_http(out, req);
        assert_eq!(status, 400, "{req:?}");
        assert!(app.seen().is_empty(), "{req:?}: {:?}", app.seen());
    }
    assert_eq!(check(&policy, "*"), "DENY by normalize:not-absolute");
    // Refusals are logged and counted with their reason.
    backend.wait_log(&[
        "request refused",
        "reason=\"normalize:escaped-slash\"",
        "status=400",
    ]);
    for reason in [
        "normalize:escaped-slash",
        "normalize:bad-escape",
        "normalize:not-absolute",
    ] {
        assert!(
            backend.metric_sum(&[
                "svidcar_proxy_http_refused_total",
                &format!("reason=\"{reason}\"")
            ]) >= 1.0,
            "{reason} not counted:\n{}",
            backend.metrics()
        );
    }
    assert!(
        backend.metric_sum(&[
            "svidcar_proxy_decisions_total",
            "deny",
            "rule=\"normalize:escaped-slash\""
        ]) >= 4.0
    );
}

#[test]
fn escaped_slashes_keep_are_matched_literally_and_forwarded_as_is() {
    let mesh = Mesh::start("attack-l7-keep", &[]);
    let app = RecordingApp::start();
    let yaml = "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\ndefaults: {inbound: deny}\nsettings: {escapedSlashes: keep}\npolicies:\n- {name: public, direction: inbound, action: allow, rules: [{to: [{paths: [\"/public/*\"]}]}]}\n- {name: no-xy, direction: inbound, action: deny, rules: [{to: [{paths: [\"/public/x%2fy*\"]}]}]}\n";
    let (_backend, in_port) = backend(&mesh, "keep.yaml", yaml, app.port, "strict:http");
    let (_frontend, out) = mesh.frontend(in_port, &format!("spiffe://{TD}/backend"));
    let policy = mesh.dir.path().join("keep.yaml");
    let cases: &[(&str, u16, Option<&str>)] = &[
        ("/public/a%2fb", 200, Some("GET /public/a%2Fb HTTP/1.1")),
        (
            "/public/a%5c..%5cb",
            200,
            Some("GET /public/a%5C..%5Cb HTTP/1.1"),
        ),
        // The deny pattern `x%2fy` covers every case of the escape.
        ("/public/x%2Fy", 403, None),
        ("/public/x%2fy/z", 403, None),
        ("/public/%78%2F%79", 403, None),
        ("/public/%zz", 400, None),
    ];
    for (target, status, want) in cases {
        app.clear();
        let (got, body) = get(out, target, "");
        assert_eq!(got, *status, "{target}: {body}");
        let seen = app.seen();
        match want {
            Some(line) => assert_eq!(
                seen.first().and_then(|s| s.lines().next()),
                Some(*line),
                "{target}: {seen:?}"
            ),
            None => assert!(seen.is_empty(), "{target}: {seen:?}"),
        }
        let verdict = check(&policy, target);
        let want_check = match status {
            200 => "ALLOW by public/rules[0]",
            403 => "DENY by no-xy/rules[0]",
            _ => "DENY by normalize:bad-escape",
        };
        assert_eq!(verdict, want_check, "{target}");
    }
}

/// A running `python3 -m http.server` (killed on drop).
struct PyServer(Child);

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn python_http_server_that_decodes_gets_no_admin_file() {
    let Some(python) = common::which("python3") else {
        return common::skip("python3 not installed");
    };
    let mesh = Mesh::start("attack-l7-python", &[]);
    let root = mesh.dir.path().join("www");
    std::fs::create_dir_all(root.join("public")).unwrap();
    std::fs::create_dir_all(root.join("admin")).unwrap();
    std::fs::write(root.join("public/index.html"), "public page\n").unwrap();
    std::fs::write(root.join("admin/secret.txt"), "TOP SECRET\n").unwrap();
    let port = common::free_port();
    let log = mesh.dir.path().join("python.log");
    let child = Command::new(python)
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(&root)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start python3 -m http.server");
    let _py = PyServer(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "python http.server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Control: the app itself decodes and resolves the dot segments (so the test can fail).
    let (status, body) = get(port, "/public/%2e%2e/admin/secret.txt", "");
    assert_eq!((status, body.as_str()), (200, "TOP SECRET\n"));
    let (status, body) = get(port, "/public/..%2Fadmin/secret.txt", "");
    assert_eq!((status, body.as_str()), (200, "TOP SECRET\n"));
    let direct = std::fs::read_to_string(&log).unwrap().lines().count();

    let (_backend, in_port) = backend(&mesh, "py.yaml", POLICY, port, "strict:http");
    let (_frontend, out) = mesh.frontend(in_port, &format!("spiffe://{TD}/backend"));
    assert_eq!(
        get(out, "/public/index.html", ""),
        (200, "public page\n".into())
    );
    for target in [
        "/public/%2e%2e/admin/secret.txt",
        "/public/%2E%2E/admin/secret.txt",
        "/public/.%2e/admin/secret.txt",
        "/public/%2e./admin/secret.txt",
        "/%61dmin/secret.txt",
        "/adm%69n/secret.txt",
        "/public/..%2Fadmin/secret.txt",
        "/public/..%5cadmin/secret.txt",
        "/public/%2e%2e%2fadmin%2fsecret.txt",
        "/public/%252e%252e/admin/secret.txt",
    ] {
        let (status, body) = get(out, target, "");
        assert!(!body.contains("TOP SECRET"), "{target}: {status} {body}");
        assert_ne!(status, 200, "{target}: {body}");
    }
    // The app's own access log: after the two control requests, only what was allowed.
    let text = std::fs::read_to_string(&log).unwrap();
    let via_proxy: Vec<&str> = text.lines().skip(direct).collect();
    let gets: Vec<&str> = via_proxy
        .iter()
        .filter(|l| l.contains("\"GET "))
        .copied()
        .collect();
    assert!(
        gets.len() == 2
            && gets[0].contains("\"GET /public/index.html HTTP/1.1\" 200")
            && gets[1].contains("\"GET /public/%252e%252e/admin/secret.txt HTTP/1.1\" 404"),
        "python saw:\n{}",
        via_proxy.join("\n")
    );
}

#[test]
fn one_authority_per_request_h1() {
    let mesh = Mesh::start("attack-l7-authority", &[]);
    let app = RecordingApp::start();
    let (backend, in_port) = backend(&mesh, "auth.yaml", POLICY, app.port, "strict:http");
    let (_frontend, out) = mesh.frontend(in_port, &format!("spiffe://{TD}/backend"));
    // (request head without the final CRLF, status, the one `host` the app must receive).
    let cases: &[(&str, u16, Option<&str>)] = &[
        (
            "GET /public/a HTTP/1.1\r\nHost: Public.Example.:8080",
            200,
            Some("host: public.example:8080"),
        ),
        (
            "GET /public/a HTTP/1.1\r\nHost: [::1]:8080",
            200,
            Some("host: [::1]:8080"),
        ),
        // Absolute-form: evaluated on its authority, forwarded in origin form with that Host.
        (
            "GET http://Public.Example:8080/public/b HTTP/1.1",
            200,
            Some("host: public.example:8080"),
        ),
        (
            "GET http://public.example/public/b HTTP/1.1\r\nHost: PUBLIC.example",
            200,
            Some("host: public.example"),
        ),
        // Confusion: the Host differs from the absolute-form authority (either way round).
        (
            "GET http://public.example/public/c HTTP/1.1\r\nHost: admin.internal",
            400,
            None,
        ),
        (
            "GET http://admin.internal/public/c HTTP/1.1\r\nHost: public.example",
            400,
            None,
        ),
        (
            "GET http://public.example/public/c HTTP/1.1\r\nHost: public.example:80",
            400,
            None,
        ),
        (
            "GET /public/d HTTP/1.1\r\nHost: public.example\r\nHost: admin.internal",
            400,
            None,
        ),
        (
            "GET /public/d HTTP/1.1\r\nHost: public.example\r\nhost: public.example",
            400,
            None,
        ),
        ("GET /public/e HTTP/1.1", 400, None),
        ("GET /public/e HTTP/1.0", 400, None),
        (
            "GET /public/f HTTP/1.1\r\nHost: public.example, admin.internal",
            400,
            None,
        ),
        (
            "GET /public/f HTTP/1.1\r\nHost: public.example@admin.internal",
            400,
            None,
        ),
        (
            "GET http://user:pw@public.example/public/f HTTP/1.1",
            400,
            None,
        ),
        (
            "GET /public/f HTTP/1.1\r\nHost: public.example/admin",
            400,
            None,
        ),
        (
            "GET /public/f HTTP/1.1\r\nHost: admin%2einternal",
            400,
            None,
        ),
        ("GET /public/f HTTP/1.1\r\nHost: public.example:", 400, None),
        ("GET /public/f HTTP/1.1\r\nHost:", 400, None),
        // The evaluated name is the normalized one: a deny on admin.internal still applies.
        ("GET /public/g HTTP/1.1\r\nHost: ADMIN.internal.", 403, None),
        (
            "GET /public/g HTTP/1.1\r\nHost: admin.internal:443",
            403,
            None,
        ),
        ("GET http://Admin.Internal./public/g HTTP/1.1", 403, None),
    ];
    for (head, status, want_host) in cases {
        app.clear();
        let (got, body) = raw_http(out, &format!("{head}\r\nConnection: close\r\n\r\n"));
        assert_eq!(got, *status, "{head:?}: {body}");
        let seen = app.seen();
        match want_host {
            Some(h) => {
                assert_eq!(seen.len(), 1, "{head:?}: {seen:?}");
                assert_eq!(
                    header_lines(&seen[0], "host"),
                    [*h],
                    "{head:?}: {}",
                    seen[0]
                );
                let line = seen[0].lines().next().unwrap();
                assert!(line.starts_with("GET /public/"), "origin form: {line}");
            }
            None => assert!(seen.is_empty(), "{head:?}: reached the app: {seen:?}"),
        }
    }
    backend.wait_log(&["request refused", "reason=\"authority:host-mismatch\""]);
    for reason in [
        "authority:host-mismatch",
        "authority:duplicate-host",
        "authority:missing",
        "authority:invalid",
    ] {
        assert!(
            backend.metric_sum(&[
                "svidcar_proxy_http_refused_total",
                &format!("reason=\"{reason}\"")
            ]) >= 1.0,
            "{reason} not counted:\n{}",
            backend.metrics()
        );
    }
}

#[test]
fn xfcc_is_the_sidecars_own_h1_and_plaintext() {
    let mesh = Mesh::start("attack-l7-xfcc", &[]);
    let app = RecordingApp::start();
    let (_backend, in_port) = backend(&mesh, "xfcc.yaml", POLICY, app.port, "strict:http");
    let (_frontend, out) = mesh.frontend(in_port, &format!("spiffe://{TD}/backend"));
    let forged = "X-Forwarded-Client-Cert: By=spiffe://svidcar.local/backend;URI=spiffe://svidcar.local/admin\r\nx-forwarded-client-cert: URI=spiffe://svidcar.local/root\r\n";
    let (status, body) = get(out, "/public/x", forged);
    assert_eq!(status, 200, "{body}");
    let seen = app.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        header_lines(&seen[0], "x-forwarded-client-cert"),
        [OWN_XFCC],
        "{}",
        seen[0]
    );
    // The policy sees the sidecar's header, not the forged one.
    app.clear();
    assert_eq!(get(out, "/xfcc-admin", forged).0, 403);
    assert!(app.seen().is_empty(), "{:?}", app.seen());
    let (status, body) = get(out, "/xfcc-frontend", forged);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        header_lines(&app.seen()[0], "x-forwarded-client-cert"),
        [OWN_XFCC]
    );

    // A plaintext client on a permissive port: the forged header is removed, none is set.
    let (_plain, plain_port) = backend(
        &mesh,
        "xfcc-plain.yaml",
        POLICY,
        app.port,
        "permissive:http",
    );
    app.clear();
    let (status, body) = get(plain_port, "/public/plain", forged);
    assert_eq!(status, 200, "{body}");
    let seen = app.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].starts_with("GET /public/plain HTTP/1.1"),
        "{}",
        seen[0]
    );
    assert!(
        header_lines(&seen[0], "x-forwarded-client-cert").is_empty(),
        "{}",
        seen[0]
    );
    assert_eq!(get(plain_port, "/xfcc-admin", forged).0, 403);
    assert_eq!(get(plain_port, "/xfcc-frontend", forged).0, 403);
}

/// A request header block: `:method GET`, `:scheme http`, `:authority` (unless empty),
/// `:path`, then `extra`.
fn h2req(authority: &str, path: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut all = vec![(":method".to_string(), "GET".to_string())];
    all.push((":scheme".into(), "http".into()));
    if !authority.is_empty() {
        all.push((":authority".into(), authority.into()));
    }
    all.push((":path".into(), path.into()));
    all.extend(extra.iter().map(|(a, b)| (a.to_string(), b.to_string())));
    all
}

fn h2_send(port: u16, fields: &[(String, String)]) -> H2Outcome {
    let f: Vec<(&str, &str)> = fields
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    raw_h2(port, &f)
}

/// HTTP/2 through the frontend (prior knowledge): paths and authority as in HTTP/1.1, and the
/// header blocks a client library would not send.
#[test]
fn http2_paths_authority_pseudo_headers_and_xfcc() {
    let mesh = Mesh::start("attack-l7-h2", &[]);
    let app = RecordingH2App::start();
    let (_backend, in_port) = backend(&mesh, "h2.yaml", POLICY, app.port, "strict:http");
    let (_frontend, out) = mesh.frontend(in_port, &format!("spiffe://{TD}/backend"));
    let clear = || app.seen.lock().unwrap().clear();
    let send = |fields: Vec<(String, String)>| h2_send(out, &fields);
    // Allowed: what the app receives is the evaluated authority and path, one XFCC.
    clear();
    let forged = [
        (
            "x-forwarded-client-cert",
            "By=spiffe://svidcar.local/backend;URI=spiffe://svidcar.local/admin",
        ),
        ("x-forwarded-client-cert", "URI=spiffe://svidcar.local/root"),
    ];
    assert_eq!(
        send(h2req(
            "Public.Example.:8443",
            "/public/a/./b/../c%7e?q=%2e",
            &forged
        )),
        H2Outcome::Status(200)
    );
    let seen = app.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0].contains(":authority public.example:8443\n"),
        "{}",
        seen[0]
    );
    assert!(
        seen[0].contains(":path /public/a/c~?q=%2e\n"),
        "{}",
        seen[0]
    );
    assert!(header_lines(&seen[0], "host").is_empty(), "{}", seen[0]);
    assert_eq!(
        header_lines(&seen[0], "x-forwarded-client-cert"),
        [OWN_XFCC],
        "{}",
        seen[0]
    );
    // `host` without `:authority`: it becomes `:authority`, no `host` beside it.
    clear();
    assert_eq!(
        send(h2req("", "/public/h", &[("host", "Public.Example")])),
        H2Outcome::Status(200)
    );
    let seen = app.seen();
    assert!(
        seen[0].contains(":authority public.example\n"),
        "{}",
        seen[0]
    );
    assert!(header_lines(&seen[0], "host").is_empty(), "{}", seen[0]);
    // Refused with 400 before authorization, never at the app.
    let refused: Vec<(&str, Vec<(String, String)>)> = vec![
        (
            "host differs",
            h2req("public.example", "/public/r", &[("host", "admin.internal")]),
        ),
        (
            "two hosts",
            h2req(
                "",
                "/public/r",
                &[("host", "public.example"), ("host", "public.example")],
            ),
        ),
        ("no authority", h2req("", "/public/r", &[])),
        ("userinfo", h2req("u@public.example", "/public/r", &[])),
        (
            "escaped slash",
            h2req("public.example", "/public/..%2Fadmin", &[]),
        ),
        ("bad escape", h2req("public.example", "/public/%zz", &[])),
    ];
    for (what, fields) in refused {
        clear();
        assert_eq!(send(fields), H2Outcome::Status(400), "{what}");
        assert!(app.seen().is_empty(), "{what}: {:?}", app.seen());
    }
    // Denied by the policy (403 is not a static-table status: Status(0)), never at the app.
    for path in [
        "/public/%2e%2e/admin",
        "/public/.%2E/admin",
        "/%61dmin",
        "/adm%69n",
    ] {
        clear();
        assert_eq!(
            send(h2req("public.example", path, &[])),
            H2Outcome::Status(0),
            "{path}"
        );
        assert!(app.seen().is_empty(), "{path}: {:?}", app.seen());
    }
    clear();
    assert_eq!(
        send(h2req("ADMIN.internal.", "/public/x", &[])),
        H2Outcome::Status(0)
    );
    assert!(app.seen().is_empty());
    // Malformed header blocks: the stream or connection is refused, nothing reaches the app.
    let g = |v: &[(&str, &str)]| {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    };
    let malformed: Vec<(&str, Vec<(String, String)>)> = vec![
        (
            "two :authority",
            g(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", "public.example"),
                (":authority", "admin.internal"),
                (":path", "/public/m"),
            ]),
        ),
        (
            "uppercase :Authority",
            g(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":Authority", "admin.internal"),
                (":path", "/public/m"),
            ]),
        ),
        (
            "uppercase Host",
            g(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", "public.example"),
                ("Host", "admin.internal"),
                (":path", "/public/m"),
            ]),
        ),
        (
            "two :path",
            g(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", "public.example"),
                (":path", "/public/m"),
                (":path", "/admin"),
            ]),
        ),
        (
            "pseudo after regular",
            g(&[
                (":method", "GET"),
                (":scheme", "http"),
                ("x-a", "1"),
                (":authority", "admin.internal"),
                (":path", "/public/m"),
            ]),
        ),
        (
            "unknown pseudo",
            g(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":host", "admin.internal"),
                (":authority", "public.example"),
                (":path", "/public/m"),
            ]),
        ),
    ];
    for (what, fields) in malformed {
        clear();
        let got = send(fields);
        assert!(
            matches!(
                got,
                H2Outcome::Reset(_) | H2Outcome::GoAway(_) | H2Outcome::Status(400)
            ),
            "{what}: {got:?}"
        );
        assert!(app.seen().is_empty(), "{what}: {:?}", app.seen());
    }
    // The policy sees the sidecar's XFCC on HTTP/2 too.
    clear();
    assert_eq!(
        send(h2req("public.example", "/xfcc-admin", &forged)),
        H2Outcome::Status(0)
    );
    assert_eq!(
        send(h2req("public.example", "/xfcc-frontend", &forged)),
        H2Outcome::Status(200)
    );
    assert_eq!(app.seen().len(), 1);

    // gRPC-shaped: the body and the trailers come back through the sidecar's upstream
    // HTTP/2 connection (a real h2 client this time).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (body, trailers) = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", out))
            .await
            .unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let req = http::Request::builder()
            .method("POST")
            .uri("http://public.example/public/pkg.Svc/Call")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (resp, mut tx) = client.send_request(req, false).unwrap();
        tx.send_data(bytes::Bytes::from_static(b"\0\0\0\0\0"), true)
            .unwrap();
        let mut body = resp.await.unwrap().into_body();
        let mut text = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            text.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.unwrap();
        (String::from_utf8_lossy(&text).into_owned(), trailers)
    });
    assert!(
        body.contains(
            ":method POST\n:scheme http\n:authority public.example\n:path /public/pkg.Svc/Call"
        ),
        "{body}"
    );
    assert!(body.contains("content-type: application/grpc"), "{body}");
    let status = trailers.as_ref().and_then(|t| t.get("grpc-status"));
    assert_eq!(
        status.map(|v| v.as_bytes()),
        Some(&b"0"[..]),
        "{trailers:?}"
    );

    // Plaintext HTTP/2 on a permissive port: the forged XFCC is removed and none is set.
    let (_plain, plain_port) = backend(&mesh, "h2-plain.yaml", POLICY, app.port, "permissive:http");
    clear();
    let fields = h2req("public.example", "/public/plain", &forged);
    assert_eq!(h2_send(plain_port, &fields), H2Outcome::Status(200));
    let seen = app.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        header_lines(&seen[0], "x-forwarded-client-cert").is_empty(),
        "{}",
        seen[0]
    );
}
