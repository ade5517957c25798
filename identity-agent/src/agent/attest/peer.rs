//! The caller of one socket connection, bound when the agent accepts it: the kernel's
//! `SO_PEERCRED` (pid, uid, gid) plus the process it names as it was then (start time, uid,
//! executable; see [`process`](super::process)). Every call on the connection is attested
//! against this binding, never against whatever the pid runs at call time.

use std::path::{Path, PathBuf};

use tokio::net::unix::UCred;

use super::process::Process;
use super::AttestError;

/// Where `/proc` is mounted (a parameter so tests can point elsewhere).
pub const PROC_ROOT: &str = "/proc";

/// A connection's caller, as bound at accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    /// Effective uid at connect (`SO_PEERCRED`).
    pub uid: u32,
    /// Effective gid at connect (`SO_PEERCRED`).
    pub gid: u32,
    /// The process at accept; `None` when `/proc/<pid>` was not visible (another pid
    /// namespace, hidepid): then only the kernel's uid/gid are attested.
    pub process: Option<Process>,
    proc_root: PathBuf,
}

impl Peer {
    /// Binds a connection to its caller, reading `/proc/<pid>` under `proc_root` at once.
    pub fn bind(cred: Option<UCred>, proc_root: &Path) -> Result<Self, AttestError> {
        let cred = cred.ok_or(AttestError::NoCredentials)?;
        let pid = cred.pid().ok_or(AttestError::NoPid)?;
        let process = Process::read(&proc_root.join(pid.to_string()), pid)?;
        if let Some(p) = &process {
            if p.uid != cred.uid() {
                return Err(AttestError::Changed {
                    pid,
                    what: format!("uid {} at connect, {} now", cred.uid(), p.uid),
                });
            }
        }
        Ok(Self {
            pid,
            uid: cred.uid(),
            gid: cred.gid(),
            process,
            proc_root: proc_root.to_path_buf(),
        })
    }

    /// `/proc/<pid>` of the caller.
    pub fn proc_dir(&self) -> PathBuf {
        self.proc_root.join(self.pid.to_string())
    }

    /// Checks that the pid is still the process bound at accept (same start time, uid and
    /// executable) and returns it as it is now (`None` if it was never visible).
    pub fn verify(&self) -> Result<Option<Process>, AttestError> {
        let Some(bound) = &self.process else {
            return Ok(None);
        };
        let now = Process::read(&self.proc_dir(), self.pid)?;
        bound.same_as_bound(self.pid, now.as_ref())?;
        Ok(now)
    }
}
