//! A full disk: appends fail cleanly, the daemon keeps running, and it recovers when space
//! returns; the free-disk floor refuses appends before the disk is actually full.
//!
//! The data directory is a small tmpfs mounted by the test (the test command runs as root; a
//! non-root run fails here with mount's error, it does not skip).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code, no async runtime here

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outpost_e2e::daemon::Daemon;
use outpost_sync::OutboxReader;

/// A tmpfs mounted for the test's lifetime.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

const LOAD: &str = "[[drivers]]\nkind = \"simulator\"\nname = \"fill\"\ndevices = 20\ninterval = \"1ms\"\npayload_bytes = 2000\n";

fn readings_gap_free(data: &Path) -> usize {
    let stored = OutboxReader::open(&data.join("outbox.db"))
        .unwrap()
        .read_all()
        .unwrap();
    let mut next = std::collections::HashMap::new();
    for r in &stored {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        let n = v["n"].as_u64().unwrap();
        let expected = next.entry(r.device_id.clone()).or_insert(0u64);
        assert_eq!(
            n, *expected,
            "device {}: reading lost or reordered",
            r.device_id
        );
        *expected += 1;
    }
    stored.len()
}

#[test]
fn serial_disk_full_fails_cleanly_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("data"), "4m");
    let mut d = Daemon::start(
        dir.path(),
        &format!("[outbox]\nmin_free_disk = \"0\"\n\n{LOAD}"),
    );
    d.wait_until("a commit failing on ENOSPC", Duration::from_secs(30), |d| {
        d.metric("outpost_outbox_commit_errors_total") >= 1.0
    });
    assert!(
        d.logs()
            .iter()
            .any(|l| l.contains("Outbox commit failed") && l.contains("full")),
        "the failure is logged with its cause"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.is_running(), "the daemon survives a full disk");
    assert_eq!(d.get("/healthz").0, 200);
    let stuck = d.metric("outpost_outbox_records");

    fs.resize("64m");
    d.wait_until(
        "appends resuming after space returned",
        Duration::from_secs(30),
        |d| d.metric("outpost_outbox_records") > stuck + 1000.0,
    );
    let (status, _) = d.terminate(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", d.logs().join("\n"));
    // Readings refused while the disk was full were held and retried: none is missing.
    assert!(readings_gap_free(&d.data_dir) > 1000);
}

#[test]
fn serial_disk_floor_refuses_before_the_disk_fills() {
    let dir = tempfile::tempdir().unwrap();
    let _fs = Tmpfs::mount(&dir.path().join("data"), "6m");
    let mut d = Daemon::start(
        dir.path(),
        &format!("[outbox]\nmin_free_disk = \"3MiB\"\n\n{LOAD}"),
    );
    let floor = "outpost_outbox_rejected_records_total{route=\"default\",reason=\"disk_floor\"}";
    d.wait_until(
        "the disk floor refusing appends",
        Duration::from_secs(30),
        |d| d.metric(floor) >= 1.0,
    );
    assert_eq!(
        d.metric("outpost_outbox_commit_errors_total"),
        0.0,
        "refused before ENOSPC"
    );
    assert!(
        d.logs()
            .iter()
            .any(|l| l.contains("Outbox full: refusing appends"))
    );
    assert!(d.is_running());
    let (status, _) = d.terminate(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", d.logs().join("\n"));
    assert!(readings_gap_free(&d.data_dir) > 100);
}
