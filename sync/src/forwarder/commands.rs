//! Commands from the cloud: the Kafka side. A backend writes a command (JSON, [`WireCommand`])
//! to `kafka.commands.topic`, keyed by the gateway id; this module reads the commands meant for
//! this gateway and hands them, checked, to a [`CommandStore`] (the daemon's registry), which
//! queues them for devices.
//!
//! **One partition per gateway.** A producer using Kafka's default partitioner (Java clients,
//! or librdkafka's `partitioner=murmur2_random`) sends every command keyed `<gateway id>` to
//! partition `murmur2(id) mod partitions` ([`partition_for`]). This gateway assigns itself that
//! partition only (no consumer group, no rebalances) and keeps the records whose key is its id.
//! With G gateways and P partitions a gateway reads about 1/P of the fleet's commands, whatever
//! G is; the count is checked every [`PARTITIONS_RECHECK`] and a change reassigns.
//!
//! **Exactly once into the device queue.** The offset after the last record read is stored by
//! the [`CommandStore`] in the same transaction as the commands read (`registry.db`), never
//! committed to Kafka: a crash before that commit reads the records again, a crash after it
//! does not, and the store also refuses an id it already has (a backend that sends a command
//! twice). A first start (no stored offset) reads the partition from its beginning, so commands
//! sent before the gateway was first started are delivered unless they expired.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use outpost_config::KafkaConfig;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry as MetricsRegistry;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::client;
use crate::outbox::{now_unix_ms, parse_rfc3339};

/// How often the partition count of the commands topic is checked again.
pub const PARTITIONS_RECHECK: Duration = Duration::from_secs(300);
/// Records handed to the store at most at once.
pub const MAX_BATCH: usize = 500;
/// A TTL of a command that sets no expiry (as for commands queued through the API).
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The longest a command may wait for its device.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longest command id and name, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// How long an advanced offset of records not for this gateway may stay unstored.
const OFFSET_SAVE_INTERVAL: Duration = Duration::from_secs(5);
/// One poll's wait: also how soon a stop is seen.
const POLL: Duration = Duration::from_millis(500);

/// Kafka's `Utils.murmur2` (Java client; librdkafka `rd_murmur2`).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if let Some(first) = tail.first() {
        h ^= u32::from(*first);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner gives `key` among `partitions` (at least 1).
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

/// A command as the backend writes it: the value of a record on the commands topic
/// (docs/KAFKA.md, "Commands from the cloud"). Unknown fields are ignored, so a backend may
/// add its own.
#[derive(Debug, Clone, Deserialize)]
pub struct WireCommand {
    /// Unique, chosen by the backend: 1 to 128 printable ASCII characters.
    pub id: String,
    /// `"device"` (default) or `"gateway"`.
    #[serde(default)]
    pub target: Option<String>,
    /// The device, when `target` is `"device"`.
    #[serde(default)]
    pub device: Option<String>,
    /// What to do: for a device, the backend's and device's own vocabulary; for the gateway,
    /// one of the gateway actions.
    pub name: String,
    /// JSON arguments.
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    /// Bytes arguments, base64 (standard alphabet), instead of `payload`.
    #[serde(default)]
    pub payload_base64: Option<String>,
    /// Absolute expiry, RFC 3339.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// Expiry relative to the record's Kafka timestamp, in seconds.
    #[serde(default)]
    pub ttl_s: Option<u64>,
    /// Kafka topic for this command's status events instead of `kafka.commands.status_topic`.
    #[serde(default)]
    pub reply_topic: Option<String>,
    /// Echoed in every status event of the command.
    #[serde(default)]
    pub correlation: Option<String>,
}

/// Who a command is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Device(String),
    Gateway,
}

/// A command's arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Json(serde_json::Value),
    Bytes(Vec<u8>),
}

/// A checked command for this gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudCommand {
    pub id: String,
    pub target: Target,
    pub name: String,
    pub payload: Payload,
    pub expires_at_ms: i64,
    pub reply_topic: Option<String>,
    pub correlation: Option<String>,
}

/// What a record keyed with this gateway's id turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Read {
    Command(CloudCommand),
    /// Not a command; `id` and `device` when the record had them, for the status event.
    Invalid {
        id: Option<String>,
        device: Option<String>,
        correlation: Option<String>,
        reason: String,
    },
}

