//! Commands from the cloud, the gateway's side: the consumer (`outpost_sync::forwarder::commands`)
//! stores into the registry; this module moves the registry's status events into the outbox and
//! reports expiries.
//!
//! ```text
//!  Kafka commands topic ──consumer──> registry.db (commands, command_events, kafka_offsets)
//!                                        │                      │
//!          MQTT bus / HTTP poll / CoAP <─┘                      └──relay──> outbox ──> Kafka
//! ```
//!
//! Commands for the gateway itself (`"target": "gateway"`, with `kafka.commands.gateway`) are
//! carried out by [`execute`], oldest first: `deploy_app`, `update_app`, `remove_app`,
//! `restart_app` (the apps' desired-state store, as `/api/v1/apps`), `resend_inventory`,
//! `report_status`. Each ends as `acked` with a result, `failed` with a reason, or `expired`, in
//! the transaction that removes it. A crash while one runs carries it out again at the next
//! start (at least once; every action is idempotent but `restart_app`, which restarts twice).
//!
//! Status events are written to `registry.db` in the transaction that changes the command
//! (`registry::commands`), so none is lost between the two databases: [`relay`] appends them to
//! the outbox in id order and deletes them only once the outbox has them. A crash between the
//! two repeats events, never drops them (at least once; an event is identified by its command
//! id and status). While the outbox refuses (full disk, cap), they wait in the registry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost_config::AppConfig;
use outpost_sync::forwarder::commands::{Batch, CommandStore};
use outpost_sync::{Envelope, Outbox, Source};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::admin::{AdminState, status_document};
use crate::apps::Apps;
use crate::registry::Registry;
use crate::registry::commands::{GatewayCommand, GatewayOutcome, StatusEvent};

/// The commands consumer's store: the registry, and whether commands for the gateway itself
/// are accepted (`kafka.commands.gateway`).
#[derive(Debug, Clone)]
pub struct CloudStore {
    pub registry: Registry,
    pub gateway: bool,
}

impl CommandStore for CloudStore {
    fn next_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, String> {
        self.registry.cloud_offset(topic, partition)
    }

    fn store(&self, batch: Batch) -> Result<(), String> {
        self.registry.store_cloud_commands(&batch, self.gateway)
    }
}

/// How often the relay looks for new status events (and for expired commands).
const TICK: Duration = Duration::from_millis(100);
/// How often expired commands are looked for.
const EXPIRY_EVERY: Duration = Duration::from_secs(1);
/// How often old command ids are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// Events appended to the outbox at most at once.
const BATCH: usize = 256;

/// What the relay needs to turn a status event into an outbox record.
#[derive(Debug, Clone)]
pub struct Relay {
    pub registry: Registry,
    pub outbox: Outbox,
    pub gateway_id: Arc<str>,
    pub status_topic: String,
}

/// Moves status events into the outbox until `stop`.
pub async fn relay(r: Relay, stop: CancellationToken) {
    let route: Arc<str> = Arc::from(outpost_config::DEFAULT_ROUTE);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut expiry_at, mut prune_at) = (Instant::now(), Instant::now());
    let mut warned_at: Option<Instant> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if Instant::now() >= expiry_at {
            let prune = Instant::now() >= prune_at;
            if prune {
                prune_at = Instant::now() + PRUNE_EVERY;
            }
            expiry_at = Instant::now() + EXPIRY_EVERY;
            match r.registry.report_expired_commands(prune).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(count = n, "Commands expired before delivery"),
                Err(e) => tracing::warn!(error = %e, "Could not report expired commands"),
            }
        }
        if let Err(e) = move_events(&r, &route).await
            && warned_at.is_none_or(|t| t.elapsed() > Duration::from_secs(60))
        {
            tracing::warn!(error = %e, "Command status events wait in the registry");
            warned_at = Some(Instant::now());
        }
    }
}

/// Appends every waiting event to the outbox, oldest first.
async fn move_events(r: &Relay, route: &Arc<str>) -> Result<(), String> {
    loop {
        let events = r
            .registry
            .status_events(BATCH)
            .await
            .map_err(|e| e.to_string())?;
        let Some(last) = events.last().map(|e| e.id) else {
            return Ok(());
        };
        let envelopes = events.iter().map(|e| envelope(r, route, e)).collect();
        r.outbox
            .append_all(envelopes)
            .await
            .map_err(|e| e.to_string())?;
        r.registry
            .delete_status_events(last)
            .await
            .map_err(|e| e.to_string())?;
    }
}

