//! The forwarder: outbox → Kafka, deleting a record only after Kafka acknowledged it.
//!
//! * [`pump`]: the at-least-once forwarder, a state machine (Live, Backfill, Offline,
//!   Rewinding, Draining) over a [`sink::Sink`]; its documentation states the phases, the
//!   transitions and the invariants, and its unit tests drive each transition against a fake
//!   sink.
//! * [`eos`]: exactly-once mode, a transactional loop of its own (read a batch, produce it and
//!   the checkpoint in one transaction, commit, delete).
//! * [`poison`]: what Kafka refuses for good, and where such a record goes instead.
//! * [`window`]: the per-topic share of the in-flight window.
//! * [`client`]: librdkafka's settings and the context that reports broker reachability.
//! * [`rules`], [`fleet`], [`metrics`]: routing rules, the fleet topics, the metrics.

pub mod client;
pub mod cloudevents;
pub mod commands;
mod eos;
pub mod fleet;
pub mod metrics;
pub mod poison;
mod polled;
mod probe;
mod pump;
pub mod rules;
pub mod sink;
mod tls_check;
mod window;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_config::KafkaConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureProducer;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::envelope::StoredRecord;
use crate::outbox::{DeadLetterCause, Outbox, OutboxReader, now_unix_ms};
pub use client::LinkSignals;
pub use metrics::ForwarderMetrics;
pub use rules::{DeviceTags, NoTags, Rules, SharedRules};

/// Kafka record headers every forwarded record carries (documented in `docs/KAFKA.md`).
pub mod header {
    pub const GATEWAY: &str = "outpost-gateway";
    pub const DEVICE: &str = "outpost-device";
    pub const SOURCE: &str = "outpost-source";
    pub const TOPIC: &str = "outpost-topic";
    pub const CONTENT_TYPE: &str = "outpost-content-type";
    pub const SEQ: &str = "outpost-seq";
    pub const BOOT: &str = "outpost-boot";
    pub const RECEIVED_AT: &str = "outpost-received-at";
    pub const OUTBOX: &str = "outpost-outbox";
}

/// Everything the forwarder needs, resolved by the composition root.
#[derive(Debug, Clone)]
pub struct ForwarderOptions {
    pub kafka: KafkaConfig,
    pub gateway_id: String,
    pub client_id: String,
    /// How long shutdown waits for in-flight records to be acknowledged.
    pub drain_timeout: Duration,
}

impl ForwarderOptions {
    pub fn from_config(config: &outpost_config::Config) -> Self {
        let gateway_id = config.gateway_id();
        Self {
            kafka: config.kafka.clone(),
            client_id: config
                .kafka
                .client_id
                .clone()
                .unwrap_or_else(|| format!("outpost-{gateway_id}")),
            gateway_id,
            drain_timeout: config.gateway.shutdown_grace / 2,
        }
    }
}

/// The forwarder's state, as the status API and the metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Starting,
    Live,
    Backfill,
    Offline,
    Draining,
    Stopped,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Starting,
        State::Live,
        State::Backfill,
        State::Offline,
        State::Draining,
        State::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Live => "live",
            State::Backfill => "backfill",
            State::Offline => "offline",
            State::Draining => "draining",
            State::Stopped => "stopped",
        }
    }
}

/// A point-in-time view of the forwarder for `/api/v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct ForwarderStatus {
    pub state: State,
    /// Unix milliseconds of the last state change.
    pub since_ms: i64,
    /// Unix milliseconds since when Kafka is unreachable.
    pub offline_since_ms: Option<i64>,
    pub exactly_once: bool,
    pub produced: u64,
    pub delivered: u64,
    pub failed: u64,
    pub dropped: u64,
    /// Records Kafka refused for good, moved to the dead-letter topic or table.
    pub poison: u64,
    pub in_flight: u64,
    /// Records and bytes in the outbox waiting for Kafka, and the age of the oldest.
    pub backlog_records: u64,
    pub backlog_bytes: u64,
    pub backlog_oldest_age_ms: Option<i64>,
    pub last_error: Option<String>,
}

#[derive(Debug)]
struct StateCell {
    state: State,
    since_ms: i64,
    offline_since_ms: Option<i64>,
}

