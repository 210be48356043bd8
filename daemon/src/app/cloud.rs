//! Cloud sync: the forwarder reads the outbox and produces to Kafka; the fleet task sends the
//! gateway's heartbeats and device inventory.

use std::sync::Arc;

use outpost_config::Config;
use outpost_sync::forwarder::fleet::FleetSource;
use outpost_sync::forwarder::{DeviceTags, Forwarder, ForwarderOptions};
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::spawn::Spawner;
use super::storage::Storage;
use crate::fleet::GatewayFacts;
use crate::status::StatusBoard;

/// The forwarder, built (`None`, shown as inactive, with `kafka.enabled = false`).
pub fn forwarder(
    config: &Config,
    storage: &Storage,
    status: &StatusBoard,
    metrics: &mut MetricsRegistry,
) -> Option<Forwarder> {
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
    Some(forwarder)
}

/// Runs the fleet task and the forwarder until `stop`. Returns the forwarder's task: it drains
/// its in-flight records within half the grace, and stops before the writer it acks through.
pub fn spawn(
    forwarder: Forwarder,
    storage: &Storage,
    spawner: &Spawner,
    stop: &CancellationToken,
) -> JoinHandle<()> {
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