/// The outbox record of a status event: the event JSON with the gateway id, on the status topic
/// (or the command's `reply_topic`), keyed by device (the gateway id for events of no device).
fn envelope(r: &Relay, route: &Arc<str>, e: &StatusEvent) -> Envelope {
    let mut value: serde_json::Value = serde_json::from_str(&e.event).unwrap_or_default();
    value["gateway"] = serde_json::json!(&*r.gateway_id);
    let device_id = if e.device_id.is_empty() {
        r.gateway_id.to_string()
    } else {
        e.device_id.clone()
    };
    Envelope {
        route: Arc::clone(route),
        device_id,
        source: Source::Gateway,
        topic: e
            .reply_topic
            .clone()
            .unwrap_or_else(|| r.status_topic.clone()),
        received_at_ms: outpost_sync::outbox::now_unix_ms(),
        content_type: Some("application/json".to_owned()),
        headers: Vec::new(),
        payload: Bytes::from(value.to_string().into_bytes()),
        priority: None,
    }
}

/// What commands for the gateway itself act on.
#[derive(Debug, Clone)]
pub struct GatewayActions {
    pub registry: Registry,
    /// `None` with `apps.enabled = false`: app actions fail, saying so.
    pub apps: Option<Apps>,
    pub admin: AdminState,
    /// Wakes the fleet task to send every device's inventory.
    pub resend_inventory: Arc<Notify>,
}

/// The gateway actions, for error messages.
const ACTIONS: &str =
    "deploy_app, update_app, remove_app, restart_app, resend_inventory, report_status";

/// Carries out commands for the gateway itself until `stop`.
pub async fn execute(actions: GatewayActions, stop: CancellationToken) {
    let mut tick = tokio::time::interval(TICK * 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        loop {
            let command = match actions.registry.next_gateway_command().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "Could not read commands for the gateway");
                    break;
                }
            };
            let outcome = actions.outcome(&command).await;
            match &outcome {
                GatewayOutcome::Done(_) => {
                    tracing::info!(command = %command.command_id, action = %command.name, "Gateway command carried out");
                }
                GatewayOutcome::Failed(why) => {
                    tracing::warn!(command = %command.command_id, action = %command.name, reason = %why, "Gateway command failed");
                }
                GatewayOutcome::Expired => {
                    tracing::info!(command = %command.command_id, "Gateway command expired");
                }
            }
            if let Err(e) = actions
                .registry
                .finish_gateway_command(command.id, outcome)
                .await
            {
                tracing::warn!(error = %e, "Could not record a gateway command's outcome");
                break;
            }
        }
    }
}

impl GatewayActions {
    async fn outcome(&self, c: &GatewayCommand) -> GatewayOutcome {
        if c.expires_at_ms <= outpost_sync::outbox::now_unix_ms() {
            return GatewayOutcome::Expired;
        }
        match self.act(&c.name, &c.payload).await {
            Ok(result) => GatewayOutcome::Done(result),
            Err(reason) => GatewayOutcome::Failed(reason),
        }
    }

    /// One action; the result for the `acked` event, or why it failed.
    async fn act(&self, action: &str, payload: &Value) -> Result<Value, String> {
        match action {
            "deploy_app" | "update_app" => {
                let apps = self.apps()?;
                let spec: AppConfig = serde_path_to_error::deserialize(payload)
                    .map_err(|e| format!("payload.{}: {}", e.path(), e.inner()))?;
                let name = spec.name.clone();
                let exists = apps.get(&name).is_some();
                let result = match (action, exists) {
                    // Deploying what exists replaces it: a deploy carried out twice (after a
                    // crash) ends the same.
                    (_, true) => apps.replace(spec).await,
                    ("deploy_app", false) => apps.create(spec).await,
                    _ => return Err(format!("no app \"{name}\" to update")),
                };
                result.map_err(|e| e.to_string())?;
                Ok(json!({ "app": name, "status": apps.get(&name).map(|(_, s)| s) }))
            }
            "remove_app" => {
                let name = app_name(payload)?;
                self.apps()?
                    .delete(&name)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(json!({ "app": name, "removed": true }))
            }
            "restart_app" => {
                let name = app_name(payload)?;
                self.apps()?.restart(&name).map_err(|e| e.to_string())?;
                Ok(json!({ "app": name, "restarted": true }))
            }
            "resend_inventory" => {
                self.resend_inventory.notify_one();
                Ok(json!({ "devices": self.registry.len() }))
            }
            "report_status" => Ok(status_document(&self.admin)),
            other => Err(format!(
                "unknown gateway action \"{}\": one of {ACTIONS}",
                other.escape_debug()
            )),
        }
    }

    fn apps(&self) -> Result<&Apps, String> {
        self.apps
            .as_ref()
            .ok_or_else(|| "the apps subsystem is disabled (apps.enabled = false)".to_owned())
    }
}

/// `{"name": "<app>"}`.
fn app_name(payload: &Value) -> Result<String, String> {
    payload["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| "payload.name: the app's name is required".to_owned())
}
