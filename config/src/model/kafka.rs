//! `[kafka]`: forwarding the outbox to a cloud Kafka, routing rules, fleet topics.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use super::{Config, machine_id};
use crate::path::KeyPath;
use crate::path::suggest;
use crate::units::duration;
use crate::validate::{Checker, root};
use serde::{Deserialize, Serialize};

/// `[kafka]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [kafka] table")]
pub struct KafkaConfig {
    /// Forward the outbox to Kafka. Default `false`: records stay in the outbox (its cap and
    /// policy apply) until forwarding is enabled.
    pub enabled: bool,
    /// Bootstrap brokers as `host:port`. Default `["127.0.0.1:9092"]`; at least one.
    pub brokers: Vec<String>,
    /// Kafka topic of records no rule sends elsewhere. Default `"outpost.readings"`.
    pub default_topic: String,
    /// Kafka client id. Default: `"outpost-"` followed by the gateway id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Batch compression. Default `"zstd"`.
    pub compression: Compression,
    /// Transactional producer with the forwarded position committed to `checkpoint_topic` in the
    /// same transaction: `read_committed` consumers see every record exactly once, also across
    /// crashes. Default `false` (at-least-once: duplicates are possible after a crash or an
    /// outage, never gaps).
    pub exactly_once: bool,
    /// How long the producer waits to fill a batch (`linger.ms`). Default `"5ms"`; 0 to 1s.
    #[serde(with = "crate::units::duration")]
    pub linger: Duration,
    /// Records read from the outbox at a time. Default 2000; 1 to 100000.
    pub read_batch: usize,
    /// Records produced but not yet acknowledged by Kafka, at most. Bounds the forwarder's
    /// memory (docs/BENCHMARKS.md measures it) and how much can be sent twice after a failure.
    /// Default 2000; 1 to 1000000.
    pub max_in_flight: usize,
    /// Records of one Kafka topic in flight at most: a topic whose partition is stuck (no
    /// leader, a slow broker) holds at most this many slots of `max_in_flight`, and the other
    /// topics keep flowing. Default: half of `max_in_flight` (at least 1); 1 to `max_in_flight`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight_per_topic: Option<usize>,
    /// Records per second at most while a backlog drains after an outage or a restart; live
    /// records are not counted against it. Default 20000; 1 to 10000000.
    pub backlog_rate: u32,
    /// How a backlog and live records share the way to Kafka. Default `"per_device"`.
    pub order: BacklogOrder,
    /// Forwarded records as CloudEvents (Kafka protocol binding): `"off"`, `"binary"` (the
    /// payload unchanged, the event attributes in `ce_*` headers) or `"structured"` (the value
    /// is the JSON event with the payload as its data). A rule's `cloudevents` overrides it.
    /// Default `"off"`.
    pub cloudevents: CloudEvents,
    /// Shortest wait before reconnecting after Kafka became unreachable. Default `"500ms"`.
    #[serde(with = "crate::units::duration")]
    pub reconnect_backoff_min: Duration,
    /// Longest wait between reconnect attempts (the waits double, with jitter, up to this).
    /// Default `"30s"`; at least `reconnect_backoff_min`.
    #[serde(with = "crate::units::duration")]
    pub reconnect_backoff_max: Duration,
    /// Kafka is reported offline after this long without a sign of it: no acknowledgement of
    /// the records in flight and no answer to the metadata probe sent every `offline_after / 2`
    /// while nothing is in flight or nothing was acknowledged for that long (a partition
    /// without a leader is not an outage) — or when every broker is down. Default
    /// `"10s"`; 100ms to 1h.
    #[serde(with = "crate::units::duration")]
    pub offline_after: Duration,
    /// Interval of the gateway heartbeat on `heartbeat_topic`. Default `"30s"`; 1s to 1h.
    #[serde(with = "crate::units::duration")]
    pub heartbeat_interval: Duration,
    /// Compacted topic of gateway heartbeats, keyed by gateway id. Default `"outpost.heartbeats"`.
    pub heartbeat_topic: String,
    /// Compacted topic of device inventory changes, keyed by device id.
    /// Default `"outpost.inventory"`.
    pub inventory_topic: String,
    /// Compacted topic of exactly-once checkpoints, keyed by gateway id.
    /// Default `"outpost.checkpoints"`.
    pub checkpoint_topic: String,
    /// `[kafka.dead_letter]`: what happens to a record Kafka refuses for good.
    pub dead_letter: DeadLetterConfig,
    /// `[kafka.commands]`: commands from the cloud to devices, read from Kafka.
    pub commands: CommandsConfig,
    /// `[kafka.security]`: TLS and SASL.
    pub security: KafkaSecurity,
    /// `[kafka.properties]`: further librdkafka settings, passed through as strings. Settings
    /// that would break the forwarder's guarantees (acks, idempotence, timeouts, transactions)
    /// are refused.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
    /// `[[kafka.rules]]`: routing rules, tried in order; the first match decides.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<KafkaRule>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            brokers: vec!["127.0.0.1:9092".to_owned()],
            default_topic: "outpost.readings".to_owned(),
            client_id: None,
            compression: Compression::Zstd,
            exactly_once: false,
            linger: Duration::from_millis(5),
            read_batch: 2000,
            max_in_flight: 2000,
            max_in_flight_per_topic: None,
            backlog_rate: 20_000,
            order: BacklogOrder::PerDevice,
            cloudevents: CloudEvents::Off,
            reconnect_backoff_min: Duration::from_millis(500),
            reconnect_backoff_max: Duration::from_secs(30),
            offline_after: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_topic: "outpost.heartbeats".to_owned(),
            inventory_topic: "outpost.inventory".to_owned(),
            checkpoint_topic: "outpost.checkpoints".to_owned(),
            dead_letter: DeadLetterConfig::default(),
            commands: CommandsConfig::default(),
            security: KafkaSecurity::default(),
            properties: BTreeMap::new(),
            rules: Vec::new(),
        }
    }
}

impl KafkaConfig {
    /// [`max_in_flight_per_topic`](Self::max_in_flight_per_topic) with its default applied.
    pub fn topic_in_flight_cap(&self) -> usize {
        self.max_in_flight_per_topic
            .unwrap_or(self.max_in_flight / 2)
            .clamp(1, self.max_in_flight.max(1))
    }
}

