//! `outpost fleet watch`: the fleet as Kafka sees it, read from the heartbeat topic. A Kafka
//! client like any backend's; it shares nothing with the daemon but the configuration file.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use outpost_sync::forwarder::fleet::{self, GatewayView};

use super::{EXIT_CONFIG, load_config};

/// `outpost fleet watch`: the last heartbeat of every gateway on the heartbeat topic, flagging
/// gateways that stopped sending. Exits 1 when a gateway is silent (with `--once`).
pub fn watch(config: Option<&Path>, brokers: Option<String>, once: bool, json: bool) -> ExitCode {
    let mut config = match load_config(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
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
