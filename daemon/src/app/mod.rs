//! The composition root: reads like the architecture diagram.
//!
//! ```text
//!  drivers ──> readings channel ──> driver-ingest ──┐
//!  CoAP (UDP) ───────────┐                          │
//!  HTTP ingestion ───────┴──> Ingest ───────────────┴──> outbox writer (group commit) ──> SQLite
//!                              │  └─> local readings stream (broadcast) ──> mqtt-bus ──> broker
//!                              └─> device registry (auth, monitoring) ──> registry.db
//!  admin listener: /healthz /readyz /metrics /api/v1/status, REST API, HTTP ingestion
//!  systemd: READY, STATUS, WATCHDOG (fed only while the writer makes progress), STOPPING
//! ```
//!
//! Every long-running task is spawned here, by name, into one `TaskTracker`. Shutdown is one
//! mechanism in two steps within `gateway.shutdown_grace`: (1) ingress stops (drivers, admin) and
//! what it already accepted drains into the outbox; (2) the writer commits what is queued and
//! stops. Only then does `run` return.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use outpost_config::Config;
use outpost_drivers::{DeviceHealth, DriverContext, DriverStats};
use outpost_sync::forwarder::{DeviceTags, Forwarder, ForwarderOptions, Rules};
use outpost_sync::{OutboxOptions, outbox};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admin::{self, AdminState};
use crate::ingress::bus::BusMetrics;
use crate::ingress::coap::{CoapMetrics, CoapSettings};
use crate::ingress::http::{HttpIngestMetrics, HttpIngestState};
use crate::ingress::{Ingest, READINGS_STREAM_CAPACITY};
use crate::registry::Registry;
use crate::status::StatusBoard;
use crate::{api, apps, ingress, supervisor, systemd, telemetry};

/// Capacity of the channel between all drivers and the driver-ingest task. When it is full,
/// drivers wait (their poll loops slow down); nothing is dropped.
const READINGS_QUEUE: usize = 1024;