/// `[kafka.dead_letter]`: records Kafka refuses for good ("poison records": too large, invalid,
/// a topic the broker refuses or does not have) are moved aside so they never block the others:
/// to `topic` when set (the original record with `outpost-error-*` headers), else — or when that
/// topic refuses them too — to the outbox's local dead-letter table, listed, retried and dropped
/// through `/api/v1/dead-letters` and `outpost dead-letters`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "a [kafka.dead_letter] table"
)]
pub struct DeadLetterConfig {
    /// Kafka topic for poison records. Default: none (the local dead-letter table only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Deliveries of one record that may fail with an error not known to be permanent (nor an
    /// outage, which never counts) before the record is moved aside. Default 5; 1 to 1000.
    pub max_attempts: u32,
    /// How long records for a topic the cluster does not have are held (librdkafka's
    /// `topic.metadata.propagation.max.ms`: the time a new topic takes to appear) before they
    /// count as poison. Default `"60s"`; 1s to 1h.
    #[serde(with = "crate::units::duration")]
    pub unknown_topic_timeout: Duration,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        Self {
            topic: None,
            max_attempts: 5,
            unknown_topic_timeout: Duration::from_secs(60),
        }
    }
}

/// `[kafka.commands]`: commands from a cloud backend, read from a Kafka topic and queued for
/// devices (docs/KAFKA.md, "Commands from the cloud"). Each gateway reads only the partition
/// its id hashes to with Kafka's default partitioner (murmur2) and keeps the records keyed by
/// its id; status events go back through the outbox to `status_topic`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [kafka.commands] table")]
pub struct CommandsConfig {
    /// Read commands from `topic`. Default `false`. Needs `kafka.enabled`.
    pub enabled: bool,
    /// The commands topic, keyed by gateway id. Default `"outpost.commands"`.
    pub topic: String,
    /// Where status events of commands go (queued, delivered, acked, rejected, expired,
    /// failed), keyed by device id. Default `"outpost.command-status"`.
    pub status_topic: String,
    /// Accept commands addressed to the gateway itself (`"target": "gateway"`: deploy, update,
    /// remove and restart apps, resend the inventory, report status). Default `false`: whoever
    /// may write to the commands topic could otherwise run containers on the gateway. A security
    /// decision, see docs/KAFKA.md.
    pub gateway: bool,
    /// How long the broker may hold a fetch while no command waits (`fetch.wait.max.ms`).
    /// Default `"5s"`; 10ms to 60s. Apache Kafka answers as soon as a record arrives, so the
    /// wait costs no latency and a longer one means fewer idle fetches per gateway; a broker that
    /// instead looks again now and then (tansu 0.6: after half the remaining wait) adds up to
    /// half of it to a command's latency.
    #[serde(with = "crate::units::duration")]
    pub fetch_wait: Duration,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            topic: "outpost.commands".to_owned(),
            status_topic: "outpost.command-status".to_owned(),
            gateway: false,
            fetch_wait: Duration::from_secs(5),
        }
    }
}

/// Producer batch compression (`compression.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// How a backlog and live records share the way to Kafka after an outage or a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BacklogOrder {
    /// Every device's records reach Kafka in receive order. Live records of devices without a
    /// backlog go at once; a device with a backlog gets its live records forwarded after the
    /// backlog (which drains at `backlog_rate`).
    PerDevice,
    /// Every live record goes at once, ahead of the backlog. A device's records are then in
    /// order within the live stream and within the backlog, and the `outpost-seq` header
    /// restores the receive order across both.
    LiveFirst,
}

/// `security.protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    pub fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// `sasl.mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    #[serde(rename = "OAUTHBEARER")]
    OauthBearer,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::OauthBearer => "OAUTHBEARER",
        }
    }
}

/// `[kafka.security]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [kafka.security] table")]
pub struct KafkaSecurity {
    /// Default `"plaintext"`.
    pub protocol: SecurityProtocol,
    /// Required when `protocol` is `sasl_plaintext` or `sasl_ssl`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name (PLAIN, SCRAM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// SASL password (PLAIN, SCRAM). Prefer `password_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// File holding the SASL password (trailing newline ignored).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// CA certificates (PEM) to verify the brokers. Default: the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM) of `cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// `[[kafka.rules]]`: where matching records go. Every match field that is set must match; a
/// rule without match fields matches every record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [[kafka.rules]] table")]
pub struct KafkaRule {
    /// A name for logs and metrics. Default: `rule-<n>` (1-based position).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// MQTT-style filter on the record's original topic (`+` one level, `#` the rest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Where the record entered: `mqtt`, `coap`, `http` or `driver`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Device id, `*` matching any run of characters (e.g. `"pump-*"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// A tag the device carries in the registry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Kafka topic of matching records. Default: `kafka.default_topic`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_topic: Option<String>,
    /// Partition key. Default `"device"`.
    pub key: RuleKey,
    /// Forwarding priority, 0 to 255 (higher first), given to matching records when they are
    /// stored; overrides the route's priority. Default: the route's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// What happens to matching records. Default `"forward"`.
    pub action: RuleAction,
    /// CloudEvents for matching records, overriding `kafka.cloudevents`. Default: that.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloudevents: Option<CloudEvents>,
    /// With `action = "sample"`: forward one record in this many (by gateway sequence), drop the
    /// rest. Default 10; 2 to 1000000.
    pub sample_every: u32,
}

impl Default for KafkaRule {
    fn default() -> Self {
        Self {
            name: None,
            topic: None,
            source: None,
            device: None,
            tag: None,
            kafka_topic: None,
            key: RuleKey::Device,
            priority: None,
            action: RuleAction::Forward,
            cloudevents: None,
            sample_every: 10,
        }
    }
}

/// Whether and how forwarded records are CloudEvents (docs/KAFKA.md, "CloudEvents").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CloudEvents {
    /// Outpost's own headers only.
    Off,
    /// Binary content mode: the value is the payload, the attributes are `ce_*` headers.
    Binary,
    /// Structured content mode: the value is the event as JSON (`application/cloudevents+json`).
    Structured,
}

/// The Kafka record key of a rule's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleKey {
    /// The authenticated device id (per-device order within a partition).
    Device,
    /// The record's original topic.
    Topic,
    /// No key: records spread over partitions (no per-device order).
    None,
}

/// What a rule does with the records it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Forward,
    /// Delete from the outbox without forwarding (counted).
    Drop,
    /// Forward one in `sample_every`, drop the rest (counted).
    Sample,
}

