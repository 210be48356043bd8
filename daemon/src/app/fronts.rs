//! The device-facing fronts (CoAP, MQTT, HTTP ingestion) and the admin listener. Each binds
//! before READY, so a port conflict stops the start with a clear error, and runs under a
//! supervisor that serves again on a clone of its socket if it fails or panics.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use outpost_config::Config;
use outpost_sync::Outbox;
use outpost_sync::forwarder::{Rules, SharedRules};
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::spawn::Spawner;
use super::storage::Storage;
use crate::admin::{self, AdminState};
use crate::api;
use crate::apps::Apps;
use crate::edge::{EdgeControl, EdgeRules};
use crate::https::{HttpsListener, HttpsPeer};
use crate::ingress::budget::IngressBudget;
use crate::ingress::bus::{BusMetrics, FrontEvents};
use crate::ingress::coap::{CoapMetrics, CoapSettings};
use crate::ingress::http::{HttpIngestMetrics, HttpIngestState};
use crate::ingress::{self, Ingest, LocalReading, READINGS_STREAM_CAPACITY};
use crate::local_admin;
use crate::registry::Registry;
use crate::status::StatusBoard;

/// What every front hands its records to: one [`Ingest`] (outbox, registry, rules, the local
/// bus, the ingress byte budget).
pub struct IngressCore {
    pub ingest: Ingest,
    /// `[[kafka.rules]]` in force: ingestion (priorities) and the forwarder share them, a
    /// reload replaces them.
    pub rules: SharedRules,
    /// `[edge]` in force (the file's rules and the API's): ingestion runs it, a reload or an
    /// API call replaces it.
    pub edge: EdgeRules,
    /// The edge rules' webhook calls (`webhooks.db`).
    pub webhooks: crate::webhooks::Webhooks,
    budget: IngressBudget,
    /// The local bus's feed (committed readings, the MQTT server's events), for the MQTT
    /// front; `None` without MQTT (the bus handle then drops what it is told).
    bus_feed: Option<(broadcast::Receiver<LocalReading>, FrontEvents)>,
}

impl IngressCore {
    pub fn new(
        config: &Config,
        storage: &Storage,
        metrics: &mut MetricsRegistry,
    ) -> anyhow::Result<Self> {
        let (readings, _) = broadcast::channel(READINGS_STREAM_CAPACITY);
        // The local bus's receiver exists from the start, so no committed reading is missed.
        let bus_readings = config.mqtt.enabled.then(|| readings.subscribe());
        let (bus_handle, bus_events) = ingress::bus::handle();
        let budget = IngressBudget::new(
            usize::try_from(config.gateway.max_ingress_bytes.bytes()).unwrap_or(usize::MAX),
        );
        metrics.register_collector(Box::new(budget.clone()));
        let rules = SharedRules::new(Rules::from_config(&config.kafka));
        // The file's rules were checked when it was loaded; the API's are checked here.
        let edge = EdgeRules::open(&config.edge, &config.data_dir())?;
        metrics.register_collector(Box::new(crate::edge::EdgeMetrics(edge.shared().clone())));
        let webhook_metrics = crate::webhooks::WebhookMetrics::default();
        webhook_metrics.register(metrics);
        let webhooks = crate::webhooks::Webhooks::open(&config.data_dir(), webhook_metrics)?;
        let ingest = Ingest::new(storage.outbox.clone(), storage.registry.clone(), readings)
            .with_rules(rules.clone())
            .with_edge(edge.shared().clone())
            .with_webhooks(webhooks.clone())
            .with_bus(bus_handle)
            .with_budget(budget.clone());
        Ok(Self {
            ingest,
            rules,
            edge,
            webhooks,
            budget,
            bus_feed: bus_readings.map(|readings| (readings, bus_events)),
        })
    }
}

