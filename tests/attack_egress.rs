//! Attacks on egress through the real binaries (issue #13 items 3 and 4, POLICY.md §3/§9).
//!
//! - CONNECT tunnels (`--egress-proxy`): a real rustls client whose ClientHello is split over
//!   records or 1-byte segments, delayed past the first-bytes wait, padded past 4 KiB / 16 KiB
//!   or sent at 1 byte per 300 ms, through the sidecar to a real rustls upstream on loopback that
//!   records every raw byte: denied connections must leave it with nothing, allowed ones must
//!   give it the exact original bytes (and the handshake completes, so nothing was altered).
//! - Records that are not a readable ClientHello (alert or change_cipher_spec first or in
//!   between, SSLv2 hello, garbage after 0x16, declared length > 64 KiB, truncated) are denied
//!   as `egress:unreadable-client-hello`.
//! - Plaintext HTTP in a tunnel after a pause, pipelined requests naming another host, and an
//!   absolute-form target that differs from `Host` never reach the app naming a host that was
//!   not evaluated.
//! - Emptied or cut-short policy files: refused at start, kept on reload (error counted),
//!   `policy check`/`lint` exit 2.
//!
//! Transparent-mode variants (root, network namespaces) are in `attack_egress_transparent.rs`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::egress::{
    client, egress_proxy, finish, first_flight, read_head, recut, refused, resolves_to_loopback,
    send, statuses, tunnel, Recorder, Send, HEAD,
};
use common::proxy::{Mesh, Sidecar};
use common::{free_port, skip, BIN};

#[test]
fn tunneled_client_hello_is_read_whole_however_it_is_sent() {
    if !resolves_to_loopback("localhost") {
        return skip("localhost does not resolve to a loopback address here");
    }
    let mesh = Mesh::start("attack-egress-tls", &[]);
    let up = Recorder::tls();
    let ca = up.ca.clone().unwrap();
    let (fe, proxy) = egress_proxy(&mesh);
    let ms = Duration::from_millis;
    // (SNI, ALPN bytes, record sizes to re-cut into, how to send)
    let cases: &[(&str, usize, Option<&[usize]>, Send)] = &[
        ("allowed.test", 0, None, Send::Whole),
        ("allowed.test", 0, Some(&[1]), Send::Whole),
        ("allowed.test", 0, Some(&[60, 3]), Send::Bytes(ms(1))),
        ("allowed.test", 0, None, Send::After(ms(700))),
        ("allowed.test", 5_000, None, Send::Whole),
        ("allowed.test", 20_000, None, Send::Whole),
        ("evil.test", 0, None, Send::Whole),
        ("evil.test", 0, Some(&[1]), Send::Whole),
        ("evil.test", 0, Some(&[100]), Send::Whole),
        ("evil.test", 0, None, Send::Bytes(ms(1))),
        ("evil.test", 0, None, Send::After(ms(700))),
        ("evil.test", 5_000, None, Send::Whole),
        ("evil.test", 20_000, Some(&[16384, 1]), Send::After(ms(700))),
    ];
    for &(sni, alpn, sizes, how) in cases {
        let what = format!("SNI {sni}, ALPN {alpn} B, records {sizes:?}, {how:?}");
        let mut conn = client(&ca, sni, alpn);
        let flight = first_flight(&mut conn);
        let wire = sizes.map_or_else(|| flight.clone(), |sz| recut(&flight, sz));
        let before = up.count();
        let mut s = tunnel(proxy, up.port);
        send(&mut s, &wire, how).unwrap();
        if sni == "allowed.test" {
            let answer = finish(conn, s).unwrap_or_else(|e| {
                panic!(
                    "{what}: handshake through the tunnel failed: {e}\n{}",
                    fe.log_text()
                )
            });
            assert_eq!(answer, "sni=allowed.test got=ping", "{what}");
            let got = up.bytes_since(before);
            assert!(
                got.starts_with(&wire),
                "{what}: the upstream did not receive the original bytes first"
            );
        } else {
            assert!(refused(&mut s), "{what}: the tunnel was not reset");
            assert_eq!(
                up.bytes_since(before),
                b"",
                "{what}: the upstream got bytes"
            );
        }
    }
    fe.wait_log(&[
        "outcome=\"denied\"",
        "(SNI evil.test) denied by default:deny(implicit)",
    ]);
    assert!(
        fe.metric_sum(&["direction=\"egress\"", "decision=\"deny\"", "default:deny"]) >= 7.0,
        "{}",
        fe.metrics()
    );
}

