//! Fleet topics: a heartbeat per gateway and the device inventory, both on compacted topics, so
//! a cloud backend sees every gateway and every device; and the reader behind
//! `outpost fleet watch`.
//!
//! * `kafka.heartbeat_topic`, key = gateway id, value = [`Heartbeat`] JSON, every
//!   `kafka.heartbeat_interval`; a clean shutdown sends a last one with `"state": "stopped"`.
//! * `kafka.inventory_topic`, key = device id, value = the device's inventory JSON (as
//!   `GET /api/v1/devices/{id}` shows it, without monitoring figures) whenever it changes, and a
//!   tombstone (null value) when the device is deleted. At start every device is sent once.
//!
//! Heartbeats are state, not data: they do not go through the outbox, and one lost during an
//! outage is simply replaced by the next (librdkafka expires it after one interval).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::BaseRecord;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::polled::{OnDelivery, PolledProducer};
use super::{ForwarderHandle, ForwarderOptions, client};
use crate::outbox::now_unix_ms;

/// What the daemon adds to the fleet topics: its subsystem states and its device inventory.
pub trait FleetSource: Send + Sync {
    /// Subsystem name → state (`active`, `inactive: reason`, ...).
    fn subsystems(&self) -> serde_json::Value;
    /// Every device as (id, inventory JSON). Only fields that describe the device, not its
    /// traffic: a change here is an inventory change.
    fn inventory(&self) -> Vec<(String, serde_json::Value)>;
}

/// The value of a heartbeat record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub gateway: String,
    pub version: String,
    pub boot_id: String,
    /// `running` or `stopped` (the last heartbeat of a clean shutdown).
    pub state: String,
    pub started_at_ms: i64,
    pub sent_at_ms: i64,
    pub uptime_s: u64,
    pub interval_s: u64,
    /// The forwarder's state (`live`, `backfill`, `offline`, ...).
    pub forwarder: String,
    pub backlog_records: u64,
    pub backlog_bytes: u64,
    pub backlog_oldest_age_ms: Option<i64>,
    pub devices: u64,
    pub subsystems: serde_json::Value,
}

/// Sends heartbeats and inventory changes until `stop`, then one last `stopped` heartbeat.
/// `resend` makes it send a heartbeat and every device's inventory at once (a backend's
/// `resend_inventory` command).
pub async fn run(
    options: ForwarderOptions,
    handle: ForwarderHandle,
    source: Arc<dyn FleetSource>,
    boot_id: String,
    resend: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    let kafka = &options.kafka;
    let interval = kafka.heartbeat_interval;
    // Its own context: librdkafka's errors go to the debug log, not to ERROR lines on every
    // failed reconnect (the forwarder reports reachability).
    let context = client::Context {
        signals: Arc::new(client::LinkSignals::default()),
        tls_check: None,
    };
    let producer: Producer =
        match client::common_config(kafka, &options.client_id).and_then(|mut c| {
            c.set("acks", "all")
                .set("enable.idempotence", "true")
                .set("linger.ms", "5")
                .set(
                    "message.timeout.ms",
                    interval.as_millis().max(1000).to_string(),
                );
            PolledProducer::new(&c, context, Replies).map_err(|e| e.to_string())
        }) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "Fleet heartbeats disabled: cannot create a producer");
                return;
            }
        };
    let started = Instant::now();
    let started_at_ms = now_unix_ms();
    let mut sent_inventory: HashMap<String, String> = HashMap::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            _ = ticker.tick() => false,
            () = resend.notified() => {
                sent_inventory.clear();
                false
            }
        };
        let inventory = source.inventory();
        let status = handle.status();
        let heartbeat = Heartbeat {
            gateway: options.gateway_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            boot_id: boot_id.clone(),
            state: if stopping { "stopped" } else { "running" }.to_owned(),
            started_at_ms,
            sent_at_ms: now_unix_ms(),
            uptime_s: started.elapsed().as_secs(),
            interval_s: interval.as_secs(),
            forwarder: status.state.as_str().to_owned(),
            backlog_records: status.backlog_records,
            backlog_bytes: status.backlog_bytes,
            backlog_oldest_age_ms: status.backlog_oldest_age_ms,
            devices: inventory.len() as u64,
            subsystems: source.subsystems(),
        };
        let value = serde_json::to_vec(&heartbeat).unwrap_or_default();
        let sent = deliver(
            &producer,
            &kafka.heartbeat_topic,
            &options.gateway_id,
            Some(&value),
        )
        .await;
        if !sent {
            tracing::debug!("Heartbeat not delivered");
        }
        if stopping {
            return;
        }
        publish_inventory(
            &producer,
            &kafka.inventory_topic,
            inventory,
            &mut sent_inventory,
        )
        .await;
    }
}

