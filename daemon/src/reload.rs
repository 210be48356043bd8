//! `SIGHUP` (and `systemctl reload outpost`): the configuration file is read again and what
//! can change without reopening storage or rebinding a listener is applied at once; everything
//! else that differs is reported, never silently ignored.
//!
//! Applied now: `log.level` (unless `RUST_LOG` is set, which keeps precedence as at start),
//! `api.tokens` (the config's tokens are replaced; those created through the API stay),
//! `mqtt.acl` and `mqtt.limits` (both from each device's next CONNECT; connected devices keep
//! theirs), `kafka.rules` (the whole rule list, from the next record stored or forwarded, the
//! backlog included), `drivers` (a driver whose settings changed stops, lets go of its port and
//! starts again with the new ones; removed drivers stop, added ones start; unchanged drivers run
//! on untouched), `edge` (the whole section: the next reading meets the new rules; raised alerts
//! of rules whose name and alert settings are unchanged stay raised; open aggregate windows are
//! closed and stored marked incomplete). Every
//! other key whose value in the file differs from what the daemon runs on is listed by key path
//! under `needs_restart` — in the log (a warning) and in `/api/v1/status` (`config`) — until a
//! restart. A file that does not load (a syntax error, an invalid value) changes nothing: its
//! problems are logged and shown as `config.error`, and the daemon keeps running on what it has.
//!
//! The file is the one `outpost run` resolved: `--config`, else `/etc/outpost/outpost.toml` when
//! it exists, else none (then a reload picks up a default file created since).
//!

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use outpost_config::Config;
use serde::Serialize;
use serde_json::Value;
use tokio::signal::unix::Signal;
use tokio_util::sync::CancellationToken;

use outpost_sync::forwarder::{Rules, SharedRules};

use crate::api::auth::TokenSet;
use crate::app::drivers::DriverSet;
use crate::edge::EdgeRules;
use crate::ingress::Ingest;
use crate::status::StatusBoard;

/// Keys a reload applies.
const APPLIED: &[&str] = &[
    "log.level",
    "api.tokens",
    "mqtt.acl.publish",
    "mqtt.acl.subscribe",
    "mqtt.limits.messages_per_second",
    "mqtt.limits.bytes_per_second",
    "mqtt.limits.burst",
    "kafka.rules",
    "drivers",
    "edge.alerts_topic",
    "edge.aggregates_topic",
    "edge.invalid_topic",
    "edge.max_window_keys",
    "edge.max_alert_keys",
    "edge.rules",
];

/// What the last reload did, for `/api/v1/status` (`config`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The file read, or `null` for the built-in defaults.
    pub file: Option<String>,
    /// Reloads since start (successful or not).
    pub reloads: u64,
    pub last_reload_ms: Option<i64>,
    /// Keys the last successful reload changed in the running daemon.
    pub applied: Vec<String>,
    /// Keys whose value in the file differs from what runs: they take effect at the next start.
    pub needs_restart: Vec<String>,
    /// Why the last reload changed nothing (the file's problems), if it failed.
    pub error: Option<String>,
}

/// The reload task's state.
pub struct Reloader {
    /// `--config` as given (`None`: the default file when it exists).
    pub named: Option<PathBuf>,
    /// What the daemon runs on: the start config with the applied keys updated.
    pub running: Config,
    pub tokens: Arc<TokenSet>,
    /// The MQTT server's global ACL; `None` with `mqtt.enabled = false`.
    pub mqtt_acl: Option<crate::ingress::mqtt::SharedAcl>,
    /// The MQTT server, for its rate limits; `None` with `mqtt.enabled = false`.
    pub mqtt_broker: Option<Arc<outpost_mqtt::broker::Broker>>,
    /// `[[kafka.rules]]` in force (ingestion and the forwarder).
    pub rules: SharedRules,
    /// The running drivers.
    pub drivers: DriverSet,
    /// `[edge]` in force, and the ingestion that stores the old engine's open windows.
    pub edge: Option<(EdgeRules, Ingest)>,
    pub report: Arc<Mutex<Report>>,
}

