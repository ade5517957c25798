//! `svidcar agent` (the node identity agent) and `svidcar svid show` (fetch and print the
//! caller's SVIDs through the Workload API, like `spire-agent api fetch`).
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use svidcar_agent::agent::config::{
    format_duration, parse_federate_flag, AgentConfig, AgentFile, EntryFile, UpstreamFile,
};
use svidcar_agent::client::{self, WorkloadApiClient};

/// `svidcar agent`: serve the SPIFFE Workload API on a unix socket from an embedded CA.
///
/// Every flag overrides the same field of `--config`; `--entry` and `--federate` add to the
/// file's lists. Defaults: trust domain `svidcar.local`, socket `/tmp/svidcar/agent.sock`
/// (mode 0777 like SPIRE: attestation, not file permissions, decides who gets an identity),
/// state dir `/tmp/svidcar/agent-state` (`/var/lib/svidcar/agent` as root), SVID TTL 1h,
/// JWT-SVID TTL 5m, CA TTL 24h, health/metrics on 127.0.0.1:8088.
#[derive(clap::Args)]
pub struct AgentCmd {
    /// YAML config file (every field optional; unknown fields are errors).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Trust domain [default: svidcar.local].
    #[arg(long)]
    trust_domain: Option<String>,
    /// Workload API socket path [default: /tmp/svidcar/agent.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Socket file mode, octal [default: 0777].
    #[arg(long)]
    socket_mode: Option<String>,
    /// State directory for the CA and JWT keys (0600) and certificates [default:
    /// /tmp/svidcar/agent-state, or /var/lib/svidcar/agent when run as root].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// X.509-SVID lifetime, e.g. 1h, 30s, 500ms [default: 1h].
    #[arg(long)]
    svid_ttl: Option<String>,
    /// JWT-SVID lifetime [default: 5m].
    #[arg(long)]
    jwt_svid_ttl: Option<String>,
    /// Lifetime of the embedded root CA [default: 24h]; rotated at half life.
    #[arg(long)]
    ca_ttl: Option<String>,
    /// Registration entry `SPIFFE_ID=SELECTOR[,SELECTOR...]`, e.g.
    /// `spiffe://svidcar.local/web=unix:uid:1000` (repeatable).
    #[arg(long = "entry", value_name = "ID=SELECTORS")]
    entries: Vec<String>,
    /// Federated trust bundle `TRUST_DOMAIN=BUNDLE_FILE` (JWKS or PEM; reloaded on change).
    #[arg(long = "federate", value_name = "TD=FILE")]
    federate: Vec<String>,
    /// Upstream intermediate CA certificate (PEM; may include its chain and root).
    #[arg(long, requires = "upstream_key")]
    upstream_cert: Option<PathBuf>,
    /// Private key of the upstream intermediate (PEM).
    #[arg(long, requires = "upstream_cert")]
    upstream_key: Option<PathBuf>,
    /// Upstream root certificate(s) for the bundle, if not in --upstream-cert.
    #[arg(long, requires = "upstream_cert")]
    upstream_bundle: Option<PathBuf>,
    /// Health/metrics listener (`/live`, `/ready`, `/metrics`), or `off` [default: 127.0.0.1:8088].
    #[arg(long)]
    health_addr: Option<String>,
    /// Open connections one uid may hold on the socket; more are closed at once [default: a
    /// quarter of the open-files limit, 16 to 1024].
    #[arg(long, value_name = "N")]
    max_connections_per_uid: Option<usize>,
    /// Close a connection that sent no request within this time [default: 10s].
    #[arg(long, value_name = "DURATION")]
    first_request_timeout: Option<String>,
    /// Allow a non-loopback --health-addr (e.g. `0.0.0.0:8088` for Kubernetes probes; sets
    /// `health_allow_remote: true`).
    #[arg(long)]
    health_allow_remote: bool,
    #[command(flatten)]
    federation: Box<super::agent_federation::FederationArgs>,
    #[command(flatten)]
    k8s: Box<super::agent_k8s::K8sArgs>,
}

impl AgentCmd {
    fn merged(self) -> anyhow::Result<AgentConfig> {
        let mut f = match &self.config {
            Some(p) => AgentFile::load(p)?,
            None => AgentFile::default(),
        };
        macro_rules! over {
            ($($field:ident),*) => { $( if self.$field.is_some() { f.$field = self.$field; } )* };
        }
        over!(
            trust_domain,
            socket,
            socket_mode,
            state_dir,
            svid_ttl,
            jwt_svid_ttl,
            ca_ttl,
            health_addr,
            max_connections_per_uid,
            first_request_timeout
        );
        if self.health_allow_remote {
            f.health_allow_remote = Some(true);
        }
        for e in &self.entries {
            let (id, sels) = e.split_once('=').with_context(|| {
                format!("--entry {e:?}: expected SPIFFE_ID=SELECTOR[,SELECTOR...]")
            })?;
            f.entries.push(EntryFile {
                spiffe_id: id.to_string(),
                selectors: sels
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
                ttl: None,
                hint: None,
                federates_with: Vec::new(),
            });
        }
        self.federation.apply(&mut f)?;
        self.k8s.apply(&mut f);
        for fed in &self.federate {
            f.federation.push(parse_federate_flag(fed)?);
        }
        if let (Some(cert), Some(key)) = (self.upstream_cert, self.upstream_key) {
            f.upstream = Some(UpstreamFile {
                cert,
                key,
                bundle: self.upstream_bundle,
            });
        }
        Ok(AgentConfig::from_file(f)?)
    }