/// Sends the devices whose inventory changed since the last call, and tombstones for deleted
/// ones. A device whose send failed is tried again next time.
type Producer = PolledProducer<Replies>;

/// Each record's delivery report goes back to its sender through a oneshot channel (a few
/// records per heartbeat interval: the per-record channel costs nothing here).
struct Replies;

impl OnDelivery for Replies {
    type Opaque = Box<oneshot::Sender<bool>>;

    fn delivered(&self, result: Result<(), KafkaError>, reply: Self::Opaque) {
        let _ = reply.send(result.is_ok());
    }
}

/// Sends one record (no payload: a tombstone) and waits at most [`DELIVERY_WAIT`] for its
/// acknowledgement: heartbeats and inventory must never hold up the loop or a shutdown while
/// Kafka is away.
async fn deliver(producer: &Producer, topic: &str, key: &str, payload: Option<&[u8]>) -> bool {
    let (reply, delivered) = oneshot::channel();
    let mut record = BaseRecord::<str, [u8], _>::with_opaque_to(topic, Box::new(reply)).key(key);
    if let Some(payload) = payload {
        record = record.payload(payload);
    }
    if producer.producer().send(record).is_err() {
        return false;
    }
    matches!(
        tokio::time::timeout(DELIVERY_WAIT, delivered).await,
        Ok(Ok(true))
    )
}

const DELIVERY_WAIT: Duration = Duration::from_secs(2);

async fn publish_inventory(
    producer: &Producer,
    topic: &str,
    inventory: Vec<(String, serde_json::Value)>,
    sent: &mut HashMap<String, String>,
) {
    let mut present = std::collections::HashSet::new();
    for (id, device) in inventory {
        present.insert(id.clone());
        let text = device.to_string();
        if sent.get(&id) == Some(&text) {
            continue;
        }
        if deliver(producer, topic, &id, Some(text.as_bytes())).await {
            sent.insert(id, text);
        }
    }
    let gone: Vec<String> = sent
        .keys()
        .filter(|id| !present.contains(*id))
        .cloned()
        .collect();
    for id in gone {
        if deliver(producer, topic, &id, None).await {
            sent.remove(&id);
        }
    }
}

/// One gateway as `outpost fleet watch` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayView {
    pub heartbeat: Heartbeat,
    /// `ok`, `stopped` (said goodbye) or `silent` (no heartbeat for 3 intervals).
    pub verdict: &'static str,
    pub age_ms: i64,
}

/// Reads the heartbeat topic from the beginning to its end and returns the last heartbeat of
/// every gateway with a verdict. Blocking.
pub fn read_fleet(
    kafka: &outpost_config::KafkaConfig,
    timeout: Duration,
) -> Result<Vec<GatewayView>, String> {
    let mut config = client::common_config(kafka, "outpost-fleet-watch")?;
    config
        .set("group.id", "outpost-fleet-watch")
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = config.create().map_err(|e| e.to_string())?;
    let topic = &kafka.heartbeat_topic;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| format!("cannot reach Kafka: {e}"))?;
    let mut ends = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        if let Some(e) = t.error() {
            return Err(format!("topic {topic}: {e:?}"));
        }
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), timeout)
                .map_err(|e| e.to_string())?;
            if high > low {
                ends.insert(p.id(), high);
                assignment
                    .add_partition_offset(topic, p.id(), Offset::Beginning)
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    let mut last: HashMap<String, Heartbeat> = HashMap::new();
    if !ends.is_empty() {
        consumer.assign(&assignment).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + timeout;
        while !ends.is_empty() && Instant::now() < deadline {
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = message.map_err(|e| e.to_string())?;
            if let Some(hb) = message
                .payload()
                .and_then(|v| serde_json::from_slice::<Heartbeat>(v).ok())
            {
                last.insert(hb.gateway.clone(), hb);
            }
            if ends
                .get(&message.partition())
                .is_some_and(|end| message.offset() + 1 >= *end)
            {
                ends.remove(&message.partition());
            }
        }
    }
    let now = now_unix_ms();
    let mut views: Vec<GatewayView> = last
        .into_values()
        .map(|heartbeat| {
            let age_ms = (now - heartbeat.sent_at_ms).max(0);
            let silent_after = (heartbeat.interval_s.max(1) * 3 * 1000) as i64;
            let verdict = if heartbeat.state == "stopped" {
                "stopped"
            } else if age_ms > silent_after {
                "silent"
            } else {
                "ok"
            };
            GatewayView {
                heartbeat,
                verdict,
                age_ms,
            }
        })
        .collect();
    views.sort_by(|a, b| a.heartbeat.gateway.cmp(&b.heartbeat.gateway));
    Ok(views)
}
