//! Per-device monitoring: counters, rates, last seen, signal quality and location.
//!
//! Kept in memory and updated on every message by [`super::Registry::observe`], so updates are a
//! map lookup under a short lock and never touch the disk. The map holds one entry per
//! registered device (entries appear with the device and go with it), so it is bounded by the
//! inventory; traffic for unknown ids is not recorded per device. The counters, last seen, signal
//! and location are persisted by [`super::Registry::flush`] (every ~10 s and at shutdown); the
//! rates are not (they decay to nothing within minutes anyway).
//!
//! **Rates** are exponentially decayed counts with a 60 s time constant: each event adds 1 and
//! the sum decays by `exp(-dt / 60 s)`. At a steady rate of *r* events per minute the value
//! converges to *r*, so it reads directly as "per minute"; after traffic stops it halves about
//! every 42 s (`60 s × ln 2`). This needs no buckets and O(1) memory per device.
//!
//! **State**: `disabled` if the device is disabled, else `online` if it was seen within
//! `offline_after`, else `offline`. "Seen" is measured on the monotonic clock while the process
//! runs; for a device not heard from since the daemon started, the persisted wall-clock time of
//! its last message is compared with the wall clock (informational only, like every wall-clock
//! value here: a Pi booting in 1970 just shows its devices offline until they speak).
//! A device counts as seen when a message of it was accepted, malformed or dropped, or it
//! reported signal or location: it spoke, even if what it said was unusable. A *refused* message
//! (bad secret, disabled, protocol not allowed) does not count: it was not proven to be the device.

use std::time::{Duration, Instant};

use serde::Serialize;

/// Time constant of the decayed rates.
const RATE_TAU: Duration = Duration::from_secs(60);

/// An exponentially decayed event count (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct DecayedRate {
    value: f64,
    at: Option<Instant>,
}

impl DecayedRate {
    fn decayed(&self, now: Instant) -> f64 {
        match self.at {
            None => 0.0,
            Some(at) => {
                let dt = now.saturating_duration_since(at).as_secs_f64();
                self.value * (-dt / RATE_TAU.as_secs_f64()).exp()
            }
        }
    }

    pub fn add(&mut self, now: Instant, n: f64) {
        self.value = self.decayed(now) + n;
        self.at = Some(now);
    }

    /// Events per minute, as of `now`.
    pub fn per_minute(&self, now: Instant) -> f64 {
        self.decayed(now) * 60.0 / RATE_TAU.as_secs_f64()
    }
}

/// What is known about a device's traffic.
#[derive(Debug, Clone, Default)]
pub struct Monitor {
    /// Wall-clock time of the last message, ms since the epoch (persisted).
    pub last_seen_ms: Option<i64>,
    /// Monotonic time of the last message in this process.
    pub last_seen_at: Option<Instant>,
    pub messages: u64,
    pub bytes: u64,
    pub malformed: u64,
    pub refused: u64,
    pub dropped: u64,
    pub message_rate: DecayedRate,
    pub error_rate: DecayedRate,
    pub rssi_dbm: Option<f64>,
    pub rssi_at_ms: Option<i64>,
    pub location: Option<(f64, f64)>,
    pub location_at_ms: Option<i64>,
    /// Changed since the last flush.
    pub dirty: bool,
    /// Set when a driver reported the device unreachable (its port is gone, a Modbus slave
    /// stopped answering): the device is offline until it is seen again, whatever
    /// `offline_after` says. Not persisted.
    pub offline_reason: Option<String>,
}

/// One traffic event of a device, reported by the ingress paths.
#[allow(dead_code)] // Signal and Location: reported by drivers and devices that know them
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Traffic {
    /// A message was accepted (committed or handed on), `bytes` long.
    Accepted { bytes: u64 },
    /// A message could not be decoded.
    Malformed,
    /// A message or connection was refused (authentication, disabled, protocol, ACL).
    Refused,
    /// An accepted message was dropped (outbox full, queue full).
    Dropped,
    /// The device or its driver reported its signal strength in dBm.
    Signal { rssi: f64 },
    /// The device or its driver reported its position.
    Location { lat: f64, lon: f64 },
}

