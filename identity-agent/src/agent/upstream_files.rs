//! An upstream intermediate from files (`--upstream-cert`, `--upstream-key`,
//! `--upstream-bundle`): loaded and checked at start, and reloaded when the files change — a
//! renewed node intermediate (a Secret updated by an operator or cert-manager) takes effect
//! without restarting the agent. A change that does not load or does not pass the check is
//! refused with the reason and the current intermediate stays.
//!
//! The check ([`check_upstream`]), at start and on every reload, proves that what the agent
//! will sign is accepted by peers:
//!
//! - a `spiffe://` URI SAN on the intermediate must name the agent's own trust domain (an
//!   intermediate issued for another trust domain is a misconfiguration, not a federation);
//! - a probe SVID signed by it must verify, with the chain the agent sends, against the roots
//!   it will publish as its bundle — exactly the SPIFFE verification every peer performs
//!   (`svid::verify_chain`), so an intermediate of another root, an expired or not-yet-valid
//!   link, or a chain that is missing a link is caught here, not in every peer's handshake.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, UnixTime};

use crate::agent::ca::{is_self_signed, CaError, SigningCa};
use crate::agent::rotation::read_certs;
use crate::agent::upstream_ca::ca_trust_domain;
use crate::bundle::{Bundle, BundleSet};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::svid::{split_der_chain, verify_chain};

/// What the files hold: the signing intermediate (with its chain) and the roots for the bundle.
pub struct Loaded {
    /// Signs SVIDs; sends the intermediate (and any further links) after each leaf.
    pub signing: SigningCa,
    /// The upstream roots, published as our X.509 bundle.
    pub roots: Vec<CertificateDer<'static>>,
}

type Stamp = Vec<Option<(SystemTime, u64)>>;

/// The three files and what they looked like when last loaded.
pub struct UpstreamFiles {
    cert: PathBuf,
    key: PathBuf,
    bundle: Option<PathBuf>,
    stamp: Stamp,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> CaError {
    CaError::Load {
        what: path.display().to_string(),
        reason: e.to_string(),
    }
}

impl UpstreamFiles {
    /// Remembers the files as they are now.
    pub fn new(cert: &Path, key: &Path, bundle: Option<&Path>) -> Self {
        let mut f = Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            bundle: bundle.map(Path::to_path_buf),
            stamp: Vec::new(),
        };
        f.stamp = f.current();
        f
    }

    /// Modification time and size of each file (following symlinks, as Kubernetes Secret
    /// volumes swap them).
    fn current(&self) -> Stamp {
        [Some(&self.cert), Some(&self.key), self.bundle.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| {
                let m = std::fs::metadata(p).ok()?;
                Some((m.modified().ok()?, m.len()))
            })
            .collect()
    }

    /// True (once) when any file changed since the last call or since [`UpstreamFiles::new`].
    pub fn changed(&mut self) -> bool {
        let now = self.current();
        let changed = now != self.stamp;
        self.stamp = now;
        changed
    }

    /// Reads and checks the intermediate for `td` at `now`.
    pub fn load(&self, td: &TrustDomain, now: SystemTime) -> Result<Loaded, CaError> {
        // Nobody else may control what the agent signs with (also on reload).
        crate::agent::file_safety::check_upstream_files(
            &self.cert,
            &self.key,
            self.bundle.as_deref(),
        )
        .map_err(|e| io_err(&self.key, e))?;
        let mut roots = Vec::new();
        let mut chain = Vec::new();
        for c in read_certs(&self.cert)? {
            if is_self_signed(&c) {
                roots.push(c);
            } else {
                chain.push(c);
            }
        }
        if let Some(b) = &self.bundle {
            roots.extend(read_certs(b)?);
        }
        let signing = chain
            .first()
            .cloned()
            .ok_or_else(|| io_err(&self.cert, "no intermediate CA certificate (only roots)"))?;
        if roots.is_empty() {
            return Err(io_err(
                &self.cert,
                "no root certificate for the bundle: append it to the cert file or give upstream bundle",
            ));
        }
        let key_pem = std::fs::read_to_string(&self.key).map_err(|e| io_err(&self.key, e))?;
        let signing = SigningCa::from_pem(signing, &key_pem, chain)?;
        check_upstream(&signing, &roots, td, now)?;
        Ok(Loaded { signing, roots })
    }
}

