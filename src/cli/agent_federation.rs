//! `svidcar agent` flags for SPIFFE federation over bundle endpoints (flattened into
//! [`AgentCmd`](crate::cli::agent::AgentCmd)): serve our bundle, poll foreign ones.
use std::path::PathBuf;

use svidcar_agent::agent::config::AgentFile;
use svidcar_agent::agent::federation_client::parse_flag;

/// Bundle endpoint and federation flags; each overrides the same field of `--config`.
#[derive(clap::Args, Debug, Default)]
pub struct FederationArgs {
    /// Serve our trust bundle (SPIFFE bundle JWKS) on HTTPS at `host:port`; profile
    /// https_spiffe (the agent's own SVID) unless --bundle-endpoint-cert is given (https_web).
    #[arg(long, value_name = "ADDR")]
    bundle_endpoint: Option<String>,
    /// SPIFFE ID of the bundle endpoint's SVID [default: spiffe://<td>/svidcar/bundle-endpoint].
    #[arg(long, value_name = "SPIFFE_ID")]
    bundle_endpoint_id: Option<String>,
    /// https_web: PEM certificate chain of the bundle endpoint.
    #[arg(long, value_name = "FILE", requires = "bundle_endpoint_key")]
    bundle_endpoint_cert: Option<PathBuf>,
    /// https_web: PEM private key of the bundle endpoint.
    #[arg(long, value_name = "FILE", requires = "bundle_endpoint_cert")]
    bundle_endpoint_key: Option<PathBuf>,
    /// `spiffe_refresh_hint` served on the bundle endpoint [default: 5m].
    #[arg(long, value_name = "DURATION")]
    bundle_refresh_hint: Option<String>,
    /// Poll a foreign bundle endpoint: `TD=https://host:port,https_spiffe[,SPIFFE_ID]` (bootstrap
    /// its bundle with --federate TD=FILE) or `TD=https://host:port,https_web[,CA_FILE]`
    /// (repeatable).
    #[arg(long = "federate-endpoint", value_name = "TD=URL,PROFILE[,ARG]")]
    federate_endpoint: Vec<String>,
    /// Never poll a bundle endpoint more often than this [default: 30s].
    #[arg(long, value_name = "DURATION")]
    federation_min_refresh: Option<String>,
}

impl FederationArgs {
    /// Applies the flags onto the file config.
    pub fn apply(self, f: &mut AgentFile) -> anyhow::Result<()> {
        let any_endpoint_flag = self.bundle_endpoint.is_some()
            || self.bundle_endpoint_id.is_some()
            || self.bundle_endpoint_cert.is_some()
            || self.bundle_refresh_hint.is_some();
        if any_endpoint_flag {
            let mut be = f.bundle_endpoint.take().unwrap_or_default();
            if self.bundle_endpoint.is_some() {
                be.address = self.bundle_endpoint;
            }
            if self.bundle_endpoint_id.is_some() {
                be.spiffe_id = self.bundle_endpoint_id;
            }
            if self.bundle_endpoint_cert.is_some() {
                be.cert_file = self.bundle_endpoint_cert;
                be.key_file = self.bundle_endpoint_key;
                be.profile = Some("https_web".into());
            }
            if self.bundle_refresh_hint.is_some() {
                be.refresh_hint = self.bundle_refresh_hint;
            }
            f.bundle_endpoint = Some(be);
        }
        for e in &self.federate_endpoint {
            f.federation_endpoints.push(parse_flag(e)?);
        }
        if self.federation_min_refresh.is_some() {
            f.federation_min_refresh = self.federation_min_refresh;
        }
        Ok(())
    }
}
