//! `svidcar`: one binary for the identity agent, the sidecar proxy, the policy tools and the demo.
//! Thin: parses arguments and calls the crates. Each subcommand lives in `src/cli/<name>.rs`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod cli;

#[derive(Parser)]
#[command(
    name = "svidcar",
    version,
    about = "mTLS sidecar proxy with SPIFFE workload identity"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SVIDCAR_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. `info,svidcar_proxy=debug`.
    #[arg(long, global = true, default_value = "info", env = "SVIDCAR_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the node identity agent (SPIFFE Workload API on a unix socket, embedded CA).
    Agent(cli::agent::AgentCmd),
    /// Work with SVIDs through the Workload API (like `spire-agent api fetch`).
    Svid(cli::agent::SvidCmd),
    /// Offline upstream CA for multi-node trust: create a root, issue per-node intermediates.
    Ca(cli::ca::CaCmd),
    /// Run the sidecar proxy (inbound/outbound mTLS, policy, admin).
    Proxy(cli::proxy::ProxyCmd),
    /// Check or lint authorization policy files offline.
    Policy(cli::policy::PolicyCmd),
    /// Start an agent, two sidecars and two sample apps on loopback and show an allowed and a
    /// denied call.
    Demo(cli::demo::DemoCmd),
    /// Install, print or remove the pod's traffic interception rules (iptables or nftables).
    Init(cli::init::InitCmd),
    /// Add the svidcar sidecar to Kubernetes manifests, or serve that as a mutating webhook.
    Inject(cli::inject::InjectCmd),
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log);
    let result = match cli.command {
        Command::Agent(cmd) => cmd.run(),
        Command::Svid(cmd) => cmd.run(),
        Command::Ca(cmd) => cmd.run(),
        Command::Proxy(cmd) => cmd.run(),
        Command::Policy(cmd) => cmd.run(),
        Command::Demo(cmd) => cmd.run(),
        Command::Init(cmd) => cmd.run(),
        Command::Inject(cmd) => cmd.run(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("svidcar: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
