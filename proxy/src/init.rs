//! `svidcar init`: the pod's traffic interception rules.
//!
//! Rendering is a pure function ([`InterceptionConfig`] in, ruleset text out: see
//! [`render`]); applying and removing the rules runs `iptables-restore` / `ip6tables-restore`
//! or `nft -f` once per address family, so each family changes in one atomic transaction
//! (see [`apply`]).
//!
//! # What is captured (the same for both backends)
//!
//! * **Inbound**: every TCP connection arriving at the pod (nat `PREROUTING`) is redirected to
//!   the proxy's inbound port ([`DEFAULT_INBOUND_PORT`]), except the excluded inbound ports,
//!   which always include the proxy's own admin port ([`DEFAULT_ADMIN_PORT`]) and inbound port.
//!   The outbound port is deliberately *not* excluded: a peer connecting to `pod:15001` lands on
//!   the inbound listener (and its policy), so the outbound listener can never be used from
//!   outside the pod as an open relay.
//! * **Outbound**: every TCP connection opened by a process of the pod (nat `OUTPUT`) is
//!   redirected to the outbound port ([`DEFAULT_OUTBOUND_PORT`]), except:
//!   1. connections from [`INBOUND_PASSTHROUGH_SOURCE_V4`] over `lo`: the proxy forwarding an
//!      accepted inbound connection to the application;
//!   2. connections of the proxy's UID ([`DEFAULT_PROXY_UID`]) — except those to the pod's own
//!      IP over `lo`, which go to the inbound port (see *Loopback* below);
//!   3. connections of the application over `lo` (to `127.0.0.1`, `::1`, or its own pod IP);
//!   4. excluded outbound CIDRs and ports.
//!
//! # Loopback (the Istio choice)
//!
//! Traffic of the application to loopback, or to its own pod IP (which the kernel routes over
//! `lo`), is never captured: an application talking to itself stays plaintext and local.
//! The proxy's own connections to the pod IP over `lo` (a mesh call whose chosen endpoint is this
//! very pod) are redirected to the *inbound* port, so they are authenticated and authorized like
//! any other inbound call. Connections to `127.0.0.1` / `::1` are never redirected.
//!
//! # What the proxy must honour
//!
//! * listen inbound on [`DEFAULT_INBOUND_PORT`] on all addresses (`0.0.0.0` / `[::]`):
//!   `PREROUTING` redirection targets the address of the receiving interface;
//! * listen outbound on [`DEFAULT_OUTBOUND_PORT`] on loopback (`127.0.0.1` and `::1`): `OUTPUT`
//!   redirection targets the loopback address; read the original destination with
//!   `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`;
//! * run as [`DEFAULT_PROXY_UID`] (its connections are not captured);
//! * bind the source address [`INBOUND_PASSTHROUGH_SOURCE_V4`] (`127.0.0.6`) before connecting
//!   to the application (`127.0.0.1:<original port>`) when forwarding inbound traffic;
//! * with IPv6 rules, also listen on `[::1]:15001` (or `[::]` dual-stack) and `[::]:15006`;
//! * refuse a connection whose original destination port is one of its own ports (a peer
//!   dialing `pod:15006` directly, or `pod:15001` redirected to inbound): that is a loop.
//!
//! The proxy honours all of these (`inbound.rs` connects to the app from `127.0.0.6`,
//! `server.rs` adds the IPv6 twins of the transparent listeners, both directions refuse
//! [`is_proxy_port`] destinations); `tests/k8s_two_pods.rs` checks them end to end.
#![forbid(unsafe_code)]

mod apply;
mod cidr;
mod iptables;
mod nft;

use std::fmt;
use std::net::Ipv4Addr;

pub use apply::{apply, cleanup, ApplyError};
pub use cidr::{Cidr, CidrError};

