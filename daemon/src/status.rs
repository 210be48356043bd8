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
}

impl StatusBoard {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic while holding this lock cannot leave the map half-updated: recover the data.
        let mut guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut guard)
    }

    pub fn set(&self, name: &str, state: State, reason: Option<String>, essential: bool) {
        self.with(|i| {
            i.subsystems.insert(
                name.to_owned(),
                Subsystem {
                    name: name.to_owned(),
                    state,
                    reason,
                    essential,
                },
            );
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

    pub fn subsystems(&self) -> Vec<Subsystem> {
        self.with(|i| i.subsystems.values().cloned().collect())
    }

    pub fn alarms(&self) -> Vec<Alarm> {
        self.with(|i| i.alarms.clone())
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
