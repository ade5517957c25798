//! Real SPIRE v1.13.3 processes for the interop tests (`tests/interop_spire.rs`): a
//! `spire-server` (sqlite datastore, join-token node attestation, in-memory keys, optional
//! `federation` block) and a `spire-agent` attested with a join token, with the `unix` workload
//! attestor (`discover_workload_path = true`, so `unix:path:` selectors work). Each runs in its
//! own temp dir on loopback ports, and is killed on drop (only the processes started here).
//!
//! The binaries come from `tests/spire/install.sh` (`$SVIDCAR_SPIRE_BIN`, default
//! `$HOME/.cache/svidcar/spire-v1.13.3/bin`).
#![allow(dead_code)]

pub mod federation;
pub mod mesh;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{free_port, skip};

/// The SPIRE release these tests run against (built by `tests/spire/install.sh`).
pub const VERSION: &str = "v1.13.3";

/// The directory holding `spire-server` and `spire-agent`, or `None` after [`skip`] (which
/// panics under CI).
pub fn bin_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("SVIDCAR_SPIRE_BIN") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(format!(".cache/svidcar/spire-{VERSION}/bin")),
    };
    if dir.join("spire-server").is_file() && dir.join("spire-agent").is_file() {
        return Some(dir);
    }
    skip(&format!(
        "SPIRE {VERSION} is not built in {} (run tests/spire/install.sh once, or set SVIDCAR_SPIRE_BIN)",
        dir.display()
    ));
    None
}

/// `<bin> healthcheck -socketPath <socket>` succeeds (spire-server and spire-agent alike).
fn healthcheck(bin: &Path, socket: &Path) -> bool {
    Command::new(bin)
        .args(["healthcheck", "-socketPath"])
        .arg(socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn wait_until(what: &str, secs: u64, child: &mut Child, log: &Path, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "{what} exited with {st}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "{what} not ready after {secs}s:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A running `spire-server`.
pub struct SpireServer {
    child: Option<Child>,
    bin: PathBuf,
    /// Its directory (config, data, log, API socket).
    pub dir: PathBuf,
    /// Its trust domain name.
    pub td: String,
    /// The server API socket (`-socketPath` of the CLI).
    pub socket: PathBuf,
    /// The agent API port on 127.0.0.1.
    pub port: u16,
    pub log: PathBuf,
}

impl SpireServer {
    /// Starts a server of trust domain `td` in `dir`; `federation` is a `federation { … }`
    /// block (or empty), `env` extra environment (e.g. `SSL_CERT_FILE` for `https_web`).
    pub fn start(
        bins: &Path,
        dir: &Path,
        td: &str,
        federation: &str,
        env: &[(&str, &str)],
    ) -> Self {
        std::fs::create_dir_all(dir.join("data")).expect("server dir");
        let port = free_port();
        let d = dir.display();
        let conf = format!(
            r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{port}"
    socket_path = "{d}/api.sock"
    trust_domain = "{td}"
    data_dir = "{d}/data"
    log_level = "DEBUG"
    default_x509_svid_ttl = "1h"
{federation}
}}

plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{d}/data/datastore.sqlite3"
        }}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "memory" {{
        plugin_data {{}}
    }}
}}
"#
        );
        std::fs::write(dir.join("server.conf"), conf).expect("server.conf");
        let log = dir.join("server.log");
        let mut child = Command::new(bins.join("spire-server"))
            .args(["run", "-config"])
            .arg(dir.join("server.conf"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("server log"))
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&log)
                    .expect("server log"),
            ))
            .spawn()
            .expect("start spire-server");
        let socket = dir.join("api.sock");
        let bin = bins.join("spire-server");
        let healthy = || healthcheck(&bin, &socket);
        wait_until("spire-server", 60, &mut child, &log, healthy);
        Self {
            child: Some(child),
            bin,
            dir: dir.to_path_buf(),
            td: td.to_string(),
            socket,
            port,
            log,
        }
    }

    /// Runs `spire-server <cmd…> -socketPath S <args…>`: (success, stdout, stderr).
    pub fn try_cli(&self, cmd: &[&str], args: &[&str]) -> (bool, String, String) {
        let out = Command::new(&self.bin)
            .args(cmd)
            .arg("-socketPath")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run spire-server CLI");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// [`SpireServer::try_cli`] that must succeed; its stdout.
    pub fn cli(&self, cmd: &[&str], args: &[&str]) -> String {
        let (ok, out, err) = self.try_cli(cmd, args);
        assert!(ok, "spire-server {cmd:?} {args:?} failed:\n{out}\n{err}");
        out
    }

    /// Our own bundle as PEM (`bundle show`).
    pub fn bundle_pem(&self) -> String {
        self.cli(&["bundle", "show"], &["-format", "pem"])
    }

    /// A one-time join token for a node that gets the alias `node_id` too.
    pub fn join_token(&self, node_id: &str) -> String {
        let out = self.cli(&["token", "generate"], &["-spiffeID", node_id]);
        out.lines()
            .find_map(|l| l.strip_prefix("Token:"))
            .map(|t| t.trim().to_string())
            .unwrap_or_else(|| panic!("no token in {out:?}"))
    }

    /// Registers `spiffe_id` for workloads (under the node alias `parent`) with all of
    /// `selectors`, plus extra `entry create` flags (e.g. `-x509SVIDTTL 30`).
    pub fn entry(&self, parent: &str, spiffe_id: &str, selectors: &[String], extra: &[&str]) {
        let mut args = vec!["-parentID", parent, "-spiffeID", spiffe_id];
        for s in selectors {
            args.extend(["-selector", s.as_str()]);
        }
        args.extend_from_slice(extra);
        self.cli(&["entry", "create"], &args);
    }

    /// The bundle SPIRE holds for the foreign `td` in SPIFFE (JWKS) form, if any.
    pub fn federated_bundle(&self, td: &str) -> Option<String> {
        let (ok, out, _) = self.try_cli(
            &["bundle", "list"],
            &["-id", &format!("spiffe://{td}"), "-format", "spiffe"],
        );
        // The JSON document, without any banner around it.
        let (start, end) = (out.find('{')?, out.rfind('}')?);
        (ok && out.contains("keys")).then(|| out[start..=end].to_string())
    }

    /// Starts an agent in `dir`, attested with a fresh join token as `spiffe://<td>/node`.
    pub fn agent(&self, bins: &Path, dir: &Path) -> SpireAgent {
        SpireAgent::start(bins, dir, self, &self.join_token(&self.node_id()))
    }

    /// The node alias that [`SpireServer::agent`] gives its agents (the `parentID` of entries).
    pub fn node_id(&self) -> String {
        format!("spiffe://{}/node", self.td)
    }
}

