//! Egress beyond TLS passthrough (POLICY.md §3/§5): the explicit HTTP proxy (`--egress-proxy`,
//! `CONNECT host:port` decided on the CONNECT name, then on the tunneled TLS SNI) and plaintext
//! HTTP/1.x egress in transparent mode (decided per request on Host, method and path; a denial is
//! a `403` on a connection that stays open). No internet: every destination is a local server
//! (`localhost` and `vm` resolve to 127.0.0.1 through /etc/hosts on the test machines; the test
//! checks that). Needs `curl` and `openssl`; the transparent test also needs root, `ip`,
//! `iptables`, `setpriv`, `python3`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::{is_root, redirect_app_outbound, PodPair};
use common::proxy::{Mesh, TestApp};
use common::{free_port, skip, spawn_quiet, which};

fn resolves_to_loopback(name: &str) -> bool {
    use std::net::ToSocketAddrs;
    (name, 1)
        .to_socket_addrs()
        .map(|mut a| a.next().is_some_and(|a| a.ip().is_loopback()))
        .unwrap_or(false)
}

/// `curl` through the egress proxy: (exit success, `%{http_connect} %{http_code}`, stderr).
fn curl_via(proxy: u16, extra: &[&str], url: &str) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sSk", "--max-time", "10", "-o", "/dev/null"])
        .args(["-w", "%{http_connect} %{http_code}"])
        .args(["-x", &format!("http://127.0.0.1:{proxy}")])
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn egress_proxy_decides_connect_then_sni_and_plain_requests() {
    for tool in ["curl", "openssl"] {
        if which(tool).is_none() {
            return skip(&format!("{tool} is not installed"));
        }
    }
    for name in ["localhost", "vm"] {
        if !resolves_to_loopback(name) {
            return skip(&format!(
                "{name} does not resolve to a loopback address here"
            ));
        }
    }
    let mesh = Mesh::start("proxy-egress-connect", &[]);
    let app = TestApp::start("plain-app");
    let (cert, key) = common::proxy::foreign_svid(mesh.dir.path(), "external.example");
    let tls_port = free_port();
    let _server = spawn_quiet(
        Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("127.0.0.1:{tls_port}"))
            .args([
                "-cert",
                cert.to_str().unwrap(),
                "-key",
                key.to_str().unwrap(),
            ]),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
        assert!(Instant::now() < deadline, "openssl s_server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let policy = mesh.dir.path().join("egress-connect.yaml");
    std::fs::write(
        &policy,
        format!("apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n- name: local-tls\n  direction: egress\n  action: allow\n  rules:\n  - to: [{{ hosts: [\"localhost\"], ports: [{tls_port}], cidrs: [\"127.0.0.0/8\"] }}]\n  - to: [{{ hosts: [\"localhost\"], ports: [{app_port}], methods: [\"GET\"], paths: [\"/ok\"] }}]\n", app_port = app.port),
    )
    .unwrap();
    let proxy_port = free_port();
    let frontend = mesh.sidecar(
        "frontend",
        &mesh.frontend_bin.clone(),
        &[
            "--policy".into(),
            policy.display().to_string(),
            "--egress-proxy".into(),
            format!("127.0.0.1:{proxy_port}"),
        ],
    );

    // Allowed CONNECT name and SNI: the TLS request goes through.
    let (ok, codes, err) = curl_via(proxy_port, &[], &format!("https://localhost:{tls_port}/"));
    assert!(
        ok && codes == "200 200",
        "allowed CONNECT failed: {codes} {err}\n{}",
        frontend.log_text()
    );
    frontend.wait_log(&[
        "direction=\"egress\"",
        "rule=\"local-tls/rules[0]\"",
        "outcome=\"allowed\"",
    ]);

    // Disallowed CONNECT name: 403 to the CONNECT, nothing dialed.
    let (ok, codes, _) = curl_via(proxy_port, &[], &format!("https://vm:{tls_port}/"));
    assert!(
        !ok && codes.starts_with("403"),
        "CONNECT vm was not refused with 403: {codes}"
    );
    frontend.wait_log(&[
        "outcome=\"denied\"",
        &format!("CONNECT vm:{tls_port} denied by default:deny(implicit)"),
    ]);

    // Allowed CONNECT name, disallowed SNI (curl connects to localhost but says `vm`): reset.
    let (ok, codes, err) = curl_via(
        proxy_port,
        &[
            "--connect-to",
            &format!("vm:{tls_port}:localhost:{tls_port}"),
        ],
        &format!("https://vm:{tls_port}/"),
    );
    assert!(
        !ok,
        "a disallowed SNI went through the tunnel: {codes} {err}"
    );
    assert!(
        codes.starts_with("200"),
        "the CONNECT itself should be allowed: {codes} {err}"
    );
    frontend.wait_log(&[
        "outcome=\"denied\"",
        "(SNI vm) denied by default:deny(implicit)",
    ]);

    // Absolute-form plaintext requests through the proxy: decided per request on the URI host,
    // method and path (403 on denial), forwarded to the first resolved address.
    let via = |url: &str, method: &str| {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-w",
                " %{http_code}",
                "-X",
                method,
            ])
            .args(["-x", &format!("http://127.0.0.1:{proxy_port}")])
            .arg(url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let app_port = app.port;
    assert_eq!(
        via(&format!("http://localhost:{app_port}/ok"), "GET"),
        "hello from plain-app\n 200"
    );
    assert_eq!(
        via(&format!("http://LocalHost.:{app_port}/ok?x=1"), "GET"),
        "hello from plain-app\n 200"
    );
    assert_eq!(
        via(&format!("http://localhost:{app_port}/other"), "GET"),
        "RBAC: access denied 403"
    );
    assert_eq!(
        via(&format!("http://localhost:{app_port}/ok"), "POST"),
        "RBAC: access denied 403"
    );
    assert_eq!(
        via(&format!("http://vm:{app_port}/ok"), "GET"),
        "RBAC: access denied 403"
    );
    frontend.wait_log(&["host=\"vm\"", "outcome=\"denied\"", "status=403"]);
    frontend.wait_log(&[
        "path=\"/ok\"",
        "rule=\"local-tls/rules[1]\"",
        "outcome=\"allowed\"",
    ]);

    // An oversized proxy request head is refused with 431.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let big = "a".repeat(20 * 1024);
        let _ = write!(
            s,
            "CONNECT localhost:{tls_port} HTTP/1.1\r\nX-Big: {big}\r\n\r\n"
        );
        let head = read_until(&mut s, "\r\n\r\n").unwrap_or_default();
        assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    }

    // Every decision is counted.
    let m = frontend.metrics();
    assert!(
        frontend.metric_sum(&["direction=\"egress\"", "decision=\"deny\""]) >= 5.0,
        "{m}"
    );
}

