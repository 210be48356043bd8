//! The drivers: one supervised task per configured driver, all feeding one readings channel that
//! the `driver-ingest` task commits through [`Ingest`].

use std::sync::Arc;
use std::time::Duration;

use outpost_config::Config;
use outpost_drivers::{DeviceHealth, DriverContext, DriverStats};
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::spawn::Spawner;
use crate::ingress::{self, Ingest};
use crate::registry::Registry;
use crate::status::StatusBoard;
use crate::telemetry;

/// Capacity of the channel between all drivers and the driver-ingest task. When it is full,
/// drivers wait (their poll loops slow down); nothing is dropped.
const READINGS_QUEUE: usize = 1024;

/// Pause before a driver that panicked is built and started again.
const DRIVER_RESTART: Duration = Duration::from_secs(5);

/// The configured drivers' counters, which exist before the drivers: `/metrics` and the status
/// read them live.
pub struct Drivers {
    stats: Vec<Arc<DriverStats>>,
}

impl Drivers {
    pub fn new(config: &Config, metrics: &mut MetricsRegistry) -> Self {
        let stats: Vec<Arc<DriverStats>> = config
            .drivers
            .iter()
            .map(|d| Arc::new(DriverStats::new(d.name(), d.kind())))
            .collect();
        metrics.register_collector(Box::new(telemetry::drivers::DriverMetrics::new(
            stats.clone(),
        )));
        Self { stats }
    }

    /// Registers the devices the drivers' config names, starts every driver and the ingest task
    /// (returned: it ends once every driver stopped and the queue is empty).
    pub async fn spawn(
        self,
        config: &Config,
        registry: &Registry,
        ingest: &Ingest,
        zigbee: &outpost_drivers::zigbee::ZigbeeControl,
        spawner: &Spawner,
        stop: &CancellationToken,
    ) -> JoinHandle<()> {
        // Devices the drivers' config names are in the registry before the first poll, offline
        // until heard from: a slave that never answers is visible, not a 404.
        registry
            .register_configured(
                config
                    .drivers
                    .iter()
                    .flat_map(|d| {
                        let source = format!("driver:{}", d.name());
                        d.configured_devices()
                            .into_iter()
                            .map(move |id| (id, source.clone()))
                    })
                    .collect(),
            )
            .await;
        let (readings_tx, readings_rx) = mpsc::channel(READINGS_QUEUE);
        let health: Arc<dyn DeviceHealth> =
            Arc::new(ingress::drivers::RegistryHealth(registry.clone()));
        let status = &spawner.status;
        for (driver_config, stats) in config.drivers.iter().zip(self.stats) {
            let context = DriverContext {
                stats: Arc::clone(&stats),
                health: Arc::clone(&health),
                zigbee: zigbee.clone(),
            };
            let name = format!("driver/{}", driver_config.name());
            status.active(&name, false);
            status.watch_driver(&name, stats);
            let supervisor = supervise_driver(
                driver_config.clone(),
                context,
                readings_tx.clone(),
                stop.clone(),
                status.clone(),
                spawner.tracker.clone(),
            );
            spawner.spawn(name, supervisor);
        }
        // The ingest task ends once every driver has dropped its sender and the queue is empty.
        drop(readings_tx);
        spawner.spawn(
            "driver-ingest",
            ingress::drivers::run(readings_rx, ingest.clone(), stop.clone()),
        )
    }
}

/// Runs one driver until it stops. A panic inside the driver does not take the daemon down: it
/// is logged, the driver is shown INACTIVE with the reason, and after [`DRIVER_RESTART`] the
/// driver is built again from its config (its counters carry over). An error the driver returns
/// is final (a configuration it cannot run).
async fn supervise_driver(
    config: outpost_config::DriverConfig,
    context: DriverContext,
    sink: mpsc::Sender<outpost_drivers::Reading>,
    stop: CancellationToken,
    board: StatusBoard,
    tracker: TaskTracker,
) {
    let name = format!("driver/{}", config.name());
    loop {
        let driver = outpost_drivers::from_config(&config, context.clone());
        let run = driver.run(sink.clone(), stop.clone()).in_current_span();
        match tracker.spawn(run).await {
            Ok(Ok(()) | Err(outpost_drivers::DriverError::SinkClosed)) => {
                board.inactive(&name, "stopped", false);
                return;
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "Driver failed");
                board.inactive(&name, e.to_string(), false);
                return;
            }
            Err(join) => {
                let why = if join.is_panic() {
                    "panicked"
                } else {
                    "was cancelled"
                };
                tracing::error!(error = %join, "Driver {why}; restarting it in {DRIVER_RESTART:?}");
                context.stats.set_down(format!("driver {why}; restarting"));
                board.inactive(&name, format!("driver {why}; restarting"), false);
                tokio::select! {
                    () = tokio::time::sleep(DRIVER_RESTART) => {}
                    () = stop.cancelled() => return,
                }
                board.active(&name, false);
            }
        }
    }
}
