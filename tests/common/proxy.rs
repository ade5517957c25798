//! Test support for the sidecar proxy: a mesh of the real agent and real `svidcar proxy`
//! processes (each sidecar runs from its own hard link of the binary so that `unix:path:`
//! attestation gives it its own identity), sample HTTP servers (nginx or an in-test one), and a
//! small HTTP/1.1 client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{free_port, Agent, TempDir, BIN};

/// Trust domain of the test mesh (the agent's default).
pub const TD: &str = "svidcar.local";

/// The agent plus the binary links for the two sidecars.
pub struct Mesh {
    pub agent: Agent,
    pub frontend_bin: PathBuf,
    pub backend_bin: PathBuf,
    pub dir: TempDir,
}

impl Mesh {
    /// Starts an agent with entries for `frontend` and `backend` (plus `agent_extra` flags).
    pub fn start(tag: &str, agent_extra: &[&str]) -> Self {
        let dir = TempDir::new(tag);
        let link = |name: &str| {
            let to = dir.path().join(name);
            if std::fs::hard_link(BIN, &to).is_err() {
                std::fs::copy(BIN, &to).expect("copy binary");
            }
            to
        };
        let frontend_bin = link("frontend-proxy");
        let backend_bin = link("backend-proxy");
        let fe = format!(
            "spiffe://{TD}/frontend=unix:path:{}",
            frontend_bin.display()
        );
        let be = format!("spiffe://{TD}/backend=unix:path:{}", backend_bin.display());
        let mut args = vec!["--trust-domain", TD, "--entry", &fe, "--entry", &be];
        args.extend_from_slice(agent_extra);
        let agent = Agent::start_in(dir.path(), &args);
        Self {
            agent,
            frontend_bin,
            backend_bin,
            dir,
        }
    }

    /// Starts a sidecar from `bin` with `args` (after `proxy --agent-socket ... --admin-addr ...`).
    pub fn sidecar(&self, name: &str, bin: &Path, args: &[String]) -> Sidecar {
        Sidecar::start(name, bin, &self.agent.socket, self.dir.path(), args)
    }

    /// A backend sidecar with one strict inbound listener to `app_port`; returns it and the port.
    pub fn backend(&self, app_port: u16, mode: &str) -> (Sidecar, u16) {
        let port = free_port();
        let inbound = format!("127.0.0.1:{port}={app_port}:{mode}");
        (self.inbound_backend(&[inbound], &[]), port)
    }

    /// A backend sidecar with one `--inbound` listener per spec of `inbounds`
    /// (`addr=app_port[:mode]`), then the flags `extra`.
    pub fn inbound_backend(&self, inbounds: &[String], extra: &[String]) -> Sidecar {
        let mut args = Vec::new();
        for spec in inbounds {
            args.extend(["--inbound".to_string(), spec.clone()]);
        }
        args.extend_from_slice(extra);
        self.sidecar("backend", &self.backend_bin.clone(), &args)
    }

    /// A transparent-mode frontend sidecar inside namespace `ns` (listeners on 0.0.0.0:15006 and
    /// :15001, no mesh destinations) with the egress policy `policy_yaml`, written to
    /// `policy_file` in the mesh directory.
    pub fn transparent_egress_frontend(
        &self,
        ns: &str,
        policy_file: &str,
        policy_yaml: &str,
    ) -> Sidecar {
        let cfg = self.dir.path().join("egress-transparent.yaml");
        std::fs::write(&cfg, "transparent:\n  enabled: true\n  inbound_addr: \"0.0.0.0:15006\"\n  outbound_addr: \"0.0.0.0:15001\"\n").unwrap();
        let policy = self.dir.path().join(policy_file);
        std::fs::write(&policy, policy_yaml).unwrap();
        Sidecar::start_in(
            Some(ns),
            "frontend",
            &self.frontend_bin,
            &self.agent.socket,
            self.dir.path(),
            &[
                "--config".into(),
                cfg.display().to_string(),
                "--policy".into(),
                policy.display().to_string(),
            ],
        )
    }

