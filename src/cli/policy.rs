//! `svidcar policy` (stub: to be implemented).
use std::process::ExitCode;

/// `svidcar policy`.
#[derive(clap::Args)]
pub struct PolicyCmd {}

impl PolicyCmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        anyhow::bail!("`svidcar policy` is not implemented yet")
    }
}