/// Shared between the forwarder task and whoever reports on it.
#[derive(Debug)]
pub struct Shared {
    cell: Mutex<StateCell>,
    pub metrics: ForwarderMetrics,
    pub signals: Arc<LinkSignals>,
    produced: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    /// Records moved aside as poison (to the dead-letter topic or table).
    poison: AtomicU64,
    in_flight: AtomicU64,
    exactly_once: bool,
}

impl Shared {
    fn new(exactly_once: bool) -> Self {
        let metrics = ForwarderMetrics::default();
        for state in State::ALL {
            metrics
                .state
                .get_or_create(&metrics::StateLabel {
                    state: state.as_str(),
                })
                .set(i64::from(state == State::Starting));
        }
        Self {
            cell: Mutex::new(StateCell {
                state: State::Starting,
                since_ms: now_unix_ms(),
                offline_since_ms: None,
            }),
            metrics,
            signals: Arc::new(LinkSignals::default()),
            produced: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            poison: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            exactly_once,
        }
    }

    pub fn state(&self) -> State {
        self.cell.lock().map_or(State::Stopped, |c| c.state)
    }

    fn set_state(&self, state: State) {
        let Ok(mut cell) = self.cell.lock() else {
            return;
        };
        if cell.state == state {
            return;
        }
        let now = now_unix_ms();
        tracing::info!(
            from = cell.state.as_str(),
            to = state.as_str(),
            "Forwarder state"
        );
        for (s, value) in [(cell.state, 0), (state, 1)] {
            self.metrics
                .state
                .get_or_create(&metrics::StateLabel { state: s.as_str() })
                .set(value);
        }
        if state == State::Offline {
            cell.offline_since_ms = Some(now);
            self.metrics.offline_since.set(now as f64 / 1000.0);
        } else if cell.state == State::Offline {
            cell.offline_since_ms = None;
            self.metrics.offline_since.set(0.0);
        }
        cell.state = state;
        cell.since_ms = now;
    }

    fn count(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A poison record was moved aside, to `to` (`topic` or `local`).
    fn count_poison(&self, reason: &'static str, to: &'static str) {
        self.metrics
            .poison
            .get_or_create(&metrics::PoisonLabel { reason, to })
            .inc();
        self.count(&self.poison, 1);
    }

    /// A poison record is in the outbox's dead-letter table: counted and logged (both modes).
    fn buried(&self, seq: u64, cause: &DeadLetterCause) {
        self.count_poison(cause.reason, "local");
        tracing::error!(
            seq,
            reason = cause.reason,
            error = %cause.error,
            "Poison record moved to the outbox's dead-letter table (see `outpost dead-letters list`)"
        );
    }
}

/// Handle for status reports; cheap to clone.
#[derive(Debug, Clone)]
pub struct ForwarderHandle {
    shared: Arc<Shared>,
    outbox: Outbox,
}

impl ForwarderHandle {
    pub fn status(&self) -> ForwarderStatus {
        let (records, bytes, oldest) = self.outbox.figures();
        let (state, since_ms, offline_since_ms) = self
            .shared
            .cell
            .lock()
            .map_or((State::Stopped, 0, None), |c| {
                (c.state, c.since_ms, c.offline_since_ms)
            });
        let s = &self.shared;
        ForwarderStatus {
            state,
            since_ms,
            offline_since_ms,
            exactly_once: s.exactly_once,
            produced: s.produced.load(Ordering::Relaxed),
            delivered: s.delivered.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            poison: s.poison.load(Ordering::Relaxed),
            in_flight: s.in_flight.load(Ordering::Relaxed),
            backlog_records: records,
            backlog_bytes: bytes,
            backlog_oldest_age_ms: oldest.map(|ms| (now_unix_ms() - ms).max(0)),
            last_error: s.signals.last_error(),
        }
    }

    pub fn metrics(&self) -> &ForwarderMetrics {
        &self.shared.metrics
    }

    /// Refreshes gauges that are read from the outbox at scrape time.
    pub fn refresh_gauges(&self) {
        let (records, _, _) = self.outbox.figures();
        self.shared.metrics.backlog_records.set(records as i64);
    }
}

/// Why the forwarder stopped on its own (the supervisor restarts it).
#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    #[error("cannot create the Kafka producer: {0}")]
    Producer(String),
    #[error("cannot read the outbox: {0}")]
    Outbox(String),
}