/// Checks one record's value. `timestamp_ms` is the record's Kafka timestamp (a TTL counts
/// from it, so a command that waited in Kafka for an offline gateway is not made younger).
pub fn parse(value: &[u8], timestamp_ms: Option<i64>, now_ms: i64) -> Read {
    let wire: WireCommand = match serde_json::from_slice(value) {
        Ok(w) => w,
        Err(e) => {
            // What can still be said about the record, for the status event.
            let loose: serde_json::Value = serde_json::from_slice(value).unwrap_or_default();
            let field = |k: &str| loose.get(k).and_then(|v| v.as_str()).map(str::to_owned);
            return Read::Invalid {
                id: field("id").filter(|id| valid_id(id)),
                device: field("device"),
                correlation: field("correlation"),
                reason: format!("not a command: {e}"),
            };
        }
    };
    let invalid = |reason: String| Read::Invalid {
        id: Some(wire.id.clone()).filter(|id| valid_id(id)),
        device: wire.device.clone(),
        correlation: wire.correlation.clone(),
        reason,
    };
    match check(&wire, timestamp_ms.unwrap_or(now_ms), now_ms) {
        Ok(command) => Read::Command(command),
        Err(reason) => invalid(reason),
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

fn check(w: &WireCommand, sent_ms: i64, now_ms: i64) -> Result<CloudCommand, String> {
    if !valid_id(&w.id) {
        return Err(format!(
            "id: must be 1 to {MAX_ID_LEN} printable ASCII characters"
        ));
    }
    // The name is the last level of the device's MQTT command topic.
    let bad_char = |c: char| c.is_control() || matches!(c, '/' | '+' | '#');
    if w.name.is_empty() || w.name.len() > MAX_ID_LEN || w.name.chars().any(bad_char) {
        return Err(format!(
            "name: must be 1 to {MAX_ID_LEN} bytes without control characters, '/', '+' or '#'"
        ));
    }
    let target = match (w.target.as_deref().unwrap_or("device"), &w.device) {
        ("device", Some(device)) if !device.is_empty() => Target::Device(device.clone()),
        ("device", _) => return Err("device: required when target is \"device\"".into()),
        ("gateway", None) => Target::Gateway,
        ("gateway", Some(_)) => {
            return Err("device: must not be set when target is \"gateway\"".into());
        }
        (other, _) => {
            return Err(format!(
                "target: must be \"device\" or \"gateway\", found \"{}\"",
                other.escape_debug()
            ));
        }
    };
    let payload = match (&w.payload, &w.payload_base64) {
        (Some(_), Some(_)) => return Err("payload and payload_base64: set one, not both".into()),
        (Some(json), None) => Payload::Json(json.clone()),
        (None, Some(b64)) => Payload::Bytes(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("payload_base64: not base64: {e}"))?,
        ),
        (None, None) => Payload::Json(serde_json::Value::Null),
    };
    let max_ms = i64::try_from(MAX_TTL.as_millis()).unwrap_or(i64::MAX);
    let expires_at_ms = match (&w.expires_at, w.ttl_s) {
        (Some(_), Some(_)) => return Err("expires_at and ttl_s: set one, not both".into()),
        (Some(at), None) => parse_rfc3339(at).ok_or_else(|| {
            format!(
                "expires_at: not an RFC 3339 date-time: \"{}\"",
                at.escape_debug()
            )
        })?,
        (None, Some(ttl)) => {
            sent_ms.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX).saturating_mul(1000))
        }
        (None, None) => sent_ms.saturating_add(i64::try_from(DEFAULT_TTL.as_millis()).unwrap_or(0)),
    };
    if expires_at_ms > now_ms.saturating_add(max_ms) {
        return Err(format!(
            "expiry: at most {} days ahead",
            MAX_TTL.as_secs() / 86_400
        ));
    }
    if let Some(topic) = &w.reply_topic {
        outpost_config::check_kafka_topic(topic).map_err(|why| format!("reply_topic: {why}"))?;
    }
    Ok(CloudCommand {
        id: w.id.clone(),
        target,
        name: w.name.clone(),
        payload,
        expires_at_ms,
        reply_topic: w.reply_topic.clone(),
        correlation: w.correlation.clone(),
    })
}

