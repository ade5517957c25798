//! `svidcar agent` (stub: to be implemented).
use std::process::ExitCode;

/// `svidcar agent`.
#[derive(clap::Args)]
pub struct AgentCmd {}

impl AgentCmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        anyhow::bail!("`svidcar agent` is not implemented yet")
    }
}

/// `svidcar svid ...`.
#[derive(clap::Args)]
pub struct SvidCmd {}

impl SvidCmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        anyhow::bail!("`svidcar svid` is not implemented yet")
    }
}