/// The forwarder task. Create with [`Forwarder::new`], run with [`Forwarder::run`]; a clone
/// shares the status and metrics (a supervisor runs a fresh clone after a failure).
#[derive(Clone)]
pub struct Forwarder {
    options: ForwarderOptions,
    outbox: Outbox,
    /// `[[kafka.rules]]`, which a reload replaces.
    rules: SharedRules,
    tags: Arc<dyn DeviceTags>,
    shared: Arc<Shared>,
    /// One for every producer this forwarder makes, so its rate limit holds across them.
    tls_check: Option<Arc<tls_check::TlsCheck>>,
}

impl Forwarder {
    pub fn new(
        options: ForwarderOptions,
        outbox: Outbox,
        tags: Arc<dyn DeviceTags>,
    ) -> (Self, ForwarderHandle) {
        let shared = Arc::new(Shared::new(options.kafka.exactly_once));
        let rules = SharedRules::new(Rules::from_config(&options.kafka));
        let tls_check = tls_check::TlsCheck::new(&options.kafka);
        let handle = ForwarderHandle {
            shared: Arc::clone(&shared),
            outbox: outbox.clone(),
        };
        (
            Self {
                options,
                outbox,
                rules,
                tags,
                shared,
                tls_check,
            },
            handle,
        )
    }

    /// Forwards until `stop` is cancelled, then drains. Returns an error only when it cannot
    /// work at all (no producer, no outbox); the caller restarts it.
    pub async fn run(self, stop: CancellationToken) -> Result<(), ForwarderError> {
        if self.options.kafka.exactly_once {
            eos::run(self, stop).await
        } else {
            let fw = self.clone();
            let make_sink: pump::MakeSink = Box::new(move || {
                let sink = fw.sink()?;
                Ok(Arc::new(sink) as Arc<dyn sink::Sink>)
            });
            pump::Pump::new(self, make_sink)?.run(stop).await
        }
    }

    /// Decides by `rules` (the gateway's, which ingestion and a reload share) instead of the
    /// rules compiled from the options.
    #[must_use]
    pub fn with_rules(mut self, rules: SharedRules) -> Self {
        self.rules = rules;
        self
    }

    pub fn options(&self) -> &ForwarderOptions {
        &self.options
    }

    /// A status handle sharing this forwarder's state.
    pub fn handle(&self) -> ForwarderHandle {
        ForwarderHandle {
            shared: Arc::clone(&self.shared),
            outbox: self.outbox.clone(),
        }
    }

    fn producer(&self, transactional_id: Option<&str>) -> Result<Producer_, ForwarderError> {
        self.producer_config(transactional_id)?
            .create_with_context(self.client_context())
            .map_err(|e| ForwarderError::Producer(e.to_string()))
    }

    /// The at-least-once producer (see [`sink::KafkaSink`] for why it is not a
    /// `FutureProducer`).
    fn sink(&self) -> Result<sink::KafkaSink, ForwarderError> {
        sink::KafkaSink::new(&self.producer_config(None)?, self.client_context())
            .map_err(|e| ForwarderError::Producer(e.to_string()))
    }

    fn producer_config(
        &self,
        transactional_id: Option<&str>,
    ) -> Result<rdkafka::ClientConfig, ForwarderError> {
        client::producer_config(
            &self.options.kafka,
            &self.options.client_id,
            transactional_id,
        )
        .map_err(ForwarderError::Producer)
    }

    fn client_context(&self) -> client::Context {
        client::Context {
            signals: Arc::clone(&self.shared.signals),
            tls_check: self.tls_check.clone(),
        }
    }

    fn reader(&self) -> Result<OutboxReader, ForwarderError> {
        self.outbox
            .reader()
            .map_err(|e| ForwarderError::Outbox(e.to_string()))
    }
}

type Producer_ = FutureProducer<client::Context>;