/// The path of the probe SVID (signed in memory, never served).
const PROBE_PATH: &str = "/svidcar-agent/upstream-check";

fn refused(reason: String) -> CaError {
    CaError::Load {
        what: "upstream CA (--upstream-cert)".into(),
        reason,
    }
}

/// Checks that `ca` (the loaded intermediate) belongs to `td` and that the SVIDs it signs
/// verify against `roots` at `now`.
pub fn check_upstream(
    ca: &SigningCa,
    roots: &[CertificateDer<'static>],
    td: &TrustDomain,
    now: SystemTime,
) -> Result<(), CaError> {
    if let Ok(named) = ca_trust_domain(&ca.cert) {
        if named != td.name() {
            return Err(refused(format!(
                "the intermediate is for trust domain \"{named}\" (its URI SAN), but this agent \
                 serves \"{}\" (--trust-domain)",
                td.name()
            )));
        }
    }
    let probe = SpiffeId::from_parts(td, PROBE_PATH).map_err(|e| refused(e.to_string()))?;
    let svid = ca
        .issue(&probe, "", Duration::from_secs(60), now)
        .map_err(|e| refused(format!("cannot sign with it: {e}")))?;
    let chain = split_der_chain(&svid.chain_der).map_err(refused)?;
    let mut bundle = Bundle::new(td.clone());
    bundle.x509_authorities = roots.to_vec();
    let mut bundles = BundleSet::new();
    bundles.insert(bundle);
    let at = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(UnixTime::since_unix_epoch)
        .map_err(|e| refused(e.to_string()))?;
    verify_chain(&chain, &bundles, at).map_err(|e| {
        refused(format!(
            "an SVID it signs does not verify against the {} upstream root(s) of the bundle: {e} \
             (is the intermediate signed by this root, with every link of the chain in the \
             cert file?)",
            roots.len()
        ))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::upstream_ca::{create_root, first_cert, issue_intermediate, CertAndKey};

    const DAY: Duration = Duration::from_secs(86400);

    fn td(s: &str) -> TrustDomain {
        TrustDomain::parse(s).unwrap()
    }

    fn der(pem_text: &str) -> CertificateDer<'static> {
        first_cert(pem_text).unwrap().into()
    }

    /// Root and node intermediate of `domain`, as `svidcar ca` makes them.
    fn pki(domain: &str, now: SystemTime) -> (CertAndKey, CertAndKey) {
        let root = create_root(&td(domain), 30 * DAY, now).unwrap();
        let int = issue_intermediate(
            &root.cert_pem,
            &root.key_pem,
            &td(domain),
            "node-1",
            DAY,
            now,
        )
        .unwrap();
        (root, int)
    }

    fn signing(int: &CertAndKey) -> SigningCa {
        let c = der(&int.cert_pem);
        SigningCa::from_pem(c.clone(), &int.key_pem, vec![c]).unwrap()
    }

    #[test]
    fn an_intermediate_of_our_root_and_domain_passes() {
        let now = SystemTime::now();
        let (root, int) = pki("example.org", now);
        check_upstream(
            &signing(&int),
            &[der(&root.cert_pem)],
            &td("example.org"),
            now,
        )
        .unwrap();
    }

    #[test]
    fn an_intermediate_of_another_trust_domain_is_refused() {
        let now = SystemTime::now();
        let (root, int) = pki("other.example", now);
        let e = check_upstream(
            &signing(&int),
            &[der(&root.cert_pem)],
            &td("example.org"),
            now,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("\"other.example\"") && e.contains("\"example.org\""),
            "{e}"
        );
    }

    #[test]
    fn an_intermediate_of_another_root_is_refused() {
        let now = SystemTime::now();
        let (_, int) = pki("example.org", now);
        let (unrelated, _) = pki("example.org", now);
        let e = check_upstream(
            &signing(&int),
            &[der(&unrelated.cert_pem)],
            &td("example.org"),
            now,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("does not verify against the 1 upstream root"),
            "{e}"
        );
    }

    #[test]
    fn an_expired_intermediate_is_refused() {
        let then = SystemTime::now() - 3 * DAY;
        let (root, int) = pki("example.org", then);
        let e = check_upstream(
            &signing(&int),
            &[der(&root.cert_pem)],
            &td("example.org"),
            SystemTime::now(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cannot sign with it") && e.contains("expired"),
            "{e}"
        );
    }
}