/// Checks a Kafka topic name as brokers accept it: 1 to 249 characters `a-z A-Z 0-9 . _ -`,
/// neither `.` nor `..`. The one definition of the rule: the daemon calls it too (re-exported
/// as `outpost_config::check_kafka_topic`).
pub fn check_kafka_topic(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    let len = name.chars().count();
    if len > 249 {
        return Err(format!("must be at most 249 characters, found {len}"));
    }
    if name == "." || name == ".." {
        return Err(format!("\"{name}\" is not a valid Kafka topic name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "invalid character {c:?} in \"{name}\": use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Checks a rule's `topic`: an MQTT topic filter, `+` a whole level, `#` the whole last level.
pub(crate) fn check_topic_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if filter.len() > 65_535 {
        return Err("longer than MQTT's 65535 bytes".to_owned());
    }
    if filter.chars().any(char::is_control) {
        return Err("control characters are not allowed".to_owned());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(format!("\"{filter}\": # must be the whole last level"));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("\"{filter}\": + must be a whole level"));
        }
    }
    Ok(())
}

/// Checks a bootstrap broker: `host:port` with a port from 1 to 65535, an IPv6 address in
/// brackets (`[::1]:9092`).
pub(crate) fn check_broker(broker: &str) -> Result<(), String> {
    const EXPECTED: &str =
        "expected \"host:port\" like \"kafka-1.example.net:9092\" or \"[::1]:9092\"";
    let Some((host, port)) = broker.rsplit_once(':') else {
        return Err(format!("invalid broker \"{broker}\": {EXPECTED}"));
    };
    if !port.parse::<u16>().is_ok_and(|p| p > 0) {
        return Err(format!(
            "invalid broker \"{broker}\": the port must be 1 to 65535; {EXPECTED}"
        ));
    }
    if let Some(inner) = host.strip_prefix('[') {
        let valid = inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok());
        if !valid {
            return Err(format!(
                "invalid broker \"{broker}\": expected an IPv6 address in brackets like \
                 \"[::1]:9092\""
            ));
        }
        return Ok(());
    }
    if host.is_empty() {
        return Err(format!(
            "invalid broker \"{broker}\": missing host; {EXPECTED}"
        ));
    }
    if host.contains(':') {
        return Err(format!(
            "invalid broker \"{broker}\": write an IPv6 address in brackets (\"[::1]:9092\"), \
             without a scheme"
        ));
    }
    if let Some(c) = host
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | ',' | '[' | ']'))
    {
        return Err(format!(
            "invalid broker \"{broker}\": invalid character {c:?} in the host; list each broker \
             as its own string"
        ));
    }
    Ok(())
}

/// librdkafka settings the forwarder sets itself, because its guarantees depend on them
/// (acknowledgement, idempotence, unlimited retries, transactions) or because a typed key
/// exists. A key here is refused in `[kafka.properties]`; the text says what to use instead.
pub(crate) const FORWARDER_PROPERTIES: &[(&str, &str)] = &[
    (
        "acks",
        "the forwarder always waits for all in-sync replicas (acks=all): records leave the \
         outbox only once Kafka has them safely",
    ),
    (
        "request.required.acks",
        "the forwarder always waits for all in-sync replicas (acks=all): records leave the \
         outbox only once Kafka has them safely",
    ),
    (
        "enable.idempotence",
        "the forwarder always produces idempotently; use kafka.exactly_once for transactions",
    ),
    (
        "message.timeout.ms",
        "the forwarder retries every record until Kafka acknowledges it; use \
         kafka.offline_after for when Kafka counts as offline",
    ),
    (
        "delivery.timeout.ms",
        "the forwarder retries every record until Kafka acknowledges it; use \
         kafka.offline_after for when Kafka counts as offline",
    ),
    (
        "transactional.id",
        "the forwarder derives it from the gateway id; use kafka.exactly_once",
    ),
    ("bootstrap.servers", "use kafka.brokers"),
    ("metadata.broker.list", "use kafka.brokers"),
    ("security.protocol", "use kafka.security.protocol"),
    ("sasl.mechanism", "use kafka.security.sasl_mechanism"),
    ("sasl.mechanisms", "use kafka.security.sasl_mechanism"),
    ("sasl.username", "use kafka.security.username"),
    (
        "sasl.password",
        "use kafka.security.password_file (or kafka.security.password)",
    ),
    ("compression.type", "use kafka.compression"),
    ("compression.codec", "use kafka.compression"),
    ("linger.ms", "use kafka.linger"),
    ("queue.buffering.max.ms", "use kafka.linger"),
    ("client.id", "use kafka.client_id"),
    (
        "max.in.flight",
        "the forwarder sets it to keep each partition in order; kafka.max_in_flight bounds the \
         records awaiting acknowledgement",
    ),
    (
        "max.in.flight.requests.per.connection",
        "the forwarder sets it to keep each partition in order; kafka.max_in_flight bounds the \
         records awaiting acknowledgement",
    ),
    (
        "topic.metadata.propagation.max.ms",
        "use kafka.dead_letter.unknown_topic_timeout",
    ),
    (
        "retries",
        "the forwarder retries every record until Kafka acknowledges it; use \
         kafka.reconnect_backoff_min and kafka.reconnect_backoff_max for the waits",
    ),
    (
        "message.send.max.retries",
        "the forwarder retries every record until Kafka acknowledges it; use \
         kafka.reconnect_backoff_min and kafka.reconnect_backoff_max for the waits",
    ),
];

/// Why `key` may not be set in `[kafka.properties]`, if it may not.
pub(crate) fn forwarder_property(key: &str) -> Option<&'static str> {
    let key = key.trim().to_ascii_lowercase();
    FORWARDER_PROPERTIES
        .iter()
        .find(|(owned, _)| *owned == key)
        .map(|(_, why)| *why)
}

/// Where a record entered the gateway, as a rule's `source` names it.
pub(crate) const RULE_SOURCES: &[&str] = &["mqtt", "coap", "http", "driver"];

impl Checker {
    /// `[kafka.commands]`: its topics must be its own (a command read back as a reading, or a
    /// status event mistaken for a command, would loop).
    fn kafka_commands(&mut self, config: &Config) {
        let k = &config.kafka;
        let c = &k.commands;
        let commands = root("kafka").key("commands");
        self.kafka_topic(commands.key("topic"), &c.topic);
        self.kafka_topic(commands.key("status_topic"), &c.status_topic);
        self.duration_range(
            commands.key("fetch_wait"),
            c.fetch_wait,
            Duration::from_millis(10),
            Duration::from_secs(60),
        );
        if c.status_topic == c.topic {
            self.problem(
                commands.key("status_topic"),
                format!("must differ from kafka.commands.topic (\"{}\")", c.topic),
            );
        }
        let forwarded = std::iter::once(&k.default_topic)
            .chain(k.rules.iter().filter_map(|r| r.kafka_topic.as_ref()))
            .chain(k.dead_letter.topic.as_ref());
        for topic in forwarded {
            if topic == &c.topic {
                self.problem(
                    commands.key("topic"),
                    format!("\"{topic}\" also receives forwarded records; use a topic of its own"),
                );
            }
        }
        if c.enabled && !k.enabled {
            self.problem(
                commands.key("enabled"),
                "needs kafka.enabled = true (commands are read from the same cluster)",
            );
        }
    }
}

