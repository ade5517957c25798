//! Test support for L7 attacks: apps that record exactly what they received (HTTP/1.1: the
//! request head byte for byte; HTTP/2: pseudo headers and headers), a raw HTTP/1.1 exchange,
//! and a raw HTTP/2 client that sends hand-encoded header blocks (uppercase or duplicate
//! pseudo headers, `host` beside `:authority`) that no well-behaved client library would.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::proxy::{Mesh, Sidecar};

/// What a recording app received, one entry per request.
pub type Seen = Arc<Mutex<Vec<String>>>;

/// An HTTP/1.1 app (keep-alive) that records each request head exactly as received (request
/// line and header lines, `\r\n` stripped) and answers `200` with that head as the body.
pub struct RecordingApp {
    pub port: u16,
    pub seen: Seen,
}

impl RecordingApp {
    pub fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind app");
        let port = l.local_addr().unwrap().port();
        let seen: Seen = Arc::default();
        let s2 = seen.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let seen = s2.clone();
                std::thread::spawn(move || serve_recording(s, &seen));
            }
        });
        Self { port, seen }
    }

    /// Everything received so far.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// Forgets what was received.
    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }

    /// Forgets what was received, runs `exchange` (a client call: status and body) and returns
    /// its answer and what the app received meanwhile.
    pub fn during(&self, exchange: impl FnOnce() -> (u16, String)) -> (u16, String, Vec<String>) {
        self.clear();
        let (status, body) = exchange();
        (status, body, self.seen())
    }
}

fn serve_recording(s: TcpStream, seen: &Seen) {
    let mut r = BufReader::new(s);
    loop {
        let mut head = Vec::new();
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            head.push(line);
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let text = head.join("\n");
        seen.lock().unwrap().push(text.clone());
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        if r.get_mut().write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// A cleartext HTTP/2 (prior knowledge) server on loopback calling `handle` for each request
/// (anything but HTTP/2 fails its handshake); returns its port.
pub fn h2c_server(
    handle: impl Fn(http::Request<h2::RecvStream>, h2::server::SendResponse<bytes::Bytes>)
        + Send
        + Sync
        + 'static,
) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind app");
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port();
    let handle = Arc::new(handle);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            while let Ok((s, _)) = l.accept().await {
                let handle = handle.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(s).await else {
                        return;
                    };
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        handle(req, respond);
                    }
                });
            }
        });
    });
    port
}

/// An HTTP/2 (prior knowledge) app recording each request as lines `:method M`,
/// `:scheme S`, `:authority A` (if any), `:path P`, then `name: value` per header, and
/// answering `200` with those lines as the body (and, for `content-type: application/grpc…`,
/// trailers `grpc-status: 0`).
pub struct RecordingH2App {
    pub port: u16,
    pub seen: Seen,
}

impl RecordingH2App {
    pub fn start() -> Self {
        let seen: Seen = Arc::default();
        let s2 = seen.clone();
        let port = h2c_server(move |req, mut respond| {
            let u = req.uri();
            let mut lines = vec![
                format!(":method {}", req.method()),
                format!(":scheme {}", u.scheme_str().unwrap_or("-")),
            ];
            if let Some(a) = u.authority() {
                lines.push(format!(":authority {a}"));
            }
            lines.push(format!(
                ":path {}",
                u.path_and_query().map_or("", |p| p.as_str())
            ));
            for (k, v) in req.headers() {
                lines.push(format!("{k}: {}", v.to_str().unwrap_or("<bin>")));
            }
            let grpc = req
                .headers()
                .get("content-type")
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            let text = lines.join("\n");
            s2.lock().unwrap().push(text.clone());
            let resp = http::Response::builder().status(200).body(()).unwrap();
            let Ok(mut tx) = respond.send_response(resp, false) else {
                return;
            };
            if grpc {
                // gRPC-shaped: the status comes in trailers.
                let _ = tx.send_data(bytes::Bytes::from(text), false);
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", http::HeaderValue::from_static("0"));
                let _ = tx.send_trailers(t);
            } else {
                let _ = tx.send_data(bytes::Bytes::from(text), true);
            }
        });
        Self { port, seen }
    }

    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// Sends `request` on a new plain TCP connection to `port` and reads until the peer closes:
/// (status, body). Use `Connection: close` in `request`.
pub fn raw_http(port: u16, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).expect("write request");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The end of a raw HTTP/2 exchange on stream 1.
#[derive(Debug, PartialEq, Eq)]
pub enum H2Outcome {
    /// A response HEADERS frame; the status when it is a static-table one (`:status` 200,
    /// 204, 206, 304, 400, 404, 500), else 0.
    Status(u16),
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code.
    GoAway(u32),
    /// The connection closed (or timed out) without any of the above.
    Closed,
}

/// One HPACK "literal header field without indexing, new name" (no Huffman): the name is
/// sent exactly as given, uppercase included.
fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    assert!(name.len() < 127 && value.len() < 127, "short fields only");
    out.push(0x00);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Opens a plain TCP connection to `port`, speaks HTTP/2 with prior knowledge and sends one
/// request on stream 1 whose header block holds exactly `fields` (in order, as written), with
/// END_STREAM. Returns how stream 1 ended.
pub fn raw_h2(port: u16, fields: &[(&str, &str)]) -> H2Outcome {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]); // SETTINGS
    let mut block = Vec::new();
    for (k, v) in fields {
        literal(&mut block, k, v);
    }
    frame(&mut out, 0x1, 0x4 | 0x1, 1, &block); // HEADERS, END_HEADERS | END_STREAM
    s.write_all(&out).expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = Vec::new();
    while Instant::now() < deadline {
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => return H2Outcome::Closed,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return H2Outcome::Closed,
        }
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let payload = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            match kind {
                0x4 if flags & 1 == 0 => {
                    let mut ack = Vec::new();
                    frame(&mut ack, 0x4, 0x1, 0, &[]);
                    let _ = s.write_all(&ack);
                }
                0x1 if stream == 1 => {
                    let status = match payload.first() {
                        Some(0x88) => 200,
                        Some(0x89) => 204,
                        Some(0x8a) => 206,
                        Some(0x8b) => 304,
                        Some(0x8c) => 400,
                        Some(0x8d) => 404,
                        Some(0x8e) => 500,
                        _ => 0,
                    };
                    return H2Outcome::Status(status);
                }
                0x3 if stream == 1 && payload.len() >= 4 => {
                    return H2Outcome::Reset(u32::from_be_bytes([
                        payload[0], payload[1], payload[2], payload[3],
                    ]));
                }
                0x7 if payload.len() >= 8 => {
                    return H2Outcome::GoAway(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]));
                }
                _ => {}
            }
        }
    }
    H2Outcome::Closed
}

