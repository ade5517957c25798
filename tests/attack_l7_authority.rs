//! Issue #13 item 2 through the real binaries: one authority per request (absolute-form vs
//! `Host`, two `Host` headers, HTTP/2 `:authority` vs `host`, userinfo, odd names), and
//! `x-forwarded-client-cert` set by the sidecar only (forged by an mTLS client over HTTP/1.1
//! and HTTP/2, and by a plaintext client on a permissive port). HTTP/2 header blocks are
//! hand-encoded (uppercase and duplicate pseudo headers). Every case asserts what the APP
//! received (or that it received nothing), not only the status.

mod common;

use common::l7::{
    assert_refusals_counted, backend, get, h2_send, h2req, header_lines, raw_http, through,
    H2Outcome, RecordingApp, RecordingH2App, OWN_XFCC, POLICY,
};
use common::proxy::Mesh;

#[test]
fn one_authority_per_request_h1() {
    let mesh = Mesh::start("attack-l7-authority", &[]);
    let app = RecordingApp::start();
    let (backend, _frontend, out) = through(&mesh, "auth.yaml", POLICY, app.port, "strict:http");
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
        let request = format!("{head}\r\nConnection: close\r\n\r\n");
        let (got, body, seen) = app.during(|| raw_http(out, &request));
        assert_eq!(got, *status, "{head:?}: {body}");
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
    assert_refusals_counted(
        &backend,
        &[
            "authority:host-mismatch",
            "authority:duplicate-host",
            "authority:missing",
            "authority:invalid",
        ],
    );
}

#[test]
fn xfcc_is_the_sidecars_own_h1_and_plaintext() {
    let mesh = Mesh::start("attack-l7-xfcc", &[]);
    let app = RecordingApp::start();
    let (_backend, _frontend, out) = through(&mesh, "xfcc.yaml", POLICY, app.port, "strict:http");
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
    let (status, body, seen) = app.during(|| get(plain_port, "/public/plain", forged));
    assert_eq!(status, 200, "{body}");
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

/// HTTP/2 through the frontend (prior knowledge): paths and authority as in HTTP/1.1, and the
/// header blocks a client library would not send.
#[test]
fn http2_paths_authority_pseudo_headers_and_xfcc() {
    let mesh = Mesh::start("attack-l7-h2", &[]);
    // The app speaks only HTTP/2 (prior knowledge): the port says so (`h2`), as an operator would.
    let app = RecordingH2App::start();
    let (_backend, _frontend, out) = through(&mesh, "h2.yaml", POLICY, app.port, "strict:h2");
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
    let (_plain, plain_port) = backend(&mesh, "h2-plain.yaml", POLICY, app.port, "permissive:h2");
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
