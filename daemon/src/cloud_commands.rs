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
//! Status events are written to `registry.db` in the transaction that changes the command
//! (`registry::commands`), so none is lost between the two databases: [`relay`] appends them to
//! the outbox in id order and deletes them only once the outbox has them. A crash between the
//! two repeats events, never drops them (at least once; an event is identified by its command
//! id and status). While the outbox refuses (full disk, cap), they wait in the registry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost_sync::{Envelope, Outbox, Source};
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;
use crate::registry::commands::StatusEvent;

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
