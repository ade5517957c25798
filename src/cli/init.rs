//! `svidcar init`: install (or remove, or print) the pod's traffic interception rules.
use std::process::ExitCode;

use clap::ValueEnum;
use svidcar_proxy::init::{self, Backend, Cidr, Family, InterceptionConfig};

/// Rule backend.
#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    /// iptables-restore / ip6tables-restore on svidcar's own nat chains.
    Iptables,
    /// nft -f with one `inet svidcar` table.
    Nft,
}

/// Whether to install IPv6 rules.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Ipv6Arg {
    /// When the kernel has IPv6 addresses in this network namespace.
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

/// `svidcar init`: redirect the pod's inbound TCP to the proxy's inbound port and the
/// application's outbound TCP to its outbound port (see `svidcar_proxy::init` for the rules).
#[derive(clap::Args)]
pub struct InitCmd {
    /// Which tool installs the rules.
    #[arg(long, value_enum, default_value_t = BackendArg::Iptables)]
    backend: BackendArg,
    /// UID the proxy runs as; its connections are not captured.
    #[arg(long, default_value_t = init::DEFAULT_PROXY_UID)]
    proxy_uid: u32,
    /// The proxy's outbound listener port.
    #[arg(long, default_value_t = init::DEFAULT_OUTBOUND_PORT)]
    outbound_port: u16,
    /// The proxy's inbound listener port.
    #[arg(long, default_value_t = init::DEFAULT_INBOUND_PORT)]
    inbound_port: u16,
    /// The proxy's admin port (never captured).
    #[arg(long, default_value_t = init::DEFAULT_ADMIN_PORT)]
    admin_port: u16,
    /// Inbound ports delivered straight to the application (comma-separated).
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports not captured (comma-separated).
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    exclude_outbound_ports: Vec<u16>,
    /// Outbound destination networks not captured, IPv4 or IPv6 (comma-separated CIDRs).
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    exclude_outbound_cidrs: Vec<Cidr>,
    /// Install IPv6 rules too.
    #[arg(long, value_enum, default_value_t = Ipv6Arg::Auto)]
    ipv6: Ipv6Arg,
    /// Print the ruleset instead of applying it.
    #[arg(long)]
    dry_run: bool,
    /// Remove everything `svidcar init` installed (succeeds when nothing is installed).
    #[arg(long)]
    cleanup: bool,
}

/// Does this network namespace have IPv6 addresses? (`/proc/net/if_inet6` is per namespace.)
fn ipv6_present() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6")
        .map(|s| !s.trim().is_empty())
        .unwrap_or(false)
}

impl InitCmd {
    /// Installs, prints or removes the rules, as the flags say.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let backend = match self.backend {
            BackendArg::Iptables => Backend::Iptables,
            BackendArg::Nft => Backend::Nft,
        };
        if self.cleanup {
            if self.dry_run {
                print!("{}", init::render_cleanup(backend));
            } else {
                init::cleanup(backend)?;
                tracing::info!(%backend, "interception rules removed");
            }
            return Ok(ExitCode::SUCCESS);
        }
        let ipv6 = match self.ipv6 {
            Ipv6Arg::On => true,
            Ipv6Arg::Off => false,
            Ipv6Arg::Auto => ipv6_present(),
        };
        let config = InterceptionConfig {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            admin_port: self.admin_port,
            proxy_uid: self.proxy_uid,
            exclude_inbound_ports: self.exclude_inbound_ports,
            exclude_outbound_ports: self.exclude_outbound_ports,
            exclude_outbound_cidrs: self.exclude_outbound_cidrs,
            ipv6,
        };
        if !ipv6 && !config.outbound_cidrs(Family::V6).is_empty() {
            tracing::warn!(
                "IPv6 is off: the IPv6 networks of --exclude-outbound-cidrs are ignored"
            );
        }
        if self.dry_run {
            print!("{}", init::render(&config, backend));
            return Ok(ExitCode::SUCCESS);
        }
        init::apply(&config, backend)?;
        tracing::info!(
            %backend,
            ipv6,
            inbound_port = config.inbound_port,
            outbound_port = config.outbound_port,
            proxy_uid = config.proxy_uid,
            "interception rules installed"
        );
        Ok(ExitCode::SUCCESS)
    }
}
