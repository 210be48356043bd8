//! Cloud sync: the forwarder reads the outbox and produces to Kafka; the fleet task sends the
//! gateway's heartbeats and device inventory; with `kafka.commands.enabled`, the commands
//! consumer reads commands from Kafka into the registry and the relay sends their status events
//! back through the outbox (`crate::cloud_commands`).

use std::sync::Arc;

use outpost_config::Config;
use outpost_sync::forwarder::commands::{CommandStore, CommandsMetrics};
use outpost_sync::forwarder::fleet::FleetSource;
use outpost_sync::forwarder::{DeviceTags, Forwarder, ForwarderOptions};
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::spawn::Spawner;
use super::storage::Storage;
use crate::cloud_commands::{self, Relay};
use crate::fleet::GatewayFacts;
use crate::status::StatusBoard;

/// The cloud side, built: the forwarder, and the commands consumer's metrics when it runs.
pub struct Cloud {
    forwarder: Forwarder,
    commands: Option<CommandsMetrics>,
}

/// The forwarder, built (`None`, shown as inactive, with `kafka.enabled = false`).
pub fn forwarder(
    config: &Config,
    storage: &Storage,
    status: &StatusBoard,
    metrics: &mut MetricsRegistry,
) -> Option<Cloud> {
    if !config.kafka.enabled {
        status.inactive(
            "cloud",
            "kafka.enabled = false: records are kept in the outbox until forwarding is enabled",
            false,
        );
        return None;
    }
    let options = ForwarderOptions::from_config(config);
    let tags: Arc<dyn DeviceTags> = Arc::new(storage.registry.clone());
    let (forwarder, handle) = Forwarder::new(options, storage.outbox.clone(), tags);
    handle.metrics().register(metrics);
    status.watch_forwarder(handle);
    status.active("cloud", false);
    let commands = config.kafka.commands.enabled.then(|| {
        let commands = CommandsMetrics::default();
        commands.register(metrics);
        commands
    });
    Some(Cloud {
        forwarder,
        commands,
    })
}

/// Runs the fleet task and the forwarder until `stop`. Returns the forwarder's task: it drains
/// its in-flight records within half the grace, and stops before the writer it acks through.
pub fn spawn(
    cloud: Cloud,
    storage: &Storage,
    spawner: &Spawner,
    stop: &CancellationToken,
) -> JoinHandle<()> {
    let Cloud {
        forwarder,
        commands,
    } = cloud;
    if let Some(metrics) = commands {
        spawn_commands(&forwarder, metrics, storage, spawner, stop);
    }
    let facts: Arc<dyn FleetSource> = Arc::new(GatewayFacts {
        registry: storage.registry.clone(),
        status: spawner.status.clone(),
    });
    let (options, handle, fleet_stop) = (
        forwarder.options().clone(),
        forwarder.handle(),
        stop.clone(),
    );
    let boot_id = outpost_sync::outbox::kernel_boot_id();
    spawner.status.active("fleet", false);
    spawner.supervise("fleet", "fleet", false, stop.clone(), move || {
        outpost_sync::forwarder::fleet::run(
            options.clone(),
            handle.clone(),
            Arc::clone(&facts),
            boot_id.clone(),
            fleet_stop.clone(),
        )
    });
    let forward_stop = stop.clone();
    spawner.supervise("forwarder", "cloud", false, stop.clone(), move || {
        let (forwarder, stop) = (forwarder.clone(), forward_stop.clone());
        async move {
            if let Err(e) = forwarder.run(stop).await {
                tracing::error!(error = %e, "Forwarder stopped");
            }
        }
    })
}

/// The commands consumer and the status relay, each under the supervisor.
fn spawn_commands(
    forwarder: &Forwarder,
    metrics: CommandsMetrics,
    storage: &Storage,
    spawner: &Spawner,
    stop: &CancellationToken,
) {
    let options = forwarder.options().clone();
    let relay = Relay {
        registry: storage.registry.clone(),
        outbox: storage.outbox.clone(),
        gateway_id: Arc::from(options.gateway_id.as_str()),
        status_topic: options.kafka.commands.status_topic.clone(),
    };
    let store: Arc<dyn CommandStore> = Arc::new(storage.registry.clone());
    spawner.status.active("commands", false);
    let consumer_stop = stop.clone();
    spawner.supervise(
        "kafka-commands",
        "commands",
        false,
        stop.clone(),
        move || {
            outpost_sync::forwarder::commands::run(
                options.kafka.clone(),
                options.gateway_id.clone(),
                format!("{}-commands", options.client_id),
                Arc::clone(&store),
                metrics.clone(),
                consumer_stop.clone(),
            )
        },
    );
    let relay_stop = stop.clone();
    spawner.supervise(
        "command-status",
        "commands",
        false,
        stop.clone(),
        move || cloud_commands::relay(relay.clone(), relay_stop.clone()),
    );
}
