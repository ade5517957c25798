//! `svidcar inject`: add the svidcar sidecar to Kubernetes manifests, or serve the same
//! injection as a mutating admission webhook (`--webhook`).
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::ValueEnum;
use svidcar_proxy::inject::{self, manifest, webhook, InitBackend, InjectConfig, SocketVolume};

/// Backend of the injected `svidcar init`.
#[derive(Clone, Copy, ValueEnum)]
enum InitBackendArg {
    /// iptables-restore (the init image must ship iptables).
    Iptables,
    /// nft (the init image must ship nftables).
    Nft,
}

/// `svidcar inject`.
#[derive(clap::Args)]
pub struct InjectCmd {
    /// Manifest file to inject (`-` for standard input); the result goes to standard output.
    #[arg(short = 'f', long = "filename", required_unless_present = "webhook")]
    filename: Option<String>,
    /// Proxy image (also used for the init container); `svidcar.io/proxy-image` overrides it.
    #[arg(long, default_value = inject::DEFAULT_IMAGE)]
    image: String,
    /// Host directory of the agent's socket, mounted read-only into the sidecar.
    #[arg(long, default_value = inject::DEFAULT_AGENT_SOCKET_DIR)]
    agent_socket_dir: String,
    /// Take the agent socket from this CSI driver instead of a hostPath directory.
    #[arg(long)]
    csi_driver: Option<String>,
    /// Backend of the injected `svidcar init`.
    #[arg(long, value_enum, default_value_t = InitBackendArg::Iptables)]
    init_backend: InitBackendArg,
    /// Sidecar arguments, replacing the default (`proxy --transparent --admin-addr
    /// 0.0.0.0:15000 --admin-allow-remote`); repeat for each argument.
    #[arg(long = "proxy-arg", allow_hyphen_values = true)]
    proxy_args: Vec<String>,
    /// Serve a mutating admission webhook (HTTPS) instead of rewriting a file.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    webhook: bool,
    /// Webhook listen address.
    #[arg(long, default_value = "0.0.0.0:9443")]
    listen: SocketAddr,
    /// Webhook TLS certificate chain (PEM).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Webhook TLS private key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// On SIGTERM/SIGINT, keep serving this many seconds before exiting.
    #[arg(long, default_value_t = 5)]
    drain_seconds: u64,
}

/// Installs the SIGTERM and SIGINT handlers now (so no signal is missed) and returns a future
/// that resolves on the first of them.
fn terminated() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    })
}

impl InjectCmd {
    fn config(&self) -> InjectConfig {
        InjectConfig {
            image: self.image.clone(),
            socket_volume: match &self.csi_driver {
                Some(driver) => SocketVolume::Csi(driver.clone()),
                None => SocketVolume::HostPath(self.agent_socket_dir.clone()),
            },
            proxy_args: if self.proxy_args.is_empty() {
                inject::default_proxy_args()
            } else {
                self.proxy_args.clone()
            },
            init_backend: match self.init_backend {
                InitBackendArg::Iptables => InitBackend::Iptables,
                InitBackendArg::Nft => InitBackend::Nft,
            },
        }
    }

    /// Rewrites the manifest to standard output, or serves the webhook until SIGTERM.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let config = self.config();
        if self.webhook {
            let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
                anyhow::bail!("--webhook needs --tls-cert and --tls-key");
            };
            let tls = webhook::load_tls(cert, key)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let drain = std::time::Duration::from_secs(self.drain_seconds);
            runtime.block_on(async move {
                let stop = terminated()?;
                let serve = webhook::serve(self.listen, tls, config);
                tokio::pin!(serve);
                tokio::select! {
                    result = &mut serve => result,
                    _ = async {
                        stop.await;
                        // Endpoints are removed while we are told to stop: keep answering
                        // for a while so no admission request hits a closed port.
                        tracing::info!(drain_seconds = drain.as_secs(), "stopping after the drain");
                        tokio::time::sleep(drain).await;
                    } => Ok(()),
                }
                .map_err(anyhow::Error::from)
            })?;
            return Ok(ExitCode::SUCCESS);
        }
        let filename = self.filename.as_deref().unwrap_or("-");
        let input = if filename == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("cannot read standard input")?;
            s
        } else {
            std::fs::read_to_string(filename).with_context(|| format!("cannot read {filename}"))?
        };
        let (output, outcomes) = manifest::inject_yaml(&input, &config)?;
        for o in &outcomes {
            match &o.skipped {
                None => tracing::info!(document = o.index, object = %o.object, "injected"),
                Some(reason) => {
                    tracing::info!(document = o.index, object = %o.object, reason, "unchanged")
                }
            }
        }
        print!("{output}");
        Ok(ExitCode::SUCCESS)
    }
}