impl Reloader {
    pub fn new(
        named: Option<PathBuf>,
        running: Config,
        tokens: Arc<TokenSet>,
        mqtt_acl: Option<crate::ingress::mqtt::SharedAcl>,
        mqtt_broker: Option<Arc<outpost_mqtt::broker::Broker>>,
        rules: SharedRules,
        drivers: DriverSet,
    ) -> Reloader {
        let report = Report {
            file: crate::cli::config_file(named.as_deref()).map(|f| f.display().to_string()),
            ..Report::default()
        };
        Reloader {
            named,
            running,
            tokens,
            mqtt_acl,
            mqtt_broker,
            rules,
            drivers,
            edge: None,
            report: Arc::new(Mutex::new(report)),
        }
    }

    /// Applies `[edge]` on reload through `edge`; `ingest` stores the windows a replaced
    /// engine had open.
    pub fn with_edge(mut self, edge: EdgeRules, ingest: Ingest) -> Self {
        self.edge = Some((edge, ingest));
        self
    }

    /// Shows the report as the status document's `config` section.
    pub fn watch(&self, status: &StatusBoard) {
        let report = Arc::clone(&self.report);
        status.watch_section("config", move || {
            let report = report.lock().unwrap_or_else(PoisonError::into_inner);
            serde_json::to_value(&*report).unwrap_or(Value::Null)
        });
    }

    /// One reload: read, compare, apply, report.
    pub async fn reload(&mut self) {
        crate::systemd::reloading();
        let file = crate::cli::config_file(self.named.as_deref());
        let shown = file.as_ref().map_or_else(
            || "built-in defaults".to_owned(),
            |f| f.display().to_string(),
        );
        let mut report = self
            .report
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        report.reloads += 1;
        report.last_reload_ms = Some(outpost_sync::outbox::now_unix_ms());
        report.file = file.as_ref().map(|f| f.display().to_string());
        match crate::cli::load_config(file.as_deref()) {
            Err(e) => {
                tracing::error!(file = %shown, "Configuration not reloaded, nothing changed: {e}");
                report.error = Some(e.to_string());
                report.applied.clear();
            }
            Ok(new) => {
                report.error = None;
                report.applied = self.apply(&new).await;
                report.needs_restart = changed_keys(&self.running, &new);
                if report.needs_restart.is_empty() {
                    tracing::info!(file = %shown, applied = ?report.applied, "Configuration reloaded");
                } else {
                    tracing::warn!(
                        file = %shown,
                        applied = ?report.applied,
                        needs_restart = ?report.needs_restart,
                        "Configuration reloaded; some changes take effect only after a restart"
                    );
                }
            }
        }
        let line = match (&report.error, report.needs_restart.len()) {
            (Some(_), _) => "reload failed: configuration unchanged".to_owned(),
            (None, 0) => "configuration reloaded".to_owned(),
            (None, n) => format!("configuration reloaded; {n} change(s) need a restart"),
        };
        *self.report.lock().unwrap_or_else(PoisonError::into_inner) = report;
        crate::systemd::reloaded(&line);
    }

