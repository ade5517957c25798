//! Offline upstream CA for multi-node trust (`svidcar ca`): create a P-256 root for a trust
//! domain and issue per-node intermediates that the agent loads with `--upstream-cert`.
//!
//! Each node intermediate is cA=true with pathLenConstraint 0 (it signs SVIDs only), KeyUsage
//! keyCertSign+cRLSign (critical), URI SAN `spiffe://<td>`, and never outlives the root.
//!
//! No NameConstraints extension: RFC 5280 URI name constraints (permitted URI host `<td>`)
//! would be the natural way to pin an intermediate to its trust domain, but rustls-webpki (our
//! verifier, and that of every rustls-based client) does not evaluate URI constraints and fails
//! closed: it refuses *every* chain whose leaf has a URI SAN under such a CA (see the test
//! `uri_name_constraints_are_refused_by_webpki`). The intermediate is confined instead by
//! pathLen 0, by the agent only issuing IDs of its own trust domain, and by verifiers checking
//! a peer only against the bundle of the peer's own trust domain.
//!
//! Private keys are written 0600 in directories created 0700, never printed.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};

use super::ca::{cert_validity, SigningCa, BACKDATE};
use crate::spiffe_id::TrustDomain;

/// Why a root or an intermediate cannot be created or written.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamCaError {
    #[error(transparent)]
    Ca(#[from] super::ca::CaError),
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{0} already exists; refusing to overwrite it (use --force)")]
    Exists(String),
    #[error("root certificate {path}: {reason}")]
    BadRoot { path: String, reason: String },
    #[error("the root is for {root_td:?}, not {wanted:?}: a root signs intermediates of its own trust domain only")]
    WrongTrustDomain { root_td: String, wanted: String },
    #[error("invalid node name {0:?}: use 1-63 characters of [a-zA-Z0-9._-]")]
    BadNodeName(String),
    #[error("the root expired; create a new root with `svidcar ca init`")]
    RootExpired,
    #[error("cannot sign: {0}")]
    Sign(String),
}

fn io(path: &Path, e: impl std::fmt::Display) -> UpstreamCaError {
    UpstreamCaError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn sign(e: rcgen::Error) -> UpstreamCaError {
    UpstreamCaError::Sign(e.to_string())
}

/// A certificate and its private key, both PEM.
pub struct CertAndKey {
    pub cert_pem: String,
    /// PKCS#8 PEM; write it with [`write_file`] mode 0600, never print it.
    pub key_pem: String,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for CertAndKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAndKey")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Creates a self-signed P-256 root for `td`: cA=true, keyCertSign+cRLSign (critical), URI SAN
/// `spiffe://<td>`, subject `O=svidcar, CN=svidcar root <td>`.
pub fn create_root(
    td: &TrustDomain,
    ttl: Duration,
    now: SystemTime,
) -> Result<CertAndKey, UpstreamCaError> {
    let (ca, key_pem) = SigningCa::generate_root(td, ttl, now)?;
    Ok(CertAndKey {
        cert_pem: crate::client::to_pem("CERTIFICATE", &ca.cert),
        key_pem,
        not_after: ca.not_after,
    })
}

/// Checks a node name (used in the subject and the file names).
pub fn check_node_name(node: &str) -> Result<(), UpstreamCaError> {
    let ok = !node.is_empty()
        && node.len() <= 63
        && !node.starts_with('.')
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(UpstreamCaError::BadNodeName(node.to_string()))
    }
}

/// The trust domain named by a CA certificate's URI SAN (`spiffe://<td>`), if any.
pub(crate) fn ca_trust_domain(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    if !cert.is_ca() {
        return Err("not a CA certificate".into());
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
        .ok_or("no URI SAN spiffe://<trust domain>")?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix("spiffe://"),
            _ => None,
        })
        .map(|td| td.trim_end_matches('/').to_string())
        .ok_or_else(|| "no URI SAN spiffe://<trust domain>".into())
}

/// Issues the intermediate for `node` in `td`, signed by the root (PEM cert and key).
/// Refuses a root of another trust domain; `not_after` is capped at the root's.
pub fn issue_intermediate(
    root_cert_pem: &str,
    root_key_pem: &str,
    td: &TrustDomain,
    node: &str,
    ttl: Duration,
    now: SystemTime,
) -> Result<CertAndKey, UpstreamCaError> {
    check_node_name(node)?;
    let bad_root = |reason: String| UpstreamCaError::BadRoot {
        path: "root-cert.pem".into(),
        reason,
    };
    let root_der = first_cert(root_cert_pem).map_err(bad_root)?;
    let root_td = ca_trust_domain(&root_der).map_err(bad_root)?;
    if root_td != td.name() {
        return Err(UpstreamCaError::WrongTrustDomain {
            root_td,
            wanted: td.name().to_string(),
        });
    }
    // Checks the key belongs to the root and the root is a CA.
    let root = SigningCa::from_pem(root_der.clone().into(), root_key_pem, Vec::new())?;
    let (root_nb, root_na, _) = cert_validity(&root_der).map_err(bad_root)?;
    if now >= root_na {
        return Err(UpstreamCaError::RootExpired);
    }
    let key = KeyPair::generate().map_err(sign)?;
    let key_pem = key.serialize_pem();
    let root_key = KeyPair::from_pem(root_key_pem).map_err(sign)?;
    let issuer = Issuer::from_ca_cert_der(&root.cert, root_key).map_err(sign)?;

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "svidcar");
    dn.push(
        DnType::CommonName,
        format!("svidcar node {node} {}", td.name()),
    );
    params.distinguished_name = dn;
    params.serial_number = Some(random_serial()?);
    let uri = td.id_string().try_into().map_err(sign)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = true;
    let not_after = (now + ttl).min(root_na);
    params.not_before = (now - BACKDATE).max(root_nb).into();
    params.not_after = not_after.into();
    let cert = params.signed_by(&key, &issuer).map_err(sign)?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem,
        not_after,
    })
}

fn random_serial() -> Result<SerialNumber, UpstreamCaError> {
    use aws_lc_rs::rand::SecureRandom;
    let mut b = [0u8; 16];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| UpstreamCaError::Sign("no randomness for the serial".into()))?;
    b[0] = (b[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&b))
}

/// The first certificate of a PEM text, DER.
pub(crate) fn first_cert(pem_text: &str) -> Result<Vec<u8>, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let first = CertificateDer::pem_slice_iter(pem_text.as_bytes()).next();
    match first {
        Some(Ok(c)) => Ok(c.to_vec()),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("no PEM certificate".into()),
    }
}

/// Creates `dir` (and parents) with mode 0700 if missing.
pub fn create_private_dir(dir: &Path) -> Result<(), UpstreamCaError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io(dir, e))
}

/// Writes `data` to `path` with `mode`; refuses an existing file unless `force`, in which case
/// it is replaced (removed first, so the new mode applies).
pub fn write_file(
    path: &Path,
    data: &[u8],
    mode: u32,
    force: bool,
) -> Result<PathBuf, UpstreamCaError> {
    if path.exists() || path.is_symlink() {
        if !force {
            return Err(UpstreamCaError::Exists(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(|e| io(path, e))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| io(path, e))?;
    f.write_all(data).map_err(|e| io(path, e))?;
    f.sync_all().map_err(|e| io(path, e))?;
    Ok(path.to_path_buf())
}

/// Reads a text file, with the path in the error.
pub fn read_text(path: &Path) -> Result<String, UpstreamCaError> {
    std::fs::read_to_string(path).map_err(|e| io(path, e))
}

#[cfg(test)]
#[path = "upstream_ca_tests.rs"]
mod tests;
