//! Local app containers: the desired set (config + `apps.db`) and one reconcile loop.

use anyhow::Context;
use outpost_config::Config;
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio_util::sync::CancellationToken;

use super::spawn::Spawner;
use crate::apps::{self, Apps};
use crate::registry::Registry;
use crate::status::StatusBoard;
use crate::telemetry;

/// Opens `apps.db` (`None`, shown as inactive, with `apps.enabled = false`). `mqtt_port`: the
/// MQTT server's, which apps reach through the engine's host gateway.
pub async fn open(
    config: &Config,
    mqtt_port: Option<u16>,
    status: &StatusBoard,
    metrics: &mut MetricsRegistry,
) -> anyhow::Result<Option<Apps>> {
    if !config.apps.enabled {
        status.inactive("apps", "disabled by apps.enabled = false", false);
        return Ok(None);
    }
    let (store, saved, failed) = {
        let dir = config.data_dir();
        tokio::task::spawn_blocking(move || {
            let (store, saved) = apps::store::AppStore::open(&dir)?;
            let failed = store.failures()?;
            Ok::<_, apps::store::StoreError>((store, saved, failed))
        })
        .await
        .context("opening apps.db")??
    };
    let bus_url = mqtt_port.map(|port| format!("mqtt://host.docker.internal:{port}"));
    let apps = Apps::new(&config.apps, Some(store), saved)
        .with_failures(failed)
        .with_bus_url(bus_url);
    status.inactive("apps", "connecting to the container engine", false);
    status.watch_apps(apps.clone());
    metrics.register_collector(Box::new(telemetry::apps::AppMetrics::new(apps.clone())));
    Ok(Some(apps))
}

/// The reconcile loop, stopped with ingress. Supervised: a panic in the loop restarts it with
/// backoff.
pub fn spawn(apps: Apps, registry: &Registry, spawner: &Spawner, stop: &CancellationToken) {
    let (registry, board, loop_stop) = (registry.clone(), spawner.status.clone(), stop.clone());
    spawner.supervise("apps", "apps", false, stop.clone(), move || {
        apps::reconcile::run(
            apps.clone(),
            registry.clone(),
            board.clone(),
            loop_stop.clone(),
        )
    });
}