/// Device-facing HTTP ingestion, served by the admin listener (`None`: disabled).
pub fn http_ingest(
    config: &Config,
    core: &IngressCore,
    metrics: &mut MetricsRegistry,
) -> Option<HttpIngestState> {
    config.http_ingest.enabled.then(|| {
        let http_metrics = HttpIngestMetrics::default();
        http_metrics.register(metrics);
        HttpIngestState {
            ingest: core.ingest.clone(),
            route: config.http_ingest.route.as_str().into(),
            max_body: usize::try_from(config.http_ingest.max_body.bytes()).unwrap_or(usize::MAX),
            max_batch: config.http_ingest.max_batch,
            metrics: http_metrics,
        }
    })
}

/// The CoAP endpoint, bound.
pub struct CoapFront {
    socket: UdpSocket,
    settings: CoapSettings,
    metrics: CoapMetrics,
}

impl CoapFront {
    /// Binds `coap.listen` (`None`, shown as disabled, with `coap.enabled = false`).
    pub async fn bind(
        config: &Config,
        core: &IngressCore,
        status: &StatusBoard,
        metrics: &mut MetricsRegistry,
    ) -> anyhow::Result<Option<Self>> {
        if !config.coap.enabled {
            status.inactive("coap", "disabled by coap.enabled = false", false);
            return Ok(None);
        }
        let mut settings = CoapSettings::from_config(&config.coap).context("resolving [coap]")?;
        settings.budget = Some(core.budget.clone());
        let socket = UdpSocket::bind(config.coap.listen)
            .await
            .with_context(|| format!("binding the CoAP listener on {}", config.coap.listen))?;
        let addr = socket
            .local_addr()
            .context("reading the CoAP listener address")?;
        tracing::info!(addr = %addr, "CoAP listener bound");
        let coap_metrics = CoapMetrics::default();
        coap_metrics.register(metrics);
        Ok(Some(Self {
            socket,
            settings,
            metrics: coap_metrics,
        }))
    }

    /// Serves until `stop`. Essential (ingress).
    pub fn spawn(
        self,
        ingest: &Ingest,
        spawner: &Spawner,
        stop: &CancellationToken,
    ) -> anyhow::Result<JoinHandle<()>> {
        let Self {
            socket,
            settings,
            metrics,
        } = self;
        spawner.status.active("coap", true);
        let socket = socket.into_std().context("taking the CoAP socket")?;
        let (ingest, serve_stop) = (ingest.clone(), stop.clone());
        Ok(
            spawner.supervise("coap", "coap", true, stop.clone(), move || {
                let socket = socket.try_clone().and_then(UdpSocket::from_std);
                let (ingest, settings, metrics, stop) = (
                    ingest.clone(),
                    settings.clone(),
                    metrics.clone(),
                    serve_stop.clone(),
                );
                async move {
                    match socket {
                        Ok(socket) => {
                            ingress::coap::run(socket, ingest, settings, metrics, stop).await
                        }
                        Err(e) => tracing::error!(error = %e, "CoAP socket unusable"),
                    }
                }
            }),
        )
    }
}

/// The MQTT server, bound, with its broker (sessions, subscriptions, retained messages).
pub struct MqttFront {
    listener: TcpListener,
    tls: Option<outpost_mqtt::tls::TlsListener>,
    broker: Arc<outpost_mqtt::broker::Broker>,
    metrics: outpost_mqtt::metrics::MqttMetrics,
    bus_metrics: BusMetrics,
    /// `[mqtt.acl]`, which a reload replaces.
    pub acl: ingress::mqtt::SharedAcl,
}

