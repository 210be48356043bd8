//! Free space on the filesystem that holds the outbox, and the space kept in reserve for a
//! full disk.
//!
//! # A full disk
//!
//! Deleting from SQLite writes too (the WAL), so a filesystem filled to the last byte — by
//! anything: an app, the journal, a log — would leave the outbox unable even to delete what Kafka
//! has, and the forwarder could never free space. So the outbox keeps [`Reserve`]: a file of
//! `outbox.disk_reserve` bytes beside the database. When the disk is found full (at open, when a
//! commit fails with "database or disk is full", or when less than the reserve is free) the
//! outbox **releases** it — deletes, the boot row and the WAL's growth get that room — and
//! refuses appends (devices get their protocol's "try later") until the filesystem has room for
//! the reserve again; then it takes the reserve back and accepts appends by itself.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

/// Bytes available to an unprivileged writer on the filesystem holding `path`.
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// The file name of the reserve inside the data directory.
pub const RESERVE_FILE: &str = "outbox.reserve";

/// Room the filesystem must have beyond the reserve before appends resume: a little more than
/// the reserve itself, so the outbox does not flip between full and not full on every commit.
const RESUME_MARGIN: u64 = 1024 * 1024;

/// The space kept in reserve (see the module docs).
#[derive(Debug)]
pub struct Reserve {
    path: PathBuf,
    dir: PathBuf,
    size: u64,
}

impl Reserve {
    pub fn new(dir: &Path, size: u64) -> Self {
        Self {
            path: dir.join(RESERVE_FILE),
            dir: dir.to_path_buf(),
            size,
        }
    }

    /// Whether the reserve is in place (always, when it has no size).
    pub fn held(&self) -> bool {
        self.size == 0 || fs::metadata(&self.path).is_ok_and(|m| m.len() >= self.size)
    }

    /// Gives the reserve's space back to the filesystem.
    pub fn release(&self) {
        match fs::remove_file(&self.path) {
            Ok(()) => tracing::warn!(
                bytes = self.size,
                "Disk full: released the outbox's disk reserve so delivered records can still be deleted"
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(error = %e, path = %self.path.display(), "Cannot release the disk reserve")
            }
        }
    }

    /// Whether the disk counts as full: less free than the reserve while it is held (the next
    /// commit could fail), or no room to take it back while it is released.
    pub fn disk_full(&self) -> bool {
        if self.size == 0 {
            return false;
        }
        let Ok(free) = available_bytes(&self.dir) else {
            return false;
        };
        if self.held() {
            free < self.size
        } else {
            free < self.size + RESUME_MARGIN
        }
    }

    /// Takes the reserve (back): allocates the file's blocks. False if the filesystem has no room
    /// for it (the file is then removed again).
    pub fn take(&self) -> bool {
        if self.held() {
            return true;
        }
        let result = File::create(&self.path).and_then(|file| {
            rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, self.size)
                .map_err(io::Error::from)?;
            file.sync_all()
        });
        match result {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "No room for the disk reserve yet");
                let _ = fs::remove_file(&self.path);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report

    use super::*;

    #[test]
    fn the_reserve_is_taken_released_and_taken_back() {
        let dir = tempfile::tempdir().unwrap();
        let reserve = Reserve::new(dir.path(), 64 * 1024);
        assert!(!reserve.held());
        assert!(reserve.take());
        assert!(reserve.held());
        let file = dir.path().join(RESERVE_FILE);
        assert_eq!(fs::metadata(&file).unwrap().len(), 64 * 1024);
        // Blocks really allocated, not a sparse file.
        let blocks = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&file).unwrap());
        assert!(blocks * 512 >= 64 * 1024, "{blocks} blocks");
        reserve.release();
        assert!(!reserve.held() && !file.exists());
        assert!(Reserve::new(dir.path(), 0).held(), "no reserve configured");
    }
}
