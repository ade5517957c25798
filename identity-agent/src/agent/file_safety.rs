//! Refuses to run on directories and files another local user controls.
//!
//! The default socket and state directories live under `/tmp`, where anyone may create them
//! first: a pre-created socket directory lets its owner swap the socket for their own (and
//! hand out their identities), a pre-created state directory lets its owner read the CA key
//! the agent writes there or plant a CA key pair of their own that the agent would adopt.
//! So at start:
//!
//! - the state directory and every entry in it must be owned by the agent's uid and not
//!   writable by group/others; key files (`*key*`) not readable by them either;
//! - the socket directory must be owned by the agent's uid (or root) and not writable by
//!   group/others;
//! - every directory above them must be owned by the agent's uid or root, and if writable by
//!   group/others, sticky (like `/tmp`), so nobody else can rename what is inside.
//!
//! Missing directories are created (socket directory 0755, state directory 0700).
//!
//! The upstream intermediate's files (`--upstream-cert`, `--upstream-key`, `--upstream-bundle`)
//! are checked the same way, at start and on every reload: owned by the agent's uid or root
//! (symlinks too, as in Kubernetes Secret volumes), not writable by group/others (whoever can
//! write the bundle or the key decides what the whole trust domain trusts), the key not
//! readable by them, and every directory above them as above.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::agent::AgentError;

const STICKY: u32 = 0o1000;
const GROUP_OTHER_WRITE: u32 = 0o022;
const GROUP_OTHER_ALL: u32 = 0o077;

/// The agent's effective uid (the owner of `/proc/self`).
pub fn effective_uid() -> Result<u32, AgentError> {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(|e| AgentError::State(format!("cannot read /proc/self to learn our uid: {e}")))
}

fn unsafe_path(path: &Path, problem: impl Into<String>, fix: impl Into<String>) -> AgentError {
    AgentError::UnsafePath {
        path: path.display().to_string(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

fn stat(path: &Path, follow: bool) -> Result<std::fs::Metadata, AgentError> {
    let m = if follow {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    };
    m.map_err(|e| AgentError::State(format!("{}: {e}", path.display())))
}

/// A directory above the socket or state directory: owned by us or root; if writable by
/// group/others, then sticky.
fn check_ancestor(dir: &Path, uid: u32) -> Result<(), AgentError> {
    let link = stat(dir, false)?;
    if link.file_type().is_symlink() && link.uid() != uid && link.uid() != 0 {
        return Err(unsafe_path(
            dir,
            format!(
                "is a symlink owned by uid {}, not by the agent's uid {uid} or root: that user \
                 can point it elsewhere",
                link.uid()
            ),
            "use a path whose directories belong to the agent's user or root",
        ));
    }
    let m = stat(dir, true)?;
    if m.uid() != uid && m.uid() != 0 {
        return Err(unsafe_path(
            dir,
            format!(
                "is owned by uid {}, not by the agent's uid {uid} or root: that user can \
                 replace what the agent keeps below it",
                m.uid()
            ),
            "use a path whose directories belong to the agent's user or root",
        ));
    }
    if m.mode() & GROUP_OTHER_WRITE != 0 && m.mode() & STICKY == 0 {
        return Err(unsafe_path(
            dir,
            format!(
                "is writable by group or others (mode {:o}) and not sticky: anyone can \
                 replace what the agent keeps below it",
                m.mode() & 0o7777
            ),
            format!("chmod go-w {} (or +t), or use another path", dir.display()),
        ));
    }
    Ok(())
}

/// Every directory above `path` (as given and after resolving symlinks).
fn check_ancestors(path: &Path, uid: u32) -> Result<(), AgentError> {
    let abs = std::path::absolute(path)
        .map_err(|e| AgentError::State(format!("{}: {e}", path.display())))?;
    let real = std::fs::canonicalize(&abs)
        .map_err(|e| AgentError::State(format!("{}: {e}", abs.display())))?;
    for dir in abs.ancestors().skip(1).chain(real.ancestors().skip(1)) {
        check_ancestor(dir, uid)?;
    }
    Ok(())
}

/// The directory itself: a directory (not a symlink owned by someone else), owned by `uid`
/// (or root when `root_ok`), not writable by group/others.
fn check_own_dir(dir: &Path, uid: u32, root_ok: bool, what: &str) -> Result<(), AgentError> {
    let m = stat(dir, true)?;
    if !m.is_dir() {
        return Err(unsafe_path(
            dir,
            format!("the {what} is not a directory"),
            "remove it or choose another path",
        ));
    }
    if m.uid() != uid && !(root_ok && m.uid() == 0) {
        return Err(unsafe_path(
            dir,
            format!(
                "the {what} is owned by uid {}, not by the agent's uid {uid}: another user \
                 created it and controls what is in it",
                m.uid()
            ),
            format!(
                "remove it (the agent creates it) or `chown {uid} {}` after checking its contents",
                dir.display()
            ),
        ));
    }
    if m.mode() & GROUP_OTHER_WRITE != 0 {
        return Err(unsafe_path(
            dir,
            format!(
                "the {what} is writable by group or others (mode {:o}): any local user can \
                 replace what is in it",
                m.mode() & 0o7777
            ),
            format!("chmod go-w {} after checking its contents", dir.display()),
        ));
    }
    Ok(())
}

fn create_dirs(dir: &Path, leaf_mode: u32) -> Result<(), AgentError> {
    let io = |e: std::io::Error| AgentError::State(format!("cannot create {}: {e}", dir.display()));
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(io)?;
    }
    match std::fs::DirBuilder::new().mode(leaf_mode).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(e)),
    }
}

