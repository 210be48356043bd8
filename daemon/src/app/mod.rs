//! The composition root: reads like the architecture diagram.
//!
//! ```text
//!  drivers ──> readings channel ──> driver-ingest ──┐
//!  CoAP (UDP) ───────────┐                          │
//!  HTTP ingestion ───────┴──> Ingest ───────────────┴──> outbox writer (group commit) ──> SQLite
//!                              │  └─> local readings stream (broadcast) ──> mqtt-bus ──> broker
//!                              └─> device registry (auth, monitoring) ──> registry.db
//!  outbox ──> forwarder ──> Kafka;  fleet ──> heartbeats and inventory ──> Kafka
//!  admin listener: /healthz /readyz /metrics /api/v1/status, REST API, HTTP ingestion
//!  systemd: READY, STATUS, WATCHDOG (fed only while the writer makes progress), STOPPING
//! ```
//!
//! One builder per subsystem, in the order [`run`] calls them: [`storage`] (outbox and its
//! writer, registry), [`fronts`] (the ingest core, CoAP, MQTT with the local bus, HTTP
//! ingestion, the admin listener), [`drivers`], [`local_apps`], [`cloud`] (forwarder and
//! fleet). Everything that can fail at start (files, ports) happens before READY; then every
//! long-running task is spawned by name into one tracker, the long-running ones under a
//! supervisor ([`spawn::Spawner`]). Shutdown is one mechanism in two steps within
//! `gateway.shutdown_grace`: (1) ingress stops (drivers, fronts, forwarder) and what it already
//! accepted drains into the outbox; (2) the writer commits what is queued and stops. Only then
//! does `run` return.

mod cloud;
pub mod drivers;
mod fronts;
mod local_apps;
mod spawn;
mod storage;

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use outpost_config::Config;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::AdminState;
use crate::status::StatusBoard;
use crate::{systemd, telemetry};
use fronts::{AdminFront, AdminRoutes, CoapFront, IngressCore, MqttFront};
use spawn::Spawner;
use storage::Storage;

