//! `auto` inbound ports (`--inbound ADDR=PORT:strict:auto`): the backend sidecar sniffs the
//! first bytes after the mTLS handshake. curl over HTTP/1.1 and HTTP/2 (prior knowledge) and a
//! real gRPC client are served as HTTP with per-request policy (`403` / `PERMISSION_DENIED`); a
//! server-first protocol (the app sends a banner before the client says anything) and a
//! client-first binary protocol work as opaque TCP under L4 policy, every byte delivered; a
//! client that stays silent or dribbles a request line past the wait is TCP, so an allow rule
//! with HTTP-only fields cannot admit it.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::proxy::{Mesh, TD};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// What the apps received: one line per request (`h1 GET /p`, `h2 GET /p`) or TCP line.
#[derive(Clone, Default)]
struct Seen {
    lines: Arc<Mutex<Vec<String>>>,
    conns: Arc<AtomicUsize>,
}

impl Seen {
    fn push(&self, s: String) {
        self.lines.lock().unwrap().push(s);
    }
    fn has(&self, s: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l == s)
    }
    fn any(&self, prefix: &str) -> bool {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(prefix))
    }
}

/// Runs `f(listener)` on a runtime of its own thread; returns the port.
fn spawn_app<F, Fut>(f: F) -> u16
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move { f(tokio::net::TcpListener::from_std(l).unwrap()).await });
    });
    port
}

/// An HTTP app that speaks HTTP/1.1 and cleartext HTTP/2 (prior knowledge) on one port.
fn http_app(seen: Seen) -> u16 {
    spawn_app(move |l| async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            seen.conns.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            tokio::spawn(serve_app_conn(s, seen));
        }
    })
}

async fn serve_app_conn(s: tokio::net::TcpStream, seen: Seen) {
    let mut first = [0u8; 3];
    if s.peek(&mut first).await.unwrap_or(0) == 3 && &first == b"PRI" {
        let Ok(mut conn) = h2::server::handshake(s).await else {
            return;
        };
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            seen.push(format!("h2 {} {}", req.method(), req.uri().path()));
            let resp = http::Response::builder().status(200).body(()).unwrap();
            if let Ok(mut send) = respond.send_response(resp, false) {
                let _ = send.send_data(Bytes::from_static(b"hello from app\n"), true);
            }
        }
        return;
    }
    let mut rd = tokio::io::BufReader::new(s);
    loop {
        let mut line = String::new();
        if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut h = String::new();
            if rd.read_line(&mut h).await.unwrap_or(0) == 0 || h.trim().is_empty() {
                break;
            }
        }
        let mut parts = line.split(' ');
        let (m, p) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        seen.push(format!("h1 {m} {p}"));
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\nhello from app\n";
        if rd.get_mut().write_all(ok).await.is_err() {
            return;
        }
    }
}

/// A server-first app: sends a banner at once, then echoes each line it receives as
/// `echo <line>`, recording it.
fn banner_app(seen: Seen) -> u16 {
    spawn_app(move |l| async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            seen.conns.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut rd = tokio::io::BufReader::new(s);
                if rd
                    .get_mut()
                    .write_all(b"220 banner ready\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                loop {
                    let mut line = Vec::new();
                    if rd.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    seen.push(format!("tcp {}", line.escape_ascii()));
                    let mut out = b"echo ".to_vec();
                    out.extend_from_slice(&line);
                    if rd.get_mut().write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}

fn curl(url: &str, extra: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-m",
            "10",
            "-o",
            "-",
            "-w",
            "\n%{http_code} %{http_version}",
        ])
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, codes) = text.rsplit_once('\n').unwrap_or(("", &text));
    (body.to_string(), codes.to_string())
}

fn line(rd: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut s = String::new();
    rd.read_line(&mut s)?;
    Ok(s)
}

