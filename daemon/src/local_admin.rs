//! The local admin socket (`admin.socket`, default `/run/outpost/admin.sock`): the admin
//! listener's router served over a Unix socket, for administration on the gateway itself
//! without a token (`sudo outpost devices add sensor-1` right after installation).
//!
//! Decision: **the file's permissions are the access control**. The socket is created mode
//! 0660, owned by the service's user and group, in a directory systemd creates for the service
//! (`RuntimeDirectory=outpost`, 0750): root, the service's user and members of its group can
//! open it, nobody else. Whoever can open it is trusted with the `admin` scope, as whoever can
//! read `/etc/outpost/outpost.toml` could. Each connection's peer credentials (`SO_PEERCRED`)
//! are read when it is accepted: a request on a connection without them is refused (403), and
//! the caller's uid names it where the API logs who did something (`token = local:uid=<uid>`).
//!
//! The socket is created only when its directory exists: the daemon never creates `/run/…`
//! itself, so a development run or a test on the same machine never takes over the installed
//! service's socket. A stale socket file (a daemon killed with `kill -9`: nothing accepts on
//! it) is replaced; a socket another daemon still serves, or any other file at the path, is
//! left alone and this daemon serves no local socket.

use std::io;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::Path;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::net::UnixListener;

/// Who is on the other end of a local socket connection (the connection's `ConnectInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalPeer {
    /// `None` when the credentials could not be read: the request is refused.
    pub uid: Option<u32>,
}

impl Connected<IncomingStream<'_, UnixListener>> for LocalPeer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        match stream.io().peer_cred() {
            Ok(cred) => LocalPeer {
                uid: Some(cred.uid()),
            },
            Err(e) => {
                tracing::warn!(error = %e, "Local admin socket: no peer credentials");
                LocalPeer { uid: None }
            }
        }
    }
}

/// Why the socket is not served.
#[derive(Debug)]
pub enum NotServed {
    /// `admin.socket = ""`.
    Off,
    /// Its directory does not exist (not running under the systemd unit).
    NoDirectory,
    /// Something that is not a socket is at the path.
    NotASocket,
    /// Another process serves a socket at the path.
    InUse,
    Io(io::Error),
}

impl std::fmt::Display for NotServed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotServed::Off => f.write_str("admin.socket is \"\""),
            NotServed::NoDirectory => f.write_str(
                "its directory does not exist (the systemd unit's RuntimeDirectory= creates it)",
            ),
            NotServed::NotASocket => f.write_str("another kind of file is at that path"),
            NotServed::InUse => f.write_str("another process serves a socket at that path"),
            NotServed::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Binds the socket at `path` (mode 0660), replacing a stale socket file.
pub fn bind(path: &Path) -> Result<UnixListener, NotServed> {
    if path.as_os_str().is_empty() {
        return Err(NotServed::Off);
    }
    if !path.parent().is_some_and(Path::is_dir) {
        return Err(NotServed::NoDirectory);
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(NotServed::InUse);
            }
            std::fs::remove_file(path).map_err(NotServed::Io)?;
        }
        Ok(_) => return Err(NotServed::NotASocket),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(NotServed::Io(e)),
    }
    let listener = UnixListener::bind(path).map_err(NotServed::Io)?;
    // The service's umask (0027) would leave the group without write access, which connecting
    // needs.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(NotServed::Io)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_with_mode_0660_replaces_a_stale_socket_and_leaves_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let first = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // A live socket (another daemon's) is not taken over.
        assert!(matches!(bind(&path), Err(NotServed::InUse)));
        drop(first); // as after kill -9: the file stays
        assert!(path.exists());
        let _second = bind(&path).unwrap();

        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(bind(&file), Err(NotServed::NotASocket)));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        assert!(matches!(
            bind(&dir.path().join("missing/admin.sock")),
            Err(NotServed::NoDirectory)
        ));
        assert!(matches!(bind(Path::new("")), Err(NotServed::Off)));
    }
}
