//! A `socat` pseudo-terminal pair standing in for a serial cable: the daemon opens one end by a
//! stable link path (like `/dev/serial/by-id/...`), the test or a peer process the other.
//! Killing socat is an unplug (both ptys vanish, the links are removed); starting it again on
//! the same links is a replug.

#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::require_command;

/// A running `socat pty,… pty,…` with links `<dir>/<name>-dev` (the daemon's end) and
/// `<dir>/<name>-peer` (the sensor's end). Killed on drop.
pub struct PtyPair {
    child: Option<Child>,
    /// The daemon's end.
    pub dev: PathBuf,
    /// The sensor's (or peer's) end.
    pub peer: PathBuf,
}

impl PtyPair {
    /// Starts socat and waits until both links exist.
    pub fn start(dir: &Path, name: &str) -> PtyPair {
        let mut pair = PtyPair {
            child: None,
            dev: dir.join(format!("{name}-dev")),
            peer: dir.join(format!("{name}-peer")),
        };
        pair.plug();
        pair
    }

    /// (Re)starts socat on the same link paths.
    pub fn plug(&mut self) {
        assert!(self.child.is_none(), "already plugged");
        let socat = require_command("socat");
        let end = |link: &Path| format!("pty,raw,echo=0,link={}", link.display());
        let child = Command::new(socat)
            .arg(end(&self.dev))
            .arg(end(&self.peer))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn socat");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(self.dev.exists() && self.peer.exists()) {
            assert!(Instant::now() < deadline, "socat did not create its ptys");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills socat (SIGTERM, so it removes its links) and waits for it: the cable is pulled.
    pub fn unplug(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id())
                && let Some(pid) = rustix::process::Pid::from_raw(pid)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.dev.symlink_metadata().is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // socat removes its links on SIGTERM; make sure a stale one cannot be opened.
        let _ = std::fs::remove_file(&self.dev);
        let _ = std::fs::remove_file(&self.peer);
    }

    /// Opens the sensor's end for writing.
    pub fn open_peer(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.peer)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.peer.display()))
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