/// Runs one blocking outbox read off the async threads, handing the reader back.
async fn with_reader<T: Send + 'static>(
    reader: &mut Option<OutboxReader>,
    f: impl FnOnce(&mut OutboxReader) -> rusqlite::Result<T> + Send + 'static,
) -> Result<T, ForwarderError> {
    let mut r = reader
        .take()
        .ok_or_else(|| ForwarderError::Outbox("reader lost after a failed read".into()))?;
    let (r, result) = tokio::task::spawn_blocking(move || {
        let result = f(&mut r);
        (r, result)
    })
    .await
    .map_err(|e| ForwarderError::Outbox(e.to_string()))?;
    *reader = Some(r);
    result.map_err(|e| ForwarderError::Outbox(e.to_string()))
}

/// The Kafka record of an outbox record: headers per `docs/KAFKA.md`.
fn headers(record: &StoredRecord, gateway_id: &str, outbox_id: &str) -> OwnedHeaders {
    // Formatted on the stack: this runs for every forwarded record.
    let (mut seq, mut received) = (itoa::Buffer::new(), itoa::Buffer::new());
    let seq = seq.format(record.seq);
    let received = received.format(record.received_at_ms);
    let mut h = OwnedHeaders::new_with_capacity(9 + record.headers.len());
    let fixed: [(&str, &str); 8] = [
        (header::GATEWAY, gateway_id),
        (header::DEVICE, &record.device_id),
        (header::SOURCE, record.source.as_str()),
        (header::TOPIC, &record.topic),
        (header::SEQ, seq),
        (header::BOOT, &record.boot_id),
        (header::RECEIVED_AT, received),
        (header::OUTBOX, outbox_id),
    ];
    for (key, value) in fixed {
        h = h.insert(Header {
            key,
            value: Some(value),
        });
    }
    if let Some(ct) = &record.content_type {
        h = h.insert(Header {
            key: header::CONTENT_TYPE,
            value: Some(ct.as_str()),
        });
    }
    for (key, value) in &record.headers {
        h = h.insert(Header {
            key: key.as_str(),
            value: Some(value.as_str()),
        });
    }
    h
}

/// A poison record as the dead-letter topic gets it: its own headers, then why it is there.
fn dead_letter_headers(
    record: &StoredRecord,
    gateway_id: &str,
    outbox_id: &str,
    cause: &DeadLetterCause,
) -> OwnedHeaders {
    let attempts = cause.attempts.to_string();
    let mut h = headers(record, gateway_id, outbox_id);
    for (key, value) in [
        (poison::header::ERROR, cause.error.as_str()),
        (poison::header::REASON, cause.reason),
        (poison::header::TOPIC, cause.kafka_topic.as_str()),
        (poison::header::ATTEMPTS, attempts.as_str()),
    ] {
        h = h.insert(Header {
            key,
            value: Some(value),
        });
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers as _;

    /// The fixed headers first, then the content type, then the record's own headers in the
    /// order they were stored (docs/KAFKA.md, "Record format").
    #[test]
    fn own_headers_follow_the_fixed_ones_in_order() {
        let record = StoredRecord {
            seq: 42,
            priority: 0,
            route: "default".into(),
            boot_id: Arc::from("boot-1"),
            device_id: "dev-1".into(),
            source: crate::Source::Mqtt,
            topic: "t/1".into(),
            received_at_ms: 7,
            content_type: Some("application/json".into()),
            headers: vec![
                ("mqtt_qos".into(), "1".into()),
                ("unit".into(), "C".into()),
                ("unit".into(), "K".into()),
            ],
            payload: b"{}".to_vec(),
            size: 66,
        };
        let h = headers(&record, "gw-1", "0f1e2d3c");
        let got: Vec<(String, String)> = h
            .iter()
            .map(|h| {
                let value = String::from_utf8(h.value.unwrap_or_default().to_vec()).unwrap();
                (h.key.to_owned(), value)
            })
            .collect();
        let want: Vec<(String, String)> = [
            ("outpost-gateway", "gw-1"),
            ("outpost-device", "dev-1"),
            ("outpost-source", "mqtt"),
            ("outpost-topic", "t/1"),
            ("outpost-seq", "42"),
            ("outpost-boot", "boot-1"),
            ("outpost-received-at", "7"),
            ("outpost-outbox", "0f1e2d3c"),
            ("outpost-content-type", "application/json"),
            ("mqtt_qos", "1"),
            ("unit", "C"),
            ("unit", "K"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(got, want);
    }
}
