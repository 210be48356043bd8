//! The cap on devices the drivers register by themselves (`devices.max_automatic`).
//!
//! A driver registers a device the first time it reports a reading for an unknown id (a Zigbee
//! join, a line driver's device field). Each registered device costs memory (its index entry
//! and health monitor) and a row, for as long as it exists, so a noisy serial line or a hostile
//! radio could grow the registry without bound. Beyond the cap an unknown device's readings are
//! still stored and forwarded — a reading is never lost to this cap — but the device is not
//! registered: the readings are counted, a warning is logged (at most once a minute) and the
//! status shows an alarm until there is room again (devices deleted through the API).
//!
//! Counted: devices whose source is a driver (`driver:<name>`) and that the drivers'
//! configuration does not name. Configured devices are always registered and never count, nor
//! do devices added through the API.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// How often the "not registering" warning may be logged.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Whether a driver's reading is taken, and whether its device is in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A registered, enabled device (registered just now if it was unknown).
    Take,
    /// An unknown device beyond `devices.max_automatic`: its readings are stored, the device is
    /// not registered.
    TakeUnregistered,
    /// A disabled device, or an id that cannot be registered: the readings are dropped.
    Refuse,
}

#[derive(Debug)]
pub(super) struct AutomaticCap {
    max: AtomicUsize,
    /// Driver-sourced devices not named in the configuration.
    count: AtomicUsize,
    configured: RwLock<HashSet<String>>,
    /// `outpost_devices_automatic`: mirrors `count`.
    gauge: Gauge,
    /// `outpost_devices_unregistered_readings_total`.
    unregistered: Counter,
    /// Readings left unregistered since there was last room: the alarm stands while the cap is
    /// reached and this is not zero.
    pending: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
}

pub(super) fn is_driver_source(source: &str) -> bool {
    source.starts_with("driver:")
}

impl AutomaticCap {
    /// No cap until [`AutomaticCap::set_max`]; `count` driver-sourced devices exist.
    pub(super) fn new(count: usize) -> AutomaticCap {
        let cap = AutomaticCap {
            max: AtomicUsize::new(usize::MAX),
            count: AtomicUsize::new(0),
            configured: RwLock::new(HashSet::new()),
            gauge: Gauge::default(),
            unregistered: Counter::default(),
            pending: AtomicU64::new(0),
            last_warning: Mutex::new(None),
        };
        cap.set_count(count);
        cap
    }

    pub(super) fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    fn set_count(&self, count: usize) {
        self.count.store(count, Ordering::Relaxed);
        self.gauge.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// The drivers' configured devices; `driver_sourced` lists every driver-sourced device id in
    /// the registry now, to count those that are not configured.
    pub(super) fn set_configured<'a>(
        &self,
        configured: HashSet<String>,
        driver_sourced: impl Iterator<Item = &'a str>,
    ) {
        let count = driver_sourced
            .filter(|id| !configured.contains(*id))
            .count();
        *self
            .configured
            .write()
            .unwrap_or_else(PoisonError::into_inner) = configured;
        self.set_count(count);
    }

    fn counts(&self, id: &str, source: &str) -> bool {
        is_driver_source(source)
            && !self
                .configured
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(id)
    }

    /// Whether one more device may be registered automatically.
    pub(super) fn has_room(&self) -> bool {
        self.count.load(Ordering::Relaxed) < self.max.load(Ordering::Relaxed)
    }

    /// A device was registered (by a driver, or found at start).
    pub(super) fn added(&self, id: &str, source: &str) {
        if self.counts(id, source) {
            self.set_count(self.count.load(Ordering::Relaxed) + 1);
        }
    }

    /// A device was deleted.
    pub(super) fn removed(&self, id: &str, source: &str) {
        if self.counts(id, source) {
            self.set_count(self.count.load(Ordering::Relaxed).saturating_sub(1));
            if self.has_room() {
                self.pending.store(0, Ordering::Relaxed);
            }
        }
    }

    /// `readings` of `device` were taken without registering it. Logs at most once a minute.
    pub(super) fn unregistered(&self, device: &str, readings: u64) {
        self.unregistered.inc_by(readings);
        self.pending.fetch_add(readings, Ordering::Relaxed);
        let mut last = self
            .last_warning
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                device,
                max_automatic = self.max.load(Ordering::Relaxed),
                unregistered_readings = self.unregistered.get(),
                "Not registering a device: devices.max_automatic reached; its readings are \
                 stored but it has no registry entry (delete unused devices or raise the cap)"
            );
        }
    }

    /// The status alarm: while the cap is reached and readings were left unregistered since
    /// there was last room.
    pub(super) fn alarm(&self) -> Option<String> {
        let readings = self.pending.load(Ordering::Relaxed);
        (!self.has_room() && readings > 0).then(|| {
            format!(
                "devices.max_automatic ({}) reached: {readings} reading(s) of unknown devices \
                 stored without registering the device",
                self.max.load(Ordering::Relaxed)
            )
        })
    }

    pub(super) fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "outpost_devices_automatic",
            "Devices registered by drivers on their own (not named in the configuration)",
            self.gauge.clone(),
        );
        registry.register(
            "outpost_devices_unregistered_readings",
            "Readings of unknown devices stored without registering the device, because \
             devices.max_automatic was reached",
            self.unregistered.clone(),
        );
    }
}