impl MqttFront {
    /// Opens `sessions.db` and binds `mqtt.listen` (and the TLS listener if configured);
    /// `None`, shown as disabled, with `mqtt.enabled = false`.
    pub async fn bind(
        config: &Config,
        core: &IngressCore,
        spawner: &Spawner,
        shutdown: &CancellationToken,
        metrics: &mut MetricsRegistry,
    ) -> anyhow::Result<Option<Self>> {
        let status = &spawner.status;
        if !config.mqtt.enabled {
            status.inactive("mqtt", "disabled by mqtt.enabled = false", false);
            return Ok(None);
        }
        let mut settings = outpost_mqtt::settings::Settings::from_config(&config.mqtt);
        settings.budget = Some(core.budget.for_mqtt());
        if settings.allow_anonymous {
            tracing::warn!(
                "mqtt.allow_anonymous = true: ANY client on the network can publish without \
                 credentials, under the client id it chooses"
            );
        }
        let store = {
            let path = config.data_dir().join("sessions.db");
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
        mqtt_metrics.register(metrics);
        let bus_metrics = BusMetrics::default();
        bus_metrics.register(metrics);
        let backend = Arc::new(ingress::mqtt::GatewayBackend::new(
            core.ingest.clone(),
            config,
        ));
        let acl = backend.acl();
        let broker =
            outpost_mqtt::broker::Broker::new(settings, backend, Some(store), mqtt_metrics.clone());
        // The session store's writer is not restarted in-process (like the outbox writer): if
        // it stops, the essential subsystem `mqtt-sessions` goes INACTIVE, the watchdog is no
        // longer fed, and systemd restarts the daemon.
        status.active("mqtt-sessions", true);
        let (board, stop, watched) = (status.clone(), shutdown.clone(), Arc::clone(&broker));
        spawner.spawn("mqtt-sessions-watch", async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = watched.store_stopped() => {
                    if !stop.is_cancelled() {
                        tracing::error!("The MQTT session store (sessions.db) stopped; the daemon needs a restart");
                        board.inactive("mqtt-sessions", "session store stopped; restart the daemon", true);
                    }
                }
            }
        });
        Ok(Some(Self {
            listener,
            tls,
            broker,
            metrics: mqtt_metrics,
            bus_metrics,
            acl,
        }))
    }

    /// The MQTT server (a reload replaces its rate limits).
    pub fn broker(&self) -> Arc<outpost_mqtt::broker::Broker> {
        Arc::clone(&self.broker)
    }

    /// The plain listener's port (apps reach the server through the engine's host gateway).
    pub fn port(&self) -> Option<u16> {
        self.listener.local_addr().ok().map(|addr| addr.port())
    }

    /// Serves until `stop`, with the local bus beside it. The server is essential (ingress);
    /// the bus is supervised but not essential: readings are in the outbox whether or not the
    /// bus publishes them.
    pub fn spawn(
        self,
        core: &mut IngressCore,
        registry: &Registry,
        spawner: &Spawner,
        stop: &CancellationToken,
    ) -> anyhow::Result<JoinHandle<()>> {
        let Self {
            listener,
            tls,
            broker,
            metrics,
            bus_metrics,
            acl: _,
        } = self;
        spawner.status.active("mqtt", true);
        // The local bus: committed CoAP/HTTP/driver readings and API commands → MQTT.
        if let Some((readings, events)) = core.bus_feed.take() {
            let bus = Arc::new(tokio::sync::Mutex::new(ingress::bus::Bus::new(
                Arc::clone(&broker),
                readings,
                events,
            )));
            let (registry, bus_stop) = (registry.clone(), stop.clone());
            spawner.supervise("mqtt-bus", "mqtt-bus", false, stop.clone(), move || {
                ingress::bus::run(
                    bus.clone(),
                    registry.clone(),
                    bus_metrics.clone(),
                    bus_stop.clone(),
                )
            });
        }
        spawner.status.watch_section("mqtt", move || {
            serde_json::to_value(metrics.status()).unwrap_or_default()
        });
        // A failed or panicked server serves again on a clone of its socket; the broker lives
        // on, and clients reconnect to their sessions.
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
        let serve_stop = stop.clone();
        Ok(
            spawner.supervise("mqtt", "mqtt", true, stop.clone(), move || {
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
                let (broker, stop) = (Arc::clone(&broker), serve_stop.clone());
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
            }),
        )
    }
}

/// The admin listener (API, metrics, status, HTTP ingestion), bound.
pub struct AdminFront {
    listener: TcpListener,
    /// `[admin.tls]`: the listener speaks HTTPS.
    tls: Option<TlsAcceptor>,
    pub addr: SocketAddr,
    /// Device ingestion's own listener (`http_ingest.listen`), when configured, with its TLS.
    ingest_listener: Option<(TcpListener, Option<TlsAcceptor>)>,
}

