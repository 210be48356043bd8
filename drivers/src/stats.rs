//! Per-driver counters and health, shared between a driver (writer) and the daemon (reader:
//! `/metrics`, `/api/v1/status`).
//!
//! Counters are atomics, so a scrape never blocks a driver. The last error and the per-device
//! error counts sit behind a `std::sync::Mutex` that is only held for a copy, never across an
//! `.await`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// Counters of one driver. Create one per configured driver with [`DriverStats::new`], share it
/// with an `Arc`.
#[derive(Debug)]
pub struct DriverStats {
    name: String,
    kind: &'static str,
    frames_ok: AtomicU64,
    frames_bad: AtomicU64,
    frames_dropped: AtomicU64,
    reopens: AtomicU64,
    up: AtomicBool,
    last_error: Mutex<Option<String>>,
    device_errors: Mutex<BTreeMap<(String, ErrorKind), u64>>,
    details: Mutex<BTreeMap<&'static str, String>>,
}

/// A snapshot of [`DriverStats`] for reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// The configured driver name.
    pub name: String,
    /// The driver kind (`serial`, `modbus`, …).
    pub kind: &'static str,
    /// Frames (lines, responses, ZCL messages) turned into readings.
    pub frames_ok: u64,
    /// Frames that could not be decoded (bad syntax, checksum, …).
    pub frames_bad: u64,
    /// Frames dropped without decoding (too long, partial at a reopen).
    pub frames_dropped: u64,
    /// Successful reopens of the port or connection after a failure.
    pub reopens: u64,
    /// Whether the port/connection is open and working.
    pub up: bool,
    /// The most recent error, if any.
    pub last_error: Option<String>,
    /// Error counts per (device, kind).
    pub device_errors: Vec<(String, ErrorKind, u64)>,
    /// What the driver learnt from its hardware (e.g. a Zigbee stick's channel and PAN id),
    /// shown in `/api/v1/status`; empty until the driver says.
    pub details: BTreeMap<&'static str, String>,
}

/// Kinds of per-device errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// The device answered with a protocol exception (Modbus exception code, ZCL status).
    Exception,
    /// The device did not answer in time.
    Timeout,
    /// The transport failed while talking to the device.
    Transport,
}

impl ErrorKind {
    /// The label value used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exception => "exception",
            Self::Timeout => "timeout",
            Self::Transport => "transport",
        }
    }
}

impl DriverStats {
    /// Fresh counters; the driver starts down until it opens its port.
    pub fn new(name: impl Into<String>, kind: &'static str) -> Self {
        Self {
            name: name.into(),
            kind,
            frames_ok: AtomicU64::new(0),
            frames_bad: AtomicU64::new(0),
            frames_dropped: AtomicU64::new(0),
            reopens: AtomicU64::new(0),
            up: AtomicBool::new(false),
            last_error: Mutex::new(None),
            device_errors: Mutex::new(BTreeMap::new()),
            details: Mutex::new(BTreeMap::new()),
        }
    }

    /// The configured driver name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn frame_ok(&self) {
        self.frames_ok.fetch_add(1, Ordering::Relaxed);
    }

    pub fn frame_bad(&self) {
        self.frames_bad.fetch_add(1, Ordering::Relaxed);
    }

    pub fn frame_dropped(&self) {
        self.frames_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// The port or connection was opened again after a failure.
    pub fn reopened(&self) {
        self.reopens.fetch_add(1, Ordering::Relaxed);
    }

    /// The port or connection is working.
    pub fn set_up(&self) {
        self.up.store(true, Ordering::Relaxed);
    }

    /// The port or connection failed; `error` becomes the last error.
    pub fn set_down(&self, error: impl Into<String>) {
        self.up.store(false, Ordering::Relaxed);
        self.error(error);
    }

    /// Records `error` as the last error without changing the state.
    pub fn error(&self, error: impl Into<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(error.into());
    }

    /// Counts an error of one device.
    pub fn device_error(&self, device_id: &str, kind: ErrorKind) {
        let mut map = self
            .device_errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *map.entry((device_id.to_owned(), kind)).or_default() += 1;
    }

    /// Replaces what the driver reports about its hardware (see [`StatsSnapshot::details`]).
    pub fn set_details(&self, details: BTreeMap<&'static str, String>) {
        *self.details.lock().unwrap_or_else(PoisonError::into_inner) = details;
    }

    /// Whether the driver is up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// A consistent-enough copy for reporting (each counter is read once).
    pub fn snapshot(&self) -> StatsSnapshot {
        let last_error = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let device_errors = self
            .device_errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|((device, kind), n)| (device.clone(), *kind, *n))
            .collect();
        StatsSnapshot {
            name: self.name.clone(),
            kind: self.kind,
            frames_ok: self.frames_ok.load(Ordering::Relaxed),
            frames_bad: self.frames_bad.load(Ordering::Relaxed),
            frames_dropped: self.frames_dropped.load(Ordering::Relaxed),
            reopens: self.reopens.load(Ordering::Relaxed),
            up: self.up.load(Ordering::Relaxed),
            last_error,
            device_errors,
            details: self
                .details
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_state() {
        let s = DriverStats::new("d", "serial");
        s.frame_ok();
        s.frame_ok();
        s.frame_bad();
        s.frame_dropped();
        s.set_up();
        s.set_down("port vanished");
        s.reopened();
        s.device_error("m1", ErrorKind::Timeout);
        s.device_error("m1", ErrorKind::Timeout);
        let snap = s.snapshot();
        assert_eq!(
            (snap.frames_ok, snap.frames_bad, snap.frames_dropped),
            (2, 1, 1)
        );
        assert_eq!(snap.reopens, 1);
        assert!(!snap.up);
        assert_eq!(snap.last_error.as_deref(), Some("port vanished"));
        assert_eq!(
            snap.device_errors,
            [("m1".to_owned(), ErrorKind::Timeout, 2)]
        );
        assert!(snap.details.is_empty());
        s.set_details(BTreeMap::from([("channel", "15".to_owned())]));
        assert_eq!(s.snapshot().details["channel"], "15");
    }
}
