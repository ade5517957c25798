//! The CA set and its rotation schedule (SPIRE's, made explicit):
//!
//! - at half of the active CA's lifetime a *next* CA is generated and published in the bundle,
//!   but signs nothing yet;
//! - when 1/6 of the active CA's lifetime remains, the next CA becomes active (streams re-issue
//!   their SVIDs from it) and the old root is *retired*: it stays in the bundle until its own
//!   `not_after`, by which time everything it signed has expired (SVIDs never outlive their CA).
//!
//! State directory files (keys mode 0600): `ca-cert.pem`, `ca-key.pem` (active),
//! `ca-next-cert.pem`, `ca-next-key.pem` (prepared), `ca-retired.pem` (retired roots).
//! A restart reloads them, so the trust domain keeps its root. After a downtime longer than the
//! CA's lifetime the agent activates the next CA or generates a new root instead of refusing
//! to start.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::agent::ca::{cert_validity, CaError, SigningCa, BACKDATE};
use crate::agent::config::CaSource;
use crate::agent::upstream_files::UpstreamFiles;
use crate::spiffe_id::TrustDomain;

const CERT: &str = "ca-cert.pem";
const KEY: &str = "ca-key.pem";
const NEXT_CERT: &str = "ca-next-cert.pem";
const NEXT_KEY: &str = "ca-next-key.pem";
const RETIRED: &str = "ca-retired.pem";

/// A retired root kept in the bundle until it expires.
#[derive(Debug, Clone)]
struct Retired {
    cert: CertificateDer<'static>,
    not_after: SystemTime,
}

enum Mode {
    Embedded {
        td: TrustDomain,
        ttl: Duration,
        dir: PathBuf,
    },
    Upstream {
        td: TrustDomain,
        files: UpstreamFiles,
        roots: Vec<CertificateDer<'static>>,
    },
}

/// How often the upstream files are checked for a renewed intermediate.
const UPSTREAM_POLL: Duration = Duration::from_secs(5);

/// The active CA, the prepared next one, and retired roots still in the bundle.
pub struct CaSet {
    mode: Mode,
    active: Arc<SigningCa>,
    next: Option<Arc<SigningCa>>,
    retired: Vec<Retired>,
}

fn io_err(what: impl Into<String>, e: impl std::fmt::Display) -> CaError {
    CaError::Load {
        what: what.into(),
        reason: e.to_string(),
    }
}

/// The certificates of a PEM file.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let data = std::fs::read(path).map_err(|e| io_err(path.display().to_string(), e))?;
    CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| io_err(path.display().to_string(), e))
}