impl Drop for SpireServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A running `spire-agent` (its Workload API socket is [`SpireAgent::socket`]).
pub struct SpireAgent {
    child: Option<Child>,
    pub dir: PathBuf,
    /// The Workload API socket.
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl SpireAgent {
    /// Starts an agent of `server`'s trust domain that attests with `token`, bootstrapped with
    /// the server's current bundle, and waits for it to be healthy (attested, API up).
    pub fn start(bins: &Path, dir: &Path, server: &SpireServer, token: &str) -> Self {
        std::fs::create_dir_all(dir.join("data")).expect("agent dir");
        std::fs::write(dir.join("bootstrap.pem"), server.bundle_pem()).expect("bootstrap");
        let d = dir.display();
        let conf = format!(
            r#"agent {{
    data_dir = "{d}/data"
    log_level = "DEBUG"
    server_address = "127.0.0.1"
    server_port = "{port}"
    socket_path = "{d}/workload.sock"
    trust_bundle_path = "{d}/bootstrap.pem"
    trust_domain = "{td}"
    join_token = "{token}"
}}

plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "memory" {{
        plugin_data {{}}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{
            discover_workload_path = true
        }}
    }}
}}
"#,
            port = server.port,
            td = server.td,
        );
        std::fs::write(dir.join("agent.conf"), conf).expect("agent.conf");
        let log = dir.join("agent.log");
        let bin = bins.join("spire-agent");
        let mut child = Command::new(&bin)
            .args(["run", "-config"])
            .arg(dir.join("agent.conf"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("agent log"))
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&log)
                    .expect("agent log"),
            ))
            .spawn()
            .expect("start spire-agent");
        let socket = dir.join("workload.sock");
        let healthy = || healthcheck(&bin, &socket);
        wait_until("spire-agent", 60, &mut child, &log, healthy);
        Self {
            child: Some(child),
            dir: dir.to_path_buf(),
            socket,
            log,
        }
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SpireAgent {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}