// ---------------------------------------------------------------- a mesh under one policy

/// The policy of the L7 attack tests: `/public/*` allowed from anyone, `/admin*` and host
/// `admin.internal` denied, two paths allowed only on a given `x-forwarded-client-cert`.
pub const POLICY: &str = r#"apiVersion: svidcar.io/v1alpha1
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

/// The XFCC the backend sidecar sets for the frontend.
pub const OWN_XFCC: &str =
    "x-forwarded-client-cert: By=spiffe://svidcar.local/backend;URI=spiffe://svidcar.local/frontend";

/// A backend sidecar with an `http` inbound listener (`mode` e.g. `strict:http`) to
/// `app_port`, under `yaml` written to its own file `file` (so two backends of one mesh do
/// not share, and hot-reload, one policy file). Returns it and its port.
pub fn backend(mesh: &Mesh, file: &str, yaml: &str, app_port: u16, mode: &str) -> (Sidecar, u16) {
    let path = mesh.dir.path().join(file);
    std::fs::write(&path, yaml).unwrap();
    let port = super::free_port();
    let inbound = format!("127.0.0.1:{port}={app_port}:{mode}");
    let policy = ["--policy".into(), path.display().to_string()];
    (mesh.inbound_backend(&[inbound], &policy), port)
}

/// A [`backend`] and a frontend sidecar routing to it (expecting the backend's ID): the
/// backend, the frontend and the frontend's outbound port.
pub fn through(
    mesh: &Mesh,
    file: &str,
    yaml: &str,
    app_port: u16,
    mode: &str,
) -> (Sidecar, Sidecar, u16) {
    let (backend, in_port) = backend(mesh, file, yaml, app_port, mode);
    let backend_id = format!("spiffe://{}/backend", super::proxy::TD);
    let (frontend, out) = mesh.frontend(in_port, &backend_id);
    (backend, frontend, out)
}

/// Each of `reasons` was counted at least once in `svidcar_proxy_http_refused_total`.
pub fn assert_refusals_counted(backend: &Sidecar, reasons: &[&str]) {
    for reason in reasons {
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

/// `GET target` with `Host: public.example` and `extra` header lines.
pub fn get(port: u16, target: &str, extra: &str) -> (u16, String) {
    raw_http(
        port,
        &format!(
            "GET {target} HTTP/1.1\r\nHost: public.example\r\n{extra}Connection: close\r\n\r\n"
        ),
    )
}

/// The header lines named `name` in a recorded HTTP/1.1 head or HTTP/2 request.
pub fn header_lines<'a>(seen: &'a str, name: &str) -> Vec<&'a str> {
    seen.lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(k, _)| k.eq_ignore_ascii_case(name))
        })
        .collect()
}

/// A request header block: `:method GET`, `:scheme http`, `:authority` (unless empty),
/// `:path`, then `extra`.
pub fn h2req(authority: &str, path: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut all = vec![(":method".to_string(), "GET".to_string())];
    all.push((":scheme".into(), "http".into()));
    if !authority.is_empty() {
        all.push((":authority".into(), authority.into()));
    }
    all.push((":path".into(), path.into()));
    all.extend(extra.iter().map(|(a, b)| (a.to_string(), b.to_string())));
    all
}

pub fn h2_send(port: u16, fields: &[(String, String)]) -> H2Outcome {
    let f: Vec<(&str, &str)> = fields
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    raw_h2(port, &f)
}