#[test]
fn unreadable_client_hellos_are_denied_before_the_upstream_gets_a_byte() {
    if !resolves_to_loopback("localhost") {
        return skip("localhost does not resolve to a loopback address here");
    }
    let mesh = Mesh::start("attack-egress-unreadable", &[]);
    let up = Recorder::tls();
    let ca = up.ca.clone().unwrap();
    let (fe, proxy) = egress_proxy(&mesh);
    let hello = first_flight(&mut client(&ca, "allowed.test", 0));
    let with_prefix = |prefix: &[u8]| [prefix, &hello].concat();
    let ccs_between = {
        let two = recut(&hello, &[10]);
        let cut = 5 + 10;
        [&two[..cut], &[0x14, 3, 3, 0, 1, 1][..], &two[cut..]].concat()
    };
    let mut too_large = vec![0x16, 3, 1, 0x40, 0, 1, 0x01, 0x00, 0x01];
    too_large.resize(5 + 16384, 0);
    let mut sslv2 = b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10".to_vec();
    sslv2.resize(2 + 0x2e, 7);
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("alert first", with_prefix(&[0x15, 3, 3, 0, 2, 1, 0]), false),
        ("change_cipher_spec between fragments", ccs_between, false),
        ("SSLv2 hello", sslv2, false),
        (
            "garbage after 0x16",
            b"\x16\x03\x01\x00\x08GET / HT".to_vec(),
            false,
        ),
        ("declared length over 64 KiB", too_large, false),
        ("truncated", hello[..hello.len() / 2].to_vec(), true),
    ];
    for (what, bytes, then_close) in cases {
        let before = up.count();
        let mut s = tunnel(proxy, up.port);
        send(&mut s, &bytes, Send::Whole).unwrap();
        if then_close {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        assert!(refused(&mut s), "{what}: not reset");
        assert_eq!(
            up.bytes_since(before),
            b"",
            "{what}: the upstream got bytes"
        );
    }
    // Slowloris: an allowed ClientHello at 1 byte / 300 ms is denied at the 2 s timeout.
    let before = up.count();
    let mut s = tunnel(proxy, up.port);
    let mut w = s.try_clone().unwrap();
    let slow =
        std::thread::spawn(move || send(&mut w, &hello, Send::Bytes(Duration::from_millis(300))));
    let start = Instant::now();
    assert!(refused(&mut s), "slowloris: not reset");
    assert!(
        start.elapsed() < Duration::from_secs(12),
        "slowloris held too long"
    );
    assert_eq!(
        up.bytes_since(before),
        b"",
        "slowloris: the upstream got bytes"
    );
    assert!(
        slow.join().unwrap().is_err(),
        "the slow sender was not cut off"
    );
    for reason in [
        "not-a-handshake-record",
        "sslv2-hello",
        "not-a-client-hello",
        "too-large",
        "truncated",
        "timeout",
    ] {
        fe.wait_log(&["egress:unreadable-client-hello", &format!("({reason})")]);
    }
    assert!(
        fe.metric_sum(&["decision=\"deny\"", "egress:unreadable-client-hello"]) >= 7.0,
        "{}",
        fe.metrics()
    );
}