/// An HTTP/1.1 keep-alive server on :8080 answering `path <request target>`.
const ECHO_PATH_SERVER: &str = "import http.server as h
class H(h.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def do_GET(self):
        b = ('path ' + self.path + '\\n').encode()
        self.send_response(200)
        self.send_header('content-length', str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    do_DELETE = do_GET
    def log_message(self, *a):
        pass
h.ThreadingHTTPServer(('0.0.0.0', 8080), H).serve_forever()
";

fn curl_nobody(pair: &PodPair, ns: &str, args: &[&str]) -> String {
    let mut cmd = vec!["curl", "-sS", "--max-time", "10"];
    cmd.extend_from_slice(args);
    let out = pair.exec_as_app(ns, &cmd);
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn transparent_plaintext_http_egress_decided_per_request() {
    if !is_root() {
        return skip("transparent egress test needs root (network namespaces, iptables)");
    }
    for tool in ["ip", "iptables", "curl", "setpriv", "python3"] {
        if which(tool).is_none() {
            return skip(&format!("{tool} is not installed"));
        }
    }
    let pair = PodPair::new("eh");
    let (client_ns, external_ns) = (pair.peer.clone(), pair.pod.clone());
    let mesh = Mesh::start("proxy-egress-http", &[]);
    let _server = spawn_quiet(
        Command::new("ip")
            .args(["netns", "exec", &external_ns, "python3", "-c"])
            .arg(ECHO_PATH_SERVER),
    );
    redirect_app_outbound("iptables", &client_ns, 8080);
    let frontend = mesh.transparent_egress_frontend(
        &client_ns,
        "egress-http.yaml",
        "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n- name: web\n  direction: egress\n  action: allow\n  rules: [{ to: [{ hosts: [\"allowed.example\"], ports: [8080], methods: [\"GET\"], paths: [\"/get\"] }] }]\n",
    );
    let base = format!("http://{}:8080", pair.pod_ip);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pair
        .exec(
            &client_ns,
            &["curl", "-sf", "--max-time", "2", &format!("{base}/get")],
        )
        .status
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "the external HTTP server did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // One curl, one keep-alive connection (`num_connects` 0 after the first), five requests.
    let w = "%{http_code} %{num_connects}\n";
    let get = format!("{base}/get");
    let admin = format!("{base}/admin");
    let out = curl_nobody(
        &pair,
        &client_ns,
        &[
            "-H",
            "Host: allowed.example",
            "-w",
            w,
            &get,
            "--next",
            "-H",
            "Host: Blocked.Example.",
            "-w",
            w,
            &get,
            "--next",
            "-H",
            "Host: allowed.example:8080",
            "-w",
            w,
            &admin,
            "--next",
            "-H",
            "Host: allowed.example",
            "-X",
            "DELETE",
            "-w",
            w,
            &get,
            "--next",
            "-H",
            "Host: ALLOWED.example.",
            "-w",
            w,
            &get,
            "--next",
            "--path-as-is",
            "-H",
            "Host: allowed.example",
            "-w",
            w,
            &format!("{base}//x/../get?q=1"),
        ],
    );
    // The last one is evaluated and forwarded as the normalized path (`/get`, query kept).
    let expected = "path /get\n200 1\nRBAC: access denied403 0\nRBAC: access denied403 0\nRBAC: access denied403 0\npath /get\n200 0\npath /get?q=1\n200 0\n";
    assert_eq!(out, expected, "log:\n{}", frontend.log_text());
    frontend.wait_log(&[
        "direction=\"egress\"",
        "host=\"allowed.example\"",
        "rule=\"web/rules[0]\"",
        "outcome=\"allowed\"",
    ]);
    frontend.wait_log(&[
        "host=\"Blocked.Example.\"",
        "outcome=\"denied\"",
        "default:deny(implicit)",
    ]);
    frontend.wait_log(&["method=\"DELETE\"", "outcome=\"denied\""]);
    frontend.wait_log(&["path=\"/admin\"", "outcome=\"denied\""]);
}

/// Reads from `s` until the bytes read contain `needle`; returns them (or what came before
/// EOF / an error).
fn read_until(s: &mut std::net::TcpStream, needle: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

/// A TCP echo server on 127.0.0.1 (one thread per connection); returns its port.
fn echo_server() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    port
}

fn connect_tunnel(proxy_port: u16, authority: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    )
    .unwrap();
    let head = read_until(&mut s, "\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "CONNECT {authority}: {head}"
    );
    s
}

/// Plaintext HTTP inside a CONNECT tunnel is decided per request on the CONNECT name and the
/// Host (403 on denial, the tunnel stays open); an open opaque tunnel is re-evaluated when the
/// policy changes (`onPolicyChange: reevaluate`, the default) and reset once denied.
#[test]
fn connect_tunnels_http_per_request_and_reset_on_policy_change() {
    use std::io::Write;
    if !resolves_to_loopback("localhost") {
        return skip("localhost does not resolve to a loopback address here");
    }
    let mesh = Mesh::start("proxy-egress-revoke", &[]);
    let app = TestApp::start("tunnel-app");
    let echo = echo_server();
    let policy = mesh.dir.path().join("egress-revoke.yaml");
    let allow = |host: &str| {
        format!("apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n- name: tunnel\n  direction: egress\n  action: allow\n  rules: [{{ to: [{{ hosts: [\"{host}\"] }}] }}]\n")
    };
    std::fs::write(&policy, allow("localhost")).unwrap();
    let proxy_port = free_port();
    let frontend = mesh.sidecar(
        "frontend",
        &mesh.frontend_bin.clone(),
        &[
            "--policy".into(),
            policy.display().to_string(),
            "--egress-proxy".into(),
            format!("127.0.0.1:{proxy_port}"),
        ],
    );

    // HTTP in the tunnel: both names must allow, per request, on one connection.
    let mut h = connect_tunnel(proxy_port, &format!("localhost:{}", app.port));
    let ok = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
    h.write_all(ok).unwrap();
    assert!(read_until(&mut h, "hello from tunnel-app").is_ok());
    h.write_all(b"GET / HTTP/1.1\r\nHost: vm\r\n\r\n").unwrap();
    let denied = read_until(&mut h, "RBAC: access denied").unwrap();
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    h.write_all(ok).unwrap();
    assert!(read_until(&mut h, "hello from tunnel-app").is_ok());
    frontend.wait_log(&["connect=\"localhost\"", "host=\"vm\"", "outcome=\"denied\""]);

    // An opaque tunnel, then a policy that no longer allows its CONNECT name.
    let mut s = connect_tunnel(proxy_port, &format!("localhost:{echo}"));
    s.write_all(b"ping\n").unwrap();
    assert!(read_until(&mut s, "ping").is_ok());
    std::fs::write(&policy, allow("other.example")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.write_all(b"ping\n").is_ok() && read_until(&mut s, "ping").is_ok() {
        assert!(
            Instant::now() < deadline,
            "the tunnel survived a policy that denies it:\n{}",
            frontend.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    frontend.wait_log(&["direction=\"egress\"", "reset: policy change"]);
    // A new CONNECT is refused outright.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "CONNECT localhost:{echo} HTTP/1.1\r\n\r\n").unwrap();
    let head = read_until(&mut s, "\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
}