/// Runs the gateway until `shutdown` is cancelled, then shuts down gracefully.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let started = Instant::now();
    let gateway_id: Arc<str> = config.gateway_id().into();
    let data_dir = config.data_dir();
    tracing::info!(
        gateway = %gateway_id,
        version = env!("CARGO_PKG_VERSION"),
        data_dir = %data_dir.display(),
        "Outpost starting"
    );
    let status = StatusBoard::default();
    let mut metrics = telemetry::metrics::registry();
    let tracker = TaskTracker::new();

    // Storage first: nothing may be accepted before the outbox is open.
    let options = OutboxOptions::from_config(&config);
    let (outbox, writer) = tokio::task::spawn_blocking(move || outbox::open(options))
        .await
        .context("opening the outbox")??;
    outbox.metrics().register(&mut metrics);
    if let Some(q) = outbox.quarantine() {
        status.alarm(
            "outbox",
            format!(
                "corrupt outbox moved to {}: {}",
                q.moved_to.display(),
                q.reason
            ),
        );
    }
    status.active("outbox", true);
    status.watch_outbox(outbox.clone());
    let writer_stop = CancellationToken::new();
    let mut writer_task = tracker.spawn(named("outbox-writer", writer.run(writer_stop.clone())));

    let registry = {
        let (dir, offline_after) = (data_dir.clone(), config.devices.offline_after);
        tokio::task::spawn_blocking(move || Registry::open(&dir, offline_after))
            .await
            .context("opening the device registry")??
    };
    if let Some(q) = registry.quarantine() {
        status.alarm(
            "registry",
            format!(
                "corrupt registry moved to {}: {}",
                q.moved_to.display(),
                q.reason
            ),
        );
    }
    registry.limit_automatic(config.devices.max_automatic);
    registry.register_metrics(&mut metrics);
    status.watch_alarm("registry", {
        let registry = registry.clone();
        move || registry.alarm()
    });
    status.active("registry", true);
    let (readings, _) = broadcast::channel(READINGS_STREAM_CAPACITY);
    // The local bus's receiver exists from the start, so no committed reading is missed.
    let bus_readings = config.mqtt.enabled.then(|| readings.subscribe());
    let app_subscribe = if config.apps.enabled {
        config.apps.bus_subscribe.clone()
    } else {
        Vec::new()
    };
    let (bus_handle, bus_events) = ingress::bus::handle(app_subscribe);
    let budget = ingress::budget::IngressBudget::new(
        usize::try_from(config.gateway.max_ingress_bytes.bytes()).unwrap_or(usize::MAX),
    );
    metrics.register_collector(Box::new(budget.clone()));
    let ingest = Ingest::new(outbox.clone(), registry.clone(), readings)
        .with_rules(Arc::new(Rules::from_config(&config.kafka)))
        .with_bus(bus_handle)
        .with_budget(budget.clone());

    // Ingress stops as soon as shutdown begins.
    let ingress = shutdown.child_token();

    // Device-facing HTTP ingestion shares the admin listener.
    let http_ingest = config.http_ingest.enabled.then(|| {
        let http_metrics = HttpIngestMetrics::default();
        http_metrics.register(&mut metrics);
        HttpIngestState {
            ingest: ingest.clone(),
            route: config.http_ingest.route.as_str().into(),
            max_body: usize::try_from(config.http_ingest.max_body.bytes()).unwrap_or(usize::MAX),
            max_batch: config.http_ingest.max_batch,
            metrics: http_metrics,
        }
    });

    // CoAP binds before READY so a port conflict stops the start with a clear error.
    let coap = if config.coap.enabled {
        let mut settings = CoapSettings::from_config(&config.coap).context("resolving [coap]")?;
        settings.budget = Some(budget.clone());
        let socket = UdpSocket::bind(config.coap.listen)
            .await
            .with_context(|| format!("binding the CoAP listener on {}", config.coap.listen))?;
        let addr = socket
            .local_addr()
            .context("reading the CoAP listener address")?;
        tracing::info!(addr = %addr, "CoAP listener bound");
        let coap_metrics = CoapMetrics::default();
        coap_metrics.register(&mut metrics);
        Some((socket, settings, coap_metrics))
    } else {
        None
    };

    // The MQTT server binds before READY too; its session store opens first.
    let mqtt = if config.mqtt.enabled {
        let mut settings = outpost_mqtt::settings::Settings::from_config(&config.mqtt);
        settings.budget = Some(budget.for_mqtt());
        if settings.allow_anonymous {
            tracing::warn!(
                "mqtt.allow_anonymous = true: ANY client on the network can publish without \
                 credentials, under the client id it chooses"
            );
        }
        let store = {
            let path = data_dir.join("sessions.db");
            tokio::task::spawn_blocking(move || outpost_mqtt::store::Store::open(&path))
                .await
                .context("opening sessions.db")?
                .context("opening sessions.db")?
        };
        if let Some((moved, why)) = &store.1.quarantined {
            status.alarm(
                "mqtt",
                format!(
                    "damaged sessions.db moved to {}: {why}; persistent sessions were lost",
                    moved.display()
                ),
            );
        }
        let backlog = outpost_mqtt::server::backlog(
            config.mqtt.max_connections,
            config.mqtt.max_pending_handshakes,
        );
        let listener = outpost_mqtt::server::bind(config.mqtt.listen, backlog)
            .with_context(|| format!("binding the MQTT listener on {}", config.mqtt.listen))?;
        let addr = listener
            .local_addr()
            .context("reading the MQTT listener address")?;
        tracing::info!(addr = %addr, "MQTT listener bound");
        let tls = outpost_mqtt::tls::bind(&config.mqtt.tls, backlog)
            .await
            .map_err(anyhow::Error::msg)?;
        let mqtt_metrics = outpost_mqtt::metrics::MqttMetrics::default();
        mqtt_metrics.register(&mut metrics);
        let bus_metrics = BusMetrics::default();
        bus_metrics.register(&mut metrics);
        let backend = Arc::new(ingress::mqtt::GatewayBackend::new(
            ingest.clone(),
            &config.mqtt,
        ));
        let broker =
            outpost_mqtt::broker::Broker::new(settings, backend, Some(store), mqtt_metrics.clone());
        // The session store's writer is not restarted in-process (like the outbox writer): if
        // it stops, the essential subsystem `mqtt-sessions` goes INACTIVE, the watchdog is no
        // longer fed, and systemd restarts the daemon.
        status.active("mqtt-sessions", true);
        let (board, stop, watched) = (status.clone(), shutdown.clone(), Arc::clone(&broker));
        tracker.spawn(named("mqtt-sessions-watch", async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = watched.store_stopped() => {
                    if !stop.is_cancelled() {
                        tracing::error!("The MQTT session store (sessions.db) stopped; the daemon needs a restart");
                        board.inactive("mqtt-sessions", "session store stopped; restart the daemon", true);
                    }
                }
            }
        }));
        Some(((listener, tls), broker, mqtt_metrics, bus_metrics))
    } else {
        None
    };

    // Driver counters exist before the drivers: `/metrics` and the status read them live.
    let driver_stats: Vec<Arc<DriverStats>> = config
        .drivers
        .iter()
        .map(|d| Arc::new(DriverStats::new(d.name(), d.kind())))
        .collect();
    metrics.register_collector(Box::new(telemetry::drivers::DriverMetrics::new(
        driver_stats.clone(),
    )));

    let listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("binding the admin listener on {}", config.admin.listen))?;
    let admin_addr = listener
        .local_addr()
        .context("reading the admin listener address")?;
    tracing::info!(addr = %admin_addr, "Admin listener bound");
    // Local app containers: the desired set (config + apps.db); the loop is spawned below.
    let apps = if config.apps.enabled {
        let (store, saved, failed) = {
            let dir = data_dir.clone();
            tokio::task::spawn_blocking(move || {
                let (store, saved) = apps::store::AppStore::open(&dir)?;
                let failed = store.failures()?;
                Ok::<_, apps::store::StoreError>((store, saved, failed))
            })
            .await
            .context("opening apps.db")??
        };
        // Apps reach the MQTT server through the engine's host gateway.
        let bus_url = mqtt
            .as_ref()
            .and_then(|((listener, _), ..)| listener.local_addr().ok())
            .map(|addr| format!("mqtt://host.docker.internal:{}", addr.port()));
        let apps = apps::Apps::new(&config.apps, Some(store), saved)
            .with_failures(failed)
            .with_bus_url(bus_url);
        status.inactive("apps", "connecting to the container engine", false);
        status.watch_apps(apps.clone());
        metrics.register_collector(Box::new(telemetry::apps::AppMetrics::new(apps.clone())));
        Some(apps)
    } else {
        status.inactive("apps", "disabled by apps.enabled = false", false);
        None
    };
    let forwarder = if config.kafka.enabled {
        let options = ForwarderOptions::from_config(&config);
        let tags: Arc<dyn DeviceTags> = Arc::new(registry.clone());
        let (forwarder, handle) = Forwarder::new(options, outbox.clone(), tags);
        handle.metrics().register(&mut metrics);
        status.watch_forwarder(handle);
        status.active("cloud", false);
        Some(forwarder)
    } else {
        status.inactive(
            "cloud",
            "kafka.enabled = false: records are kept in the outbox until forwarding is enabled",
            false,
        );
        None
    };
    let admin_state = AdminState {
        gateway_id: Arc::clone(&gateway_id),
        outbox: outbox.clone(),
        max_bytes: config.outbox.max_bytes.bytes(),
        status: status.clone(),
        registry: Arc::new(metrics),
        started,
    };
    // Permit join reaches the Zigbee driver through this handle; the driver attaches to it
    // when built from a `DriverContext` carrying it.
    let zigbee = outpost_drivers::zigbee::ZigbeeControl::default();
    let mut admin_router = admin::router(admin_state).merge(api::router(
        api::ApiState::new(registry.clone(), &config.api)
            .with_zigbee(zigbee.clone())
            .with_apps(apps.clone())
            .with_outbox(outbox.clone()),
    ));
    if let Some(state) = http_ingest {
        admin_router = admin_router.merge(ingress::http::router(state));
        status.active("http-ingest", false);
    } else {
        status.inactive(
            "http-ingest",
            "disabled by http_ingest.enabled = false",
            false,
        );
    }
    let admin_router = admin::with_json_errors(
        admin_router,
        admin::OWN_ROUTES
            .iter()
            .chain(ingress::http::ROUTES)
            .copied()
            .chain(api::ROUTES.iter().map(|r| (r.method, r.path))),
    );
    let admin_stop = ingress.clone();
    // The admin listener (API, metrics, HTTP ingestion) runs under a supervisor: if it fails or
    // panics it is served again on the same bound socket (a clone of it), with backoff.
    let admin_socket = listener
        .into_std()
        .context("taking the admin listener socket")?;
    let admin_task = tracker.spawn(named(
        "admin",
        supervisor::supervise(
            "admin".into(),
            true,
            status.clone(),
            admin_stop.clone(),
            tracker.clone(),
            move || {
                let listener = admin_socket.try_clone().and_then(TcpListener::from_std);
                let (router, stop) = (admin_router.clone(), admin_stop.clone());
                async move {
                    let listener = match listener {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "Admin listener socket unusable");
                            return;
                        }
                    };
                    let served = axum::serve(listener, router)
                        .with_graceful_shutdown(stop.cancelled_owned())
                        .await;
                    if let Err(e) = served {
                        tracing::error!(error = %e, "Admin listener failed");
                    }
                }
            },
        ),
    ));
    status.active("admin", true);

    let coap_task = match coap {
        Some((socket, settings, coap_metrics)) => {
            // Essential (ingress): while it is down /readyz says so and the watchdog is not fed.
            status.active("coap", true);
            // Supervised: a failed or panicked endpoint is run again on a clone of its socket.
            let socket = socket.into_std().context("taking the CoAP socket")?;
            let (ingest, stop) = (ingest.clone(), ingress.clone());
            Some(tracker.spawn(named(
                "coap",
                supervisor::supervise(
                    "coap".into(),
                    true,
                    status.clone(),
                    ingress.clone(),
                    tracker.clone(),
                    move || {
                        let socket = socket.try_clone().and_then(UdpSocket::from_std);
                        let (ingest, settings, metrics, stop) = (
                            ingest.clone(),
                            settings.clone(),
                            coap_metrics.clone(),
                            stop.clone(),
                        );
                        async move {
                            match socket {
                                Ok(socket) => {
                                    ingress::coap::run(socket, ingest, settings, metrics, stop)
                                        .await;
                                }
                                Err(e) => tracing::error!(error = %e, "CoAP socket unusable"),
                            }
                        }
                    },
                ),
            )))
        }
        None => {
            status.inactive("coap", "disabled by coap.enabled = false", false);
            None
        }
    };

    let mqtt_task = match mqtt {
        Some(((listener, tls), broker, mqtt_metrics, bus_metrics)) => {
            // Essential (ingress), like CoAP.
            status.active("mqtt", true);
            // The local bus: committed CoAP/HTTP/driver readings and API commands → MQTT.
            // Supervised, not essential: readings are in the outbox whether or not the bus
            // publishes them.
            if let Some(bus_readings) = bus_readings {
                let bus = Arc::new(tokio::sync::Mutex::new(ingress::bus::Bus::new(
                    Arc::clone(&broker),
                    bus_readings,
                    bus_events,
                )));
                let (registry, stop) = (registry.clone(), ingress.clone());
                tracker.spawn(named(
                    "mqtt-bus",
                    supervisor::supervise(
                        "mqtt-bus".into(),
                        false,
                        status.clone(),
                        ingress.clone(),
                        tracker.clone(),
                        move || {
                            ingress::bus::run(
                                bus.clone(),
                                registry.clone(),
                                bus_metrics.clone(),
                                stop.clone(),
                            )
                        },
                    ),
                ));
            }
            status.watch_mqtt(mqtt_metrics);
            // Supervised: a failed or panicked server serves again on a clone of its socket;
            // the broker (sessions, subscriptions, retained messages) lives on, and clients
            // reconnect to their sessions.
            let socket = listener
                .into_std()
                .context("taking the MQTT listener socket")?;
            let tls = match tls {
                Some(l) => Some((
                    l.listener
                        .into_std()
                        .context("taking the MQTT TLS listener socket")?,
                    l.acceptor,
                )),
                None => None,
            };
            let stop = ingress.clone();
            Some(tracker.spawn(named(
                "mqtt",
                supervisor::supervise(
                    "mqtt".into(),
                    true,
                    status.clone(),
                    ingress.clone(),
                    tracker.clone(),
                    move || {
                        let listener = socket.try_clone().and_then(TcpListener::from_std);
                        let tls = tls.as_ref().map(|(socket, acceptor)| {
                            socket
                                .try_clone()
                                .and_then(TcpListener::from_std)
                                .map(|listener| outpost_mqtt::tls::TlsListener {
                                    listener,
                                    acceptor: acceptor.clone(),
                                })
                        });
                        let (broker, stop) = (Arc::clone(&broker), stop.clone());
                        async move {
                            match (listener, tls.transpose()) {
                                (Ok(listener), Ok(tls)) => {
                                    outpost_mqtt::server::run(broker, listener, tls, stop).await;
                                }
                                (Err(e), _) | (_, Err(e)) => {
                                    tracing::error!(error = %e, "MQTT socket unusable");
                                }
                            }
                        }
                    },
                ),
            )))
        }
        None => {
            status.inactive("mqtt", "disabled by mqtt.enabled = false", false);
            None
        }
    };

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
    for (driver_config, stats) in config.drivers.iter().zip(driver_stats) {
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
            ingress.clone(),
            status.clone(),
            tracker.clone(),
        );
        tracker.spawn(named(name, supervisor));
    }
    // The ingest task ends once every driver has dropped its sender and the queue is empty.
    drop(readings_tx);
    let ingest_task = tracker.spawn(named(
        "driver-ingest",
        ingress::drivers::run(readings_rx, ingest.clone(), ingress.clone()),
    ));

    // Local app containers: one reconcile loop, stopped with ingress.
    // Runs under a supervisor: a panic in the loop restarts it with backoff.
    if let Some(apps) = apps.clone() {
        let (registry, board, stop) = (registry.clone(), status.clone(), ingress.clone());
        tracker.spawn(named(
            "apps",
            supervisor::supervise(
                "apps".into(),
                false,
                status.clone(),
                ingress.clone(),
                tracker.clone(),
                move || {
                    apps::reconcile::run(
                        apps.clone(),
                        registry.clone(),
                        board.clone(),
                        stop.clone(),
                    )
                },
            ),
        ));
    }
    // Cloud sync: the forwarder reads the outbox and produces to Kafka. Stopped with ingress
    // (it drains its in-flight records within half the grace), before the writer it acks through.
    let mut forwarder_task = None;
    if let Some(forwarder) = forwarder {
        let facts = Arc::new(crate::fleet::GatewayFacts {
            registry: registry.clone(),
            status: status.clone(),
        });
        let (options, handle, stop) = (
            forwarder.options().clone(),
            forwarder.handle(),
            ingress.clone(),
        );
        let boot_id = outpost_sync::outbox::kernel_boot_id();
        status.active("fleet", false);
        tracker.spawn(named(
            "fleet",
            supervisor::supervise(
                "fleet".into(),
                false,
                status.clone(),
                ingress.clone(),
                tracker.clone(),
                move || {
                    outpost_sync::forwarder::fleet::run(
                        options.clone(),
                        handle.clone(),
                        Arc::clone(&facts) as Arc<dyn outpost_sync::forwarder::fleet::FleetSource>,
                        boot_id.clone(),
                        stop.clone(),
                    )
                },
            ),
        ));
        let stop = ingress.clone();
        forwarder_task = Some(tracker.spawn(named(
            "forwarder",
            supervisor::supervise(
                "cloud".into(),
                false,
                status.clone(),
                ingress.clone(),
                tracker.clone(),
                move || {
                    let (forwarder, stop) = (forwarder.clone(), stop.clone());
                    async move {
                        if let Err(e) = forwarder.run(stop).await {
                            tracing::error!(error = %e, "Forwarder stopped");
                        }
                    }
                },
            ),
        )));
    }
    tracker.spawn(named(
        "status-line",
        status_line(outbox.clone(), shutdown.clone()),
    ));
    // Saves device monitoring figures periodically; stopped (with a final save) once ingress
    // has drained, so the last figures include the last readings.
    let registry_stop = CancellationToken::new();
    status.active("registry-flush", false);
    tracker.spawn(named("registry-flush", {
        let (registry, stop) = (registry.clone(), registry_stop.clone());
        supervisor::supervise(
            "registry-flush".into(),
            false,
            status.clone(),
            registry_stop.clone(),
            tracker.clone(),
            move || registry.clone().run_flusher(stop.clone()),
        )
    }));
    let (records, _, _) = outbox.figures();
    systemd::ready(&format!(
        "ready: admin on {admin_addr}, {records} records in the outbox"
    ));
    // The watchdog starts after READY, so systemd never sees a ping before the service is up.
    if let Some(interval) = systemd::watchdog_interval() {
        tracker.spawn(named(
            "watchdog",
            systemd::watchdog(interval, outbox.clone(), status.clone(), shutdown.clone()),
        ));
    }
    tracker.close();

    tracing::info!(
        startup_ms = started.elapsed().as_millis() as u64,
        "Outpost ready"
    );

    // Wait for the shutdown signal, or for the writer to die (which makes the gateway useless).
    let writer_died = tokio::select! {
        () = shutdown.cancelled() => None,
        result = &mut writer_task => Some(result),
    };
    systemd::stopping();
    let grace = config.gateway.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!(grace_ms = grace.as_millis() as u64, "Shutting down");
    ingress.cancel();

    // Step 1: ingress stops and drains into the outbox.
    let drained = tokio::time::timeout_at(deadline, async {
        let _ = ingest_task.await;
        let _ = admin_task.await;
        if let Some(coap_task) = coap_task {
            let _ = coap_task.await;
        }
        if let Some(mqtt_task) = mqtt_task {
            let _ = mqtt_task.await;
        }
        if let Some(forwarder_task) = forwarder_task {
            let _ = forwarder_task.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::error!(
            "Ingress did not drain within the shutdown grace; closing the outbox anyway"
        );
    }
    registry_stop.cancel();
    // Step 2: the writer commits what is queued and stops.
    writer_stop.cancel();
    if tokio::time::timeout_at(deadline, tracker.wait())
        .await
        .is_err()
    {
        bail!("shutdown grace of {grace:?} expired before every task stopped");
    }
    if let Some(result) = writer_died {
        match result {
            Ok(Ok(())) => bail!("the outbox writer stopped unexpectedly"),
            Ok(Err(e)) => return Err(e).context("the outbox writer failed"),
            Err(e) => return Err(e).context("the outbox writer panicked"),
        }
    }
    let (records, bytes, _) = outbox.figures();
    tracing::info!(records, bytes, "Outpost stopped cleanly");
    Ok(())
}

/// Wraps a task in a span carrying its name, so every log line says which task wrote it.
fn named<F: Future>(name: impl Into<String>, task: F) -> impl Future<Output = F::Output> {
    let name = name.into();
    task.instrument(tracing::info_span!("task", task = %name))
}

/// Pause before a driver that panicked is built and started again.
const DRIVER_RESTART: std::time::Duration = std::time::Duration::from_secs(5);

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

/// Keeps the systemd STATUS line current with the outbox figures.
async fn status_line(outbox: outpost_sync::Outbox, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (records, bytes, _) = outbox.figures();
        systemd::status(&format!(
            "running: {records} records ({bytes} bytes) in the outbox"
        ));
    }
}

/// A token cancelled by the first SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        trigger.cancel();
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal = name, "Shutdown requested");
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "Cannot install signal handlers; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
