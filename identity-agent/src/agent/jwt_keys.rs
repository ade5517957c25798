//! The agent's JWT-SVID signing keys, rotated in step with the embedded CA (as SPIRE rotates its
//! JWT key with its X.509 CA):
//!
//! - when the next root is prepared, a *next* JWT key is generated and published in the bundle,
//!   signing nothing yet, so every validator learns it before the first token it signs;
//! - when the next root is activated, the next JWT key signs from then on, and the old key is
//!   *retired*: it stays in the bundle until every token it signed has expired (activation time
//!   plus the JWT-SVID TTL), then leaves it.
//!
//! With an upstream CA nothing rotates (the agent never rotates an upstream intermediate), so the
//! JWT key stays as well. State directory files: `jwt-key.der` (0600) + `jwt-kid` (active),
//! `jwt-next-key.der` (0600) + `jwt-next-kid` (prepared), `jwt-retired.json` (public keys of
//! retired keys and when they leave the bundle). A restart reloads them.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::bundle::JwtKey;
use crate::jwt::JwtSigner;

const KEY: (&str, &str) = ("jwt-key.der", "jwt-kid");
const NEXT: (&str, &str) = ("jwt-next-key.der", "jwt-next-kid");
const RETIRED: &str = "jwt-retired.json";

/// A retired key: still in the bundle until `until`.
#[derive(Debug, Clone)]
struct Retired {
    jwk: JwtKey,
    until: SystemTime,
}

/// The active, prepared and retired JWT keys of the agent.
#[derive(Debug)]
pub struct JwtKeys {
    dir: PathBuf,
    active: Arc<JwtSigner>,
    next: Option<Arc<JwtSigner>>,
    retired: Vec<Retired>,
}

fn err(path: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", path.display())
}

/// Reads a key pair of files, if both exist.
fn read_key(dir: &Path, (key_file, kid_file): (&str, &str)) -> Result<Option<JwtSigner>, String> {
    let (key_path, kid_path) = (dir.join(key_file), dir.join(kid_file));
    match (std::fs::read(&key_path), std::fs::read_to_string(&kid_path)) {
        (Ok(key), Ok(kid)) => JwtSigner::from_pkcs8(kid.trim(), &key)
            .map(Some)
            .map_err(|e| err(&key_path, e)),
        _ => Ok(None),
    }
}