/// Creates the directory of the socket `socket` if missing (0755), then checks it and the
/// directories above it.
pub fn prepare_socket_dir(socket: &Path) -> Result<(), AgentError> {
    let dir = match socket.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    let uid = effective_uid()?;
    create_dirs(&dir, 0o755)?;
    check_own_dir(&dir, uid, true, "socket directory")?;
    check_ancestors(&dir, uid)
}

/// Creates the state directory if missing (0700), then checks it, the directories above it
/// and every entry in it.
pub fn prepare_state_dir(dir: &Path) -> Result<(), AgentError> {
    let uid = effective_uid()?;
    create_dirs(dir, 0o700)?;
    check_own_dir(dir, uid, false, "state directory")?;
    check_ancestors(dir, uid)?;
    let entries =
        std::fs::read_dir(dir).map_err(|e| AgentError::State(format!("{}: {e}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(|e| AgentError::State(format!("{}: {e}", dir.display())))?;
        check_state_file(&entry.path(), uid)?;
    }
    Ok(())
}

/// One entry of the state directory: a regular file of ours, not writable by group/others,
/// and a key not readable by them.
fn check_state_file(path: &Path, uid: u32) -> Result<(), AgentError> {
    let m = stat(path, false)?;
    if m.file_type().is_symlink() {
        return Err(unsafe_path(
            path,
            "is a symlink: the state directory holds the agent's own files only",
            "remove it (the agent writes its own files)",
        ));
    }
    let owned = m.uid() == uid;
    // The socket itself may live here (mode 0777 by design): only its owner matters.
    if owned && std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) {
        return Ok(());
    }
    if !owned {
        return Err(unsafe_path(
            path,
            format!(
                "is owned by uid {}, not by the agent's uid {uid}: the agent does not adopt \
                 another user's keys or certificates",
                m.uid()
            ),
            "remove it (on the next start the agent generates its own; workloads then need \
             the new bundle) or restore the agent's own file",
        ));
    }
    let mode = m.mode() & 0o7777;
    if mode & GROUP_OTHER_WRITE != 0 {
        return Err(unsafe_path(
            path,
            format!("is writable by group or others (mode {mode:o})"),
            format!(
                "chmod go-w {} after checking it was not tampered with",
                path.display()
            ),
        ));
    }
    let is_key = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().contains("key"));
    if is_key && m.is_file() && mode & GROUP_OTHER_ALL != 0 {
        return Err(unsafe_path(
            path,
            format!("is a private key readable by group or others (mode {mode:o})"),
            format!(
                "chmod 600 {} — and treat the key as leaked: remove it to have a new one generated",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// The upstream CA files: each owned by the agent's uid or root and not writable by
/// group/others (the key not readable by them either), with safe directories above them.
pub fn check_upstream_files(
    cert: &Path,
    key: &Path,
    bundle: Option<&Path>,
) -> Result<(), AgentError> {
    let uid = effective_uid()?;
    for (path, is_key) in [(cert, false), (key, true)]
        .into_iter()
        .chain(bundle.map(|b| (b, false)))
    {
        check_upstream_file(path, uid, is_key)?;
        check_ancestors(path, uid)?;
    }
    Ok(())
}

fn check_upstream_file(path: &Path, uid: u32, is_key: bool) -> Result<(), AgentError> {
    let what = if is_key {
        "upstream CA key (--upstream-key)"
    } else {
        "upstream CA file"
    };
    let link = stat(path, false)?;
    let m = stat(path, true)?;
    for owner in [link.uid(), m.uid()] {
        if owner != uid && owner != 0 {
            return Err(unsafe_path(
                path,
                format!(
                    "({what}) is owned by uid {owner}, not by the agent's uid {uid} or root:                      that user decides what the trust domain's SVIDs are signed with and trust"
                ),
                format!(
                    "chown root {} (and chmod {}) after checking it was not tampered with",
                    path.display(),
                    if is_key { "600" } else { "644" }
                ),
            ));
        }
    }
    let mode = m.mode() & 0o7777;
    let bad = if is_key {
        GROUP_OTHER_ALL
    } else {
        GROUP_OTHER_WRITE
    };
    if m.is_file() && mode & bad != 0 {
        let problem = if is_key {
            format!("({what}) is readable or writable by group or others (mode {mode:o})")
        } else {
            format!("({what}) is writable by group or others (mode {mode:o})")
        };
        let fix = if is_key {
            format!(
                "chmod 600 {} — and treat the intermediate key as leaked: issue a new one",
                path.display()
            )
        } else {
            format!(
                "chmod go-w {} after checking it was not tampered with",
                path.display()
            )
        };
        return Err(unsafe_path(path, problem, fix));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("svidcar-fs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    #[test]
    fn fresh_dirs_are_created_and_accepted() {
        let d = temp("fresh");
        let state = d.join("a/state");
        prepare_state_dir(&state).unwrap();
        assert_eq!(std::fs::metadata(&state).unwrap().mode() & 0o077, 0);
        assert_eq!(std::fs::metadata(d.join("a")).unwrap().mode() & 0o022, 0);
        prepare_socket_dir(&d.join("a/agent.sock")).unwrap();
        // Again: existing, ours.
        prepare_state_dir(&state).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn writable_dirs_and_readable_keys_are_refused() {
        let d = temp("perm");
        let state = d.join("state");
        prepare_state_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare_state_dir(&state).unwrap_err().to_string();
        assert!(
            e.contains(&state.display().to_string()) && e.contains("chmod"),
            "{e}"
        );
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();

        let key = state.join("ca-key.pem");
        std::fs::write(&key, "x").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = prepare_state_dir(&state).unwrap_err().to_string();
        assert!(e.contains("ca-key.pem") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        prepare_state_dir(&state).unwrap();

        // A group/other-writable, non-sticky parent of the socket directory.
        let sock_dir = d.join("open/sockets");
        std::fs::create_dir_all(&sock_dir).unwrap();
        std::fs::set_permissions(d.join("open"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare_socket_dir(&sock_dir.join("agent.sock"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("open") && e.contains("not sticky"), "{e}");
        std::fs::set_permissions(d.join("open"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        prepare_socket_dir(&sock_dir.join("agent.sock")).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }
}
