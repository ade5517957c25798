//! Unix attestation of a connection's caller: `unix:uid`, `unix:gid` from the kernel
//! (`SO_PEERCRED` at connect), `unix:supplementary_gid` and `unix:path` from `/proc/<pid>`.
//!
//! The caller is the process bound when the connection was accepted ([`Peer`]): the pid must
//! still be that process (start time, uid) running the same executable (device and inode),
//! checked before and after the selectors are read, else the call is refused. `unix:path:` is
//! the name the kernel gives the executable, only when that path still resolves to the very
//! file the process runs (see [`trusted_path`]). If `/proc/<pid>` was not visible at accept
//! (another pid namespace), only the kernel-provided `unix:uid` and `unix:gid` are produced.

use std::path::Path;

use super::peer::Peer;
use super::process::{status_field, trusted_path};
use super::{AttestError, Selectors, Workload};

/// Attests the caller bound to a connection.
pub fn attest(peer: &Peer) -> Result<Workload, AttestError> {
    let mut selectors = Selectors::new();
    selectors.insert(format!("unix:uid:{}", peer.uid));
    selectors.insert(format!("unix:gid:{}", peer.gid));
    let workload = |selectors| Workload {
        pid: peer.pid,
        uid: peer.uid,
        gid: peer.gid,
        selectors,
    };
    let Some(now) = peer.verify()? else {
        return Ok(workload(selectors));
    };
    let dir = peer.proc_dir();
    for g in supplementary_groups(&dir) {
        selectors.insert(format!("unix:supplementary_gid:{g}"));
    }
    // The exe is unreadable without the same uid or CAP_SYS_PTRACE: then no path selector.
    if let Some(exe) = &now.exe {
        match trusted_path(exe) {
            Some(path) => {
                selectors.insert(format!("unix:path:{path}"));
            }
            None => tracing::debug!(pid = peer.pid, exe = %exe,
                "no unix:path selector: the executable's name no longer names the file it runs \
                 (deleted, renamed or replaced)"),
        }
    }
    peer.verify()?;
    Ok(workload(selectors))
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
    use crate::agent::attest::peer::PROC_ROOT;

    #[tokio::test]
    async fn attests_self_over_a_socketpair() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let peer = Peer::bind(a.peer_cred().ok(), Path::new(PROC_ROOT)).unwrap();
        let w = attest(&peer).unwrap();
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
            Peer::bind(None, Path::new(PROC_ROOT)),
            Err(AttestError::NoCredentials)
        );
    }
}