    /// A backend sidecar with one strict L7 (`http`) inbound listener to `app_port`, decided by
    /// the policy `policy_yaml` (written to `policy.yaml` in the mesh directory); returns it and
    /// the port.
    pub fn l7_backend(&self, policy_yaml: &str, app_port: u16) -> (Sidecar, u16) {
        self.policy_backend(policy_yaml, app_port, "strict:http")
    }

    /// A backend sidecar with one inbound listener `=<app_port>:<mode>` (e.g. `strict`,
    /// `strict:http`) under the policy `policy_yaml`, written to `policy.yaml` in the mesh
    /// directory (rewrite it to hot-reload); returns it and the port.
    pub fn policy_backend(&self, policy_yaml: &str, app_port: u16, mode: &str) -> (Sidecar, u16) {
        let file = self.dir.path().join("policy.yaml");
        std::fs::write(&file, policy_yaml).unwrap();
        let port = free_port();
        let inbound = format!("127.0.0.1:{port}={app_port}:{mode}");
        let policy = ["--policy".into(), file.display().to_string()];
        (self.inbound_backend(&[inbound], &policy), port)
    }

    /// A frontend sidecar with one outbound route to `upstream_port` expecting `expect`.
    pub fn frontend(&self, upstream_port: u16, expect: &str) -> (Sidecar, u16) {
        let port = free_port();
        let sc = self.sidecar(
            "frontend",
            &self.frontend_bin.clone(),
            &[
                "--outbound".into(),
                format!("127.0.0.1:{port}=127.0.0.1:{upstream_port},{expect}"),
            ],
        );
        (sc, port)
    }
}

/// A running `svidcar proxy` (killed on drop).
pub struct Sidecar {
    pub name: String,
    pub child: Option<Child>,
    pub admin: SocketAddr,
    pub log: PathBuf,
    /// Network namespace the sidecar runs in (admin reached through `ip netns exec … curl`).
    pub netns: Option<String>,
}

impl Sidecar {
    /// Starts the sidecar and waits until `/ready` says 200.
    pub fn start(name: &str, bin: &Path, socket: &Path, dir: &Path, args: &[String]) -> Self {
        Self::start_in(None, name, bin, socket, dir, args)
    }