    /// Runs the agent until SIGTERM or SIGINT.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let config = self.merged()?;
        let auto_k8s = config
            .k8s
            .as_ref()
            .is_some_and(|k| k.config().auto_identity.is_some());
        if config.entries.is_empty() && !auto_k8s {
            tracing::warn!("no registration entries: every caller will get PERMISSION_DENIED");
        }
        // Every connection to the socket holds a descriptor; the usual soft limit (1024) is
        // below what one local user could open (capped per uid, see max_connections_per_uid).
        match svidcar_proxy::sys::raise_nofile_limit() {
            Ok((old, new)) if new > old => {
                tracing::info!(from = old, to = new, "raised the open-files limit")
            }
            Ok((_, new)) => tracing::info!(limit = new, "open-files limit"),
            Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
        }
        tracing::info!(trust_domain = %config.trust_domain, svid_ttl = %format_duration(config.svid_ttl),
            ca_ttl = %format_duration(config.ca_ttl), state_dir = %config.state_dir.display(), "starting agent");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let shutdown = async move {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
                }
            };
            svidcar_agent::agent::run(config, shutdown).await?;
            anyhow::Ok(ExitCode::SUCCESS)
        })
    }
}

/// `svidcar svid ...`: work with SVIDs through the Workload API.
#[derive(clap::Args)]
pub struct SvidCmd {
    #[command(subcommand)]
    cmd: SvidSub,
}

#[derive(clap::Subcommand)]
enum SvidSub {
    /// Fetch and print the caller's SVIDs (ID, hint, serial, expiry, chain, bundles; never keys).
    Show(ShowArgs),
}

#[derive(clap::Args)]
struct ShowArgs {
    /// Workload API socket (unix:///path, unix:/path or a path) [default: $SPIFFE_ENDPOINT_SOCKET
    /// or /tmp/svidcar/agent.sock].
    #[arg(long)]
    socket: Option<String>,
    /// Write svid.pem (chain), key.pem (0600) and bundle.pem of the default SVID into DIR.
    #[arg(long, value_name = "DIR")]
    write: Option<PathBuf>,
    /// Also fetch a JWT-SVID for this audience and print it.
    #[arg(long, value_name = "AUD")]
    jwt_audience: Option<String>,
}

impl SvidCmd {
    /// Runs the subcommand.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let SvidSub::Show(args) = self.cmd;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(show(args))
    }
}

async fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let socket = match &args.socket {
        Some(s) => client::parse_socket_addr(s)?,
        None => {
            client::default_socket().unwrap_or_else(|| PathBuf::from("/tmp/svidcar/agent.sock"))
        }
    };
    let mut c = WorkloadApiClient::connect(&socket).await?;
    let ctx = c.fetch_x509_context().await?;
    let now = SystemTime::now();
    for (i, s) in ctx.svids.iter().enumerate() {
        let left = s
            .not_after
            .duration_since(now)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        println!("SVID {i}");
        println!("  SPIFFE ID:  {}", s.id);
        println!("  hint:       {}", s.hint);
        println!("  serial:     {}", s.serial_hex());
        println!(
            "  not after:  {} ({}s left)",
            client::format_utc(s.not_after),
            left
        );
        println!("  chain:      {} certificate(s)", s.chain.len());
    }
    let mut tds: Vec<String> = ctx
        .bundles
        .iter()
        .map(|b| {
            format!(
                "{} ({} CA)",
                b.trust_domain.name(),
                b.x509_authorities.len()
            )
        })
        .collect();
    tds.sort();
    println!("bundles:      {}", tds.join(", "));
    if let Some(aud) = &args.jwt_audience {
        for t in c.fetch_jwt_svid(std::slice::from_ref(aud), None).await? {
            println!("JWT-SVID {} (aud {aud}):\n  {}", t.id, t.token);
        }
    }
    if let Some(dir) = &args.write {
        let svid = ctx.default_svid().context("the agent returned no SVID")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let chain: String = svid
            .chain
            .iter()
            .map(|c| client::to_pem("CERTIFICATE", c))
            .collect();
        let bundle: String = ctx
            .bundles
            .get(&svid.id.trust_domain())
            .map(|b| {
                b.x509_authorities
                    .iter()
                    .map(|c| client::to_pem("CERTIFICATE", c))
                    .collect()
            })
            .unwrap_or_default();
        client::write_private_file(
            &dir.join("key.pem"),
            client::to_pem("PRIVATE KEY", svid.key.secret_pkcs8_der()).as_bytes(),
        )?;
        std::fs::write(dir.join("svid.pem"), chain)?;
        std::fs::write(dir.join("bundle.pem"), bundle)?;
        println!(
            "wrote {0}/svid.pem, {0}/key.pem, {0}/bundle.pem",
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
