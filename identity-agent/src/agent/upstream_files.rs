//! An upstream intermediate from files (`--upstream-cert`, `--upstream-key`,
//! `--upstream-bundle`): loaded and checked at start ([`crate::agent::upstream_check`]), and
//! reloaded when the files change — a renewed node intermediate (a Secret updated by an operator
//! or cert-manager) takes effect without restarting the agent. A change that does not load or
//! does not pass the check is refused with the reason and the current intermediate stays.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustls::pki_types::CertificateDer;

use crate::agent::ca::{is_self_signed, CaError, SigningCa};
use crate::agent::rotation::read_certs;
use crate::agent::upstream_check::check_upstream;
use crate::spiffe_id::TrustDomain;

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
