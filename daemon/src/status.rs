//! The gateway's view of its own subsystems: each is ACTIVE or INACTIVE with a reason, plus any
//! standing alarms. Reported by `/api/v1/status`, `/readyz` and the systemd STATUS line.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum State {
    Active,
    Inactive,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subsystem {
    pub name: String,
    pub state: State,
    /// Why it is inactive (or a note on how it runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether the gateway is not ready while this subsystem is inactive.
    pub essential: bool,
    /// Times its supervisor restarted it after a failure (absent when 0).
    #[serde(skip_serializing_if = "is_zero")]
    pub restarts: u64,
    /// What a driver learnt from its hardware, e.g. the channel and PAN id a Zigbee stick is
    /// really on (absent when empty).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alarm {
    pub subsystem: String,
    pub message: String,
}

/// Shared, cheap to clone. Writers are rare (state changes); readers are status requests.
#[derive(Debug, Clone, Default)]
pub struct StatusBoard {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    subsystems: BTreeMap<String, Subsystem>,
    alarms: Vec<Alarm>,
    /// Live state of running drivers, read when the status is asked for.
    drivers: BTreeMap<String, Arc<outpost_drivers::DriverStats>>,
    /// The apps subsystem, whose per-app states are read when the status is asked for.
    apps: Option<crate::apps::Apps>,
    /// The Kafka forwarder, whose state is read when the status is asked for.
    forwarder: Option<outpost_sync::forwarder::ForwarderHandle>,
    /// Sections of the status document other subsystems fill in (`"mqtt"`), read when the
    /// status is asked for.
    sections: BTreeMap<&'static str, Section>,
    /// The outbox, whose dead letters are an alarm while there are any.
    outbox: Option<outpost_sync::Outbox>,
    /// Other live alarms, read when the status is asked for.
    alarm_sources: Vec<AlarmSource>,
}

/// A subsystem's live alarm: its message while the condition holds.
struct AlarmSource {
    subsystem: String,
    current: Box<dyn Fn() -> Option<String> + Send>,
}

/// A subsystem's section of the status document: its figures when the status is read.
struct Section(Box<dyn Fn() -> serde_json::Value + Send>);

impl std::fmt::Debug for Section {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Section")
    }
}

impl std::fmt::Debug for AlarmSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlarmSource")
            .field("subsystem", &self.subsystem)
            .finish_non_exhaustive()
    }
}

