//! `svidcar demo`: the whole system on loopback in one command, no root needed.
//!
//! Starts (as child processes of this same binary) an identity agent with an embedded CA and two
//! sidecars, plus a sample HTTP app in-process; shows the two identities, an allowed call through
//! both sidecars over mTLS, and two refused ones; then shuts everything down.
//! The sidecars get different identities because they run from two different paths (hard links
//! of this binary) and the agent's entries select on `unix:path:`.
use std::io::Read as _;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use svidcar_agent::tls::{ExpectedPeer, SpiffeServerVerifier};
use svidcar_agent::SpiffeId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TD: &str = "demo.svidcar";

/// `svidcar demo`: agent + two sidecars + sample apps on loopback; an allowed and refused calls.
#[derive(clap::Args)]
pub struct DemoCmd {
    /// Keep the temporary directory (logs of the agent and sidecars) instead of deleting it.
    #[arg(long)]
    keep: bool,
}

struct Procs {
    children: Vec<(String, Child)>,
}

impl Procs {
    fn stop_all(&mut self) {
        for (name, child) in self.children.iter_mut().rev() {
            let pid = child.id().to_string();
            let termed = Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !termed {
                let _ = child.kill();
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        println!("  (had to kill {name})");
                        break;
                    }
                }
            }
        }
        self.children.clear();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Hard-links (or copies) the binary to `dir/name` so attestation sees a distinct path.
fn link_binary(exe: &Path, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let to = dir.join(name);
    if std::fs::hard_link(exe, &to).is_err() {
        std::fs::copy(exe, &to)
            .with_context(|| format!("copying {} to {}", exe.display(), to.display()))?;
    }
    Ok(to)
}

