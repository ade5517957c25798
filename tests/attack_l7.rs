//! Issue #13 item 1 through the real binaries (agent, backend sidecar with a policy, frontend
//! sidecar): percent-encoded dot segments and unreserved characters, escaped slashes (refused
//! by default, `escapedSlashes: keep` matched literally), bad escapes and control characters,
//! against an app that records exactly the request it received and the stock
//! `python3 -m http.server`, which decodes paths. Every case asserts what the APP received (or
//! that it received nothing), and that `svidcar policy check` gives the proxy's answer.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::l7::{assert_refusals_counted, get, raw_http, through, RecordingApp, POLICY};
use common::proxy::{Mesh, TD};

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

#[test]
fn encoded_paths_reach_the_app_normalized_or_not_at_all_h1() {
    let mesh = Mesh::start("attack-l7-paths", &[]);
    let app = RecordingApp::start();
    let (backend, _frontend, out) = through(&mesh, "paths.yaml", POLICY, app.port, "strict:http");
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
        let (got, body, seen) = app.during(|| get(out, target, ""));
        assert_eq!(got, *status, "{target}: {body}");
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
    assert_refusals_counted(
        &backend,
        &[
            "normalize:escaped-slash",
            "normalize:bad-escape",
            "normalize:not-absolute",
        ],
    );
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
    let (_backend, _frontend, out) = through(&mesh, "keep.yaml", yaml, app.port, "strict:http");
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
        let (got, body, seen) = app.during(|| get(out, target, ""));
        assert_eq!(got, *status, "{target}: {body}");
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

    let (_backend, _frontend, out) = through(&mesh, "py.yaml", POLICY, port, "strict:http");
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
