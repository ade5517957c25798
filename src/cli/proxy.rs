//! `svidcar proxy` (stub: to be implemented).
use std::process::ExitCode;

/// `svidcar proxy`.
#[derive(clap::Args)]
pub struct ProxyCmd {}

impl ProxyCmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        anyhow::bail!("`svidcar proxy` is not implemented yet")
    }
}