/// What the admin listener serves, besides its own routes.
pub struct AdminRoutes {
    pub state: AdminState,
    pub registry: Registry,
    pub outbox: Outbox,
    pub apps: Option<Apps>,
    pub zigbee: outpost_drivers::zigbee::ZigbeeControl,
    pub http_ingest: Option<HttpIngestState>,
    /// The API's tokens; the reload task replaces the config's.
    pub tokens: Arc<api::auth::TokenSet>,
    /// Every committed reading, for devices' live views.
    pub watch: tokio::sync::broadcast::Sender<ingress::LocalReading>,
    /// `--config` as given, for `/api/v1/config/check`.
    pub config_file: Option<std::path::PathBuf>,
    /// `[edge]`, for `/api/v1/alerts`, `/api/v1/edge/…` and the dry run.
    pub edge: EdgeControl,
}

impl AdminFront {
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("binding the admin listener on {}", config.admin.listen))?;
        let addr = listener
            .local_addr()
            .context("reading the admin listener address")?;
        let tls = tls_acceptor("admin.tls", &config.admin.tls)?;
        tracing::info!(addr = %addr, tls = tls.is_some(), "Admin listener bound");
        let ingest_listener = match config.http_ingest.listen_addr() {
            Some(listen) if config.http_ingest.enabled => {
                let listener = TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("binding the HTTP ingestion listener on {listen}"))?;
                let addr = listener
                    .local_addr()
                    .context("reading the HTTP ingestion listener address")?;
                let tls = tls_acceptor("http_ingest.tls", &config.http_ingest.tls)?;
                tracing::info!(addr = %addr, tls = tls.is_some(), "HTTP ingestion listener bound");
                Some((listener, tls))
            }
            _ => None,
        };
        Ok(Self {
            listener,
            tls,
            addr,
            ingest_listener,
        })
    }

    /// Serves `routes` until `stop`. Essential.
    pub fn spawn(
        self,
        config: &Config,
        routes: AdminRoutes,
        spawner: &Spawner,
        stop: &CancellationToken,
    ) -> anyhow::Result<JoinHandle<()>> {
        let status = &spawner.status;
        let AdminRoutes {
            state,
            registry,
            outbox,
            apps,
            zigbee,
            http_ingest,
            tokens,
            watch,
            config_file,
            edge,
        } = routes;
        let mut router = admin::router(state)
            .merge(api::router(
                api::ApiState::new(registry, tokens)
                    .with_zigbee(zigbee)
                    .with_apps(apps)
                    .with_outbox(outbox)
                    .with_readings(watch, stop.clone())
                    .with_config_file(config_file)
                    .with_edge(edge),
            ))
            .merge(crate::console::router());
        if let Some(state) = http_ingest {
            // On its own listener it is essential itself; on the admin listener, that one is.
            let separate = self.ingest_listener.is_some();
            status.active("http-ingest", separate);
            match self.ingest_listener {
                Some(listener) => serve_ingest(listener, state, spawner, stop)?,
                None => router = router.merge(ingress::http::router(state)),
            }
        } else {
            status.inactive(
                "http-ingest",
                "disabled by http_ingest.enabled = false",
                false,
            );
        }
        let router = admin::with_json_errors(
            router,
            admin::OWN_ROUTES
                .iter()
                .chain(ingress::http::ROUTES)
                .chain(crate::console::ROUTES)
                .copied()
                .chain(api::ROUTES.iter().map(|r| (r.method, r.path))),
        );
        spawn_local_socket(&config.admin.socket, router.clone(), spawner, stop);
        let task = serve_http(
            (self.listener, self.tls),
            router,
            ("admin", "Admin listener", true),
            spawner,
            stop,
        )?;
        status.active("admin", true);
        Ok(task)
    }
}

