//! One file per subcommand; each exposes a clap `…Cmd` with `fn run(self) -> Result<ExitCode>`.
pub mod agent;
pub mod agent_federation;
pub mod agent_k8s;
pub mod ca;
pub mod demo;
pub mod init;
pub mod inject;
pub mod policy;
pub mod policy_observe;
pub mod proxy;
