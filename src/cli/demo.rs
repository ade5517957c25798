//! `svidcar demo` (stub: to be implemented).
use std::process::ExitCode;

/// `svidcar demo`.
#[derive(clap::Args)]
pub struct DemoCmd {}

impl DemoCmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        anyhow::bail!("`svidcar demo` is not implemented yet")
    }
}
