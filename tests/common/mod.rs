//! Shared test support: start the real `svidcar agent` binary on a temp socket and wait for it,
//! temp dirs, free ports, tools, and CI-aware skipping.
//!
//! Use with `mod common;` in a `tests/*.rs` file. Topic helpers live beside this file
//! (`tests/common/<topic>.rs`) with one `pub mod` line here.
#![allow(dead_code)]

pub mod attacker;
pub mod egress;
pub mod hostile;
pub mod l7;
pub mod netns;
pub mod peers;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The `svidcar` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_svidcar");

/// True under `CI=true` (tests must then fail instead of skipping).
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Call when a prerequisite is missing: panics under CI, otherwise prints why and returns
/// (the caller then returns early).
pub fn skip(reason: &str) {
    if in_ci() {
        panic!("CI=true but this test cannot run: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

/// Finds an executable on PATH (or /usr/sbin, /sbin).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file());
    found
}

/// Our effective uid (owner of /proc/self).
pub fn uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .expect("stat /proc/self")
}

/// A fresh, empty, unique temp directory (removed by [`TempDir`]'s drop).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "svidcar-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A TCP app on a loopback port that runs `handle` on each accepted connection in a thread of
/// its own; lives as long as the test process. Returns the port.
pub fn tcp_app(handle: fn(std::net::TcpStream)) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind app");
    let port = l.local_addr().expect("app address").port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || handle(s));
        }
    });
    port
}

/// A free TCP port on 127.0.0.1 for a process the test starts (bound and released).
///
/// Taken from 22000–31999, below the kernel's ephemeral range (32768–60999): a port the kernel
/// hands out for `bind(0)` can be taken again, before the sidecar binds it, as the source port
/// of any outgoing connection — and the 10,000-connection flood test makes thousands of those.
/// Each test process walks the range from its own offset, so parallel tests never pick the
/// same port twice.
pub fn free_port() -> u16 {
    const FIRST: u32 = 22_000;
    const SPAN: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(997) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN)
}

/// The py-spiffe venv interpreter (`.venv/bin/python` at the repo root), or `None` after
/// [`skip`] (panics under CI).
pub fn venv_python() -> Option<PathBuf> {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let ok = py.is_file()
        && Command::new(&py)
            .args(["-c", "import spiffe"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if ok {
        Some(py)
    } else {
        skip("no .venv with py-spiffe (python3 -m venv .venv && .venv/bin/pip install -r tests/py/requirements.txt)");
        None
    }
}

/// A child process, killed (and reaped) on drop.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` with stdin, stdout and stderr on `/dev/null`; killed when the guard drops.
pub fn spawn_quiet(cmd: &mut Command) -> Guard {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    Guard(child)
}

/// A gRPC channel to the unix socket `socket` (the agent's Workload API and SDS).
pub async fn unix_channel(socket: &Path) -> tonic::transport::Channel {
    let p = socket.to_path_buf();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                tokio::net::UnixStream::connect(p)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .expect("connect to the agent socket")
}

/// A running `svidcar agent` (killed on drop).
pub struct Agent {
    pub child: Option<Child>,
    /// Directory holding the socket, state and log.
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// `127.0.0.1:<port>` of the health/metrics listener.
    pub health: String,
    pub log: PathBuf,
    args: Vec<String>,
}

impl Agent {
    /// `spiffe://svidcar.local/<path>=unix:uid:<our uid>`.
    pub fn self_entry(path: &str) -> String {
        format!("spiffe://svidcar.local/{path}=unix:uid:{}", uid())
    }

    /// Starts an agent in `dir` (socket `dir/agent.sock`, state `dir/state`) with extra
    /// arguments, and waits until the socket answers.
    pub fn start_in(dir: &Path, extra: &[&str]) -> Self {
        let mut a = Self {
            child: None,
            dir: dir.to_path_buf(),
            socket: dir.join("agent.sock"),
            state_dir: dir.join("state"),
            health: format!("127.0.0.1:{}", free_port()),
            log: dir.join("agent.log"),
            args: extra.iter().map(|s| s.to_string()).collect(),
        };
        a.restart();
        a
    }

    /// (Re)starts the process with the same arguments.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(BIN)
            .args(["--log", "info,svidcar_agent=debug", "agent", "--socket"])
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--health-addr", &self.health])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start svidcar agent");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("agent exited with {status}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "agent socket {} not ready after 20s:\n{}",
            self.socket.display(),
            self.log_text()
        );
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `unix://` address of the socket.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// SIGTERM and wait (graceful shutdown); returns the exit status success.
    pub fn stop(&mut self) -> bool {
        terminate(self.child.take(), Duration::from_secs(10))
    }

    /// Kills without cleanup (SIGKILL), leaving a stale socket file.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `svidcar` with arguments; returns (success, stdout, stderr).
pub fn svidcar(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run svidcar");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// SIGTERM `child` (if any) and wait up to `grace` for it to exit, then SIGKILL; true when
/// it exited successfully within `grace` (or there was no child).
pub fn terminate(child: Option<Child>, grace: Duration) -> bool {
    let Some(mut child) = child else {
        return true;
    };
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return st.success();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}
