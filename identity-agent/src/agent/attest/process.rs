//! What a caller's process *is*, read from `/proc/<pid>` when the agent accepts its connection,
//! and the check that it is still the same process running the same executable at every call.
//!
//! The kernel records the peer's pid/uid/gid when it connects (`SO_PEERCRED`), but the pid
//! can exec another binary on the connection it opened, or exit and have its pid reused. So at
//! accept the agent binds the connection to the process's start time and to the executable's
//! identity (device and inode of `/proc/<pid>/exe`, plus the name the kernel reports), and a
//! call whose process no longer matches is refused (`PERMISSION_DENIED`). Without this, a
//! process could connect, fork a child that keeps the socket, and exec a registered binary:
//! the child's calls would be attested as that binary.
//!
//! Residual window: between `connect()` and the agent's `accept()` (microseconds on an idle
//! agent) an exec is not visible as a change. That is why `unix:path:` should be combined with
//! `unix:uid:`/`unix:gid:` (the agent warns at start about entries that are not).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::AttestError;

/// The executable a process runs: the inode (what the kernel actually maps) and the name
/// `/proc/<pid>/exe` gives for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exe {
    pub dev: u64,
    pub ino: u64,
    /// The readlink text; `None` when unreadable. A deleted file reads `"<path> (deleted)"`.
    pub name: Option<String>,
}

impl std::fmt::Display for Exe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.name.as_deref().unwrap_or("?");
        write!(f, "{name} (dev {} inode {})", self.dev, self.ino)
    }
}

/// A process as seen in `/proc/<pid>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// Field 22 of `/proc/<pid>/stat` (ticks after boot): changes when the pid is reused.
    pub start_time: u64,
    /// Real uid from `/proc/<pid>/status`.
    pub uid: u32,
    /// `None` when `/proc/<pid>/exe` cannot be followed (another uid without ptrace rights,
    /// a kernel thread): then there is no path selector either.
    pub exe: Option<Exe>,
}

pub(super) fn proc_err(pid: i32, reason: impl std::fmt::Display) -> AttestError {
    AttestError::Proc {
        pid,
        reason: reason.to_string(),
    }
}

impl Process {
    /// Reads the process `pid` from `dir` (= `/proc/<pid>`). Returns `Ok(None)` when the
    /// directory does not exist (the pid is not visible: another pid namespace, hidepid).
    pub fn read(dir: &Path, pid: i32) -> Result<Option<Self>, AttestError> {
        let stat = match std::fs::read_to_string(dir.join("stat")) {
            Ok(s) => s,
            Err(_) if !dir.exists() => return Ok(None),
            Err(e) => return Err(proc_err(pid, e)),
        };
        let start_time = parse_start_time(&stat).ok_or_else(|| proc_err(pid, "malformed stat"))?;
        let status = std::fs::read_to_string(dir.join("status")).map_err(|e| proc_err(pid, e))?;
        let uid = status_field(&status, "Uid:")
            .and_then(|v| v.split_whitespace().next().and_then(|u| u.parse().ok()))
            .ok_or_else(|| proc_err(pid, "no Uid in status"))?;
        // stat() follows the magic link to the inode the process runs, even if it was deleted
        // or renamed; readlink gives the name the kernel has for it.
        let exe = std::fs::metadata(dir.join("exe")).ok().map(|m| Exe {
            dev: m.dev(),
            ino: m.ino(),
            name: std::fs::read_link(dir.join("exe"))
                .ok()
                .map(|p| p.to_string_lossy().into_owned()),
        });
        Ok(Some(Self {
            start_time,
            uid,
            exe,
        }))
    }

