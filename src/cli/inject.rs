//! `svidcar inject` (being written).
use std::process::ExitCode;

/// `svidcar inject`.
#[derive(clap::Args)]
pub struct InjectCmd {}

impl InjectCmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        anyhow::bail!("`svidcar inject` is not implemented yet")
    }
}