impl Monitor {
    /// Applies one event observed at `now` (monotonic) / `now_ms` (wall clock).
    pub fn apply(&mut self, event: Traffic, now: Instant, now_ms: i64) {
        let seen = match event {
            Traffic::Accepted { bytes } => {
                self.messages = self.messages.saturating_add(1);
                self.bytes = self.bytes.saturating_add(bytes);
                self.message_rate.add(now, 1.0);
                true
            }
            Traffic::Malformed => {
                self.malformed = self.malformed.saturating_add(1);
                self.error_rate.add(now, 1.0);
                true
            }
            Traffic::Refused => {
                self.refused = self.refused.saturating_add(1);
                self.error_rate.add(now, 1.0);
                false
            }
            Traffic::Dropped => {
                self.dropped = self.dropped.saturating_add(1);
                self.error_rate.add(now, 1.0);
                true
            }
            Traffic::Signal { rssi } => {
                if !rssi.is_finite() {
                    return;
                }
                self.rssi_dbm = Some(rssi);
                self.rssi_at_ms = Some(now_ms);
                true
            }
            Traffic::Location { lat, lon } => {
                let valid = (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon);
                if !valid {
                    return;
                }
                self.location = Some((lat, lon));
                self.location_at_ms = Some(now_ms);
                true
            }
        };
        if seen {
            self.seen(now, now_ms);
        }
        self.dirty = true;
    }

    pub fn seen(&mut self, now: Instant, now_ms: i64) {
        self.offline_reason = None;
        self.last_seen_at = Some(now);
        self.last_seen_ms = Some(now_ms);
        self.dirty = true;
    }

    /// Whether the device was seen within `offline_after` of `now` (see the module docs).
    pub fn online(&self, offline_after: Duration, now: Instant, now_ms: i64) -> bool {
        if self.offline_reason.is_some() {
            return false;
        }
        match (self.last_seen_at, self.last_seen_ms) {
            (Some(at), _) => now.saturating_duration_since(at) <= offline_after,
            (None, Some(ms)) => {
                let age = now_ms.saturating_sub(ms);
                (0..=i64::try_from(offline_after.as_millis()).unwrap_or(i64::MAX)).contains(&age)
            }
            (None, None) => false,
        }
    }

    pub fn state(
        &self,
        enabled: bool,
        offline_after: Duration,
        now: Instant,
        now_ms: i64,
    ) -> State {
        if !enabled {
            State::Disabled
        } else if self.online(offline_after, now, now_ms) {
            State::Online
        } else {
            State::Offline
        }
    }
}

/// A device's state as reported by the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Online,
    Offline,
    Disabled,
}

impl State {
    pub const NAMES: &'static [&'static str] = &["online", "offline", "disabled"];

    pub fn parse(text: &str) -> Option<State> {
        match text {
            "online" => Some(State::Online),
            "offline" => Some(State::Offline),
            "disabled" => Some(State::Disabled),
            _ => None,
        }
    }
}

/// Error counters of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ErrorCounts {
    pub malformed: u64,
    pub refused: u64,
    pub dropped: u64,
}

/// Last reported position.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Position {
    pub lat: f64,
    pub lon: f64,
    /// When it was reported (wall clock, ms since the epoch).
    pub at_ms: i64,
}

/// Last reported signal quality.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Signal {
    pub rssi_dbm: f64,
    /// When it was reported (wall clock, ms since the epoch).
    pub at_ms: i64,
}

/// The monitoring fields of one device, as served by `GET /api/v1/devices/{id}/status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceStatus {
    pub id: String,
    pub state: State,
    pub enabled: bool,
    /// Wall-clock time of the last message, ms since the epoch.
    pub last_seen_ms: Option<i64>,
    /// Seconds since the last message, on the monotonic clock when it was seen since the daemon
    /// started, else from the wall clock.
    pub last_seen_age_seconds: Option<f64>,
    pub messages: u64,
    pub bytes: u64,
    pub errors: ErrorCounts,
    /// Accepted messages per minute (exponentially decayed, 60 s time constant).
    pub messages_per_minute: f64,
    /// Malformed + refused + dropped per minute (exponentially decayed, 60 s time constant).
    pub errors_per_minute: f64,
    pub signal: Option<Signal>,
    pub location: Option<Position>,
    /// The `offline_after` threshold in seconds, for reading `state`.
    pub offline_after_seconds: u64,
    /// Why a driver reported the device offline (until it is seen again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offline_reason: Option<String>,
}

