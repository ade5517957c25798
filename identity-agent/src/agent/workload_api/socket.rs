//! The Workload API socket file: parent directory, stale-socket replacement, mode.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;

use crate::agent::file_safety::prepare_socket_dir;
use crate::agent::AgentError;

/// Binds the socket: creates the parent directory and checks that no other user controls it
/// ([`prepare_socket_dir`]), replaces a stale socket file (refuses if another agent still
/// answers on it, or if the path is not a socket), sets `mode`.
pub fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener, AgentError> {
    let err = |reason: String| AgentError::Socket {
        path: path.display().to_string(),
        reason,
    };
    prepare_socket_dir(path)?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err(
                "exists and is not a socket; refusing to replace it".into()
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err("another process is serving on this socket".into()));
        }
        std::fs::remove_file(path).map_err(|e| err(format!("cannot remove stale socket: {e}")))?;
        tracing::info!(socket = %path.display(), "replaced a stale socket file");
    }
    let listener = UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| err(format!("cannot set mode {mode:o}: {e}")))?;
    Ok(listener)
}
