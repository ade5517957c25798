//! go-spiffe v2 (the SPIFFE project's Go library) against svidcar, with the program in
//! tests/go/spiffe-interop (built here with the installed `go`; the Go module proxy provides
//! go-spiffe v2.9.0, pinned by go.sum):
//! - the Workload API: `workloadapi.NewX509Source` (SVID verified by `x509svid.Verify`,
//!   rotation followed), `workloadapi.FetchJWTSVID` validated by `jwtsvid.ParseAndValidate`
//!   with a `workloadapi.NewJWTSource` (and by svidcar's ValidateJWTSVID);
//! - svidcar sidecars both ways: plaintext client → svidcar outbound → mTLS → a go-spiffe
//!   server (`spiffetls.Listen`, `tlsconfig.AuthorizeID(<frontend sidecar>)`), and a go-spiffe
//!   client (`spiffetls.Dial`, `tlsconfig.AuthorizeID(<backend sidecar>)`) → svidcar inbound
//!   (`tcp`) → plaintext app; each with a peer authorizing another ID, which must fail.
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::proxy::{Mesh, TD};
use common::{skip, tcp_app, uid, which, Agent, TempDir};
use serde_json::Value;
use svidcar_agent::client::WorkloadApiClient;

/// The Go program's directory.
const GO_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/go/spiffe-interop");

/// `go build`s the program once per test process into the target dir; `None` after [`skip`]
/// when no usable Go is installed.
fn go_program() -> Option<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let Some(go) = which("go") else {
        skip(
            "no `go` on PATH (tests/run.sh installs golang-go; go-spiffe v2.9.0 needs Go >= 1.21)",
        );
        return None;
    };
    let version = Command::new(&go)
        .arg("version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // "go version go1.26.8 linux/amd64": Go < 1.21 cannot fetch the 1.24 toolchain go.mod asks for.
    let minor = version
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.strip_prefix("go1."))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    if minor.is_none_or(|m| m < 21) {
        skip(&format!(
            "{} cannot build go-spiffe v2.9.0 (needs Go >= 1.24, or >= 1.21 to fetch it): install Go from https://go.dev/dl",
            version.trim()
        ));
        return None;
    }
    let built = BUILT.get_or_init(|| {
        let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-spiffe-interop");
        std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
        let bin = out_dir.join("spiffe-interop");
        let mut cmd = Command::new(&go);
        cmd.args(["build", "-mod=readonly", "-buildvcs=false", "-o"])
            .arg(&bin)
            .arg(".")
            .current_dir(GO_SRC);
        if std::env::var_os("GOTOOLCHAIN").is_none() {
            cmd.env("GOTOOLCHAIN", "auto");
        }
        let out = cmd.output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "go build in {GO_SRC} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(bin)
    });
    match built {
        Ok(p) => Some(p.clone()),
        Err(e) => panic!("{e}"),
    }
}

/// A copy (hard link) of the Go program at `dir/name`, so `unix:path:` gives it its own identity.
fn go_link(prog: &Path, dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    if std::fs::hard_link(prog, &to).is_err() {
        std::fs::copy(prog, &to).expect("copy the Go program");
    }
    to
}

/// An entry for the program at `exe`: `spiffe://svidcar.local/<name>`, by uid and path.
fn entry(name: &str, exe: &Path) -> String {
    format!(
        "spiffe://{TD}/{name}=unix:uid:{},unix:path:{}",
        uid(),
        exe.display()
    )
}