impl StatusBoard {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic while holding this lock cannot leave the map half-updated: recover the data.
        let mut guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut guard)
    }

    pub fn set(&self, name: &str, state: State, reason: Option<String>, essential: bool) {
        self.with(|i| {
            let restarts = i.subsystems.get(name).map_or(0, |s| s.restarts);
            i.subsystems.insert(
                name.to_owned(),
                Subsystem {
                    name: name.to_owned(),
                    state,
                    reason,
                    essential,
                    restarts,
                    details: BTreeMap::new(),
                },
            );
        });
    }

    /// Counts a restart of `name` by its supervisor.
    pub fn restarted(&self, name: &str) {
        self.with(|i| {
            if let Some(s) = i.subsystems.get_mut(name) {
                s.restarts += 1;
            }
        });
    }

    pub fn active(&self, name: &str, essential: bool) {
        self.set(name, State::Active, None, essential);
    }

    pub fn inactive(&self, name: &str, reason: impl Into<String>, essential: bool) {
        self.set(name, State::Inactive, Some(reason.into()), essential);
    }

    pub fn alarm(&self, subsystem: &str, message: impl Into<String>) {
        self.with(|i| {
            i.alarms.push(Alarm {
                subsystem: subsystem.to_owned(),
                message: message.into(),
            })
        });
    }

    /// While subsystem `name` (a running driver) is ACTIVE, its state and reason come from
    /// `stats`: INACTIVE with the last error while its port/connection is down.
    pub fn watch_driver(&self, name: &str, stats: Arc<outpost_drivers::DriverStats>) {
        self.with(|i| i.drivers.insert(name.to_owned(), stats));
    }

    /// Removes the subsystem `name` (a driver a reload removed): it is no longer shown.
    pub fn forget(&self, name: &str) {
        self.with(|i| {
            i.subsystems.remove(name);
            i.drivers.remove(name);
        });
    }

    /// `current` is asked for `subsystem`'s live alarm whenever the alarms are read: a narrow
    /// hook, so this board need not know the subsystem's types.
    pub fn watch_alarm(
        &self,
        subsystem: &str,
        current: impl Fn() -> Option<String> + Send + 'static,
    ) {
        self.with(|i| {
            i.alarm_sources.push(AlarmSource {
                subsystem: subsystem.to_owned(),
                current: Box::new(current),
            })
        });
    }

    /// Per-app states come from `apps` (shown under `"apps"` in the status document).
    pub fn watch_apps(&self, apps: crate::apps::Apps) {
        self.with(|i| i.apps = Some(apps));
    }

    /// The `cloud` subsystem follows the forwarder: INACTIVE while Kafka is offline.
    pub fn watch_forwarder(&self, forwarder: outpost_sync::forwarder::ForwarderHandle) {
        self.with(|i| i.forwarder = Some(forwarder));
    }

    /// The forwarder's status; `None` when forwarding is disabled.
    pub fn forwarder(&self) -> Option<outpost_sync::forwarder::ForwarderStatus> {
        self.with(|i| i.forwarder.clone()).map(|f| f.status())
    }

    /// `read` gives the section `name` of the status document (the MQTT server's figures under
    /// `"mqtt"`) whenever the status is read: a narrow hook, like [`Self::watch_alarm`], so this
    /// board need not know the subsystem's types.
    pub fn watch_section(
        &self,
        name: &'static str,
        read: impl Fn() -> serde_json::Value + Send + 'static,
    ) {
        self.with(|i| i.sections.insert(name, Section(Box::new(read))));
    }

    /// Dead letters in `outbox` are an alarm of subsystem `outbox` while there are any.
    pub fn watch_outbox(&self, outbox: outpost_sync::Outbox) {
        self.with(|i| i.outbox = Some(outbox));
    }

    /// The section `name` of the status document; `null` when no subsystem fills it in (the
    /// MQTT server disabled, say).
    pub fn section(&self, name: &str) -> serde_json::Value {
        self.with(|i| i.sections.get(name).map(|s| (s.0)()))
            .unwrap_or(serde_json::Value::Null)
    }

    /// Each running driver's figures: name, kind, up, frame counters, reopens, last error,
    /// details (for the console's drivers page).
    pub fn drivers(&self) -> Vec<serde_json::Value> {
        self.with(|i| {
            i.drivers
                .iter()
                .map(|(subsystem, stats)| {
                    let s = stats.snapshot();
                    serde_json::json!({
                        "subsystem": subsystem,
                        "name": s.name,
                        "kind": s.kind,
                        "up": s.up,
                        "frames_ok": s.frames_ok,
                        "frames_bad": s.frames_bad,
                        "frames_dropped": s.frames_dropped,
                        "reopens": s.reopens,
                        "last_error": s.last_error,
                        "details": s.details,
                    })
                })
                .collect()
        })
    }

    /// Each app's status, by name; empty without the apps subsystem.
    pub fn apps(&self) -> BTreeMap<String, crate::apps::AppStatus> {
        self.with(|i| i.apps.clone())
            .map(|a| a.statuses())
            .unwrap_or_default()
    }

    pub fn subsystems(&self) -> Vec<Subsystem> {
        self.with(|i| {
            i.subsystems
                .values()
                .map(|s| match i.drivers.get(&s.name) {
                    Some(stats) if s.state == State::Active => {
                        let snap = stats.snapshot();
                        let details = snap
                            .details
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v))
                            .collect();
                        if snap.up {
                            let reason = snap.last_error.map(|e| format!("up; last error: {e}"));
                            Subsystem {
                                reason,
                                details,
                                ..s.clone()
                            }
                        } else {
                            Subsystem {
                                state: State::Inactive,
                                reason: Some(snap.last_error.unwrap_or_else(|| "starting".into())),
                                details,
                                ..s.clone()
                            }
                        }
                    }
                    _ if s.name == "cloud" && s.state == State::Active => {
                        match i.forwarder.as_ref().map(|f| f.status()) {
                            Some(f) if f.state == outpost_sync::forwarder::State::Offline => {
                                Subsystem {
                                    state: State::Inactive,
                                    reason: Some(format!(
                                        "Kafka unreachable; {} records waiting in the outbox{}",
                                        f.backlog_records,
                                        f.last_error
                                            .map(|e| format!("; last error: {e}"))
                                            .unwrap_or_default()
                                    )),
                                    ..s.clone()
                                }
                            }
                            _ => s.clone(),
                        }
                    }
                    _ => s.clone(),
                })
                .collect()
        })
    }

    /// Standing alarms: those raised at start, then the live ones (a full disk, dead letters).
    pub fn alarms(&self) -> Vec<Alarm> {
        self.with(|i| {
            let mut alarms = i.alarms.clone();
            if i.outbox
                .as_ref()
                .is_some_and(outpost_sync::Outbox::disk_full)
            {
                alarms.push(Alarm {
                    subsystem: "outbox".into(),
                    message: "disk full: appends are refused until the data directory's \
                              filesystem has room again (delivered records are still deleted)"
                        .into(),
                });
            }
            let dead = i.outbox.as_ref().map(|o| o.dead_letter_figures());
            if let Some((records, bytes)) = dead.filter(|(records, _)| *records > 0) {
                alarms.push(Alarm {
                    subsystem: "outbox".into(),
                    message: format!(
                        "{records} dead letter(s) ({bytes} bytes): records Kafka refused for \
                         good; list them with `outpost dead-letters list`, then retry or drop them"
                    ),
                });
            }
            for source in &i.alarm_sources {
                if let Some(message) = (source.current)() {
                    alarms.push(Alarm {
                        subsystem: source.subsystem.clone(),
                        message,
                    });
                }
            }
            alarms
        })
    }

    /// Essential subsystems that are not active, with their reasons.
    pub fn not_ready(&self) -> Vec<Subsystem> {
        self.with(|i| {
            i.subsystems
                .values()
                .filter(|s| s.essential && s.state != State::Active)
                .cloned()
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_drivers_report_their_port_state() {
        let board = StatusBoard::default();
        let stats = Arc::new(outpost_drivers::DriverStats::new("line", "serial"));
        board.active("driver/line", false);
        board.watch_driver("driver/line", Arc::clone(&stats));
        let show = |b: &StatusBoard| b.subsystems().pop().expect("one subsystem");
        assert_eq!(show(&board).state, State::Inactive);
        assert_eq!(show(&board).reason.as_deref(), Some("starting"));
        stats.set_up();
        assert_eq!(
            (show(&board).state, show(&board).reason),
            (State::Active, None)
        );
        stats.set_down("cannot open /dev/ttyUSB0: No such file or directory");
        let s = show(&board);
        assert_eq!(s.state, State::Inactive);
        assert!(s.reason.expect("reason").contains("/dev/ttyUSB0"));
        stats.set_up();
        let s = show(&board);
        assert_eq!(s.state, State::Active);
        assert!(
            s.reason
                .expect("reason")
                .starts_with("up; last error: cannot open")
        );
        // A stopped driver task wins over its last port state.
        board.inactive("driver/line", "stopped", false);
        assert_eq!(show(&board).reason.as_deref(), Some("stopped"));
        assert!(board.not_ready().is_empty(), "drivers are not essential");
    }
}
