//! The gateway's side of the fleet topics (heartbeats and inventory, see
//! `outpost_sync::forwarder::fleet`) and the `outpost fleet watch` command.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use outpost_sync::forwarder::fleet::{self, FleetSource, GatewayView};

use crate::registry::{ListQuery, Registry};
use crate::status::StatusBoard;

/// What a heartbeat reports about this gateway: its subsystems and its devices.
pub struct GatewayFacts {
    pub registry: Registry,
    pub status: StatusBoard,
}

impl FleetSource for GatewayFacts {
    fn subsystems(&self) -> serde_json::Value {
        self.status
            .subsystems()
            .into_iter()
            .map(|s| {
                let state = serde_json::to_value(s.state).unwrap_or_default();
                (s.name, state)
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    fn inventory(&self) -> Vec<(String, serde_json::Value)> {
        let mut out = Vec::new();
        let mut cursor = None;
        loop {
            let query = ListQuery {
                tag: None,
                state: None,
                limit: crate::registry::MAX_PAGE,
                cursor: cursor.take(),
            };
            let Ok(page) = self.registry.list(&query) else {
                return out;
            };
            for d in page.devices {
                // Describing fields only: monitoring (state, last seen) changes with traffic and
                // is not an inventory change.
                let value = serde_json::json!({
                    "id": d.id,
                    "name": d.name,
                    "model": d.model,
                    "batch": d.batch,
                    "firmware": d.firmware,
                    "location": d.location,
                    "tags": d.tags,
                    "enabled": d.enabled,
                    "protocols": d.protocols,
                    "source": d.source,
                    "created_at_ms": d.created_at_ms,
                    "updated_at_ms": d.updated_at_ms,
                });
                out.push((d.id, value));
            }
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => return out,
            }
        }
    }
}

/// `outpost fleet watch`: the last heartbeat of every gateway on the heartbeat topic, flagging
/// gateways that stopped sending. Exits 1 when a gateway is silent (with `--once`).
pub fn watch(config: Option<&Path>, brokers: Option<String>, once: bool, json: bool) -> ExitCode {
    let mut config = match crate::commands::load_config(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(crate::EXIT_CONFIG);
        }
    };
    if let Some(brokers) = brokers {
        config.kafka.brokers = brokers.split(',').map(str::to_owned).collect();
    }
    loop {
        let views = match fleet::read_fleet(&config.kafka, Duration::from_secs(10)) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        if json {
            println!("{}", serde_json::to_string(&views).unwrap_or_default());
        } else {
            print_table(&views);
        }
        if once {
            return if views.iter().any(|v| v.verdict == "silent") {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
        #[allow(clippy::disallowed_methods)] // a blocking CLI loop, no async runtime here
        std::thread::sleep(config.kafka.heartbeat_interval.max(Duration::from_secs(1)));
    }
}

fn print_table(views: &[GatewayView]) {
    println!(
        "{:<24} {:<8} {:>10} {:<9} {:>10} {:>8} {:>10}  VERSION",
        "GATEWAY", "VERDICT", "LAST SEEN", "SYNC", "BACKLOG", "DEVICES", "UPTIME"
    );
    for v in views {
        let h = &v.heartbeat;
        println!(
            "{:<24} {:<8} {:>9}s {:<9} {:>10} {:>8} {:>9}s  {}",
            h.gateway,
            v.verdict,
            v.age_ms / 1000,
            h.forwarder,
            h.backlog_records,
            h.devices,
            h.uptime_s,
            h.version
        );
    }
}