#[test]
fn plaintext_in_tunnels_never_names_an_unevaluated_host() {
    if !resolves_to_loopback("localhost") {
        return skip("localhost does not resolve to a loopback address here");
    }
    let mesh = Mesh::start("attack-egress-http", &[]);
    let app = Recorder::http();
    let (fe, proxy) = egress_proxy(&mesh);
    let p = app.port;

    // The first request after a pause is still decided.
    let before = app.count();
    let mut s = tunnel(proxy, p);
    std::thread::sleep(Duration::from_millis(700));
    s.write_all(b"GET /late HTTP/1.1\r\nHost: evil.test\r\n\r\n")
        .unwrap();
    assert_eq!(statuses(&mut s, 1), [403]);
    drop(s);
    assert_eq!(
        app.bytes_since(before),
        b"",
        "a late request naming evil.test reached the app"
    );

    // Pipelined requests: each one decided on its own Host.
    let before = app.count();
    let mut s = tunnel(proxy, p);
    s.write_all(b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\nGET /b HTTP/1.1\r\nHost: evil.test\r\n\r\nGET /c HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    assert_eq!(statuses(&mut s, 3), [200, 403, 200]);
    drop(s);
    let got = String::from_utf8_lossy(&app.bytes_since(before)).into_owned();
    assert!(got.contains("GET /a ") && got.contains("GET /c "), "{got}");
    assert!(!got.contains("/b") && !got.contains("evil"), "{got}");

    // Absolute-form: the authority is a name too; it must agree with Host, and is forwarded
    // in origin form.
    for (req, want) in [
        (
            "GET http://evil.test/x HTTP/1.1\r\nHost: localhost\r\n\r\n",
            400,
        ),
        (
            "GET http://evil.test/x HTTP/1.1\r\nHost: evil.test\r\n\r\n",
            403,
        ),
        (
            "GET /x HTTP/1.1\r\nHost: localhost\r\nHost: evil.test\r\n\r\n",
            400,
        ),
        ("GET /x HTTP/1.1\r\nHost: evil.test@localhost\r\n\r\n", 400),
        ("\r\nget /x HTTP/1.1\r\nHost: evil.test\r\n\r\n", 403),
    ] {
        let before = app.count();
        let mut s = tunnel(proxy, p);
        s.write_all(req.as_bytes()).unwrap();
        assert_eq!(statuses(&mut s, 1), [want], "{req:?}");
        drop(s);
        assert_eq!(app.bytes_since(before), b"", "{req:?} reached the app");
    }
    let before = app.count();
    let mut s = tunnel(proxy, p);
    write!(
        s,
        "GET http://localhost:{p}/y HTTP/1.1\r\nHost: localhost:{p}\r\n\r\n"
    )
    .unwrap();
    assert_eq!(statuses(&mut s, 1), [200]);
    drop(s);
    let got = String::from_utf8_lossy(&app.bytes_since(before)).into_owned();
    assert!(got.starts_with("GET /y HTTP/1.1\r\n"), "{got}");
    assert!(got.contains(&format!("host: localhost:{p}")), "{got}");

    // The explicit proxy (no tunnel): the absolute-form authority must agree with Host.
    let before = app.count();
    let mut s = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET http://localhost:{p}/q HTTP/1.1\r\nHost: evil.test\r\n\r\n"
    )
    .unwrap();
    assert_eq!(statuses(&mut s, 1), [400]);
    drop(s);
    assert_eq!(app.bytes_since(before), b"");
    fe.wait_log(&[
        "connect=\"localhost\"",
        "host=\"evil.test\"",
        "outcome=\"denied\"",
    ]);
    assert!(fe.metric_sum(&["http_refused_total", "egress", "authority:host-mismatch"]) >= 1.0);

    // Paths the normalization refuses are `400` (POLICY.md §3), counted with their reason, and
    // the connection keeps serving; only the allowed request reaches the app.
    let before = app.count();
    let mut s = tunnel(proxy, p);
    s.write_all(b"GET /a%2F..%2Fadmin HTTP/1.1\r\nHost: localhost\r\n\r\nGET /a%zz HTTP/1.1\r\nHost: localhost\r\n\r\nOPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\nGET /ok HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    assert_eq!(statuses(&mut s, 4), [400, 400, 400, 200]);
    drop(s);
    let got = String::from_utf8_lossy(&app.bytes_since(before)).into_owned();
    assert!(got.starts_with("GET /ok HTTP/1.1\r\n"), "{got}");
    assert!(
        !got.contains("admin") && !got.contains("%zz") && !got.contains("OPTIONS"),
        "{got}"
    );
    for reason in [
        "normalize:escaped-slash",
        "normalize:bad-escape",
        "normalize:not-absolute",
    ] {
        let labels = [
            "svidcar_proxy_http_refused_total",
            "direction=\"egress\"",
            reason,
        ];
        assert_eq!(fe.metric_sum(&labels), 1.0, "{reason}: {}", fe.metrics());
    }
    fe.wait_log(&[
        "normalize:escaped-slash",
        "outcome=\"refused\"",
        "status=400",
    ]);
}

/// `svidcar policy <sub> -f <path> ...`: the exit code and stderr.
fn policy_cmd(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN).arg("policy").args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Contents that must never load as a policy set (each with what the error says).
fn not_a_policy_set() -> Vec<(&'static str, String, &'static str)> {
    let rule = "policies:\n- name: tunnel\n  direction: egress\n  action: allow\n  rules:\n";
    vec![
        ("empty", String::new(), "no PolicySet document"),
        (
            "comment only",
            "# being rewritten\n".into(),
            "no PolicySet document",
        ),
        ("header only", HEAD.into(), "lists `policies`"),
        ("cut after a key", format!("{HEAD}{rule}"), "has no value"),
        (
            "cut inside a line",
            format!("{HEAD}{rule}  - to: [{{ hosts: [\"localhost\"] }}]"),
            "newline",
        ),
    ]
}

#[test]
fn emptied_or_cut_short_policy_files_never_open_egress() {
    if !resolves_to_loopback("localhost") {
        return skip("localhost does not resolve to a loopback address here");
    }
    let mesh = Mesh::start("attack-egress-reload", &[]);
    let app = Recorder::http();
    let (fe, proxy) = egress_proxy(&mesh);
    let policy = mesh.dir.path().join("egress.yaml");
    // 127.0.0.1 is not an allowed name: refused before and after every bad reload.
    let refused_connect = || {
        let mut s = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "CONNECT 127.0.0.1:{} HTTP/1.1\r\n\r\n", app.port).unwrap();
        read_head(&mut s).starts_with("HTTP/1.1 403")
    };
    assert!(refused_connect());
    let errors = |fe: &Sidecar| fe.metric_sum(&["svidcar_policy_reload_errors_total"]);
    for (i, (what, text, reason)) in not_a_policy_set().into_iter().enumerate() {
        // The CLI refuses it the same way.
        let file = mesh.dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&file, &text).unwrap();
        let f = file.to_str().unwrap();
        let (code, err) = policy_cmd(&["lint", "-f", f]);
        assert_eq!(code, Some(2), "lint, {what}: {err}");
        assert!(err.contains(reason), "lint, {what}: {err}");
        let (code, err) = policy_cmd(&[
            "check",
            "-f",
            f,
            "--local-id",
            "spiffe://svidcar.local/x",
            "--direction",
            "egress",
        ]);
        assert_eq!(code, Some(2), "check, {what}: {err}");
        // Truncate in place, as an editor does, then write the bad content.
        std::fs::write(&policy, &text).unwrap();
        let want = i as f64 + 1.0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while errors(&fe) < want {
            assert!(
                Instant::now() < deadline,
                "{what}: no reload error counted\n{}",
                fe.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(refused_connect(), "{what}: the old set was not kept");
        fe.wait_log(&[reason]);
    }
    assert_eq!(app.count(), 0, "nothing was dialed");

    // A directory losing its only file; at start, every bad source is refused with the reason.
    let dir = mesh.dir.path().join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    let ok = format!("{HEAD}policies: []\n");
    std::fs::write(dir.join("p.yaml"), &ok).unwrap();
    let port = free_port();
    let fe2 = mesh.sidecar(
        "frontend",
        &mesh.frontend_bin.clone(),
        &[
            "--policy".into(),
            dir.display().to_string(),
            "--egress-proxy".into(),
            format!("127.0.0.1:{port}"),
        ],
    );
    std::fs::remove_file(dir.join("p.yaml")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while errors(&fe2) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no reload error for an emptied directory\n{}",
            fe2.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    fe2.wait_log(&["no policy file"]);
    fe2.wait_log(&["policy reload rejected"]);
    let mut sources: Vec<(String, std::path::PathBuf, &str)> = not_a_policy_set()
        .into_iter()
        .enumerate()
        .map(|(i, (what, _, reason))| {
            (
                what.to_string(),
                mesh.dir.path().join(format!("bad-{i}.yaml")),
                reason,
            )
        })
        .collect();
    sources.push(("empty directory".into(), dir.clone(), "no policy file"));
    for (what, path, reason) in sources {
        let out = Command::new(&mesh.frontend_bin)
            .args(["proxy", "--agent-socket"])
            .arg(&mesh.agent.socket)
            .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
            .arg("--policy")
            .arg(&path)
            .args(["--egress-proxy", &format!("127.0.0.1:{}", free_port())])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {what}: {err}");
        assert!(err.contains(reason), "{what}: {err}");
    }
}

/// Server-first protocols keep working: the server's banner is relayed while the client is
/// silent, and the client's answer is spliced even when it starts like TLS (a MySQL packet of
/// length 0x..16) or like HTTP (SMTP's `EHLO`).
#[test]
fn server_first_protocols_are_spliced_after_the_banner() {
    if !resolves_to_loopback("localhost") {
        return skip("localhost does not resolve to a loopback address here");
    }
    fn banner_then_echo(mut s: TcpStream) {
        if s.write_all(b"220 ready\r\n").is_err() {
            return;
        }
        let mut r = s.try_clone().unwrap();
        let _ = std::io::copy(&mut r, &mut s);
    }
    let port = common::tcp_app(banner_then_echo);
    let mesh = Mesh::start("attack-egress-server-first", &[]);
    let (_fe, proxy) = egress_proxy(&mesh);
    for answer in [
        &b"EHLO client.test\r\n"[..],
        b"\x16\x01\x00\x01\x85\xa6\xff\x01",
    ] {
        let mut s = tunnel(proxy, port);
        let mut banner = [0u8; 11];
        s.read_exact(&mut banner).unwrap();
        assert_eq!(&banner, b"220 ready\r\n");
        s.write_all(answer).unwrap();
        let mut echo = vec![0u8; answer.len()];
        s.read_exact(&mut echo).unwrap();
        assert_eq!(echo, answer, "the client's answer was not spliced");
    }
}
