//! `svidcar ca`: the offline upstream CA for multi-node trust. `ca init` creates a root for a
//! trust domain, `ca issue` a per-node intermediate that `svidcar agent --upstream-cert
//! --upstream-key --upstream-bundle` loads, so every node shares one trust domain.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use svidcar_agent::agent::config::parse_duration;
use svidcar_agent::agent::upstream_ca::{
    create_private_dir, create_root, issue_intermediate, read_text, write_file,
};
use svidcar_agent::TrustDomain;

/// `svidcar ca`: create a root and per-node intermediates (run offline, keep the root key safe).
#[derive(clap::Args)]
pub struct CaCmd {
    #[command(subcommand)]
    action: CaAction,
}

#[derive(clap::Subcommand)]
enum CaAction {
    /// Create a P-256 root for a trust domain: OUT/root-cert.pem and OUT/root-key.pem (0600).
    Init(InitArgs),
    /// Issue a node intermediate signed by the root (cA, pathLen 0, URI SAN spiffe://TD):
    /// OUT/<NODE>-cert.pem, OUT/<NODE>-key.pem (0600) and OUT/root-cert.pem (the bundle).
    Issue(IssueArgs),
}

#[derive(clap::Args)]
struct InitArgs {
    /// Trust domain, e.g. `example.org`.
    #[arg(long)]
    trust_domain: String,
    /// Output directory (created 0700).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Root lifetime: `10y`, `3650d`, `720h`, ...
    #[arg(long, default_value = "10y")]
    ttl: String,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct IssueArgs {
    /// Directory with root-cert.pem and root-key.pem (from `svidcar ca init`).
    #[arg(long, value_name = "DIR")]
    root_dir: PathBuf,
    /// Trust domain; must be the root's.
    #[arg(long)]
    trust_domain: String,
    /// Node name (file names and subject), e.g. the Kubernetes node name.
    #[arg(long)]
    node: String,
    /// Output directory (created 0700).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Intermediate lifetime, capped at the root's: `30d`, `720h`, ...
    #[arg(long, default_value = "30d")]
    ttl: String,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

/// Reads `10y` (365-day years) besides the agent's duration syntax.
fn parse_ttl(s: &str) -> anyhow::Result<Duration> {
    if let Some(years) = s.trim().strip_suffix('y') {
        let y: u64 = years
            .parse()
            .with_context(|| format!("invalid TTL {s:?}"))?;
        anyhow::ensure!(y > 0 && y <= 100, "invalid TTL {s:?}: 1y to 100y");
        return Ok(Duration::from_secs(y * 365 * 86400));
    }
    Ok(parse_duration(s)?)
}

fn trust_domain(s: &str) -> anyhow::Result<TrustDomain> {
    TrustDomain::parse(s).with_context(|| format!("invalid trust domain {s:?}"))
}

/// "N days" (or hours, under two days) from now until `t`.
fn lifetime(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::now())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if secs >= 2 * 86400 {
        format!("{} days", (secs + 43_200) / 86400)
    } else {
        format!("{} hours", (secs + 1800) / 3600)
    }
}

impl CaCmd {
    /// Runs `ca init` or `ca issue`; prints the written paths (never a key).
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.action {
            CaAction::Init(a) => {
                let td = trust_domain(&a.trust_domain)?;
                let root = create_root(&td, parse_ttl(&a.ttl)?, SystemTime::now())?;
                create_private_dir(&a.out)?;
                let (cert, key) = (a.out.join("root-cert.pem"), a.out.join("root-key.pem"));
                for p in [&cert, &key] {
                    anyhow::ensure!(
                        a.force || !p.exists(),
                        "{} already exists; refusing to overwrite it (use --force)",
                        p.display()
                    );
                }
                write_file(&key, root.key_pem.as_bytes(), 0o600, a.force)?;
                write_file(&cert, root.cert_pem.as_bytes(), 0o644, a.force)?;
                println!(
                    "root for spiffe://{} valid for {}\n  certificate: {}\n  private key: {} (0600; keep it offline)",
                    td.name(),
                    lifetime(root.not_after),
                    cert.display(),
                    key.display()
                );
            }
            CaAction::Issue(a) => {
                let td = trust_domain(&a.trust_domain)?;
                let root_cert_path = a.root_dir.join("root-cert.pem");
                let root_cert = read_text(&root_cert_path)?;
                let root_key = read_text(&a.root_dir.join("root-key.pem"))?;
                let int = issue_intermediate(
                    &root_cert,
                    &root_key,
                    &td,
                    &a.node,
                    parse_ttl(&a.ttl)?,
                    SystemTime::now(),
                )?;
                create_private_dir(&a.out)?;
                let cert = a.out.join(format!("{}-cert.pem", a.node));
                let key = a.out.join(format!("{}-key.pem", a.node));
                let bundle = a.out.join("root-cert.pem");
                for p in [&cert, &key] {
                    anyhow::ensure!(
                        a.force || !p.exists(),
                        "{} already exists; refusing to overwrite it (use --force)",
                        p.display()
                    );
                }
                // The bundle copy may already be there from another node: fine if identical.
                let same_bundle =
                    std::fs::read_to_string(&bundle).ok().as_deref() == Some(root_cert.as_str());
                if !same_bundle {
                    write_file(&bundle, root_cert.as_bytes(), 0o644, a.force)?;
                }
                write_file(&key, int.key_pem.as_bytes(), 0o600, a.force)?;
                write_file(&cert, int.cert_pem.as_bytes(), 0o644, a.force)?;
                println!(
                    "intermediate for node {} in spiffe://{} valid for {}\n  certificate: {}  (--upstream-cert)\n  private key: {}  (--upstream-key, 0600)\n  root:        {}  (--upstream-bundle)",
                    a.node,
                    td.name(),
                    lifetime(int.not_after),
                    cert.display(),
                    key.display(),
                    bundle.display()
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