impl Monitor {
    pub fn snapshot(
        &self,
        id: &str,
        enabled: bool,
        offline_after: Duration,
        now: Instant,
        now_ms: i64,
    ) -> DeviceStatus {
        let age = match (self.last_seen_at, self.last_seen_ms) {
            (Some(at), _) => Some(now.saturating_duration_since(at).as_secs_f64()),
            (None, Some(ms)) => Some((now_ms.saturating_sub(ms)).max(0) as f64 / 1000.0),
            (None, None) => None,
        };
        DeviceStatus {
            id: id.to_owned(),
            state: self.state(enabled, offline_after, now, now_ms),
            enabled,
            last_seen_ms: self.last_seen_ms,
            last_seen_age_seconds: age,
            messages: self.messages,
            bytes: self.bytes,
            errors: ErrorCounts {
                malformed: self.malformed,
                refused: self.refused,
                dropped: self.dropped,
            },
            messages_per_minute: round2(self.message_rate.per_minute(now)),
            errors_per_minute: round2(self.error_rate.per_minute(now)),
            signal: self
                .rssi_dbm
                .zip(self.rssi_at_ms)
                .map(|(rssi_dbm, at_ms)| Signal { rssi_dbm, at_ms }),
            location: self
                .location
                .zip(self.location_at_ms)
                .map(|((lat, lon), at_ms)| Position { lat, lon, at_ms }),
            offline_after_seconds: offline_after.as_secs(),
            offline_reason: self.offline_reason.clone(),
        }
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_rate_reads_as_per_minute_and_decays() {
        let t0 = Instant::now();
        let mut r = DecayedRate::default();
        assert_eq!(r.per_minute(t0), 0.0);
        // 2 events per second for 10 minutes: 120 per minute.
        for i in 0..1200 {
            r.add(t0 + Duration::from_millis(500 * i), 1.0);
        }
        let end = t0 + Duration::from_secs(600);
        let rate = r.per_minute(end);
        assert!((rate - 120.0).abs() < 2.0, "{rate}");
        // Halves in 60 s × ln 2.
        let half = r.per_minute(end + Duration::from_secs_f64(60.0 * std::f64::consts::LN_2));
        assert!((half - rate / 2.0).abs() < 0.5, "{half}");
        assert!(r.per_minute(end + Duration::from_secs(3600)) < 0.01);
    }

    #[test]
    fn state_follows_last_seen_and_enabled() {
        let t0 = Instant::now();
        let after = Duration::from_secs(300);
        let mut m = Monitor::default();
        assert_eq!(m.state(true, after, t0, 1_000_000), State::Offline);
        m.apply(Traffic::Accepted { bytes: 10 }, t0, 1_000_000);
        assert_eq!(m.state(true, after, t0, 1_000_000), State::Online);
        assert_eq!(m.state(false, after, t0, 1_000_000), State::Disabled);
        let later = t0 + Duration::from_secs(301);
        assert_eq!(m.state(true, after, later, 1_301_000), State::Offline);
        // After a restart only the wall clock is known.
        let restored = Monitor {
            last_seen_ms: Some(1_000_000),
            ..Monitor::default()
        };
        assert_eq!(restored.state(true, after, t0, 1_100_000), State::Online);
        assert_eq!(restored.state(true, after, t0, 1_400_001), State::Offline);
        // A wall clock that went backwards does not make it online.
        assert_eq!(restored.state(true, after, t0, 5_000), State::Offline);
        // A driver's report wins until the device is seen again.
        let mut reported = Monitor::default();
        reported.seen(t0, 1_000_000);
        reported.offline_reason = Some("slave not answering".into());
        assert_eq!(reported.state(true, after, t0, 1_000_000), State::Offline);
        reported.seen(t0, 1_000_000);
        assert_eq!(reported.state(true, after, t0, 1_000_000), State::Online);
    }

    #[test]
    fn refused_counts_but_is_not_seen() {
        let t0 = Instant::now();
        let mut m = Monitor::default();
        m.apply(Traffic::Refused, t0, 1);
        assert_eq!(m.refused, 1);
        assert!(m.last_seen_ms.is_none());
        m.apply(Traffic::Malformed, t0, 2);
        m.apply(Traffic::Dropped, t0, 3);
        assert_eq!(m.last_seen_ms, Some(3));
        let s = m.snapshot("d", true, Duration::from_secs(60), t0, 3);
        assert_eq!(
            s.errors,
            ErrorCounts {
                malformed: 1,
                refused: 1,
                dropped: 1
            }
        );
        assert!((s.errors_per_minute - 3.0).abs() < 0.01);
        assert_eq!(s.messages, 0);
    }

    #[test]
    fn signal_and_location_keep_the_last_valid_report() {
        let t0 = Instant::now();
        let mut m = Monitor::default();
        m.apply(Traffic::Signal { rssi: -71.5 }, t0, 10);
        m.apply(Traffic::Signal { rssi: f64::NAN }, t0, 11);
        m.apply(
            Traffic::Location {
                lat: 48.1,
                lon: 11.5,
            },
            t0,
            12,
        );
        m.apply(
            Traffic::Location {
                lat: 91.0,
                lon: 0.0,
            },
            t0,
            13,
        );
        let s = m.snapshot("d", true, Duration::from_secs(60), t0, 14);
        assert_eq!(
            s.signal,
            Some(Signal {
                rssi_dbm: -71.5,
                at_ms: 10
            })
        );
        assert_eq!(
            s.location,
            Some(Position {
                lat: 48.1,
                lon: 11.5,
                at_ms: 12
            })
        );
    }
}