#[test]
fn auto_ports_serve_http_grpc_and_opaque_tcp() {
    if common::which("curl").is_none() {
        return common::skip("curl not installed");
    }
    let (web_seen, tcp_seen) = (Seen::default(), Seen::default());
    let web = http_app(web_seen.clone());
    let banner = banner_app(tcp_seen.clone());
    // gRPC: a real grpcio server when the venv is there.
    let py = common::venv_python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/grpc_authz.py");
    let grpc_port = common::free_port();
    let mut grpc_server = py.as_ref().map(|py| {
        let mut c = Command::new(py)
            .arg(&script)
            .args(["server", &grpc_port.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the grpcio server");
        let mut ready = String::new();
        BufReader::new(c.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "ready");
        c
    });

    let mesh = Mesh::start("proxy-auto", &[]);
    let policy = format!(
        "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n- name: auto\n  direction: inbound\n  action: allow\n  rules:\n  - from: [{{ spiffeIds: [\"spiffe://{TD}/frontend\"] }}]\n    to: [{{ ports: [{web}, {grpc_port}], paths: [\"/public/*\", \"/grpc.health.v1.Health/Check\"] }}]\n  - from: [{{ spiffeIds: [\"spiffe://{TD}/frontend\"] }}]\n    to: [{{ ports: [{banner}] }}]\n"
    );
    let file = mesh.dir.path().join("policy.yaml");
    std::fs::write(&file, policy).unwrap();
    let ins: Vec<u16> = (0..3).map(|_| common::free_port()).collect();
    let outs: Vec<u16> = (0..3).map(|_| common::free_port()).collect();
    let mut args = vec!["--policy".to_string(), file.display().to_string()];
    for (i, app) in [web, grpc_port, banner].into_iter().enumerate() {
        args.push("--inbound".into());
        args.push(format!("127.0.0.1:{}={app}:strict:auto", ins[i]));
    }
    let backend = mesh.sidecar("backend", &mesh.backend_bin.clone(), &args);
    let mut fargs = Vec::new();
    for i in 0..3 {
        fargs.push("--outbound".to_string());
        fargs.push(format!(
            "127.0.0.1:{}=127.0.0.1:{},spiffe://{TD}/backend",
            outs[i], ins[i]
        ));
    }
    let _frontend = mesh.sidecar("frontend", &mesh.frontend_bin.clone(), &fargs);
    let web_url = |p: &str| format!("http://127.0.0.1:{}{p}", outs[0]);

    // HTTP/1.1: per-request policy.
    let (body, codes) = curl(&web_url("/public/a"), &[]);
    assert_eq!(
        (body.as_str(), codes.as_str()),
        ("hello from app\n", "200 1.1")
    );
    let (body, codes) = curl(&web_url("/secret"), &[]);
    assert_eq!(
        (body.as_str(), codes.as_str()),
        ("RBAC: access denied", "403 1.1")
    );
    assert!(web_seen.has("h1 GET /public/a"));
    // HTTP/2 with prior knowledge (the preface is sniffed).
    let (body, codes) = curl(&web_url("/public/b"), &["--http2-prior-knowledge"]);
    assert_eq!(
        (body.as_str(), codes.as_str()),
        ("hello from app\n", "200 2")
    );
    let (_, codes) = curl(&web_url("/secret2"), &["--http2-prior-knowledge"]);
    assert_eq!(codes, "403 2");
    assert!(web_seen.any("GET /public/b"));
    assert!(!web_seen.any("/secret"), "denied requests reached the app");
    backend.wait_log(&["request denied", "path=/secret2"]);

    // Silence on the HTTP port: after the wait it is TCP, and the HTTP-only allow rule cannot
    // admit TCP: reset, the app never sees a connection.
    let conns = web_seen.conns.load(Ordering::SeqCst);
    let s = TcpStream::connect(("127.0.0.1", outs[0])).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    let r = (&s).read(&mut buf);
    assert!(matches!(r, Ok(0) | Err(_)), "silent client got {r:?}");
    // A request line dribbled out past the wait is TCP too (no L7 bypass by going slow).
    let mut s = TcpStream::connect(("127.0.0.1", outs[0])).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /secret").unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let _ = s.write_all(b" HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = s.read(&mut buf);
    assert!(matches!(r, Ok(0) | Err(_)), "slow request line got {r:?}");
    assert_eq!(
        web_seen.conns.load(Ordering::SeqCst),
        conns,
        "the app saw a TCP connection"
    );
    backend.wait_log(&["connection refused", "outcome=\"denied\""]);

    // Server-first: the banner arrives although the client says nothing first.
    let s = TcpStream::connect(("127.0.0.1", outs[2])).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rd = BufReader::new(s);
    assert_eq!(line(&mut rd).unwrap(), "220 banner ready\r\n");
    rd.get_mut().write_all(b"ping\n").unwrap();
    assert_eq!(line(&mut rd).unwrap(), "echo ping\n");
    // Client-first binary bytes: sniffed as not-HTTP at once and delivered intact.
    let s = TcpStream::connect(("127.0.0.1", outs[2])).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rd = BufReader::new(s);
    rd.get_mut().write_all(b"\x00\x01\xffbinary\n").unwrap();
    assert_eq!(line(&mut rd).unwrap(), "220 banner ready\r\n");
    let mut echo = Vec::new();
    rd.read_until(b'\n', &mut echo).unwrap();
    assert_eq!(echo, b"echo \x00\x01\xffbinary\n");
    assert!(
        tcp_seen.has("tcp \\x00\\x01\\xffbinary\\n"),
        "{:?}",
        tcp_seen.lines
    );

    // gRPC (HTTP/2 with a grpcio client): allowed and denied methods.
    if let Some(py) = &py {
        let out = Command::new(py)
            .arg(&script)
            .args(["client", &format!("127.0.0.1:{}", outs[1])])
            .output()
            .expect("run the grpcio client");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("Check OK SERVING"), "{stdout}");
        assert!(stdout.contains("List PERMISSION_DENIED"), "{stdout}");
    }
    if let Some(c) = grpc_server.as_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}
