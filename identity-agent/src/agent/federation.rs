//! Federated trust bundles from files (`--federate TD=BUNDLE_FILE`): a SPIFFE bundle (JWKS
//! JSON) or PEM certificates, re-read when the file's modification time or size changes.
//! A file that fails to parse is logged and the previous bundle stays in force.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;

use crate::agent::config::FederatedFile;
use crate::agent::health::{FederationSource, Metrics, RefreshResult};
use crate::agent::TrustState;
use crate::bundle::Bundle;
use crate::spiffe_id::TrustDomain;

/// Reads a bundle file: JWKS JSON if it starts with `{`, PEM certificates otherwise.
pub fn read_bundle_file(td: &TrustDomain, path: &Path) -> Result<Bundle, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let first = data.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if first == Some(b'{') {
        return Bundle::from_jwks(td.clone(), &data)
            .map_err(|e| format!("{}: {e}", path.display()));
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: neither a JWKS bundle nor PEM certificates",
            path.display()
        ));
    }
    for (i, c) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(c)
            .map_err(|e| format!("{}: certificate {i}: {e}", path.display()))?;
    }
    let mut b = Bundle::new(td.clone());
    b.x509_authorities = certs;
    Ok(b)
}

/// Loads every federated file once at start; failures are logged and the domain is left out
/// until its file becomes readable.
pub fn load_initial(files: &[FederatedFile], metrics: &Metrics) -> BTreeMap<TrustDomain, Bundle> {
    let mut out = BTreeMap::new();
    for f in files {
        let read = read_bundle_file(&f.trust_domain, &f.path);
        let result = match read {
            Ok(_) => RefreshResult::Updated,
            Err(_) => RefreshResult::Error,
        };
        metrics.federation_refreshed(f.trust_domain.name(), FederationSource::File, result);
        match read {
            Ok(b) => {
                tracing::info!(trust_domain = %f.trust_domain, file = %f.path.display(), "loaded federated bundle");
                out.insert(f.trust_domain.clone(), b);
            }
            Err(e) => {
                tracing::warn!(trust_domain = %f.trust_domain, error = %e, "federated bundle not loaded")
            }
        }
    }
    out
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Polls one bundle file and publishes changes into the shared state.
pub async fn watch_file(
    f: FederatedFile,
    poll: Duration,
    state: Arc<watch::Sender<Arc<TrustState>>>,
    metrics: Arc<Metrics>,
) {
    let td = f.trust_domain.name().to_string();
    let mut last = stamp(&f.path);
    loop {
        tokio::time::sleep(poll).await;
        let now = stamp(&f.path);
        if now == last {
            continue;
        }
        last = now;
        match read_bundle_file(&f.trust_domain, &f.path) {
            Ok(b) => {
                let changed = state.borrow().federated.get(&f.trust_domain) != Some(&b);
                let result = if changed {
                    RefreshResult::Updated
                } else {
                    RefreshResult::Unchanged
                };
                metrics.federation_refreshed(&td, FederationSource::File, result);
                if changed {
                    tracing::info!(trust_domain = %f.trust_domain, authorities = b.x509_authorities.len(),
                        "federated bundle changed");
                    state.send_modify(|s| {
                        let mut n = (**s).clone();
                        let mut fed = (*n.federated).clone();
                        fed.insert(f.trust_domain.clone(), b);
                        n.federated = Arc::new(fed);
                        n.bundles_version += 1;
                        *s = Arc::new(n);
                    });
                }
            }
            Err(e) => {
                metrics.federation_refreshed(&td, FederationSource::File, RefreshResult::Error);
                tracing::warn!(trust_domain = %f.trust_domain, error = %e,
                    "federated bundle file unreadable; keeping the previous bundle")
            }
        }
    }
}
