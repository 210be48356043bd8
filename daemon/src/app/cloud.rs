//! Cloud sync: the forwarder reads the outbox and produces to Kafka; the fleet task sends the
//! gateway's heartbeats and device inventory; with `kafka.commands.enabled`, the commands
//! consumer reads commands from Kafka into the registry and the relay sends their status events
//! back through the outbox (`crate::cloud_commands`).

use std::sync::Arc;

use outpost_config::Config;
use outpost_sync::forwarder::commands::{CommandStore, CommandsMetrics};
use outpost_sync::forwarder::fleet::FleetSource;
use outpost_sync::forwarder::{DeviceTags, Forwarder, ForwarderOptions, SharedRules};
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::spawn::Spawner;
use super::storage::Storage;
use crate::admin::AdminState;
use crate::apps::Apps;
use crate::cloud_commands::{self, CloudStore, GatewayActions, Relay};
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
    rules: &SharedRules,
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
    let forwarder = forwarder.with_rules(rules.clone());
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

/// What commands for the gateway itself act on, besides storage.
pub struct GatewayParts {
    pub apps: Option<Apps>,
    pub admin: AdminState,
}

/// Runs the fleet task and the forwarder (and the commands tasks) until `stop`. Returns the
/// forwarder's task: it drains its in-flight records within half the grace, and stops before
/// the writer it acks through.
pub fn spawn(
    cloud: Cloud,
    gateway: GatewayParts,
    storage: &Storage,
    spawner: &Spawner,
    stop: &CancellationToken,
) -> JoinHandle<()> {
    let Cloud {
        forwarder,
        commands,
    } = cloud;
    let resend = Arc::new(Notify::new());
    if let Some(metrics) = commands {
        let actions = GatewayActions {
            registry: storage.registry.clone(),
            apps: gateway.apps,
            admin: gateway.admin,
            resend_inventory: Arc::clone(&resend),
        };
        spawn_commands(&forwarder, metrics, actions, storage, spawner, stop);
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
            Arc::clone(&resend),
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
    actions: GatewayActions,
    storage: &Storage,
    spawner: &Spawner,
    stop: &CancellationToken,
) {
    let options = forwarder.options().clone();
    let gateway_commands = options.kafka.commands.gateway;
    let relay = Relay {
        registry: storage.registry.clone(),
        outbox: storage.outbox.clone(),
        gateway_id: Arc::from(options.gateway_id.as_str()),
        status_topic: options.kafka.commands.status_topic.clone(),
    };
    let store: Arc<dyn CommandStore> = Arc::new(CloudStore {
        registry: storage.registry.clone(),
        gateway: gateway_commands,
    });
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
    if gateway_commands {
        let execute_stop = stop.clone();
        spawner.supervise(
            "gateway-commands",
            "commands",
            false,
            stop.clone(),
            move || cloud_commands::execute(actions.clone(), execute_stop.clone()),
        );
    }
}