/// Writes a key (0600, never overwriting in place) and its key id.
fn write_key(
    dir: &Path,
    (key_file, kid_file): (&str, &str),
    signer: &JwtSigner,
) -> Result<(), String> {
    let key_path = dir.join(key_file);
    let der = signer.to_pkcs8().map_err(|e| err(&key_path, e))?;
    let _ = std::fs::remove_file(&key_path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(|e| err(&key_path, e))?;
    f.write_all(&der).map_err(|e| err(&key_path, e))?;
    let kid_path = dir.join(kid_file);
    std::fs::write(&kid_path, signer.kid()).map_err(|e| err(&kid_path, e))
}

fn rename(dir: &Path, from: &str, to: &str) -> Result<(), String> {
    std::fs::rename(dir.join(from), dir.join(to)).map_err(|e| err(&dir.join(from), e))
}

impl JwtKeys {
    /// Loads the keys from `dir`, generating the active key on first start.
    pub fn load(dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
        let active = match read_key(dir, KEY)? {
            Some(k) => k,
            None => {
                let k = JwtSigner::generate().map_err(|e| err(dir, e))?;
                write_key(dir, KEY, &k)?;
                k
            }
        };
        let next = read_key(dir, NEXT)?.map(Arc::new);
        let path = dir.join(RETIRED);
        let retired = match std::fs::read(&path) {
            Ok(bytes) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&bytes).map_err(|e| err(&path, e))?;
                v.as_array()
                    .ok_or_else(|| err(&path, "not a JSON array"))?
                    .iter()
                    .map(|r| {
                        let until = r["until"].as_u64().ok_or_else(|| err(&path, "no until"))?;
                        Ok(Retired {
                            jwk: JwtKey::new(r["jwk"].clone()),
                            until: UNIX_EPOCH + Duration::from_secs(until),
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(err(&path, e)),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            active: Arc::new(active),
            next,
            retired,
        })
    }

    /// The key that signs JWT-SVIDs now.
    pub fn active(&self) -> &Arc<JwtSigner> {
        &self.active
    }

    /// Every public key for the bundle: retired ones, the active one, the prepared one.
    pub fn public_keys(&self) -> Vec<JwtKey> {
        let mut keys: Vec<JwtKey> = self.retired.iter().map(|r| r.jwk.clone()).collect();
        keys.push(self.active.public_jwk());
        keys.extend(self.next.iter().map(|n| n.public_jwk()));
        keys
    }

    /// When the next retired key leaves the bundle.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.retired.iter().map(|r| r.until).min()
    }

    /// Follows the CA: prepares a next key when the CA has a next root, switches to it when the
    /// CA `activated` its next root (the old key retired until `now + token_ttl`), and drops
    /// retired keys whose tokens have all expired. True when the bundle's keys changed.
    pub fn follow(
        &mut self,
        ca_has_next: bool,
        activated: bool,
        now: SystemTime,
        token_ttl: Duration,
    ) -> Result<bool, String> {
        let before = self.retired.len();
        self.retired.retain(|r| r.until > now);
        let mut changed = self.retired.len() != before;
        if changed {
            self.save_retired()?;
        }
        if activated {
            if self.next.is_none() {
                self.prepare()?;
            }
            self.activate(now + token_ttl)?;
            changed = true;
        }
        if ca_has_next && self.next.is_none() {
            self.prepare()?;
            changed = true;
        }
        Ok(changed)
    }

    fn prepare(&mut self) -> Result<(), String> {
        let k = JwtSigner::generate().map_err(|e| err(&self.dir, e))?;
        write_key(&self.dir, NEXT, &k)?;
        tracing::info!(kid = %k.kid(), "prepared the next JWT signing key (in the bundle, not signing yet)");
        self.next = Some(Arc::new(k));
        Ok(())
    }

    fn activate(&mut self, retire_until: SystemTime) -> Result<(), String> {
        let Some(next) = self.next.take() else {
            return Ok(());
        };
        let old = std::mem::replace(&mut self.active, next);
        // Whole seconds, rounded up: a key never leaves before its last token expired, and
        // what is persisted is exactly what is in memory.
        let secs = retire_until.duration_since(UNIX_EPOCH).unwrap_or_default();
        let until = UNIX_EPOCH + Duration::from_secs(secs.as_secs() + 1);
        self.retired.push(Retired {
            jwk: old.public_jwk(),
            until,
        });
        self.save_retired()?;
        rename(&self.dir, NEXT.0, KEY.0)?;
        rename(&self.dir, NEXT.1, KEY.1)?;
        tracing::info!(new = %self.active.kid(), old = %old.kid(),
            "activated the next JWT signing key; the old key stays in the bundle until its tokens expire");
        Ok(())
    }

    fn save_retired(&self) -> Result<(), String> {
        let list: Vec<serde_json::Value> = self
            .retired
            .iter()
            .map(|r| {
                let until = r.until.duration_since(UNIX_EPOCH).unwrap_or_default();
                json!({"jwk": r.jwk.jwk, "until": until.as_secs()})
            })
            .collect();
        let path = self.dir.join(RETIRED);
        std::fs::write(&path, serde_json::Value::Array(list).to_string()).map_err(|e| err(&path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("svidcar-jwtkeys-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn kids(k: &JwtKeys) -> Vec<String> {
        k.public_keys()
            .iter()
            .map(|j| j.kid().unwrap_or_default().to_string())
            .collect()
    }

    #[test]
    fn rotates_with_the_ca_and_keeps_the_old_key_until_its_tokens_expire() {
        let dir = temp_dir("rotate");
        let ttl = Duration::from_secs(300);
        let t0 = SystemTime::now();
        let mut keys = JwtKeys::load(&dir).unwrap();
        let first = keys.active().kid().to_string();
        assert!(
            !keys.follow(false, false, t0, ttl).unwrap(),
            "nothing to do"
        );
        assert_eq!(kids(&keys), std::slice::from_ref(&first));

        // The CA prepared its next root: a next JWT key is published, the first still signs.
        assert!(keys.follow(true, false, t0, ttl).unwrap());
        let ks = kids(&keys);
        assert_eq!(ks.len(), 2);
        assert_eq!(keys.active().kid(), first);
        let second = ks[1].clone();
        assert!(!keys.follow(true, false, t0, ttl).unwrap(), "prepared once");

        // The CA activated it: the second key signs, the first stays until t1 + ttl.
        let t1 = t0 + Duration::from_secs(10);
        assert!(keys.follow(false, true, t1, ttl).unwrap());
        assert_eq!(keys.active().kid(), second);
        assert_eq!(kids(&keys), [first.clone(), second.clone()]);
        let until = keys.next_expiry().unwrap();
        assert!(until >= t1 + ttl, "retired key kept while its tokens live");

        // A restart reloads the same state, private key files 0600.
        let again = JwtKeys::load(&dir).unwrap();
        assert_eq!(again.next_expiry(), Some(until));
        assert_eq!(again.active().kid(), second);
        assert_eq!(kids(&again), [first, second.clone()]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(KEY.0))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // After the tokens' lifetime the old key leaves the bundle.
        let mut keys = again;
        assert!(keys.follow(false, false, until, ttl).unwrap());
        assert_eq!(kids(&keys), [second]);
        assert_eq!(keys.next_expiry(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupt_retired_file_is_an_error_not_a_silent_loss() {
        let dir = temp_dir("corrupt");
        JwtKeys::load(&dir).unwrap();
        std::fs::write(dir.join(RETIRED), "{not json").unwrap();
        let e = JwtKeys::load(&dir).unwrap_err();
        assert!(e.contains(RETIRED), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