fn certs_pem(certs: &[CertificateDer<'_>]) -> String {
    use base64::Engine;
    let mut out = String::new();
    for c in certs {
        let b = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// Writes `data` to `dir/name` atomically with `mode`.
fn write_file(dir: &Path, name: &str, data: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io_err(tmp.display().to_string(), e))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| io_err(tmp.display().to_string(), e))?;
    std::fs::rename(&tmp, dir.join(name))
        .map_err(|e| io_err(dir.join(name).display().to_string(), e))
}

fn load_pair(dir: &Path, cert: &str, key: &str) -> Result<Option<SigningCa>, CaError> {
    let (cp, kp) = (dir.join(cert), dir.join(key));
    if !cp.exists() || !kp.exists() {
        return Ok(None);
    }
    let certs = read_certs(&cp)?;
    let first = certs
        .into_iter()
        .next()
        .ok_or_else(|| io_err(cp.display().to_string(), "no certificate"))?;
    let key_pem = std::fs::read_to_string(&kp).map_err(|e| io_err(kp.display().to_string(), e))?;
    SigningCa::from_pem(first, &key_pem, Vec::new()).map(Some)
}

impl CaSet {
    /// Loads the CA per `source`: the embedded root from `state_dir` (generated on first
    /// start), or the upstream intermediate from files.
    pub fn load(
        source: &CaSource,
        td: &TrustDomain,
        ca_ttl: Duration,
        state_dir: &Path,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        match source {
            CaSource::Embedded => Self::load_embedded(td, ca_ttl, state_dir, now),
            CaSource::Upstream { cert, key, bundle } => {
                let files = UpstreamFiles::new(cert, key, bundle.as_deref());
                let loaded = files.load(td, now)?;
                Ok(Self {
                    mode: Mode::Upstream {
                        td: td.clone(),
                        files,
                        roots: loaded.roots,
                    },
                    active: Arc::new(loaded.signing),
                    next: None,
                    retired: Vec::new(),
                })
            }
        }
    }

    fn load_embedded(
        td: &TrustDomain,
        ttl: Duration,
        dir: &Path,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir.display().to_string(), e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io_err(dir.display().to_string(), e))?;
        let active = load_pair(dir, CERT, KEY)?;
        let next = load_pair(dir, NEXT_CERT, NEXT_KEY)?;
        let retired = if dir.join(RETIRED).exists() {
            read_certs(&dir.join(RETIRED))?
                .into_iter()
                .filter_map(|cert| {
                    let (_, not_after, _) = cert_validity(&cert).ok()?;
                    Some(Retired { cert, not_after })
                })
                .collect()
        } else {
            Vec::new()
        };
        let mode = Mode::Embedded {
            td: td.clone(),
            ttl,
            dir: dir.to_path_buf(),
        };
        let mut set = match active {
            Some(a) => Self {
                mode,
                active: Arc::new(a),
                next: next.map(Arc::new),
                retired,
            },
            None => {
                let (ca, key_pem) = SigningCa::generate_root(td, ttl, now)?;
                tracing::info!(serial = %ca.serial_hex, trust_domain = %td, dir = %dir.display(),
                    "generated a new root CA");
                write_file(dir, KEY, key_pem.as_bytes(), 0o600)?;
                write_file(
                    dir,
                    CERT,
                    certs_pem(std::slice::from_ref(&ca.cert)).as_bytes(),
                    0o644,
                )?;
                Self {
                    mode,
                    active: Arc::new(ca),
                    next: None,
                    retired,
                }
            }
        };
        set.tick(now)?;
        Ok(set)
    }

    /// The CA that signs SVIDs now.
    pub fn active(&self) -> &Arc<SigningCa> {
        &self.active
    }

    /// True while a prepared next root is in the bundle, not signing yet.
    pub fn has_next(&self) -> bool {
        self.next.is_some()
    }

    /// The X.509 authorities for our bundle, oldest first: retired roots, the active root
    /// (or upstream roots), and the prepared next root.
    pub fn bundle_authorities(&self) -> Vec<CertificateDer<'static>> {
        match &self.mode {
            Mode::Upstream { roots, .. } => {
                let mut v: Vec<_> = self.retired.iter().map(|r| r.cert.clone()).collect();
                v.extend(roots.iter().cloned());
                v.dedup();
                v
            }
            Mode::Embedded { .. } => {
                let mut v: Vec<_> = self.retired.iter().map(|r| r.cert.clone()).collect();
                v.push(self.active.cert.clone());
                v.extend(self.next.iter().map(|n| n.cert.clone()));
                v.dedup();
                v
            }
        }
    }

    /// When a root we generated was made: its `not_before` is backdated by [`BACKDATE`], and
    /// the schedule is relative to the intended lifetime, not the backdated one.
    fn made_at(ca: &SigningCa) -> SystemTime {
        if ca.lifetime() > BACKDATE {
            ca.not_before + BACKDATE
        } else {
            ca.not_before
        }
    }

    fn prepare_at(&self) -> SystemTime {
        let start = Self::made_at(&self.active);
        start
            + self
                .active
                .not_after
                .duration_since(start)
                .unwrap_or_default()
                / 2
    }

    /// At 1/6 of the lifetime remaining, but never before the next root has been in the
    /// bundle for a grace period (1/12 of its lifetime, at most a minute), so every stream
    /// has pushed it before the first SVID it signs.
    fn activate_at(&self) -> Option<SystemTime> {
        let next = self.next.as_ref()?;
        let start = Self::made_at(&self.active);
        let life = self
            .active
            .not_after
            .duration_since(start)
            .unwrap_or_default();
        let grace = (next.lifetime() / 12).min(Duration::from_secs(60));
        Some((self.active.not_after - life / 6).max(Self::made_at(next) + grace))
    }

    /// The next time [`CaSet::tick`] has something to do.
    pub fn next_event(&self) -> Option<SystemTime> {
        let mut t = match self.mode {
            Mode::Embedded { .. } => self.activate_at().unwrap_or_else(|| self.prepare_at()),
            Mode::Upstream { .. } => SystemTime::now() + UPSTREAM_POLL,
        };
        for r in &self.retired {
            t = t.min(r.not_after);
        }
        Some(t)
    }

    /// Advances the rotation schedule to `now`. Returns true when the bundle or the active CA
    /// changed (and persists the change).
    pub fn tick(&mut self, now: SystemTime) -> Result<bool, CaError> {
        if let Mode::Upstream { .. } = self.mode {
            return Ok(self.tick_upstream(now));
        }
        let Mode::Embedded { td, ttl, dir } = &self.mode else {
            return Ok(false);
        };
        let (td, ttl, dir) = (td.clone(), *ttl, dir.clone());
        let mut changed = false;
        let before = self.retired.len();
        self.retired.retain(|r| r.not_after > now);
        if self.retired.len() != before {
            tracing::info!(
                removed = before - self.retired.len(),
                "expired retired roots left the bundle"
            );
            self.save_retired(&dir)?;
            changed = true;
        }
        if now >= self.active.not_after && self.next.as_ref().is_none_or(|n| now >= n.not_after) {
            // Downtime outlived the CA: start over with a fresh root rather than deadlock.
            tracing::warn!(expired = ?self.active.not_after, "active CA expired while the agent was down; generating a new root");
            self.next = None;
            self.prepare(&td, ttl, &dir, now)?;
            changed = true;
        }
        if self.next.is_none() && now >= self.prepare_at() {
            self.prepare(&td, ttl, &dir, now)?;
            changed = true;
        }
        let expired = now >= self.active.not_after;
        if self.activate_at().is_some_and(|at| now >= at || expired) {
            self.activate(&dir, now)?;
            changed = true;
        }
        Ok(changed)
    }

    /// Upstream mode: drops expired retired roots, and takes a renewed intermediate from the
    /// files once they changed and pass the checks (its predecessor's roots stay in the bundle
    /// until the predecessor expires, so SVIDs it signed keep verifying).
    fn tick_upstream(&mut self, now: SystemTime) -> bool {
        let before = self.retired.len();
        self.retired.retain(|r| r.not_after > now);
        let mut changed = self.retired.len() != before;
        let Mode::Upstream { td, files, roots } = &mut self.mode else {
            return changed;
        };
        if !files.changed() {
            return changed;
        }
        match files.load(td, now) {
            Ok(loaded) => {
                let old = std::mem::replace(&mut self.active, Arc::new(loaded.signing));
                for r in roots.iter().filter(|r| !loaded.roots.contains(r)) {
                    self.retired.push(Retired {
                        cert: r.clone(),
                        not_after: old.not_after,
                    });
                }
                *roots = loaded.roots;
                tracing::info!(new = %self.active.serial_hex, old = %old.serial_hex,
                    not_after = ?self.active.not_after,
                    "reloaded the upstream intermediate from its files; new SVIDs are signed by it");
                changed = true;
            }
            Err(e) => tracing::warn!(error = %e,
                "the upstream CA files changed but cannot be used; keeping the current intermediate"),
        }
        changed
    }

    fn prepare(
        &mut self,
        td: &TrustDomain,
        ttl: Duration,
        dir: &Path,
        now: SystemTime,
    ) -> Result<(), CaError> {
        let (ca, key_pem) = SigningCa::generate_root(td, ttl, now)?;
        write_file(dir, NEXT_KEY, key_pem.as_bytes(), 0o600)?;
        write_file(
            dir,
            NEXT_CERT,
            certs_pem(std::slice::from_ref(&ca.cert)).as_bytes(),
            0o644,
        )?;
        tracing::info!(serial = %ca.serial_hex, "prepared the next root CA (in the bundle, not signing yet)");
        self.next = Some(Arc::new(ca));
        Ok(())
    }

    fn activate(&mut self, dir: &Path, now: SystemTime) -> Result<(), CaError> {
        let Some(next) = self.next.take() else {
            return Ok(());
        };
        let old = std::mem::replace(&mut self.active, next);
        if now < old.not_after {
            self.retired.push(Retired {
                cert: old.cert.clone(),
                not_after: old.not_after,
            });
        }
        self.save_retired(dir)?;
        std::fs::rename(dir.join(NEXT_KEY), dir.join(KEY))
            .map_err(|e| io_err("activate CA key", e))?;
        std::fs::rename(dir.join(NEXT_CERT), dir.join(CERT))
            .map_err(|e| io_err("activate CA cert", e))?;
        tracing::info!(new = %self.active.serial_hex, old = %old.serial_hex,
            "activated the next root CA; the old root stays in the bundle until it expires");
        Ok(())
    }

    fn save_retired(&self, dir: &Path) -> Result<(), CaError> {
        let certs: Vec<_> = self.retired.iter().map(|r| r.cert.clone()).collect();
        write_file(dir, RETIRED, certs_pem(&certs).as_bytes(), 0o644)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(600);

    /// A fresh state directory (`svidcar-<name>-<pid>`) and a CA set loaded into it at `t0`.
    fn fresh_set(name: &str) -> (PathBuf, TrustDomain, SystemTime, CaSet) {
        let dir = std::env::temp_dir().join(format!("svidcar-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let td = TrustDomain::parse("example.org").unwrap();
        let t0 = SystemTime::now();
        let set = CaSet::load(&CaSource::Embedded, &td, TTL, &dir, t0).unwrap();
        (dir, td, t0, set)
    }

    #[test]
    fn schedule_prepares_then_activates_and_keeps_old_root() {
        let (dir, td, t0, mut set) = fresh_set("rot");
        let first = set.active().cert.clone();
        assert_eq!(set.bundle_authorities(), vec![first.clone()]);
        // Half life (+ backdate): next root published, not active.
        assert!(!set.tick(t0 + Duration::from_secs(290)).unwrap());
        assert!(set.tick(t0 + Duration::from_secs(301)).unwrap());
        assert_eq!(set.bundle_authorities().len(), 2);
        assert_eq!(set.active().cert, first);
        // 1/6 remaining: next becomes active, old stays.
        assert!(!set.tick(t0 + Duration::from_secs(495)).unwrap());
        assert!(set.tick(t0 + Duration::from_secs(501)).unwrap());
        assert_ne!(set.active().cert, first);
        assert!(set.bundle_authorities().contains(&first));
        // Reload keeps the same state.
        let again = CaSet::load(
            &CaSource::Embedded,
            &td,
            TTL,
            &dir,
            t0 + Duration::from_secs(506),
        )
        .unwrap();
        assert_eq!(again.active().cert, set.active().cert);
        assert!(again.bundle_authorities().contains(&first));
        // Old root leaves once expired.
        set.tick(t0 + Duration::from_secs(601)).unwrap();
        assert!(!set.bundle_authorities().contains(&first));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn never_activates_a_root_in_the_tick_that_published_it_and_survives_downtime() {
        let (dir, td, t0, mut set) = fresh_set("rot2");
        let first = set.active().cert.clone();
        // Late tick (both deadlines passed): publish only.
        assert!(set.tick(t0 + Duration::from_secs(550)).unwrap());
        assert_eq!(set.active().cert, first);
        assert_eq!(set.bundle_authorities().len(), 2);
        // After the grace period: activate.
        assert!(set
            .tick(t0 + Duration::from_secs(551) + Duration::from_secs(50))
            .unwrap());
        assert_ne!(set.active().cert, first);
        // Downtime beyond every CA: a fresh root at once, expired ones gone.
        let late = t0 + Duration::from_secs(5000);
        let set = CaSet::load(&CaSource::Embedded, &td, TTL, &dir, late).unwrap();
        assert!(set.active().not_after > late);
        assert_eq!(set.bundle_authorities().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