    /// Checks that `now` (read at call time) is the process bound at accept: same start
    /// time, uid and executable inode.
    pub fn same_as_bound(&self, pid: i32, now: Option<&Process>) -> Result<(), AttestError> {
        let Some(now) = now else {
            return Err(AttestError::Exited { pid });
        };
        if now.start_time != self.start_time || now.uid != self.uid {
            return Err(AttestError::Changed {
                pid,
                what: format!(
                    "start time {} -> {}, uid {} -> {}",
                    self.start_time, now.start_time, self.uid, now.uid
                ),
            });
        }
        let same_exe = match (&self.exe, &now.exe) {
            (None, None) => true,
            (Some(a), Some(b)) => a.dev == b.dev && a.ino == b.ino,
            _ => false,
        };
        if !same_exe {
            let show = |e: &Option<Exe>| {
                e.as_ref()
                    .map_or("an unreadable file".into(), |e| e.to_string())
            };
            return Err(AttestError::ExeChanged {
                pid,
                at_connect: show(&self.exe),
                now: show(&now.exe),
            });
        }
        Ok(())
    }
}

/// The `unix:path:` name of an executable, if its name can be trusted: the readlink text must
/// not be a deleted file (`" (deleted)"` suffix, never stripped), and that path must *now*
/// resolve to the same device and inode as the running executable. So a deleted, renamed or
/// replaced binary, or one whose name only exists in another mount namespace, matches no
/// `unix:path:` selector by its name. Hard links of one file keep their own names (the kernel
/// reports the link the process was started from), so `unix:path:` still tells them apart.
pub fn trusted_path(exe: &Exe) -> Option<&str> {
    let name = exe.name.as_deref()?;
    if name.ends_with(" (deleted)") || !name.starts_with('/') {
        return None;
    }
    let m = std::fs::metadata(name).ok()?;
    (m.dev() == exe.dev && m.ino() == exe.ino).then_some(name)
}

/// Field 22 (`starttime`) of `/proc/<pid>/stat`; the command name may contain spaces and
/// parentheses, so parse after the last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")": field 3 (state) is the first token; starttime is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The value of `name` (e.g. `"Uid:"`) in `/proc/<pid>/status`.
pub fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_parsing_survives_odd_names() {
        let stat =
            "1234 (a) b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn own_process_binds_and_a_different_exe_is_refused() {
        let pid = std::process::id() as i32;
        let dir = Path::new("/proc").join(pid.to_string());
        let me = Process::read(&dir, pid).unwrap().unwrap();
        me.same_as_bound(pid, Some(&me)).unwrap();
        let exe = me.exe.clone().unwrap();
        let current = std::env::current_exe().unwrap();
        assert_eq!(trusted_path(&exe), Some(current.to_str().unwrap()));

        let mut other = me.clone();
        other.exe = Some(Exe {
            ino: exe.ino + 1,
            ..exe.clone()
        });
        assert!(matches!(
            me.same_as_bound(pid, Some(&other)),
            Err(AttestError::ExeChanged { .. })
        ));
        let mut reused = me.clone();
        reused.start_time += 1;
        assert!(matches!(
            me.same_as_bound(pid, Some(&reused)),
            Err(AttestError::Changed { .. })
        ));
        assert_eq!(
            me.same_as_bound(pid, None),
            Err(AttestError::Exited { pid })
        );
    }

    #[test]
    fn deleted_or_foreign_names_are_not_trusted() {
        let exe = Process::read(Path::new("/proc/self"), 0)
            .unwrap()
            .unwrap()
            .exe
            .unwrap();
        let deleted = Exe {
            name: Some(format!("{} (deleted)", exe.name.as_deref().unwrap())),
            ..exe.clone()
        };
        assert_eq!(trusted_path(&deleted), None);
        // A name that exists but is another file (e.g. the same path in another mount
        // namespace, or a replaced binary).
        let other = Exe {
            name: Some("/bin/sh".into()),
            ..exe.clone()
        };
        assert_eq!(trusted_path(&other), None);
        let relative = Exe {
            name: Some("bin/sh".into()),
            ..exe
        };
        assert_eq!(trusted_path(&relative), None);
    }
}