fn spawn(
    procs: &mut Procs,
    name: &str,
    program: &Path,
    args: &[String],
    log: &Path,
) -> anyhow::Result<()> {
    let out = std::fs::File::create(log)?;
    let child = Command::new(program)
        .args(args)
        .env("SVIDCAR_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    procs.children.push((name.to_string(), child));
    Ok(())
}

/// Minimal blocking HTTP GET against the admin endpoint: (status, body).
fn admin_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::Write as _;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
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

fn wait_ready(
    name: &str,
    admin: SocketAddr,
    procs: &mut Procs,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, _)) = admin_get(admin, "/ready") {
            let (_, body) = admin_get(admin, "/config")?;
            return Ok(serde_json::from_str(&body)?);
        }
        for (n, c) in procs.children.iter_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                bail!("{n} exited early ({st}); see its log");
            }
        }
        if Instant::now() > deadline {
            bail!("{name} did not become ready within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The sample app: a tiny HTTP/1.1 server that answers every request with a greeting.
async fn sample_app(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let body = "hello from the backend app\n";
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// Plain `GET /` over TCP; the whole answer.
async fn http_get(addr: SocketAddr) -> anyhow::Result<String> {
    get_on(TcpStream::connect(addr).await?).await
}

/// `GET /` with `Connection: close` on an open stream; the whole answer (10 s at most).
async fn get_on<S>(mut s: S) -> anyhow::Result<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(b"GET / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
        .await?;
    let mut resp = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut resp)).await??;
    Ok(resp)
}

/// A TLS client that verifies the backend's SVID but presents no certificate of its own.
async fn tls_without_client_cert(
    addr: SocketAddr,
    bundles: Arc<svidcar_agent::BundleSet>,
    backend: &SpiffeId,
) -> anyhow::Result<String> {
    let verifier = SpiffeServerVerifier::new(bundles, ExpectedPeer::Id(backend.clone()));
    let mut config = rustls::ClientConfig::builder_with_provider(svidcar_agent::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![svidcar_agent::tls::ALPN_SVIDCAR.to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    get_on(tls).await
}

/// The last access-log reason in a sidecar log.
fn last_reason(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| l.contains("connection refused"))
        .and_then(|l| l.split_once("reason=").map(|(_, r)| r))
        .map(|r| {
            let r = r.trim_start_matches('"');
            r.split('"').next().unwrap_or(r).to_string()
        })
        .unwrap_or_else(|| "(no reason found in the log)".into())
}

fn metric(admin: SocketAddr, needle: &str) -> String {
    admin_get(admin, "/metrics")
        .map(|(_, b)| {
            b.lines()
                .filter(|l| l.contains(needle) && !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

fn step(n: u32, text: impl std::fmt::Display) {
    println!("[{n}] {text}");
}

/// Step `n` for a call the backend sidecar must refuse: `REFUSED  {call} (why); sidecar
/// reason: …` when it failed or got no answer, `UNEXPECTED: {caller} got …` when it was
/// answered. True when refused.
fn expect_refused(
    n: u32,
    result: anyhow::Result<String>,
    caller: &str,
    call: &str,
    backend_log: &Path,
) -> bool {
    match result {
        Ok(resp) if !resp.is_empty() => {
            step(
                n,
                format!("UNEXPECTED: {caller} got {:?}", resp.lines().next()),
            );
            false
        }
        r => {
            // Give the sidecar time to log the refusal.
            std::thread::sleep(Duration::from_millis(200));
            let why = r
                .err()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "closed".into());
            step(
                n,
                format!(
                    "REFUSED  {call} ({why}); sidecar reason: {}",
                    last_reason(backend_log)
                ),
            );
            true
        }
    }
}

impl DemoCmd {
    /// Runs the demo; exit 0 when the allowed call succeeded and both refused calls were refused.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let dir = std::env::temp_dir().join(format!("svidcar-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let result = self.run_in(&dir);
        if self.keep || !matches!(result, Ok(true)) {
            println!("logs kept in {}", dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(if result? {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }

    fn run_in(&self, dir: &Path) -> anyhow::Result<bool> {
        let exe = std::env::current_exe()?.canonicalize()?;
        let frontend_bin = link_binary(&exe, dir, "frontend-proxy")?;
        let backend_bin = link_binary(&exe, dir, "backend-proxy")?;
        let intruder_bin = link_binary(&exe, dir, "intruder-proxy")?;
        let sock = dir.join("agent.sock");
        let mut procs = Procs {
            children: Vec::new(),
        };

        let frontend_id = format!("spiffe://{TD}/frontend");
        let backend_id = format!("spiffe://{TD}/backend");
        let args: Vec<String> = vec![
            "agent".into(),
            "--trust-domain".into(),
            TD.into(),
            "--socket".into(),
            sock.display().to_string(),
            "--state-dir".into(),
            dir.join("agent-state").display().to_string(),
            "--health-addr".into(),
            "off".into(),
            "--entry".into(),
            format!("{frontend_id}=unix:path:{}", frontend_bin.display()),
            "--entry".into(),
            format!("{backend_id}=unix:path:{}", backend_bin.display()),
            "--entry".into(),
            format!(
                "spiffe://{TD}/intruder=unix:path:{}",
                intruder_bin.display()
            ),
            "--entry".into(),
            format!("spiffe://{TD}/demo-cli=unix:path:{}", exe.display()),
        ];
        spawn(&mut procs, "agent", &exe, &args, &dir.join("agent.log"))?;
        step(
            1,
            format!(
                "identity agent started: trust domain {TD}, embedded CA, socket {}",
                sock.display()
            ),
        );

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let app = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let app_port = app.local_addr()?.port();
        rt.spawn(sample_app(app));
        step(
            2,
            format!("sample backend app (HTTP) listening on 127.0.0.1:{app_port}"),
        );

        let (inbound_port, outbound_port) = (free_port()?, free_port()?);
        let (backend_admin, frontend_admin): (SocketAddr, SocketAddr) = (
            ([127, 0, 0, 1], free_port()?).into(),
            ([127, 0, 0, 1], free_port()?).into(),
        );
        let backend_log = dir.join("backend-proxy.log");
        let policy = dir.join("backend-policy.yaml");
        std::fs::write(
            &policy,
            format!(
                "apiVersion: svidcar.io/v1alpha1\nkind: PolicySet\npolicies:\n\
                 - name: frontend-only\n  direction: inbound\n  action: allow\n  \
                 rules: [{{ from: [{{ spiffeIds: [\"{frontend_id}\"] }}] }}]\n"
            ),
        )?;
        let args: Vec<String> = vec![
            "proxy".into(),
            "--agent-socket".into(),
            sock.display().to_string(),
            "--admin-addr".into(),
            backend_admin.to_string(),
            "--inbound".into(),
            format!("127.0.0.1:{inbound_port}={app_port}:strict"),
            "--policy".into(),
            policy.display().to_string(),
        ];
        spawn(
            &mut procs,
            "backend-proxy",
            &backend_bin,
            &args,
            &backend_log,
        )?;
        let args: Vec<String> = vec![
            "proxy".into(),
            "--agent-socket".into(),
            sock.display().to_string(),
            "--admin-addr".into(),
            frontend_admin.to_string(),
            "--outbound".into(),
            format!("127.0.0.1:{outbound_port}=127.0.0.1:{inbound_port},{backend_id}"),
        ];
        spawn(
            &mut procs,
            "frontend-proxy",
            &frontend_bin,
            &args,
            &dir.join("frontend-proxy.log"),
        )?;
        let b = wait_ready("backend-proxy", backend_admin, &mut procs)?;
        let f = wait_ready("frontend-proxy", frontend_admin, &mut procs)?;
        let show = |c: &serde_json::Value| {
            format!(
                "{} (serial {}, valid {} s more)",
                c["svid"]["spiffe_id"].as_str().unwrap_or("?"),
                c["svid"]["serial"].as_str().unwrap_or("?"),
                c["svid"]["expires_in_seconds"]
            )
        };
        step(3, format!("backend sidecar ready: mTLS 127.0.0.1:{inbound_port} (strict) -> app :{app_port}, identity {}", show(&b)));
        step(4, format!("frontend sidecar ready: plaintext 127.0.0.1:{outbound_port} -> mTLS 127.0.0.1:{inbound_port}, identity {}", show(&f)));

        let mut ok = true;
        let outbound: SocketAddr = ([127, 0, 0, 1], outbound_port).into();
        let inbound: SocketAddr = ([127, 0, 0, 1], inbound_port).into();
        match rt.block_on(http_get(outbound)) {
            Ok(resp) if resp.starts_with("HTTP/1.1 200") => {
                let body = resp
                    .split_once("\r\n\r\n")
                    .map(|(_, b)| b.trim())
                    .unwrap_or("");
                step(5, format!("ALLOWED  client -> frontend sidecar -> mTLS -> backend sidecar -> app: HTTP 200 {body:?}"));
            }
            Ok(resp) => {
                ok = false;
                step(
                    5,
                    format!(
                        "UNEXPECTED: allowed call answered {:?}",
                        resp.lines().next()
                    ),
                );
            }
            Err(e) => {
                ok = false;
                step(5, format!("UNEXPECTED: allowed call failed: {e}"));
            }
        }

        let ctx = rt.block_on(async {
            let mut c = svidcar_agent::client::WorkloadApiClient::connect(&sock).await?;
            c.fetch_x509_context().await
        });
        let backend = SpiffeId::parse(&backend_id)?;
        match ctx {
            Ok(ctx) => {
                let r = rt.block_on(tls_without_client_cert(
                    inbound,
                    Arc::new(ctx.bundles),
                    &backend,
                ));
                ok &= expect_refused(
                    6,
                    r,
                    "TLS client without a certificate",
                    "TLS client without a client certificate -> backend sidecar",
                    &backend_log,
                );
            }
            Err(e) => step(
                6,
                format!("(skipped the no-certificate call: demo could not fetch the bundle: {e})"),
            ),
        }

        ok &= expect_refused(
            7,
            rt.block_on(http_get(inbound)),
            "plaintext on the strict port",
            "plaintext HTTP -> backend sidecar strict port",
            &backend_log,
        );
        // A valid mesh identity of our own trust domain that the backend's policy does not allow.
        let (intruder_port, intruder_admin) = (
            free_port()?,
            SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        );
        let args: Vec<String> = vec![
            "proxy".into(),
            "--agent-socket".into(),
            sock.display().to_string(),
            "--admin-addr".into(),
            intruder_admin.to_string(),
            "--outbound".into(),
            format!("127.0.0.1:{intruder_port}=127.0.0.1:{inbound_port},{backend_id}"),
        ];
        spawn(
            &mut procs,
            "intruder-proxy",
            &intruder_bin,
            &args,
            &dir.join("intruder-proxy.log"),
        )?;
        wait_ready("intruder-proxy", intruder_admin, &mut procs)?;
        ok &= expect_refused(
            8,
            rt.block_on(http_get(([127, 0, 0, 1], intruder_port).into())),
            &format!("spiffe://{TD}/intruder"),
            &format!("spiffe://{TD}/intruder (valid mTLS, not allowed by policy frontend-only) -> backend sidecar"),
            &backend_log,
        );
        step(
            9,
            format!(
                "backend metrics: {}; {}",
                metric(backend_admin, "handshake_failures"),
                metric(backend_admin, "decisions")
            ),
        );

        procs.stop_all();
        rt.shutdown_timeout(Duration::from_secs(1));
        step(10, "stopped the sidecars and the agent (SIGTERM, drained)");
        println!("{}", if ok { "demo OK" } else { "demo FAILED" });
        Ok(ok)
    }
}