/// Serves `router` on the local admin socket (`admin.socket`, see `local_admin`) until `stop`,
/// when it can be created; not essential: the TCP listener serves the same API.
fn spawn_local_socket(
    path: &std::path::Path,
    router: axum::Router,
    spawner: &Spawner,
    stop: &CancellationToken,
) {
    let listener = match local_admin::bind(path) {
        Ok(listener) => listener,
        Err(why) => {
            tracing::info!(path = %path.display(), reason = %why, "No local admin socket");
            spawner.status.inactive(
                "admin-socket",
                format!("no local admin socket at {}: {why}", path.display()),
                false,
            );
            return;
        }
    };
    tracing::info!(path = %path.display(), "Local admin socket bound");
    spawner.status.active("admin-socket", false);
    let listener = Arc::new(tokio::sync::Mutex::new(Some(listener)));
    let path = path.to_path_buf();
    let serve_stop = stop.clone();
    spawner.supervise("admin-socket", "admin-socket", false, stop.clone(), move || {
        let (router, stop, listener, path) = (
            router.clone(),
            serve_stop.clone(),
            Arc::clone(&listener),
            path.clone(),
        );
        async move {
            // The first run takes the bound listener; a restart after a failure binds again.
            let listener = match listener.lock().await.take() {
                Some(l) => l,
                None => match local_admin::bind(&path) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "Local admin socket unusable");
                        return;
                    }
                },
            };
            let served = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<local_admin::LocalPeer>(),
            )
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "Local admin socket failed");
            }
            let _ = std::fs::remove_file(&path);
        }
    });
}

/// The acceptor of an enabled `[*.tls]` table (the files were checked with the config; they are
/// read again here).
fn tls_acceptor(
    table: &str,
    config: &outpost_config::HttpTlsConfig,
) -> anyhow::Result<Option<TlsAcceptor>> {
    if !config.enabled {
        return Ok(None);
    }
    crate::https::acceptor(table, config)
        .map(Some)
        .map_err(|problems| {
            let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
            anyhow::anyhow!(text.join("; "))
        })
}

/// Serves device ingestion and command polling on their own listener (`http_ingest.listen`)
/// until `stop`; essential, like the admin listener that carries them otherwise.
fn serve_ingest(
    listener: (TcpListener, Option<TlsAcceptor>),
    state: HttpIngestState,
    spawner: &Spawner,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let router = admin::with_json_errors(
        ingress::http::router(state).fallback(admin::not_found),
        ingress::http::ROUTES.iter().copied(),
    );
    serve_http(
        listener,
        router,
        ("http-ingest", "HTTP ingestion listener", true),
        spawner,
        stop,
    )?;
    Ok(())
}

/// Serves `router` on `listener` (HTTPS with an acceptor) until `stop`, supervised as
/// `(name, what, essential)`: a restart after a failure serves the same socket again. Requests
/// carry the peer's address (`ConnectInfo<SocketAddr>`: `/metrics` and the status answer
/// loopback without a token).
fn serve_http(
    (listener, tls): (TcpListener, Option<TlsAcceptor>),
    router: axum::Router,
    (name, what, essential): (&'static str, &'static str, bool),
    spawner: &Spawner,
    stop: &CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let socket = listener
        .into_std()
        .with_context(|| format!("taking the {what} socket"))?;
    let serve_stop = stop.clone();
    Ok(
        spawner.supervise(name, name, essential, stop.clone(), move || {
            let listener = socket.try_clone().and_then(TcpListener::from_std);
            let (router, stop, tls) = (router.clone(), serve_stop.clone(), tls.clone());
            async move {
                let listener = match listener {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "{what} socket unusable");
                        return;
                    }
                };
                let served = match tls {
                    None => {
                        axum::serve(
                            listener,
                            router.into_make_service_with_connect_info::<SocketAddr>(),
                        )
                        .with_graceful_shutdown(stop.cancelled_owned())
                        .await
                    }
                    Some(acceptor) => {
                        let listener = match HttpsListener::new(listener, acceptor) {
                            Ok(l) => l,
                            Err(e) => {
                                tracing::error!(error = %e, "{what} socket unusable");
                                return;
                            }
                        };
                        let router = router
                            .layer(axum::middleware::from_fn(crate::https::peer_as_socket_addr));
                        axum::serve(
                            listener,
                            router.into_make_service_with_connect_info::<HttpsPeer>(),
                        )
                        .with_graceful_shutdown(stop.cancelled_owned())
                        .await
                    }
                };
                if let Err(e) = served {
                    tracing::error!(error = %e, "{what} failed");
                }
            }
        }),
    )
}