/// The proxy's outbound listener port: outbound TCP of the application is redirected here.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// The proxy's inbound listener port: inbound TCP to the pod is redirected here.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// The proxy's admin listener (`/ready`, `/live`, `/metrics`): never redirected.
pub const DEFAULT_ADMIN_PORT: u16 = 15000;
/// The UID the proxy runs as: its own connections are not captured.
pub const DEFAULT_PROXY_UID: u32 = 1337;
/// The loopback source address the proxy binds when it forwards an inbound connection to the
/// application. Connections from this source over `lo` are never captured, so the proxy's
/// forwarding is never redirected back into itself (the same constant as Istio's).
pub const INBOUND_PASSTHROUGH_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// True for the proxy's own default ports (admin, outbound, inbound): a redirected connection
/// whose original destination is one of them would loop through the proxy, so it is refused.
pub fn is_proxy_port(port: u16) -> bool {
    matches!(
        port,
        DEFAULT_ADMIN_PORT | DEFAULT_OUTBOUND_PORT | DEFAULT_INBOUND_PORT
    )
}

/// Nat-table chain names of the iptables backend (created, flushed and deleted by svidcar only).
pub const IPTABLES_CHAINS: [&str; 4] = [
    "SVIDCAR_INBOUND",
    "SVIDCAR_IN_REDIRECT",
    "SVIDCAR_OUTPUT",
    "SVIDCAR_REDIRECT",
];
/// Name of the `inet` table of the nftables backend (deleted and recreated as a whole).
pub const NFT_TABLE: &str = "svidcar";

/// Which tool installs the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-restore` / `ip6tables-restore` with `--noflush`, on svidcar's own nat chains.
    Iptables,
    /// `nft -f` with one `inet svidcar` table.
    Nft,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Iptables => "iptables",
            Backend::Nft => "nft",
        })
    }
}

/// Everything the rules depend on. Build with [`InterceptionConfig::default`] and adjust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptionConfig {
    /// Outbound redirection target port.
    pub outbound_port: u16,
    /// Inbound redirection target port.
    pub inbound_port: u16,
    /// The proxy's admin port (always excluded from inbound capture).
    pub admin_port: u16,
    /// UID of the proxy process.
    pub proxy_uid: u32,
    /// Extra inbound ports left alone (delivered straight to the application).
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination networks left alone (IPv4 and IPv6 mixed; each lands in its family).
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Also install IPv6 rules.
    pub ipv6: bool,
}

impl Default for InterceptionConfig {
    fn default() -> Self {
        InterceptionConfig {
            outbound_port: DEFAULT_OUTBOUND_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
            admin_port: DEFAULT_ADMIN_PORT,
            proxy_uid: DEFAULT_PROXY_UID,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            ipv6: false,
        }
    }
}

impl InterceptionConfig {
    /// Inbound ports never redirected: the admin port, the inbound port itself, then the
    /// configured ones; sorted, without duplicates.
    pub fn effective_inbound_exclusions(&self) -> Vec<u16> {
        let mut ports = vec![self.admin_port, self.inbound_port];
        ports.extend(&self.exclude_inbound_ports);
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Outbound ports never redirected, sorted, without duplicates.
    pub fn effective_outbound_port_exclusions(&self) -> Vec<u16> {
        let mut ports = self.exclude_outbound_ports.clone();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Excluded outbound networks of one family, in the configured order, without duplicates.
    pub fn outbound_cidrs(&self, family: Family) -> Vec<Cidr> {
        let mut out: Vec<Cidr> = Vec::new();
        for c in &self.exclude_outbound_cidrs {
            if c.family() == family && !out.contains(c) {
                out.push(*c);
            }
        }
        out
    }
}

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// The ruleset text for one backend: what `--dry-run` prints and what [`apply`] feeds to the
/// tools (the iptables text lists IPv4 then, if enabled, IPv6, each under a comment header).
pub fn render(config: &InterceptionConfig, backend: Backend) -> String {
    match backend {
        Backend::Iptables => {
            let mut out = String::from("# iptables-restore --noflush (IPv4)\n");
            out.push_str(&iptables::render(config, Family::V4));
            if config.ipv6 {
                out.push_str("# ip6tables-restore --noflush (IPv6)\n");
                out.push_str(&iptables::render(config, Family::V6));
            }
            out
        }
        Backend::Nft => nft::render(config),
    }
}

/// The text that removes everything svidcar installed (for `--cleanup --dry-run`). For the
/// iptables backend, the actual jump deletions depend on what is installed; see [`cleanup`].
pub fn render_cleanup(backend: Backend) -> String {
    match backend {
        Backend::Iptables => iptables::render_cleanup(&iptables::jump_rules()),
        Backend::Nft => nft::render_cleanup(),
    }
}