    /// Applies the keys of [`APPLIED`] that changed; returns those applied.
    async fn apply(&mut self, new: &Config) -> Vec<String> {
        let mut applied = Vec::new();
        if new.log.level != self.running.log.level {
            match crate::telemetry::logging::set_level(&new.log.level) {
                Ok(true) => {
                    self.running.log.level.clone_from(&new.log.level);
                    applied.push("log.level".to_owned());
                }
                Ok(false) => {
                    tracing::info!("log.level not applied: RUST_LOG is set and takes precedence")
                }
                Err(e) => tracing::error!(error = %e, "log.level not applied"),
            }
        }
        if new.api.tokens != self.running.api.tokens {
            self.tokens.replace_configured(&new.api);
            self.running.api.tokens.clone_from(&new.api.tokens);
            applied.push("api.tokens".to_owned());
        }
        if new.mqtt.acl != self.running.mqtt.acl
            && let Some(acl) = &self.mqtt_acl
        {
            *acl.write().unwrap_or_else(PoisonError::into_inner) = new.mqtt.acl.clone();
            self.running.mqtt.acl = new.mqtt.acl.clone();
            applied.push("mqtt.acl".to_owned());
        }
        if new.mqtt.limits != self.running.mqtt.limits
            && let Some(broker) = &self.mqtt_broker
        {
            broker.limiters.set_limits(&new.mqtt.limits);
            self.running.mqtt.limits = new.mqtt.limits.clone();
            applied.push("mqtt.limits".to_owned());
        }
        if new.kafka.rules != self.running.kafka.rules {
            // The rules are compiled against the running [kafka] (default topic, CloudEvents):
            // only the rule list changes here; the other keys are reported as needing a restart.
            self.running.kafka.rules.clone_from(&new.kafka.rules);
            self.rules.replace(Rules::from_config(&self.running.kafka));
            applied.push("kafka.rules".to_owned());
        }
        if new.drivers != self.running.drivers {
            let touched = self.drivers.apply(&new.drivers).await;
            tracing::info!(drivers = ?touched, "Drivers restarted for the reload");
            self.running.drivers.clone_from(&new.drivers);
            applied.push("drivers".to_owned());
        }
        if new.edge != self.running.edge
            && let Some((edge, ingest)) = &self.edge
        {
            // Raised alerts of unchanged rules carry over; open windows are closed (stored as
            // incomplete) rather than mixed across rule versions.
            match edge.reload(&new.edge, ingest).await {
                Ok(_) => {
                    self.running.edge = new.edge.clone();
                    applied.push("edge".to_owned());
                }
                Err(problems) => tracing::error!(?problems, "[edge] not applied"),
            }
        }
        applied
    }
}

/// Reloads at every `SIGHUP` until `stop`. `hangups` is installed at start, before anything
/// else, so an early `SIGHUP` is a reload and not the default (terminating) action.
pub async fn run(mut reloader: Reloader, mut hangups: Signal, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            got = hangups.recv() => if got.is_none() { return },
        }
        tracing::info!(signal = "SIGHUP", "Reloading the configuration");
        reloader.reload().await;
    }
}

/// The key paths where `new` differs from `old`: objects are followed down to their leaves,
/// arrays and values compared whole (`kafka.rules`, `mqtt.acl.publish`). The keys a reload
/// applies are left out once equal, so what remains is what waits for a restart.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (Ok(old), Ok(new)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        return vec!["(the configuration could not be compared)".to_owned()];
    };
    let mut keys = Vec::new();
    diff(&old, &new, "", &mut keys);
    keys.retain(|k| !APPLIED.contains(&k.as_str()));
    keys
}

fn diff(old: &Value, new: &Value, path: &str, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                diff(
                    a.get(key).unwrap_or(&Value::Null),
                    b.get(key).unwrap_or(&Value::Null),
                    &child,
                    out,
                );
            }
        }
        (a, b) if a != b => out.push(path.to_owned()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        outpost_config::from_toml_str(text).unwrap()
    }

    #[test]
    fn changed_keys_name_the_leaves_and_leave_out_what_a_reload_applies() {
        let old = config("[log]\nlevel = \"info\"\n[mqtt]\nlisten = \"127.0.0.1:1883\"\n");
        let new = config(
            "[log]\nlevel = \"debug\"\n[mqtt]\nlisten = \"127.0.0.1:1884\"\n\
             [kafka]\nlinger = \"20ms\"\n",
        );
        assert_eq!(changed_keys(&old, &new), ["kafka.linger", "mqtt.listen"]);
        assert!(changed_keys(&old, &old).is_empty());
    }
}