/// Runs the Go program to completion: (success, JSON lines of stdout, stderr).
fn run_go(exe: &Path, socket: &Path, args: &[&str]) -> (bool, Vec<Value>, String) {
    let out = Command::new(exe)
        .args(args)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket.display()),
        )
        .output()
        .expect("run the Go program");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (
        out.status.success(),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A Go program left running (a server); its stdout JSON lines arrive on `lines`. Killed on drop.
struct GoProc {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl GoProc {
    fn start(exe: &Path, socket: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(exe)
            .args(args)
            .env(
                "SPIFFE_ENDPOINT_SOCKET",
                format!("unix://{}", socket.display()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the Go program");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    /// The next line within 15 s.
    fn next(&self) -> Value {
        self.lines
            .recv_timeout(Duration::from_secs(15))
            .expect("a line from the Go program within 15 s")
    }
}

impl Drop for GoProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `line` through `port` and returns what came back before the connection closed.
fn exchange(port: u16, line: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect the sidecar");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn go_spiffe_fetches_and_validates_x509_and_jwt_svids_and_follows_rotation() {
    let Some(prog) = go_program() else { return };
    let bins = TempDir::new("go-bins-api");
    let exe = go_link(&prog, bins.path(), "go-app");
    let dir = TempDir::new("interop-go-api");
    let agent = Agent::start_in(
        dir.path(),
        &[
            "--svid-ttl",
            "6s",
            "--entry",
            &entry("go-app", &exe),
            // This test process, to call ValidateJWTSVID.
            "--entry",
            &entry("validator", &std::env::current_exe().unwrap()),
        ],
    );
    let want = format!("spiffe://{TD}/go-app");

    // X509Source: two processes of one identity, each through one rotation. go-spiffe
    // verifies every SVID against the bundle it got; both see the same two SVIDs.
    let run = || {
        let (exe, socket) = (exe.clone(), agent.socket.clone());
        std::thread::spawn(move || run_go(&exe, &socket, &["x509", "-updates", "2"]))
    };
    let (p1, p2) = (run(), run());
    let (ok1, svids1, err1) = p1.join().unwrap();
    let (ok2, svids2, err2) = p2.join().unwrap();
    assert!(ok1 && ok2, "{err1}\n{err2}\n{}", agent.log_text());
    assert_eq!(svids1.len(), 2);
    for s in svids1.iter().chain(&svids2) {
        assert_eq!(s["id"], want.as_str(), "{s}");
        assert_eq!(s["verified_id"], want.as_str(), "{s}");
        assert_eq!(s["key_matches"], true, "{s}");
    }
    assert_ne!(svids1[0]["serial"], svids1[1]["serial"], "rotated");
    assert_ne!(svids1[0]["pubkey_sha256"], svids1[1]["pubkey_sha256"]);
    assert!(svids1[1]["not_after"].as_i64() > svids1[0]["not_after"].as_i64());
    // Same identity, one SVID at a time: the second process started within the first
    // SVID's half life, so both saw the same first (and then the same second) SVID.
    let serials = |v: &[Value]| -> Vec<String> {
        v.iter()
            .map(|s| s["serial"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(serials(&svids1), serials(&svids2), "one SVID per identity");

    // JWT: fetched, validated by go-spiffe against the JWT bundle of a JWTSource, refused
    // for another audience, and accepted by svidcar's own ValidateJWTSVID.
    let (ok, jwt, err) = run_go(
        &exe,
        &agent.socket,
        &["jwt", "-audience", "svidcar-interop"],
    );
    assert!(ok, "{err}\n{}", agent.log_text());
    let j = &jwt[0];
    assert_eq!(j["id"], want.as_str(), "{j}");
    assert_eq!(j["verified_id"], want.as_str(), "{j}");
    assert_eq!(j["audience"], serde_json::json!(["svidcar-interop"]));
    assert_eq!(j["wrong_audience_rejected"], true, "{j}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (id, _) = rt.block_on(async {
        let mut c = WorkloadApiClient::connect(&agent.socket).await.unwrap();
        c.validate_jwt_svid(j["token"].as_str().unwrap(), "svidcar-interop")
            .await
            .expect("svidcar validates go-spiffe's token")
    });
    assert_eq!(id.as_str(), want);
}

/// Records what the plaintext app behind the inbound sidecar received.
static APP_GOT: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn line_app(s: TcpStream) {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    APP_GOT.lock().unwrap().push(line.clone());
    let _ = write!(r.get_mut(), "app got: {line}");
}

#[test]
fn go_spiffe_client_reaches_a_plaintext_app_through_svidcar_inbound() {
    let Some(prog) = go_program() else { return };
    let bins = TempDir::new("go-bins-in");
    let client = go_link(&prog, bins.path(), "go-client");
    let mesh = Mesh::start("interop-go-in", &["--entry", &entry("go-client", &client)]);
    let app = tcp_app(line_app);
    let (backend, port) = mesh.backend(app, "strict:tcp");
    let addr = format!("127.0.0.1:{port}");
    let backend_id = format!("spiffe://{TD}/backend");
    let dial = |authorize: &str, msg: &str| {
        let args = ["dial", "-addr", &addr, "-authorize", authorize, "-msg", msg];
        run_go(&client, &mesh.agent.socket, &args)
    };

    let (ok, out, err) = dial(&backend_id, "hello from go-spiffe");
    assert!(ok, "{err}\nbackend log:\n{}", backend.log_text());
    assert_eq!(
        out[0]["server"],
        backend_id.as_str(),
        "go-spiffe verified the sidecar"
    );
    assert_eq!(out[0]["reply"], "app got: hello from go-spiffe\n");
    assert!(APP_GOT
        .lock()
        .unwrap()
        .contains(&"hello from go-spiffe\n".to_string()));

    // Authorizing another ID: go-spiffe refuses the sidecar, nothing reaches the app.
    let (ok, out, err) = dial(&format!("spiffe://{TD}/not-the-backend"), "must not arrive");
    assert!(!ok && out.is_empty(), "{out:?}");
    assert!(
        err.contains("unexpected ID") && err.contains(&backend_id),
        "go-spiffe's reason: {err}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(!APP_GOT
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("must not arrive")));
}

#[test]
fn svidcar_outbound_reaches_a_go_spiffe_server_that_authorizes_the_sidecar() {
    let Some(prog) = go_program() else { return };
    let bins = TempDir::new("go-bins-out");
    let server = go_link(&prog, bins.path(), "go-server");
    let mesh = Mesh::start("interop-go-out", &["--entry", &entry("go-server", &server)]);
    let frontend_id = format!("spiffe://{TD}/frontend");
    let server_id = format!("spiffe://{TD}/go-server");

    let listen = |authorize: &str| {
        let port = common::free_port();
        let addr = format!("127.0.0.1:{port}");
        let p = GoProc::start(
            &server,
            &mesh.agent.socket,
            &[
                "serve",
                "-addr",
                &addr,
                "-authorize",
                authorize,
                "-timeout",
                "120s",
            ],
        );
        let first = p.next();
        assert_eq!(first["listening"], addr.as_str(), "{first}");
        (p, port)
    };

    // The server authorizes the frontend sidecar: the plaintext client's line arrives and
    // the answer names the sidecar's ID as go-spiffe verified it.
    let (go, go_port) = listen(&frontend_id);
    let (frontend, port) = mesh.frontend(go_port, &server_id);
    let reply = exchange(port, "hello through svidcar\n");
    assert_eq!(
        reply,
        format!("go-spiffe server saw {frontend_id}: hello through svidcar\n"),
        "frontend log:\n{}",
        frontend.log_text()
    );
    let seen = go.next();
    assert_eq!(seen["peer"], frontend_id.as_str(), "{seen}");
    assert_eq!(seen["received"], "hello through svidcar\n");

    // A server authorizing another ID refuses the sidecar: no answer, nothing received.
    let (strict, strict_port) = listen(&format!("spiffe://{TD}/someone-else"));
    let (_frontend2, port2) = mesh.frontend(strict_port, &server_id);
    let reply = exchange(port2, "must not arrive\n");
    assert_eq!(
        reply, "",
        "the client got an answer from a server that refused it"
    );
    let refused = strict.next();
    assert!(
        refused["refused"]
            .as_str()
            .is_some_and(|r| r.contains("unexpected ID")),
        "{refused}"
    );
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        if let Ok(v) = strict.lines.try_recv() {
            assert!(
                v.get("received").is_none(),
                "a refused peer's bytes arrived: {v}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