/// Runs the gateway until `shutdown` is cancelled, then shuts down gracefully.
/// Runs the gateway on `config` until `shutdown`. `named` is the `--config` given (`None`: the
/// default file), which a `SIGHUP` reads again (`reload`).
pub async fn run(
    config: Config,
    named: Option<std::path::PathBuf>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let started = Instant::now();
    // First of all: from here on SIGHUP reloads instead of terminating.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let gateway_id: Arc<str> = config.gateway_id().into();
    tracing::info!(
        gateway = %gateway_id,
        version = env!("CARGO_PKG_VERSION"),
        data_dir = %config.data_dir().display(),
        "Outpost starting"
    );
    let spawner = Spawner {
        tracker: TaskTracker::new(),
        status: StatusBoard::default(),
    };
    let status = &spawner.status;
    let mut metrics = telemetry::metrics::registry();
    // Ingress stops as soon as shutdown begins.
    let ingress = shutdown.child_token();

    // Storage first: nothing may be accepted before the outbox is open.
    let storage = Storage::open(&config, &spawner, &mut metrics).await?;
    let mut core = IngressCore::new(&config, &storage, &mut metrics)?;
    let http_ingest = fronts::http_ingest(&config, &core, &mut metrics);
    let coap = CoapFront::bind(&config, &core, status, &mut metrics).await?;
    let mqtt = MqttFront::bind(&config, &core, &spawner, &shutdown, &mut metrics).await?;
    let drivers = drivers::Drivers::new(&config, &mut metrics);
    let admin = AdminFront::bind(&config).await?;
    let apps = local_apps::open(
        &config,
        mqtt.as_ref().and_then(MqttFront::port),
        status,
        &mut metrics,
    )
    .await?;
    let forwarder = cloud::forwarder(&config, &storage, &core.rules, status, &mut metrics);
    // Permit join reaches the Zigbee driver through this handle; the driver attaches to it
    // when built from a `DriverContext` carrying it.
    let zigbee = outpost_drivers::zigbee::ZigbeeControl::default();

    let tokens = Arc::new(crate::api::auth::TokenSet::load(
        &config.api,
        &storage.registry,
    ));

    // Everything is open and bound: run it.
    let history = crate::history::History::default();
    spawner.spawn(
        "history",
        history
            .clone()
            .run(storage.outbox.clone(), shutdown.clone()),
    );
    let routes = AdminRoutes {
        state: AdminState {
            gateway_id: Arc::clone(&gateway_id),
            outbox: storage.outbox.clone(),
            max_bytes: config.outbox.max_bytes.bytes(),
            status: status.clone(),
            registry: Arc::new(metrics),
            started,
            history: history.clone(),
            monitoring: crate::admin::MonitoringAccess {
                public: config.admin.public_monitoring,
                tokens: Arc::clone(&tokens),
            },
        },
        registry: storage.registry.clone(),
        outbox: storage.outbox.clone(),
        apps: apps.clone(),
        zigbee: zigbee.clone(),
        http_ingest,
        tokens: Arc::clone(&tokens),
        watch: core.ingest.watch(),
        config_file: named.clone(),
        edge: crate::edge::EdgeControl {
            rules: core.edge.clone(),
            ingest: core.ingest.clone(),
        },
    };
    let admin_addr = admin.addr;
    let gateway_parts = cloud::GatewayParts {
        apps: apps.clone(),
        admin: routes.state.clone(),
    };
    let mqtt_acl = mqtt.as_ref().map(|front| Arc::clone(&front.acl));
    let mqtt_broker = mqtt.as_ref().map(MqttFront::broker);
    let (driver_ingest, driver_set) = drivers
        .spawn(
            &config,
            &storage.registry,
            &core.ingest,
            &zigbee,
            &spawner,
            &ingress,
        )
        .await;
    let ingress_tasks = IngressTasks {
        admin: admin.spawn(&config, routes, &spawner, &ingress)?,
        coap: coap
            .map(|front| front.spawn(&core.ingest, &spawner, &ingress))
            .transpose()?,
        mqtt: mqtt
            .map(|front| front.spawn(&mut core, &storage.registry, &spawner, &ingress))
            .transpose()?,
        drivers: driver_ingest,
        forwarder: forwarder.map(|f| cloud::spawn(f, gateway_parts, &storage, &spawner, &ingress)),
    };
    if let Some(apps) = apps {
        local_apps::spawn(apps, &storage.registry, &spawner, &ingress);
    }
    let edge = core.edge.shared().clone();
    status.watch_section("edge", move || {
        let engine = edge.load();
        serde_json::json!({
            "rules": engine.rule_stats().count(),
            "alerts_active": engine.active_alerts().len(),
            "windows_open": engine.open_windows(),
        })
    });
    spawner.spawn("edge-webhooks", core.webhooks.clone().run(ingress.clone()));
    spawner.spawn(
        "edge-windows",
        crate::edge::run(
            core.ingest.clone(),
            core.edge.shared().clone(),
            ingress.clone(),
        ),
    );
    spawner.spawn(
        "status-line",
        status_line(storage.outbox.clone(), shutdown.clone()),
    );
    let reloader = crate::reload::Reloader::new(
        named,
        config.clone(),
        Arc::clone(&tokens),
        mqtt_acl,
        mqtt_broker,
        core.rules.clone(),
        driver_set,
    )
    .with_edge(core.edge.clone(), core.ingest.clone());
    reloader.watch(status);
    spawner.spawn(
        "reload",
        crate::reload::run(reloader, hangups, shutdown.clone()),
    );
    let registry_stop = storage.spawn_registry_flush(&spawner);
    let (records, _, _) = storage.outbox.figures();
    systemd::ready(&format!(
        "ready: admin on {admin_addr}, {records} records in the outbox"
    ));
    // The watchdog starts after READY, so systemd never sees a ping before the service is up.
    if let Some(interval) = systemd::watchdog_interval() {
        spawner.spawn(
            "watchdog",
            systemd::watchdog(
                interval,
                storage.outbox.clone(),
                status.clone(),
                shutdown.clone(),
            ),
        );
    }
    spawner.tracker.close();
    tracing::info!(
        startup_ms = started.elapsed().as_millis() as u64,
        "Outpost ready"
    );

    let Storage {
        outbox,
        mut writer,
        writer_stop,
        ..
    } = storage;
    // Wait for the shutdown signal, or for the writer to die (which makes the gateway useless).
    let writer_died = tokio::select! {
        () = shutdown.cancelled() => None,
        result = &mut writer => Some(result),
    };
    systemd::stopping();
    let grace = config.gateway.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!(grace_ms = grace.as_millis() as u64, "Shutting down");
    ingress.cancel();

    // Step 1: ingress stops and drains into the outbox.
    if tokio::time::timeout_at(deadline, ingress_tasks.join())
        .await
        .is_err()
    {
        tracing::error!(
            "Ingress did not drain within the shutdown grace; closing the outbox anyway"
        );
    }
    registry_stop.cancel();
    // Step 2: the writer commits what is queued and stops.
    writer_stop.cancel();
    if tokio::time::timeout_at(deadline, spawner.tracker.wait())
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

/// The tasks that take records in (and the forwarder, which acks through the writer): the first
/// shutdown step waits for them.
struct IngressTasks {
    admin: JoinHandle<()>,
    coap: Option<JoinHandle<()>>,
    mqtt: Option<JoinHandle<()>>,
    drivers: JoinHandle<()>,
    forwarder: Option<JoinHandle<()>>,
}

impl IngressTasks {
    async fn join(self) {
        let Self {
            admin,
            coap,
            mqtt,
            drivers,
            forwarder,
        } = self;
        let _ = drivers.await;
        let _ = admin.await;
        for task in [coap, mqtt, forwarder].into_iter().flatten() {
            let _ = task.await;
        }
    }
}

/// Keeps the systemd STATUS line current with the outbox figures. The first update comes one
/// period after the start: READY=1 carries its own STATUS, and a "running" line must never
/// reach systemd before it (the task starts before the listeners are ready).
async fn status_line(outbox: outpost_sync::Outbox, shutdown: CancellationToken) {
    let period = std::time::Duration::from_secs(10);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
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