/// Records read from the commands partition, with the offset to resume after them.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub topic: String,
    pub partition: i32,
    /// The offset of the next record to read: stored with the commands, in one transaction.
    pub next_offset: i64,
    /// The records keyed with this gateway's id, in offset order. May be empty (only the
    /// offset moved past other gateways' records).
    pub reads: Vec<Read>,
}

/// Where read commands go: the daemon's registry. Blocking; called from the consumer thread.
pub trait CommandStore: Send + Sync + 'static {
    /// The stored next offset of `topic`/`partition`, if any.
    fn next_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, String>;
    /// Stores the batch's commands and its `next_offset` atomically: either both or neither.
    fn store(&self, batch: Batch) -> Result<(), String>;
}

/// `outpost_kafka_commands_*` metrics. Clones share the counters.
#[derive(Debug, Clone, Default)]
pub struct CommandsMetrics {
    pub read: Counter,
    pub invalid: Counter,
    pub other_gateways: Counter,
    pub store_failures: Counter,
}

impl CommandsMetrics {
    pub fn register(&self, registry: &mut MetricsRegistry) {
        let r = registry.sub_registry_with_prefix("outpost_kafka_commands");
        r.register(
            "read",
            "Commands read from kafka.commands.topic for this gateway (valid or not)",
            self.read.clone(),
        );
        r.register(
            "invalid",
            "Records for this gateway that were not valid commands (answered `rejected`)",
            self.invalid.clone(),
        );
        r.register(
            "other_gateways",
            "Records of the commands partition keyed with another gateway's id (skipped)",
            self.other_gateways.clone(),
        );
        r.register(
            "store_failures",
            "Batches the registry could not store (read again)",
            self.store_failures.clone(),
        );
    }
}

/// Reads this gateway's commands into `store` until `stop`. Blocking: run it on a thread of
/// its own (the daemon uses `spawn_blocking`).
pub fn consume(
    kafka: &KafkaConfig,
    gateway_id: &str,
    client_id: &str,
    store: &dyn CommandStore,
    metrics: &CommandsMetrics,
    stop: &CancellationToken,
) -> Result<(), String> {
    let topic = &kafka.commands.topic;
    let mut config = client::common_config(kafka, client_id)?;
    config
        // Assigned, never subscribed: the group id only names the client in broker logs.
        .set("group.id", format!("outpost-commands-{gateway_id}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Memory: librdkafka prefetches up to 64 MB per partition by default.
        .set("queued.max.messages.kbytes", "1024")
        // A long poll: Kafka answers as soon as a record arrives, so this costs no latency,
        // and at the default 5 s an idle fleet of 10,000 gateways sends 2,000 fetches/s.
        .set(
            "fetch.wait.max.ms",
            kafka.commands.fetch_wait.as_millis().to_string(),
        )
        .set("fetch.max.bytes", "1048576")
        .set("max.partition.fetch.bytes", "1048576");
    let consumer: BaseConsumer = config.create().map_err(|e| e.to_string())?;
    let key = gateway_id.as_bytes();
    let mut warned_at: Option<Instant> = None;
    while !stop.is_cancelled() {
        let partitions = match partition_count(&consumer, topic) {
            Ok(n) => n,
            Err(e) => {
                if warned_at.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(topic = %topic, error = %e, "Cannot read the commands topic yet");
                    warned_at = Some(Instant::now());
                }
                sleep_unless_stopped(Duration::from_secs(2), stop);
                continue;
            }
        };
        let partition = partition_for(key, partitions);
        let start = store.next_offset(topic, partition)?;
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(
                topic,
                partition,
                start.map_or(Offset::Beginning, Offset::Offset),
            )
            .map_err(|e| e.to_string())?;
        consumer.assign(&assignment).map_err(|e| e.to_string())?;
        tracing::info!(
            topic = %topic,
            partition,
            partitions,
            offset = ?start,
            "Reading commands"
        );
        read_partition(
            &consumer, key, topic, partition, partitions, store, metrics, stop,
        )?;
    }
    Ok(())
}

/// Reads the assigned partition until `stop` or until the topic's partition count changes.
#[allow(clippy::too_many_arguments)]
fn read_partition(
    consumer: &BaseConsumer,
    key: &[u8],
    topic: &str,
    partition: i32,
    partitions: i32,
    store: &dyn CommandStore,
    metrics: &CommandsMetrics,
    stop: &CancellationToken,
) -> Result<(), String> {
    let mut recheck_at = Instant::now() + PARTITIONS_RECHECK;
    let mut unsaved: Option<i64> = None;
    let mut saved_at = Instant::now();
    while !stop.is_cancelled() {
        if Instant::now() >= recheck_at {
            recheck_at = Instant::now() + PARTITIONS_RECHECK;
            if partition_count(consumer, topic).is_ok_and(|n| n != partitions) {
                tracing::info!(topic = %topic, "The commands topic's partition count changed");
                break;
            }
        }
        let mut reads = Vec::new();
        let mut next_offset = None;
        let mut wait = POLL;
        while reads.len() < MAX_BATCH {
            let Some(polled) = consumer.poll(wait) else {
                break;
            };
            wait = Duration::ZERO;
            let message = match polled {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "Commands consumer");
                    break;
                }
            };
            next_offset = Some(message.offset() + 1);
            if message.key() != Some(key) {
                metrics.other_gateways.inc();
                continue;
            }
            metrics.read.inc();
            let read = parse(
                message.payload().unwrap_or_default(),
                message.timestamp().to_millis(),
                now_unix_ms(),
            );
            if let Read::Invalid { reason, .. } = &read {
                metrics.invalid.inc();
                tracing::warn!(offset = message.offset(), reason = %reason, "Invalid command");
            }
            reads.push(read);
        }
        let Some(next) = next_offset.or(unsaved) else {
            continue;
        };
        // Other gateways' records alone: the offset is saved now and then, not per poll.
        if reads.is_empty() && saved_at.elapsed() < OFFSET_SAVE_INTERVAL {
            unsaved = Some(next);
            continue;
        }
        let batch = Batch {
            topic: topic.to_owned(),
            partition,
            next_offset: next,
            reads,
        };
        store_until_stored(store, batch, metrics, stop)?;
        unsaved = None;
        saved_at = Instant::now();
    }
    Ok(())
}