// Validation of this section: called by `crate::validate::check`, which holds the shared
// helpers (`problem`, `range`, `name`, ...).

impl Checker {
    /// `[kafka]`, checked whether or not forwarding is enabled, so that a file fails
    /// `outpost check-config` before the day it is switched on.
    pub(crate) fn kafka(&mut self, config: &Config) {
        let kafka = root("kafka");
        let k = &config.kafka;
        if k.brokers.is_empty() {
            self.problem(
                kafka.key("brokers"),
                "must list at least one broker as \"host:port\"",
            );
        }
        for (i, broker) in k.brokers.iter().enumerate() {
            if let Err(why) = check_broker(broker) {
                self.problem(kafka.key("brokers").index(i), why);
            }
        }
        for (key, topic) in [
            ("default_topic", &k.default_topic),
            ("heartbeat_topic", &k.heartbeat_topic),
            ("inventory_topic", &k.inventory_topic),
            ("checkpoint_topic", &k.checkpoint_topic),
        ] {
            self.kafka_topic(kafka.key(key), topic);
        }
        self.kafka_commands(config);
        if let Some(why) = exactly_once_identity_problem(config, machine_id().is_some()) {
            self.problem(root("gateway").key("id"), why);
        }
        if k.heartbeat_topic == k.default_topic {
            self.problem(
                kafka.key("heartbeat_topic"),
                format!(
                    "must differ from kafka.default_topic (\"{}\"): heartbeats would reach every \
                     consumer of readings, and readings would be compacted away by gateway id",
                    k.default_topic
                ),
            );
        }
        if let Some(id) = &k.client_id {
            let printable = id.chars().all(|c| c == ' ' || c.is_ascii_graphic());
            if id.is_empty() || id.len() > 255 || !printable {
                self.problem(
                    kafka.key("client_id"),
                    format!(
                        "invalid client id \"{}\": use 1 to 255 printable ASCII characters \
                         (or leave it unset for \"outpost-<gateway id>\")",
                        id.escape_debug()
                    ),
                );
            }
        }
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        if k.linger > s(1) {
            self.problem(
                kafka.key("linger"),
                format!("must be at most 1s, found {}", duration::format(k.linger)),
            );
        }
        self.range(kafka.key("read_batch"), k.read_batch, 1, 100_000);
        self.range(kafka.key("max_in_flight"), k.max_in_flight, 1, 1_000_000);
        if let Some(cap) = k.max_in_flight_per_topic {
            self.range(
                kafka.key("max_in_flight_per_topic"),
                cap,
                1,
                k.max_in_flight.max(1),
            );
        }
        self.range(kafka.key("backlog_rate"), k.backlog_rate, 1, 10_000_000);
        let dead = kafka.key("dead_letter");
        if let Some(topic) = &k.dead_letter.topic {
            self.kafka_topic(dead.key("topic"), topic);
            if topic == &k.default_topic
                || k.rules
                    .iter()
                    .any(|r| r.kafka_topic.as_ref() == Some(topic))
            {
                self.problem(
                    dead.key("topic"),
                    format!(
                        "\"{topic}\" also receives forwarded records: poison records would be \
                         refused there again; use a topic of its own"
                    ),
                );
            }
        }
        self.range(
            dead.key("max_attempts"),
            k.dead_letter.max_attempts,
            1,
            1_000,
        );
        self.duration_range(
            dead.key("unknown_topic_timeout"),
            k.dead_letter.unknown_topic_timeout,
            s(1),
            s(3_600),
        );
        let (min, max) = (k.reconnect_backoff_min, k.reconnect_backoff_max);
        self.duration_range(kafka.key("reconnect_backoff_min"), min, ms(10), s(3_600));
        if max < min {
            self.problem(
                kafka.key("reconnect_backoff_max"),
                format!(
                    "must be at least kafka.reconnect_backoff_min ({}), found {}",
                    duration::format(min),
                    duration::format(max)
                ),
            );
        } else {
            self.duration_range(kafka.key("reconnect_backoff_max"), max, ms(10), s(3_600));
        }
        self.duration_range(
            kafka.key("offline_after"),
            k.offline_after,
            ms(100),
            s(3_600),
        );
        let heartbeat = k.heartbeat_interval;
        self.duration_range(kafka.key("heartbeat_interval"), heartbeat, s(1), s(3_600));
        self.kafka_security(&kafka.key("security"), &k.security);
        for (key, value) in &k.properties {
            let path = kafka.key("properties").key(key);
            if key.trim().is_empty() {
                self.problem(path, "a librdkafka property name must not be empty");
            } else if let Some(why) = forwarder_property(key) {
                self.problem(
                    path,
                    format!("\"{key}\" cannot be set in [kafka.properties]: {why}"),
                );
            } else if value.contains('\0') {
                self.problem(path, "must not contain NUL characters");
            }
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, rule) in k.rules.iter().enumerate() {
            let path = kafka.key("rules").index(i);
            self.kafka_rule(&path, rule);
            // Unnamed rules are called `rule-<n>` in logs and metrics: an explicit name must
            // not take one of those either.
            let effective = match rule.name.as_deref() {
                Some(name) => name.to_owned(),
                None => format!("rule-{}", i + 1),
            };
            if effective.is_empty() {
                continue;
            }
            if let Some(first) = names.get(&effective) {
                let first_path = kafka.key("rules").index(*first).key("name");
                let message = match (&rule.name, &k.rules[*first].name) {
                    (Some(_), Some(_)) => format!("duplicate rule name \"{effective}\""),
                    (Some(_), None) => format!(
                        "duplicate rule name \"{effective}\": unnamed rule number {} is called \
                         that by default",
                        first + 1
                    ),
                    (None, _) => format!(
                        "this unnamed rule is called \"{effective}\" by default, which is \
                         already a rule's name: name this rule"
                    ),
                };
                self.duplicate(path.key("name"), message, first_path);
            } else {
                names.insert(effective, i);
            }
        }
    }

    pub(crate) fn kafka_topic(&mut self, path: KeyPath, topic: &str) {
        if let Err(why) = check_kafka_topic(topic) {
            self.problem(path, format!("invalid Kafka topic: {why}"));
        }
    }

