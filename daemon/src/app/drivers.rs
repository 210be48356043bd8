//! The drivers: one supervised task per configured driver, all feeding one readings channel that
//! the `driver-ingest` task commits through [`Ingest`]. A reload changes the set
//! ([`DriverSet::apply`]): only the drivers whose settings changed stop and start again.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use outpost_config::{Config, DriverConfig};
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
use crate::telemetry::drivers::DriverStatsList;

/// Capacity of the channel between all drivers and the driver-ingest task. When it is full,
/// drivers wait (their poll loops slow down); nothing is dropped.
const READINGS_QUEUE: usize = 1024;

/// Pause before a driver that panicked is built and started again.
const DRIVER_RESTART: Duration = Duration::from_secs(5);

/// The configured drivers' counters, which exist before the drivers: `/metrics` and the status
/// read them live.
pub struct Drivers {
    stats: DriverStatsList,
}

impl Drivers {
    pub fn new(config: &Config, metrics: &mut MetricsRegistry) -> Self {
        let stats: DriverStatsList = Arc::new(RwLock::new(
            config
                .drivers
                .iter()
                .map(|d| Arc::new(DriverStats::new(d.name(), d.kind())))
                .collect(),
        ));
        metrics.register_collector(Box::new(telemetry::drivers::DriverMetrics::new(
            Arc::clone(&stats),
        )));
        Self { stats }
    }

    /// Registers the devices the drivers' config names, starts every driver and the ingest task
    /// (returned: it ends once every driver stopped, the [`DriverSet`] is dropped and the queue
    /// is empty), and returns the set a reload changes.
    pub async fn spawn(
        self,
        config: &Config,
        registry: &Registry,
        ingest: &Ingest,
        zigbee: &outpost_drivers::zigbee::ZigbeeControl,
        spawner: &Spawner,
        stop: &CancellationToken,
    ) -> (JoinHandle<()>, DriverSet) {
        register_configured(registry, &config.drivers).await;
        let (readings_tx, readings_rx) = mpsc::channel(READINGS_QUEUE);
        let mut set = DriverSet {
            running: BTreeMap::new(),
            order: Vec::new(),
            stats: self.stats,
            readings: readings_tx,
            health: Arc::new(ingress::drivers::RegistryHealth(registry.clone())),
            zigbee: zigbee.clone(),
            registry: registry.clone(),
            spawner: spawner.clone(),
            stop: stop.clone(),
        };
        let stats: Vec<Arc<DriverStats>> = set
            .stats
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for (driver_config, stats) in config.drivers.iter().zip(stats) {
            set.start(driver_config.clone(), stats);
        }
        // The ingest task ends once every driver and the set have dropped their senders and the
        // queue is empty.
        let task = spawner.spawn(
            "driver-ingest",
            ingress::drivers::run(readings_rx, ingest.clone(), stop.clone()),
        );
        (task, set)
    }
}

/// Devices the drivers' config names are in the registry before the first poll, offline until
/// heard from: a slave that never answers is visible, not a 404.
async fn register_configured(registry: &Registry, drivers: &[DriverConfig]) {
    registry
        .register_configured(
            drivers
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
}

/// How long a reload waits for a removed or changed driver to stop (and let go of its port)
/// before it starts the new one anyway (which then retries opening the port).
const DRIVER_STOP: Duration = Duration::from_secs(10);

/// The running drivers, by name: what a reload changes (`drivers`). Dropping it drops its
/// sender of the readings queue, so the ingest task can end at shutdown.
pub struct DriverSet {
    running: BTreeMap<String, Running>,
    /// Driver names in configuration order (the order of `/metrics` and the status).
    order: Vec<String>,
    stats: DriverStatsList,
    readings: mpsc::Sender<outpost_drivers::Reading>,
    health: Arc<dyn DeviceHealth>,
    zigbee: outpost_drivers::zigbee::ZigbeeControl,
    registry: Registry,
    spawner: Spawner,
    stop: CancellationToken,
}

struct Running {
    config: DriverConfig,
    stats: Arc<DriverStats>,
    /// Stops this driver alone (a child of the ingress stop).
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl DriverSet {
    fn start(&mut self, config: DriverConfig, stats: Arc<DriverStats>) {
        let context = DriverContext {
            stats: Arc::clone(&stats),
            health: Arc::clone(&self.health),
            zigbee: self.zigbee.clone(),
        };
        let name = format!("driver/{}", config.name());
        let status = &self.spawner.status;
        status.active(&name, false);
        status.watch_driver(&name, Arc::clone(&stats));
        let stop = self.stop.child_token();
        let task = self.spawner.spawn(
            name,
            supervise_driver(
                config.clone(),
                context,
                self.readings.clone(),
                stop.clone(),
                status.clone(),
                self.spawner.tracker.clone(),
            ),
        );
        self.order.push(config.name().to_owned());
        self.running.insert(
            config.name().to_owned(),
            Running {
                config,
                stats,
                stop,
                task,
            },
        );
    }

    /// Stops driver `name` and waits (at most [`DRIVER_STOP`]) until it has; its status entry
    /// goes. Returns its stats (the caller decides whether they carry over).
    async fn stop_driver(&mut self, name: &str) -> Option<Arc<DriverStats>> {
        let running = self.running.remove(name)?;
        self.order.retain(|n| n != name);
        running.stop.cancel();
        if tokio::time::timeout(DRIVER_STOP, running.task)
            .await
            .is_err()
        {
            tracing::error!(driver = name, "Driver did not stop within {DRIVER_STOP:?}");
        }
        self.spawner.status.forget(&format!("driver/{name}"));
        Some(running.stats)
    }

    /// Runs `drivers` from now on: drivers no longer configured stop, changed ones stop and
    /// start again with their new settings (counters kept when the kind is the same), new ones
    /// start; unchanged ones run on untouched. Returns the names of the drivers it stopped or
    /// started.
    pub async fn apply(&mut self, drivers: &[DriverConfig]) -> Vec<String> {
        let mut touched = Vec::new();
        let wanted: BTreeMap<&str, &DriverConfig> = drivers.iter().map(|d| (d.name(), d)).collect();
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(name, r)| wanted.get(name.as_str()) != Some(&&r.config))
            .map(|(name, _)| name.clone())
            .collect();
        let mut kept_stats = BTreeMap::new();
        for name in stale {
            tracing::info!(driver = %name, "Stopping driver for the reload");
            if let Some(stats) = self.stop_driver(&name).await {
                kept_stats.insert(name.clone(), stats);
            }
            touched.push(name);
        }
        if self.stop.is_cancelled() {
            return touched;
        }
        let added: Vec<DriverConfig> = drivers
            .iter()
            .filter(|d| !self.running.contains_key(d.name()))
            .cloned()
            .collect();
        register_configured(&self.registry, &added).await;
        for config in added {
            let stats = kept_stats
                .remove(config.name())
                .filter(|s| s.snapshot().kind == config.kind())
                .unwrap_or_else(|| Arc::new(DriverStats::new(config.name(), config.kind())));
            tracing::info!(driver = %config.name(), "Starting driver for the reload");
            if !touched.iter().any(|n| n == config.name()) {
                touched.push(config.name().to_owned());
            }
            self.start(config, stats);
        }
        // Configuration order for the metrics and the status.
        self.order = drivers.iter().map(|d| d.name().to_owned()).collect();
        *self.stats.write().unwrap_or_else(PoisonError::into_inner) = self
            .order
            .iter()
            .filter_map(|n| self.running.get(n).map(|r| Arc::clone(&r.stats)))
            .collect();
        touched
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