/// Stores a batch, retrying once a second while the registry fails (the records are already
/// read: reading on without storing them would skip them).
fn store_until_stored(
    store: &dyn CommandStore,
    batch: Batch,
    metrics: &CommandsMetrics,
    stop: &CancellationToken,
) -> Result<(), String> {
    loop {
        match store.store(batch.clone()) {
            Ok(()) => return Ok(()),
            Err(e) => {
                metrics.store_failures.inc();
                tracing::error!(error = %e, "Could not store commands; retrying");
                if stop.is_cancelled() {
                    // Not stored: read again at the next start.
                    return Ok(());
                }
                sleep_unless_stopped(Duration::from_secs(1), stop);
            }
        }
    }
}

fn partition_count(consumer: &BaseConsumer, topic: &str) -> Result<i32, String> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .map_err(|e| format!("cannot reach Kafka: {e}"))?;
    let t = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| format!("topic {topic} not in the metadata"))?;
    if let Some(e) = t.error() {
        return Err(format!("topic {topic}: {e:?}"));
    }
    match i32::try_from(t.partitions().len()) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("topic {topic} has no partitions")),
    }
}

/// Sleeps `d` on the consumer's own (blocking) thread, waking early on `stop`.
#[allow(clippy::disallowed_methods)] // a blocking thread of its own, not a runtime worker
fn sleep_unless_stopped(d: Duration, stop: &CancellationToken) {
    let until = Instant::now() + d;
    while !stop.is_cancelled() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs [`consume`] on a blocking thread until `stop`.
pub async fn run(
    kafka: KafkaConfig,
    gateway_id: String,
    client_id: String,
    store: Arc<dyn CommandStore>,
    metrics: CommandsMetrics,
    stop: CancellationToken,
) {
    let result = tokio::task::spawn_blocking(move || {
        consume(&kafka, &gateway_id, &client_id, &*store, &metrics, &stop)
    })
    .await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "Commands consumer stopped"),
        Err(e) => tracing::error!(error = %e, "Commands consumer panicked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka_s_test_vectors() {
        // From Kafka's `UtilsTest.testMurmur2`.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (data, expected) in cases {
            assert_eq!(murmur2(data), expected, "{}", String::from_utf8_lossy(data));
        }
        assert!((0..7).contains(&partition_for(b"foobar", 7)));
        assert_eq!(partition_for(b"anything", 1), 0);
    }

    fn read(json: serde_json::Value) -> Read {
        parse(json.to_string().as_bytes(), Some(1_000_000), 1_000_500)
    }

    #[test]
    fn a_command_is_checked_and_its_expiry_counts_from_the_record() {
        let Read::Command(c) = read(serde_json::json!({
            "id": "c-1", "device": "valve-1", "name": "open",
            "payload": {"percent": 40}, "ttl_s": 60, "correlation": "x", "extra": 1
        })) else {
            panic!("not a command");
        };
        assert_eq!(c.target, Target::Device("valve-1".into()));
        assert_eq!(c.payload, Payload::Json(serde_json::json!({"percent": 40})));
        assert_eq!(c.expires_at_ms, 1_060_000);
        let Read::Command(c) = read(serde_json::json!({
            "id": "c-2", "target": "gateway", "name": "status",
            "payload_base64": "AAE=", "expires_at": "1970-01-01T00:20:00Z"
        })) else {
            panic!("not a command");
        };
        assert_eq!(
            (c.target, c.payload),
            (Target::Gateway, Payload::Bytes(vec![0, 1]))
        );
        assert_eq!(c.expires_at_ms, 1_200_000);
        let Read::Command(c) = read(serde_json::json!({"id": "c-3", "device": "d", "name": "n"}))
        else {
            panic!("not a command");
        };
        assert_eq!(c.expires_at_ms, 1_000_000 + 24 * 3600 * 1000);
        assert_eq!(c.payload, Payload::Json(serde_json::Value::Null));
    }

    #[test]
    fn invalid_commands_say_which_field_is_wrong() {
        let reason = |json: serde_json::Value| match read(json) {
            Read::Invalid { reason, .. } => reason,
            Read::Command(c) => panic!("accepted {c:?}"),
        };
        let cases = [
            (
                serde_json::json!({"id": "", "device": "d", "name": "n"}),
                "id: ",
            ),
            (
                serde_json::json!({"id": "a", "name": "n"}),
                "device: required",
            ),
            (
                serde_json::json!({"id": "a", "target": "gateway", "device": "d", "name": "n"}),
                "device: must not",
            ),
            (
                serde_json::json!({"id": "a", "target": "cloud", "name": "n"}),
                "target: ",
            ),
            (
                serde_json::json!({"id": "a", "device": "d", "name": ""}),
                "name: ",
            ),
            (
                serde_json::json!({"id": "a", "device": "d", "name": "a/b"}),
                "name: ",
            ),
            (
                serde_json::json!({"id": "a", "device": "d", "name": "n", "payload": 1, "payload_base64": "AA=="}),
                "payload and payload_base64",
            ),
            (
                serde_json::json!({"id": "a", "device": "d", "name": "n", "payload_base64": "!"}),
                "payload_base64: ",
            ),
            (
                serde_json::json!({"id": "a", "device": "d", "name": "n", "expires_at": "tomorrow"}),
                "expires_at: ",
            ),
            (
                serde_json::json!({"id": "a", "device": "d", "name": "n", "ttl_s": 99_999_999}),
                "expiry: ",
            ),
            (
                serde_json::json!({"id": "a", "device": "d", "name": "n", "reply_topic": "a b"}),
                "reply_topic: ",
            ),
            (
                serde_json::json!({"device": "d", "name": "n"}),
                "not a command: missing field `id`",
            ),
        ];
        for (json, expected) in cases {
            let why = reason(json.clone());
            assert!(why.starts_with(expected), "{json}: {why}");
        }
        // What a broken record still says is kept for its `rejected` event.
        assert_eq!(
            parse(br#"{"id": "x-1", "device": "d", "name": 5}"#, None, 0),
            Read::Invalid {
                id: Some("x-1".into()),
                device: Some("d".into()),
                correlation: None,
                reason: "not a command: invalid type: integer `5`, expected a string at line 1 column 38".into(),
            }
        );
    }
}
