//! Unix attestation from `SO_PEERCRED` and `/proc/<pid>`, with a PID-reuse guard.
//!
//! The kernel records the caller's pid/uid/gid when it connects. We then read `/proc/<pid>`
//! (start time, uid, supplementary groups, executable) and read the start time and uid again:
//! if the process exited and the pid was reused, or its uid changed, in between, the caller is
//! refused. If `/proc/<pid>` is not visible (another pid namespace), only the kernel-provided
//! `unix:uid` and `unix:gid` selectors are produced.

use std::path::Path;

use tokio::net::unix::UCred;

use super::{AttestError, Selectors, Workload};

/// What we read from `/proc/<pid>` that must not change during attestation.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcIdentity {
    start_time: u64,
    uid: u32,
}

/// Attests the peer of a unix-socket connection, reading `/proc` under `proc_root`.
pub fn attest(cred: Option<UCred>, proc_root: &Path) -> Result<Workload, AttestError> {
    let cred = cred.ok_or(AttestError::NoCredentials)?;
    let pid = cred.pid().ok_or(AttestError::NoPid)?;
    let (uid, gid) = (cred.uid(), cred.gid());
    let mut selectors = Selectors::new();
    selectors.insert(format!("unix:uid:{uid}"));
    selectors.insert(format!("unix:gid:{gid}"));

    let dir = proc_root.join(pid.to_string());
    let before = match read_identity(&dir, pid) {
        Ok(id) => id,
        // Not visible (another pid namespace, hidepid): kernel credentials only.
        Err(AttestError::Proc { .. }) if !dir.exists() => {
            return Ok(Workload {
                pid,
                uid,
                gid,
                selectors,
            });
        }
        Err(e) => return Err(e),
    };
    if before.uid != uid {
        return Err(AttestError::Changed {
            pid,
            what: format!("uid {} at connect, {} now", uid, before.uid),
        });
    }
    for g in supplementary_groups(&dir) {
        selectors.insert(format!("unix:supplementary_gid:{g}"));
    }
    // readlink needs the same uid (or CAP_SYS_PTRACE); without it there is no path selector.
    if let Ok(exe) = std::fs::read_link(dir.join("exe")) {
        let exe = exe.to_string_lossy();
        let exe = exe.strip_suffix(" (deleted)").unwrap_or(&exe);
        selectors.insert(format!("unix:path:{exe}"));
    }
    let after = read_identity(&dir, pid)?;
    if after != before {
        return Err(AttestError::Changed {
            pid,
            what: format!(
                "start time {} -> {}, uid {} -> {}",
                before.start_time, after.start_time, before.uid, after.uid
            ),
        });
    }
    Ok(Workload {
        pid,
        uid,
        gid,
        selectors,
    })
}

fn proc_err(pid: i32, reason: impl std::fmt::Display) -> AttestError {
    AttestError::Proc {
        pid,
        reason: reason.to_string(),
    }
}

fn read_identity(dir: &Path, pid: i32) -> Result<ProcIdentity, AttestError> {
    let stat = std::fs::read_to_string(dir.join("stat")).map_err(|e| proc_err(pid, e))?;
    let start_time = parse_start_time(&stat).ok_or_else(|| proc_err(pid, "malformed stat"))?;
    let status = std::fs::read_to_string(dir.join("status")).map_err(|e| proc_err(pid, e))?;
    let uid = status_field(&status, "Uid:")
        .and_then(|v| v.split_whitespace().next().and_then(|u| u.parse().ok()))
        .ok_or_else(|| proc_err(pid, "no Uid in status"))?;
    Ok(ProcIdentity { start_time, uid })
}

/// Field 22 (`starttime`) of `/proc/<pid>/stat`; the command name may contain spaces and
/// parentheses, so parse after the last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")": field 3 (state) is the first token; starttime is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
}

fn supplementary_groups(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("status"))
        .ok()
        .and_then(|s| {
            status_field(&s, "Groups:").map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
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

    #[tokio::test]
    async fn attests_self_over_a_socketpair() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let w = attest(a.peer_cred().ok(), Path::new("/proc")).unwrap();
        assert_eq!(w.pid as u32, std::process::id());
        assert!(w.selectors.contains(&format!("unix:uid:{}", w.uid)));
        let exe = std::env::current_exe().unwrap();
        assert!(
            w.selectors
                .contains(&format!("unix:path:{}", exe.display())),
            "{:?}",
            w.selectors
        );
        assert_eq!(
            attest(None, Path::new("/proc")),
            Err(AttestError::NoCredentials)
        );
    }
}