    pub(crate) fn kafka_security(&mut self, path: &KeyPath, sec: &KafkaSecurity) {
        let protocol = sec.protocol.as_str();
        match sec.sasl_mechanism {
            None if sec.protocol.uses_sasl() => self.problem(
                path.key("sasl_mechanism"),
                format!(
                    "required with protocol = \"{protocol}\": one of \"PLAIN\", \
                     \"SCRAM-SHA-256\", \"SCRAM-SHA-512\", \"OAUTHBEARER\""
                ),
            ),
            Some(mechanism) if !sec.protocol.uses_sasl() => self.problem(
                path.key("sasl_mechanism"),
                format!(
                    "\"{}\" is only used with protocol = \"sasl_plaintext\" or \"sasl_ssl\", \
                     found protocol = \"{protocol}\"",
                    mechanism.as_str()
                ),
            ),
            _ => {}
        }
        let with_password = match sec.sasl_mechanism {
            Some(
                m
                @ (SaslMechanism::Plain | SaslMechanism::ScramSha256 | SaslMechanism::ScramSha512),
            ) => Some(m),
            Some(SaslMechanism::OauthBearer) | None => None,
        };
        match with_password {
            Some(mechanism) => {
                let mechanism = mechanism.as_str();
                match sec.username.as_deref() {
                    None => self.problem(
                        path.key("username"),
                        format!("required with sasl_mechanism = \"{mechanism}\""),
                    ),
                    Some("") => self.problem(path.key("username"), "must not be empty"),
                    Some(_) => {}
                }
                match (&sec.password, &sec.password_file) {
                    (None, None) => self.problem(
                        path.key("password"),
                        format!(
                            "required with sasl_mechanism = \"{mechanism}\": set password_file \
                             (preferred) or password"
                        ),
                    ),
                    (Some(_), Some(_)) => self.problem(
                        path.key("password"),
                        "set only one of password and password_file",
                    ),
                    (Some(password), None) if password.is_empty() => {
                        self.problem(path.key("password"), "must not be empty");
                    }
                    _ => {}
                }
            }
            None => {
                let why = "only used with sasl_mechanism = \"PLAIN\", \"SCRAM-SHA-256\" or \
                           \"SCRAM-SHA-512\"";
                if sec.username.is_some() {
                    self.problem(path.key("username"), why);
                }
                if sec.password.is_some() {
                    self.problem(path.key("password"), why);
                }
                if sec.password_file.is_some() {
                    self.problem(path.key("password_file"), why);
                }
            }
        }
        let tls = matches!(
            sec.protocol,
            SecurityProtocol::Ssl | SecurityProtocol::SaslSsl
        );
        for (key, file) in [
            ("password_file", &sec.password_file),
            ("ca_file", &sec.ca_file),
            ("cert_file", &sec.cert_file),
            ("key_file", &sec.key_file),
        ] {
            let Some(file) = file else { continue };
            if file.as_os_str().is_empty() {
                self.problem(path.key(key), "must not be empty");
            } else if key != "password_file" && !tls {
                self.problem(
                    path.key(key),
                    format!(
                        "only used with protocol = \"ssl\" or \"sasl_ssl\", found protocol = \
                         \"{protocol}\""
                    ),
                );
            }
        }
        match (&sec.cert_file, &sec.key_file) {
            (Some(_), None) => self.problem(
                path.key("key_file"),
                "required with cert_file: the private key of the client certificate",
            ),
            (None, Some(_)) => self.problem(
                path.key("cert_file"),
                "required with key_file: the client certificate of the private key",
            ),
            _ => {}
        }
    }

    pub(crate) fn kafka_rule(&mut self, path: &KeyPath, rule: &KafkaRule) {
        match rule.name.as_deref() {
            Some("") => self.problem(
                path.key("name"),
                "must not be empty (leave it unset to use rule-<n>)",
            ),
            Some(name) => self.name(path.key("name"), name, "rule"),
            None => {}
        }
        if let Some(topic) = &rule.topic
            && let Err(why) = check_topic_filter(topic)
        {
            self.problem(path.key("topic"), format!("invalid topic filter: {why}"));
        }
        if let Some(source) = &rule.source
            && !RULE_SOURCES.contains(&source.as_str())
        {
            let hint = suggest(source, RULE_SOURCES)
                .map(|s| format!(", did you mean \"{s}\"?"))
                .unwrap_or_default();
            self.problem(
                path.key("source"),
                format!(
                    "unknown source \"{source}\"{hint} (expected one of \"mqtt\", \"coap\", \
                     \"http\", \"driver\")"
                ),
            );
        }
        if let Some(device) = &rule.device {
            let bad = device
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-' | '*')));
            if device.is_empty() {
                self.problem(
                    path.key("device"),
                    "must not be empty (leave it unset to match every device)",
                );
            } else if let Some(c) = bad {
                self.problem(
                    path.key("device"),
                    format!(
                        "invalid character {c:?} in \"{device}\": a device id pattern uses \
                         letters, digits, '.', '_', ':', '-' and '*' (any run of characters)"
                    ),
                );
            }
        }
        if rule.tag.as_deref() == Some("") {
            self.problem(
                path.key("tag"),
                "must not be empty (leave it unset to match every device)",
            );
        }
        if let Some(topic) = &rule.kafka_topic {
            self.kafka_topic(path.key("kafka_topic"), topic);
        }
        if rule.action == RuleAction::Sample {
            self.range(path.key("sample_every"), rule.sample_every, 2, 1_000_000);
        }
    }
}

