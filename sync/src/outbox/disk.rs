//! Free space on the filesystem that holds the outbox.

use std::io;
use std::path::Path;

/// Bytes available to an unprivileged writer on the filesystem holding `path`.
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}
