//! Attacker tooling for the agent attack tests (`tests/attack_agent.rs`): a python3 ELF
//! binary and copies of it (each copy its own executable inode), `tests/py/raw_grpc.py` (gRPC
//! over HTTP/2 on a raw unix socket, so it can call on a socket inherited across exec/fork),
//! connection floods run as another uid (`setpriv`), and an agent started under `prlimit`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::BIN;

/// The unregistered local user of the attacks.
pub const OTHER_UID: u32 = 12345;

/// A python3 ELF binary (not a shim script), or `None` after `skip`.
pub fn python() -> Option<PathBuf> {
    if super::uid() != 0 {
        super::skip("attack_agent tests need root (chown, setpriv)");
        return None;
    }
    for cand in ["/usr/bin/python3", "/usr/local/bin/python3"] {
        if let Ok(real) = std::fs::canonicalize(cand) {
            let head = std::fs::read(&real).unwrap_or_default();
            if head.starts_with(b"\x7fELF") {
                return Some(real);
            }
        }
    }
    super::skip("no python3 ELF binary in /usr/bin or /usr/local/bin");
    None
}

/// The attack script, copied into `dir` (readable by every uid).
pub fn script(dir: &Path) -> PathBuf {
    let to = dir.join("raw_grpc.py");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/raw_grpc.py"),
        &to,
    )
    .expect("copy raw_grpc.py");
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
    to
}

/// A copy of `python` at `dir/name` (its own inode: a different executable).
pub fn python_copy(python: &Path, dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::copy(python, &to).expect("copy python3");
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
    to
}

/// Runs `prog args` and returns its trimmed stdout (stderr is shown on failure).
pub fn run(prog: &Path, args: &[&str]) -> String {
    let out = Command::new(prog).args(args).output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        !stdout.is_empty(),
        "{} {args:?} printed nothing: {}",
        prog.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub fn metrics(health: &str) -> String {
    let addr: SocketAddr = health.parse().unwrap();
    super::proxy::http_get(addr, "/metrics")
        .expect("GET /metrics")
        .1
}

pub fn metric(health: &str, needle: &str) -> f64 {
    metrics(health)
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An agent started under `prlimit --nofile=<nofile>`, killed on drop.
pub struct LimitedAgent {
    child: Option<Child>,
    pub socket: PathBuf,
    pub health: String,
    log: PathBuf,
}

impl LimitedAgent {
    pub fn start(dir: &Path, nofile: &str, extra: &[&str]) -> Self {
        let socket = dir.join("agent.sock");
        let health = format!("127.0.0.1:{}", super::free_port());
        let log = dir.join("agent.log");
        let child = Command::new("prlimit")
            .arg(format!("--nofile={nofile}"))
            .arg("--")
            .arg(BIN)
            .args(["agent", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--health-addr", &health])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start agent under prlimit");
        let a = Self {
            child: Some(child),
            socket,
            health,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&a.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "agent not ready: {}",
                a.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        a
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for LimitedAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Our hard open-files limit.
pub fn hard_nofile() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace()
        .nth(4)
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// `n` idle connections to `sock` held by a python process running as uid 12345; returns the
/// process (close its stdin to release them) once they are open.
pub fn flood(py: &Path, script: &Path, sock: &Path, n: usize) -> Child {
    let mut child = Command::new("setpriv")
        .args([
            &format!("--reuid={OTHER_UID}"),
            &format!("--regid={OTHER_UID}"),
            "--clear-groups",
        ])
        .arg(py)
        .arg(script)
        .arg("flood")
        .arg(sock)
        .arg(n.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("setpriv python3 flood");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), format!("OPEN {n}"));
    child
}

pub fn end_flood(mut child: Child) {
    drop(child.stdin.take());
    let _ = child.wait();
}

/// An agent whose one entry `spiffe://svidcar.local/app` is for uid 0 running the copy
/// `registered-app` of python3 (`extra`: more agent flags), with the attack script beside it.
pub struct Registered {
    /// The system python3 (an unregistered binary of the same uid).
    pub py: PathBuf,
    pub script: PathBuf,
    /// The registered binary.
    pub registered: PathBuf,
    pub agent: super::Agent,
    pub dir: super::TempDir,
}

impl Registered {
    /// `None` after `skip` (not root, or no python3 ELF binary).
    pub fn start(tag: &str, extra: &[&str]) -> Option<Self> {
        let py = python()?;
        let dir = super::TempDir::new(tag);
        let script = script(dir.path());
        let registered = python_copy(&py, dir.path(), "registered-app");
        let entry = format!(
            "spiffe://svidcar.local/app=unix:uid:0,unix:path:{}",
            registered.display()
        );
        let args: Vec<&str> = ["--entry", entry.as_str()]
            .iter()
            .chain(extra)
            .copied()
            .collect();
        let agent = super::Agent::start_in(dir.path(), &args);
        Some(Self {
            py,
            script,
            registered,
            agent,
            dir,
        })
    }

    /// The agent socket, the script and the registered binary, as arguments.
    pub fn args(&self) -> (&str, &str, &str) {
        (
            self.agent.socket.to_str().unwrap(),
            self.script.to_str().unwrap(),
            self.registered.to_str().unwrap(),
        )
    }
}

/// True if `prlimit` and `setpriv` (util-linux) are there; otherwise `skip`s.
pub fn flood_tools() -> bool {
    if super::which("prlimit").is_none() || super::which("setpriv").is_none() {
        super::skip("needs prlimit and setpriv (util-linux)");
        return false;
    }
    true
}

/// Starts `svidcar agent` with `args` and expects it to refuse to start: returns its stderr.
pub fn agent_refuses(args: &[&str]) -> String {
    let mut child = Command::new(BIN)
        .args(["agent", "--health-addr", "off"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start agent");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(!status.success(), "agent exited 0: {err}");
            return err;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agent started with {args:?}; it should have refused");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The agent refuses to start with `args`, naming each of `want` and a `fix:`, and leaves no
/// socket at `sock`.
pub fn assert_refused(args: &[&str], want: &[&str], sock: &Path) {
    let err = agent_refuses(args);
    for w in want {
        assert!(err.contains(w), "want {w:?} in: {err}");
    }
    assert!(err.contains("fix:"), "{err}");
    assert!(!sock.exists(), "refused agent left a socket");
}

pub fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).expect("chown");
}

pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