/// Exactly-once mode needs a gateway id no other gateway has: the transactional producer's id is
/// derived from it, and two gateways with one id fence each other's transactions endlessly. An id
/// set in `gateway.id` or derived from the machine id is taken as unique; the host name (the last
/// fallback, on a system without a machine id) is not: Raspberry Pis are all `raspberrypi`.
pub(crate) fn exactly_once_identity_problem(
    config: &Config,
    has_machine_id: bool,
) -> Option<String> {
    (config.kafka.exactly_once && config.gateway.id.is_none() && !has_machine_id).then(|| {
        "kafka.exactly_once needs a gateway id unique in the fleet, and this system has no \
         machine id (/etc/machine-id) to derive one from: set gateway.id"
            .to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::problem_keys as keys;
    use crate::problems;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = KafkaConfig::default();
        assert!(!c.enabled);
        assert_eq!(c.brokers, ["127.0.0.1:9092"]);
        assert_eq!(c.default_topic, "outpost.readings");
        assert_eq!(
            (c.client_id.as_deref(), c.compression),
            (None, Compression::Zstd)
        );
        assert!(!c.exactly_once);
        assert_eq!(c.linger, Duration::from_millis(5));
        assert_eq!(
            (c.read_batch, c.max_in_flight, c.backlog_rate),
            (2000, 2000, 20_000)
        );
        assert_eq!(c.order, BacklogOrder::PerDevice);
        assert_eq!(c.reconnect_backoff_min, Duration::from_millis(500));
        assert_eq!(c.reconnect_backoff_max, Duration::from_secs(30));
        assert_eq!(c.offline_after, Duration::from_secs(10));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(c.heartbeat_topic, "outpost.heartbeats");
        assert_eq!(c.inventory_topic, "outpost.inventory");
        assert_eq!(c.checkpoint_topic, "outpost.checkpoints");
        assert_eq!(c.security, KafkaSecurity::default());
        assert_eq!(c.security.protocol, SecurityProtocol::Plaintext);
        assert!(c.properties.is_empty() && c.rules.is_empty());
        assert_eq!(
            (c.max_in_flight_per_topic, c.topic_in_flight_cap()),
            (None, 1000)
        );
        assert_eq!(
            (c.dead_letter.topic.as_deref(), c.dead_letter.max_attempts),
            (None, 5)
        );
        assert_eq!(c.dead_letter.unknown_topic_timeout, Duration::from_secs(60));
        let rule = KafkaRule::default();
        assert_eq!(
            (rule.key, rule.action, rule.sample_every),
            (RuleKey::Device, RuleAction::Forward, 10)
        );
        assert_eq!(crate::from_toml_str("[kafka]\n").expect("valid").kafka, c);
        assert_eq!(
            crate::from_toml_str("[[kafka.rules]]\n")
                .expect("valid")
                .kafka
                .rules,
            [rule]
        );
    }

    #[test]
    fn kafka_topic_names() {
        for ok in ["outpost.readings", "a", "A-b_c.9", &"x".repeat(249), "..."] {
            assert_eq!(check_kafka_topic(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            &"x".repeat(250),
            "a b",
            "a/b",
            "tópico",
            "a:b",
        ] {
            assert!(check_kafka_topic(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn brokers() {
        for ok in [
            "127.0.0.1:9092",
            "kafka-1.example.net:9093",
            "[::1]:9092",
            "h:1",
            "h:65535",
        ] {
            assert_eq!(check_broker(ok), Ok(()), "{ok}");
        }
        let bad = [
            "",
            "kafka",
            ":9092",
            "h:0",
            "h:65536",
            "h:",
            "h:x",
            "::1:9092",
            "[::1]",
            "[x]:9092",
            "kafka://h:9092",
            "a,b:9092",
            "a b:9092",
        ];
        for bad in bad {
            assert!(check_broker(bad).is_err(), "{bad}");
        }
        assert_eq!(keys("[kafka]\nbrokers = []\n"), ["kafka.brokers"]);
        assert_eq!(
            keys("[kafka]\nbrokers = [\"ok:9092\", \"h:0\", \"[::1]:9092\", \"::1:9092\"]\n"),
            ["kafka.brokers[1]", "kafka.brokers[3]"]
        );
    }

    #[test]
    fn topics_and_client_id() {
        let found = problems(concat!(
            "[kafka]\ndefault_topic = \"\"\nheartbeat_topic = \".\"\n",
            "inventory_topic = \"a/b\"\ncheckpoint_topic = \"..\"\nclient_id = \"gw\\n1\"\n",
            "[[kafka.rules]]\n[[kafka.rules]]\nkafka_topic = \"bad topic\"\n",
        ));
        let paths: Vec<&str> = found
            .iter()
            .map(|p| p.split(": ").next().unwrap_or(""))
            .collect();
        assert_eq!(
            paths,
            [
                "kafka.checkpoint_topic",
                "kafka.client_id",
                "kafka.default_topic",
                "kafka.heartbeat_topic",
                "kafka.inventory_topic",
                "kafka.rules[1].kafka_topic",
            ],
            "{found:#?}"
        );
        assert_eq!(
            found[5],
            "kafka.rules[1].kafka_topic: invalid Kafka topic: invalid character ' ' in \
             \"bad topic\": use letters, digits, '.', '_' and '-'"
        );
        assert_eq!(keys_of_client_id(""), ["kafka.client_id"]);
        assert_eq!(keys_of_client_id(&"c".repeat(256)), ["kafka.client_id"]);
        assert!(keys_of_client_id(&"c".repeat(255)).is_empty());
        assert!(keys_of_client_id("outpost gw-1 (site 4)").is_empty());
    }

    fn keys_of_client_id(id: &str) -> Vec<String> {
        keys(&format!("[kafka]\nclient_id = \"{id}\"\n"))
    }

    #[test]
    fn ranges() {
        let found = problems(concat!(
            "[kafka]\nlinger = \"2s\"\nread_batch = 0\nmax_in_flight = 1000001\n",
            "backlog_rate = 0\nreconnect_backoff_min = \"5ms\"\n",
            "offline_after = \"50ms\"\nheartbeat_interval = \"2h\"\n",
        ));
        assert_eq!(
            found,
            [
                "kafka.backlog_rate: must be between 1 and 10000000, found 0",
                "kafka.heartbeat_interval: must be between 1s and 1h, found 2h",
                "kafka.linger: must be at most 1s, found 2s",
                "kafka.max_in_flight: must be between 1 and 1000000, found 1000001",
                "kafka.offline_after: must be between 100ms and 1h, found 50ms",
                "kafka.read_batch: must be between 1 and 100000, found 0",
                "kafka.reconnect_backoff_min: must be between 10ms and 1h, found 5ms",
            ]
        );
        assert_eq!(
            problems("[kafka]\nreconnect_backoff_min = \"1m\"\nreconnect_backoff_max = \"30s\"\n"),
            [
                "kafka.reconnect_backoff_max: must be at least kafka.reconnect_backoff_min (1m), \
              found 30s"
            ]
        );
        assert_eq!(
            keys("[kafka]\nreconnect_backoff_max = \"2h\"\n"),
            ["kafka.reconnect_backoff_max"]
        );
        assert!(
            problems(concat!(
                "[kafka]\nlinger = \"0ms\"\n",
                "reconnect_backoff_min = \"1h\"\nreconnect_backoff_max = \"1h\"\n"
            ))
            .is_empty()
        );
    }

    #[test]
    fn checked_also_when_disabled() {
        let disabled = keys("[kafka]\nenabled = false\nread_batch = 0\n");
        assert_eq!(disabled, ["kafka.read_batch"]);
        assert_eq!(keys("[kafka]\nenabled = true\nread_batch = 0\n"), disabled);
    }

    #[test]
    fn security() {
        let sasl = |body: &str| keys(&format!("[kafka.security]\n{body}"));
        assert_eq!(
            sasl("protocol = \"sasl_ssl\"\n"),
            ["kafka.security.sasl_mechanism"]
        );
        assert_eq!(
            problems("[kafka.security]\nprotocol = \"sasl_plaintext\"\n"),
            [
                "kafka.security.sasl_mechanism: required with protocol = \"sasl_plaintext\": one \
              of \"PLAIN\", \"SCRAM-SHA-256\", \"SCRAM-SHA-512\", \"OAUTHBEARER\""
            ]
        );
        assert_eq!(
            sasl("protocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"\n"),
            ["kafka.security.password", "kafka.security.username"]
        );
        assert_eq!(
            sasl(concat!(
                "protocol = \"sasl_ssl\"\nsasl_mechanism = \"PLAIN\"\nusername = \"gw\"\n",
                "password = \"p\"\npassword_file = \"/etc/outpost/kafka.pass\"\n"
            )),
            ["kafka.security.password"]
        );
        assert!(
            sasl(concat!(
                "protocol = \"sasl_plaintext\"\nsasl_mechanism = \"SCRAM-SHA-256\"\n",
                "username = \"gw\"\npassword = \"p\"\n"
            ))
            .is_empty()
        );
        assert!(sasl("protocol = \"sasl_ssl\"\nsasl_mechanism = \"OAUTHBEARER\"\n").is_empty());
        assert_eq!(
            problems(concat!(
                "[kafka.security]\nprotocol = \"ssl\"\nsasl_mechanism = \"PLAIN\"\n",
                "username = \"u\"\npassword = \"p\"\n"
            )),
            [
                "kafka.security.sasl_mechanism: \"PLAIN\" is only used with protocol = \
              \"sasl_plaintext\" or \"sasl_ssl\", found protocol = \"ssl\""
            ]
        );
        assert_eq!(
            sasl("username = \"u\"\npassword_file = \"/p\"\n"),
            ["kafka.security.password_file", "kafka.security.username"]
        );
        assert_eq!(
            sasl("protocol = \"ssl\"\ncert_file = \"/c.pem\"\n"),
            ["kafka.security.key_file"]
        );
        assert_eq!(
            sasl(
                "protocol = \"sasl_ssl\"\nsasl_mechanism = \"OAUTHBEARER\"\nkey_file = \"/k.pem\"\n"
            ),
            ["kafka.security.cert_file"]
        );
        assert_eq!(
            sasl("ca_file = \"/ca.pem\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n"),
            [
                "kafka.security.ca_file",
                "kafka.security.cert_file",
                "kafka.security.key_file"
            ]
        );
        assert!(
            sasl(concat!(
                "protocol = \"ssl\"\nca_file = \"/ca.pem\"\n",
                "cert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n"
            ))
            .is_empty()
        );
    }

    #[test]
    fn properties_owned_by_the_forwarder_are_refused() {
        let mut text = String::from("[kafka.properties]\n\"socket.keepalive.enable\" = \"true\"\n");
        for (key, _) in FORWARDER_PROPERTIES {
            text.push_str(&format!("\"{key}\" = \"1\"\n"));
        }
        let found = problems(&text);
        assert_eq!(found.len(), FORWARDER_PROPERTIES.len(), "{found:#?}");
        assert!(
            found.contains(
                &"kafka.properties.acks: \"acks\" cannot be set in [kafka.properties]: the \
              forwarder always waits for all in-sync replicas (acks=all): records leave the \
              outbox only once Kafka has them safely"
                    .to_owned()
            )
        );
        assert!(
            found.contains(
                &"kafka.properties.\"linger.ms\": \"linger.ms\" cannot be set in \
              [kafka.properties]: use kafka.linger"
                    .to_owned()
            )
        );
        assert!(found.iter().any(|p| p.starts_with(
            "kafka.properties.\"bootstrap.servers\": \"bootstrap.servers\" cannot be set in \
 [kafka.properties]: use kafka.brokers"
        )));
        assert!(found.iter().any(
            |p| p.starts_with("kafka.properties.\"enable.idempotence\": ")
                && p.contains("kafka.exactly_once")
        ));
        assert!(
            problems(concat!(
                "[kafka.properties]\n\"socket.keepalive.enable\" = \"true\"\n",
                "\"fetch.wait.max.ms\" = \"10\"\n"
            ))
            .is_empty()
        );
        assert_eq!(
            keys("[kafka.properties]\n\"\" = \"x\"\n"),
            ["kafka.properties.\"\""]
        );
    }

    #[test]
    fn rules() {
        let found = problems(concat!(
            "[[kafka.rules]]\nname = \"Alarms!\"\n",
            "[[kafka.rules]]\nname = \"dup\"\ntopic = \"a/#/b\"\n",
            "[[kafka.rules]]\nname = \"dup\"\ntopic = \"a/b+\"\nsource = \"mqqt\"\n",
            "[[kafka.rules]]\ndevice = \"pump 1\"\ntag = \"\"\n",
            "[[kafka.rules]]\ndevice = \"\"\naction = \"sample\"\nsample_every = 1\n",
            "[[kafka.rules]]\nname = \"\"\nsource = \"serial\"\n",
        ));
        let paths: Vec<&str> = found
            .iter()
            .map(|p| p.split(": ").next().unwrap_or(""))
            .collect();
        assert_eq!(
            paths,
            [
                "kafka.rules[0].name",
                "kafka.rules[1].topic",
                "kafka.rules[2].name",
                "kafka.rules[2].source",
                "kafka.rules[2].topic",
                "kafka.rules[3].device",
                "kafka.rules[3].tag",
                "kafka.rules[4].device",
                "kafka.rules[4].sample_every",
                "kafka.rules[5].name",
                "kafka.rules[5].source",
            ],
            "{found:#?}"
        );
        assert!(
            found.contains(
                &"kafka.rules[2].name: duplicate rule name \"dup\" (also kafka.rules[1].name)"
                    .to_owned()
            )
        );
        assert!(
            found.contains(
                &"kafka.rules[2].source: unknown source \"mqqt\", did you mean \"mqtt\"? \
              (expected one of \"mqtt\", \"coap\", \"http\", \"driver\")"
                    .to_owned()
            )
        );
        assert!(found.contains(
            &"kafka.rules[4].sample_every: must be between 2 and 1000000, found 1".to_owned()
        ));
        // sample_every only matters to sampling rules.
        assert!(problems("[[kafka.rules]]\nsample_every = 0\n").is_empty());
        assert!(
            problems("[[kafka.rules]]\naction = \"sample\"\nsample_every = 1000000\n").is_empty()
        );
        // Unnamed rules are `rule-<n>`: an explicit name must not collide with one.
        assert_eq!(
            keys("[[kafka.rules]]\n[[kafka.rules]]\nname = \"rule-1\"\n"),
            ["kafka.rules[1].name"]
        );
        assert_eq!(
            keys("[[kafka.rules]]\nname = \"rule-2\"\n[[kafka.rules]]\n"),
            ["kafka.rules[1].name"]
        );
    }

    #[test]
    fn topic_filters() {
        for ok in [
            "#",
            "+",
            "devices/+/telemetry",
            "devices/#",
            "a//b",
            "+/+/#",
        ] {
            assert_eq!(check_topic_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "+a/b", "a/\u{0}"] {
            assert!(check_topic_filter(bad).is_err(), "{bad}");
        }
    }

    /// The crate's example test walks a config whose `[kafka]` optional keys are unset; this
    /// one sets them all, so every key of `[kafka]` must be in outpost.toml.
    #[test]
    fn example_documents_every_kafka_key() {
        let full = KafkaConfig {
            client_id: Some("c".into()),
            max_in_flight_per_topic: Some(10),
            dead_letter: DeadLetterConfig {
                topic: Some("dead".into()),
                ..DeadLetterConfig::default()
            },
            security: KafkaSecurity {
                sasl_mechanism: Some(SaslMechanism::Plain),
                username: Some("u".into()),
                password: Some("p".into()),
                password_file: Some("/p".into()),
                ca_file: Some("/ca".into()),
                cert_file: Some("/c".into()),
                key_file: Some("/k".into()),
                ..KafkaSecurity::default()
            },
            properties: [("socket.keepalive.enable".to_owned(), "true".to_owned())].into(),
            rules: vec![KafkaRule {
                name: Some("n".into()),
                topic: Some("t".into()),
                source: Some("mqtt".into()),
                device: Some("d".into()),
                tag: Some("t".into()),
                kafka_topic: Some("k".into()),
                priority: Some(1),
                ..KafkaRule::default()
            }],
            ..KafkaConfig::default()
        };
        let toml::Value::Table(schema) = toml::Value::try_from(&full).expect("serializes") else {
            panic!("a table");
        };
        let mut expected = Vec::new();
        for (key, value) in &schema {
            match value {
                toml::Value::Table(t) if key == "properties" => {
                    expected.extend(t.keys().map(|k| format!("kafka.properties.\"{k}\"")));
                }
                toml::Value::Table(t) => {
                    expected.extend(t.keys().map(|k| format!("kafka.{key}.{k}")));
                }
                toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {
                    for item in items.iter().filter_map(toml::Value::as_table) {
                        expected.extend(item.keys().map(|k| format!("kafka.{key}.{k}")));
                    }
                }
                _ => expected.push(format!("kafka.{key}")),
            }
        }
        let mut documented = std::collections::BTreeSet::new();
        let mut section = String::new();
        for line in include_str!("../../examples/outpost.toml").lines() {
            let line = line.trim_start_matches(['#', ' ']);
            if let Some(name) = line.strip_prefix('[') {
                section = name.trim_matches(['[', ']']).to_owned();
            } else if let Some((key, _)) = line.split_once(" = ") {
                documented.insert(format!("{section}.{key}"));
            }
        }
        let missing: Vec<_> = expected
            .iter()
            .filter(|k| !documented.contains(*k))
            .collect();
        assert!(
            missing.is_empty(),
            "not documented in outpost.toml: {missing:?}"
        );
        assert!(expected.len() > 35, "{expected:?}");
    }

    /// The commented `[kafka]` examples, uncommented as the crate's example test does, give a
    /// valid SASL/TLS setup and two rules.
    #[test]
    fn example_commented_kafka_keys_are_valid() {
        let text: String = include_str!("../../examples/outpost.toml")
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest)
                    if (rest.starts_with('[') && rest.ends_with(']'))
                        || rest.split_once(" = ").is_some_and(|(k, _)| {
                            k.chars()
                                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                        }) =>
                {
                    format!("{rest}\n")
                }
                _ => format!("{line}\n"),
            })
            .collect();
        let kafka = crate::from_toml_str(&text)
            .unwrap_or_else(|e| panic!("{e}"))
            .kafka;
        assert_eq!(kafka.client_id.as_deref(), Some("outpost-gw-0042"));
        assert_eq!(kafka.security.protocol, SecurityProtocol::SaslSsl);
        assert_eq!(
            kafka.security.sasl_mechanism,
            Some(SaslMechanism::ScramSha512)
        );
        assert!(kafka.security.password.is_none() && kafka.security.key_file.is_some());
        let names: Vec<_> = kafka.rules.iter().map(|r| r.name.as_deref()).collect();
        assert_eq!(names, [Some("alarms"), Some("chatty-sensors")]);
        assert_eq!(kafka.rules[1].action, RuleAction::Sample);
    }

    #[test]
    fn a_full_configuration_is_valid() {
        let config = crate::from_toml_str(concat!(
            "[kafka]\nenabled = true\n",
            "brokers = [\"kafka-1.example.net:9093\", \"10.0.0.2:9093\", \"[fd00::2]:9093\"]\n",
            "default_topic = \"site-4.readings\"\nclient_id = \"outpost-site-4\"\n",
            "compression = \"lz4\"\nexactly_once = true\nlinger = \"0ms\"\n",
            "read_batch = 100000\nmax_in_flight = 1\nbacklog_rate = 10000000\n",
            "order = \"live_first\"\nreconnect_backoff_min = \"10ms\"\n",
            "reconnect_backoff_max = \"1h\"\noffline_after = \"100ms\"\n",
            "heartbeat_interval = \"1s\"\nheartbeat_topic = \"hb\"\n",
            "inventory_topic = \"inv\"\ncheckpoint_topic = \"cp\"\n",
            "[kafka.security]\nprotocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"\n",
            "username = \"site-4\"\npassword_file = \"/etc/outpost/kafka.pass\"\n",
            "ca_file = \"/etc/outpost/ca.pem\"\ncert_file = \"/etc/outpost/c.pem\"\n",
            "key_file = \"/etc/outpost/k.pem\"\n",
            "[kafka.properties]\n\"socket.keepalive.enable\" = \"true\"\n",
            "[[kafka.rules]]\nname = \"alarms\"\ntopic = \"devices/+/alarms/#\"\n",
            "source = \"mqtt\"\ndevice = \"pump-*\"\ntag = \"critical\"\n",
            "kafka_topic = \"site-4.alarms\"\nkey = \"topic\"\npriority = 255\n",
            "[[kafka.rules]]\nsource = \"driver\"\naction = \"drop\"\nkafka_topic = \"unused\"\n",
            "[[kafka.rules]]\naction = \"sample\"\nsample_every = 2\nkey = \"none\"\n",
            "kafka_topic = \"site-4.sampled\"\n",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let k = &config.kafka;
        assert_eq!(k.order, BacklogOrder::LiveFirst);
        assert!(k.exactly_once);
        assert_eq!(k.security.sasl_mechanism, Some(SaslMechanism::ScramSha512));
        assert_eq!(k.rules.len(), 3);
        assert_eq!(k.rules[0].priority, Some(255));
        assert_eq!(k.rules[2].action, RuleAction::Sample);
        let written = toml::to_string(&config).expect("serializes");
        assert_eq!(crate::from_toml_str(&written).expect("reads back"), config);
    }
}