    /// [`Sidecar::start`] inside network namespace `netns` (if any).
    pub fn start_in(
        netns: Option<&str>,
        name: &str,
        bin: &Path,
        socket: &Path,
        dir: &Path,
        args: &[String],
    ) -> Self {
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let log = dir.join(format!("{name}-{}.log", admin.port()));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .env("NO_COLOR", "1")
            .args([
                "--log",
                "info,svidcar_proxy=debug",
                "proxy",
                "--agent-socket",
            ])
            .arg(socket)
            .args(["--admin-addr", &admin.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start svidcar proxy");
        let mut s = Self {
            name: name.into(),
            child: Some(child),
            admin,
            log,
            netns: netns.map(str::to_string),
        };
        s.wait_ready();
        s
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok((200, _)) = self.admin_get("/ready") {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "sidecar {} exited with {st}:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "sidecar {} not ready after 30 s:\n{}",
            self.name,
            self.log_text()
        );
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to 5 s for a log line containing all of `needles`.
    pub fn wait_log(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = self.log_text();
            if let Some(l) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return l.to_string();
            }
            if Instant::now() > deadline {
                panic!(
                    "sidecar {}: no log line with {needles:?}:\n{text}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET on the admin listener: (status, body).
    pub fn admin_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let Some(ns) = &self.netns else {
            return http_get(self.admin, path);
        };
        let url = format!("http://{}{path}", self.admin);
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "curl",
                "-s",
                "--max-time",
                "5",
                "-w",
                "\n%{http_code}",
                &url,
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        Ok((code.trim().parse().unwrap_or(0), body.to_string()))
    }

    /// `/metrics` text.
    pub fn metrics(&self) -> String {
        self.admin_get("/metrics").expect("GET /metrics").1
    }

    /// Sum of the samples of metric lines containing all of `needles`.
    pub fn metric_sum(&self, needles: &[&str]) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| !l.starts_with('#') && needles.iter().all(|n| l.contains(n)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// SIGTERM and wait; returns true on a clean exit.
    pub fn stop(&mut self) -> bool {
        super::terminate(self.child.take(), Duration::from_secs(25))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One HTTP/1.1 request on a new connection (`Connection: close`): (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A keep-alive HTTP/1.1 connection (requests one after another on the same socket).
pub struct KeepAlive {
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self {
            reader: BufReader::new(s),
        })
    }

    /// GET `path`: (status, body); needs a `Content-Length` response.
    pub fn get(&mut self, path: &str) -> std::io::Result<(u16, String)> {
        write!(
            self.reader.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"
        )?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// A sample HTTP server answering `hello from <name>` (keep-alive capable); stops on drop.
pub struct TestApp {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl TestApp {
    pub fn start(name: &str) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, body) = (stop.clone(), format!("hello from {name}\n"));
        l.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let body = body.clone();
                        std::thread::spawn(move || serve_http(s, &body));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { port, stop }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_http(s: TcpStream, body: &str) {
    let _ = s.set_nonblocking(false);
    let mut r = BufReader::new(s);
    loop {
        let mut close = false;
        let mut first = true;
        // A request target containing `/echo` gets the target back as the body (what the
        // proxy forwarded); every other request gets `body`.
        let mut echo = None;
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line.trim_end().is_empty() && !first {
                break;
            }
            if first {
                let target = line.split_whitespace().nth(1).unwrap_or("");
                if target.contains("/echo") {
                    echo = Some(format!("{target}\n"));
                }
            }
            first = false;
            if line.to_ascii_lowercase().starts_with("connection: close") {
                close = true;
            }
        }
        let body = echo.as_deref().unwrap_or(body);
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if r.get_mut().write_all(resp.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// nginx serving `index.html` = `body` on a free port (temp config), killed on drop.
pub struct Nginx {
    pub port: u16,
    child: Child,
}

impl Nginx {
    /// Starts nginx if installed (`None` otherwise).
    pub fn start(dir: &Path, body: &str) -> Option<Self> {
        let nginx = super::which("nginx")?;
        let root = dir.join("nginx");
        std::fs::create_dir_all(root.join("html")).ok()?;
        std::fs::write(root.join("html/index.html"), body).ok()?;
        let port = free_port();
        let r = root.display();
        let conf = format!(
            // One process (no master/worker pair), so killing the child leaves nothing behind.
            "master_process off;\npid {r}/nginx.pid;\nerror_log {r}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n access_log off;\n client_body_temp_path {r}/cb;\n proxy_temp_path {r}/px;\n\
             fastcgi_temp_path {r}/fc;\n uwsgi_temp_path {r}/uw;\n scgi_temp_path {r}/sc;\n\
             keepalive_requests 100000;\n\
             server {{ listen 127.0.0.1:{port}; root {r}/html; location / {{ index index.html; }} }}\n}}\n"
        );
        std::fs::write(root.join("nginx.conf"), conf).ok()?;
        let child = Command::new(nginx)
            .args(["-e", &format!("{r}/error.log"), "-p", &r.to_string(), "-c"])
            .arg(root.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Self { port, child });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA and leaf SVID of another trust domain (made with rcgen), written as PEM files:
/// returns (cert chain path, key path).
pub fn foreign_svid(dir: &Path, td: &str) -> (PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.distinguished_name.push(DnType::CommonName, "foreign CA");
    ca.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::default();
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{td}/intruder").try_into().unwrap(),
    )];
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let cert = dir.join(format!("{td}.crt"));
    let key = dir.join(format!("{td}.key"));
    std::fs::write(&cert, leaf_cert.pem() + &ca_cert.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    (cert, key)
}

/// Runs `openssl s_client` against `port` (extra args e.g. `-cert`), sending an HTTP request;
/// returns stdout+stderr.
pub fn openssl_client(port: u16, extra: &[&str]) -> String {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-tls1_3",
            "-quiet",
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        std::thread::sleep(Duration::from_millis(500));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}
