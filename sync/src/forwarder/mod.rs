//! The forwarder: outbox → Kafka, deleting a record only after Kafka acknowledged it.
//!
//! # States
//!
//! ```text
//!   start ──plan──> Backfill ──backlog drained──> Live
//!                      ▲  │                        │
//!                      │  └──no acks / brokers down┴──> Offline ──first ack or probe──> plan
//!   any ──stop──> Draining ──in-flight settled or drain_timeout──> Stopped
//! ```
//!
//! * **Live**: one cursor in sequence order forwards records as they are committed (it wakes on
//!   the outbox's commit watch, so a record is produced within milliseconds of its commit).
//! * **Backfill**: after a start or an outage, records below `live_from` (the sequence at the
//!   moment of planning) are the backlog. A second cursor drains it, highest priority first, at
//!   most `backlog_rate` records per second, while the live cursor keeps forwarding records from
//!   `live_from` on. With `order = "per_device"` (the default) the live cursor skips devices that
//!   have a backlog; once the backlog is drained it rescans from `live_from` and forwards those
//!   devices' live records, so every device's records reach Kafka in receive order. With
//!   `order = "live_first"` nothing is skipped.
//! * **Offline**: no sign of Kafka for `offline_after` — records are in flight and none was
//!   acknowledged, or nothing is in flight and no metadata probe (sent every `offline_after / 2`
//!   while idle) succeeded — or librdkafka reports every broker down. Nothing is dropped:
//!   librdkafka holds at most `max_in_flight` records (it never expires them, see [`client`]) and
//!   everything else waits in the outbox. The first acknowledgement (or a successful probe when
//!   nothing is in flight) ends it, once: the recovery is logged once and clears the last error,
//!   and a new plan puts live records first.
//! * **Draining**: on shutdown, no more reading; in-flight records get `drain_timeout` to be
//!   acknowledged. Unacknowledged ones stay in the outbox and are sent again after the restart.
//!
//! # Invariants
//!
//! * A record is deleted from the outbox only after its delivery report succeeded (or a drop /
//!   sample rule decided not to forward it).
//! * `unsettled` holds every sequence that was produced (or dropped) and is not yet deleted. Any
//!   cursor may read a record again (after a rewind, a rescan or a new plan); a record whose
//!   sequence is unsettled is skipped, so a record is never in flight twice.
//! * After a failed delivery (an outage, or an error not known to be permanent) nothing more is
//!   produced until every in-flight record has settled; then the forwarder plans again from the
//!   outbox, which holds exactly the undelivered records. A fatal producer error also recreates
//!   the producer. Records of one device are therefore produced again in receive order.
//! * A record Kafka refuses for good ([`poison`]) is moved aside — to the dead-letter topic or
//!   the outbox's dead-letter table — without that pause; it stays unsettled until it is.
//! * Nothing is produced while deleting delivered records fails, nor while a window's worth of
//!   delivered records waits for its delete; a topic without a recent acknowledgement holds at
//!   most its share of the window ([`TopicWindow`]).

pub mod client;
mod eos;
pub mod fleet;
pub mod metrics;
pub mod poison;
pub mod rules;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use outpost_config::{BacklogOrder, KafkaConfig, RuleKey};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::envelope::StoredRecord;
use crate::outbox::{AckError, DeadLetterCause, Outbox, OutboxReader, ReadPosition, now_unix_ms};
pub use client::LinkSignals;
pub use metrics::ForwarderMetrics;
pub use rules::{DeviceTags, NoTags, Rules};

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
            last_error: s.signals.last_error.lock().ok().and_then(|e| e.clone()),
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
    rules: Arc<Rules>,
    tags: Arc<dyn DeviceTags>,
    shared: Arc<Shared>,
}

impl Forwarder {
    pub fn new(
        options: ForwarderOptions,
        outbox: Outbox,
        tags: Arc<dyn DeviceTags>,
    ) -> (Self, ForwarderHandle) {
        let shared = Arc::new(Shared::new(options.kafka.exactly_once));
        let rules = Arc::new(Rules::from_config(&options.kafka));
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
            let mut pump = Pump::new(self)?;
            pump.run(stop).await
        }
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
        let config = client::producer_config(
            &self.options.kafka,
            &self.options.client_id,
            transactional_id,
        )
        .map_err(ForwarderError::Producer)?;
        config
            .create_with_context(client::Context {
                signals: Arc::clone(&self.shared.signals),
            })
            .map_err(|e| ForwarderError::Producer(e.to_string()))
    }

    fn reader(&self) -> Result<OutboxReader, ForwarderError> {
        self.outbox
            .reader()
            .map_err(|e| ForwarderError::Outbox(e.to_string()))
    }
}

type Producer_ = FutureProducer<client::Context>;

/// A settled delivery.
struct Settled {
    seq: u64,
    received_at_ms: i64,
    /// The Kafka topic it went to (for the per-topic window).
    topic: TopicId,
    /// Set when this was the record's dead letter, produced to the dead-letter topic.
    dead: Option<Box<DeadLetterCause>>,
    result: Result<(), KafkaError>,
}

type InFlight = Pin<Box<dyn Future<Output = Settled> + Send>>;

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

/// Whether Kafka answers while nothing is in flight, when no acknowledgement can tell: a
/// metadata request for one topic (small on any cluster; it proves a broker answers), sent every
/// `offline_after / 2` (at least 1 s) with a 2 s timeout. An outage is then reported within
/// `offline_after` + one interval + the timeout (12 s with the default 10 s). The price is one
/// small request every interval on an idle link: raise `offline_after` on a metered uplink.
struct IdleProbe {
    /// The last sign of a reachable Kafka: an acknowledgement, a commit or a successful probe.
    last_contact: Instant,
    next: Instant,
    running: Option<JoinHandle<bool>>,
}

impl IdleProbe {
    fn new() -> Self {
        Self {
            last_contact: Instant::now(),
            next: Instant::now(),
            running: None,
        }
    }

    /// Kafka answered (an acknowledgement or a commit).
    fn contact(&mut self) {
        self.last_contact = Instant::now();
    }

    fn silent_for(&self) -> Duration {
        self.last_contact.elapsed()
    }

    /// Starts a probe when one is due; the outcome of one that finished since the last call.
    fn poll(&mut self, producer: &Producer_, topic: &str, offline_after: Duration) -> Option<bool> {
        let mut outcome = None;
        if self.running.as_ref().is_some_and(JoinHandle::is_finished) {
            let ok = self
                .running
                .take()
                .and_then(futures_util::FutureExt::now_or_never)
                .is_some_and(|r| matches!(r, Ok(true)));
            if ok {
                self.contact();
            }
            outcome = Some(ok);
        }
        if self.running.is_none() && Instant::now() >= self.next {
            let (producer, topic) = (producer.clone(), topic.to_owned());
            self.next = Instant::now() + (offline_after / 2).max(Duration::from_secs(1));
            self.running = Some(tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(Some(&topic), Duration::from_secs(2))
                    .is_ok_and(|m| !m.brokers().is_empty())
            }));
        }
        outcome
    }
}

/// Records per second for the backlog, with a burst of 50 ms (also the batch it is read in).
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        let burst = (rate / 20.0).max(1.0);
        Self {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    fn available(&mut self) -> usize {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        self.tokens.floor() as usize
    }

    fn spend(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    /// The batch to wait for: a full bucket, or `limit` if smaller (never 0 unless `limit` is).
    fn batch(&self, limit: usize) -> usize {
        (self.burst as usize).max(1).min(limit)
    }

    /// How long until `n` tokens are available.
    fn wait_for(&self, n: usize) -> Duration {
        Duration::from_secs_f64(((n as f64 - self.tokens) / self.rate).max(0.0))
    }
}

#[derive(Debug)]
struct Backlog {
    pos: ReadPosition,
    /// Records below this sequence are the backlog (`live_from`).
    below: u64,
    /// `per_device`: devices whose live records wait for the backlog.
    gated: HashSet<String>,
    bucket: TokenBucket,
}

/// The sequences an ack task deleted, and its outcome.
type AckResult = (Vec<u64>, Result<u64, AckError>);
type AckDone = Result<AckResult, tokio::task::JoinError>;

enum Wake {
    Settled(Settled),
    Acked(AckDone),
    /// Dead letters were put back: plan again (they are below the cursors).
    Revived,
    Other,
}

/// A record found poison, waiting to be moved aside (its sequence stays unsettled meanwhile).
#[derive(Debug)]
struct Poisoned {
    seq: u64,
    cause: DeadLetterCause,
    /// The dead-letter topic refused it too (or there is none): the local table.
    local: bool,
}

/// The window per Kafka topic: a topic holds at most `cap` records in flight unless Kafka
/// acknowledged one of its records within [`RECENT_DELIVERY`], so one whose partition is stuck
/// (no leader, a slow broker) cannot take the whole window from the others, while a topic that
/// flows may use all of it (one busy topic is the common case, and skipping costs reads).
///
/// A record of a topic over its cap is skipped, and its topic stays *closed* (every later record
/// of it skipped too, so the topic's records still go in sequence order) until its in-flight
/// count has fallen to half the cap; then the cursors read again from the first skipped record
/// (records already in flight are unsettled and skipped). The hysteresis keeps a slowly
/// recovering topic from costing a rescan per acknowledgement.
/// A Kafka topic's index in [`TopicWindow`].
type TopicId = usize;

#[derive(Debug, Default)]
struct TopicWindow {
    cap: usize,
    /// Per topic, by [`TopicId`]: its name, records in flight, and whether it is closed.
    names: Vec<Arc<str>>,
    in_flight: Vec<usize>,
    closed: Vec<bool>,
    /// When Kafka last acknowledged a record of the topic.
    delivered_at: Vec<Option<Instant>>,
    index: HashMap<Arc<str>, TopicId>,
    /// The topic of the last record: most records go where the one before went, and comparing
    /// the name is cheaper than hashing it.
    last: Option<TopicId>,
    /// The live cursor skipped records from this sequence on.
    live_from: Option<u64>,
    /// The backlog cursor skipped records.
    backlog: bool,
    /// A closed topic has room again: rescan at the next fill.
    due: bool,
}

impl TopicWindow {
    fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            ..Self::default()
        }
    }

    /// The topic's id, and whether a record of it may be produced now.
    fn admit(&mut self, topic: &str) -> (TopicId, bool) {
        let id = match self.last {
            Some(id) if &*self.names[id] == topic => id,
            _ => match self.index.get(topic) {
                Some(&id) => id,
                None => {
                    // Topics come from the configuration (rules, the dead-letter topic): few.
                    let name: Arc<str> = Arc::from(topic);
                    let id = self.names.len();
                    self.names.push(Arc::clone(&name));
                    self.in_flight.push(0);
                    self.closed.push(false);
                    self.delivered_at.push(None);
                    self.index.insert(name, id);
                    id
                }
            },
        };
        self.last = Some(id);
        let flowing = self.in_flight[id] < self.cap
            || self.delivered_at[id].is_some_and(|at| at.elapsed() < RECENT_DELIVERY);
        (id, !self.closed[id] && flowing)
    }

    fn name(&self, id: TopicId) -> Arc<str> {
        Arc::clone(&self.names[id])
    }

    fn produced(&mut self, id: TopicId) {
        self.in_flight[id] += 1;
    }

    /// A record of topic `id` was skipped by the live cursor (`Some(seq)`) or the backlog's.
    fn skipped(&mut self, id: TopicId, live_seq: Option<u64>) {
        self.closed[id] = true;
        match live_seq {
            Some(seq) => self.live_from = Some(self.live_from.map_or(seq, |s| s.min(seq))),
            None => self.backlog = true,
        }
    }

    /// A record of topic `id` settled; `delivered`: Kafka has it.
    fn settled(&mut self, id: TopicId, delivered: bool) {
        let n = &mut self.in_flight[id];
        *n = n.saturating_sub(1);
        if delivered {
            self.delivered_at[id] = Some(Instant::now());
        }
        // A closed topic flows again (a delivery) or has room: read its skipped records.
        if self.closed[id] && (delivered || *n <= self.cap / 2) {
            self.due = true;
        }
    }

    /// Takes a due rescan: where the live cursor restarts and whether the backlog's does.
    fn rescan(&mut self) -> Option<(Option<u64>, bool)> {
        if !self.due {
            return None;
        }
        self.due = false;
        self.closed.fill(false);
        Some((self.live_from.take(), std::mem::take(&mut self.backlog)))
    }

    /// A new plan reads everything again anyway.
    fn reset(&mut self) {
        self.closed.fill(false);
        self.live_from = None;
        self.backlog = false;
        self.due = false;
    }
}

/// A topic with an acknowledgement this recent is flowing: [`TopicWindow`] does not cap it.
const RECENT_DELIVERY: Duration = Duration::from_secs(1);

/// How long after a failed delete of delivered records the forwarder tries again.
const ACK_RETRY: Duration = Duration::from_millis(500);

/// What must happen before producing resumes after a failure.
#[derive(Debug, Clone, Copy)]
struct Rewind {
    at: Instant,
    recreate: bool,
}

struct Pump {
    fw: Forwarder,
    producer: Producer_,
    reader: Option<OutboxReader>,
    committed: watch::Receiver<u64>,
    in_flight: FuturesUnordered<InFlight>,
    unsettled: HashSet<u64>,
    delivered: Vec<u64>,
    acking: Option<JoinHandle<AckResult>>,
    last_ack: Instant,
    /// The live cursor: every record with a sequence up to this was looked at.
    live_after: u64,
    backlog: Option<Backlog>,
    rewind: Option<Rewind>,
    failure_backoff: Duration,
    last_progress: Instant,
    /// Whether Kafka answers while nothing is in flight.
    link: IdleProbe,
    /// Set when an outage ended, until the next plan: the recovery is announced once, not once
    /// per record still settling.
    recovered: bool,
    /// Set while deleting delivered records fails: when to try again. No producing meanwhile.
    ack_retry_at: Option<Instant>,
    attempts: poison::Attempts,
    poisoned: Vec<Poisoned>,
    topics: TopicWindow,
    /// Dead letters put back into the outbox (below the cursors): plan again.
    revived: watch::Receiver<u64>,
}

impl Pump {
    fn new(fw: Forwarder) -> Result<Self, ForwarderError> {
        let producer = fw.producer(None)?;
        let reader = Some(fw.reader()?);
        let committed = fw.outbox.committed();
        let revived = fw.outbox.revived();
        let failure_backoff = fw.options.kafka.reconnect_backoff_min;
        let topics = TopicWindow::new(fw.options.kafka.topic_in_flight_cap());
        Ok(Self {
            fw,
            producer,
            reader,
            committed,
            in_flight: FuturesUnordered::new(),
            unsettled: HashSet::new(),
            delivered: Vec::new(),
            acking: None,
            last_ack: Instant::now(),
            live_after: 0,
            backlog: None,
            rewind: None,
            failure_backoff,
            last_progress: Instant::now(),
            link: IdleProbe::new(),
            recovered: false,
            ack_retry_at: None,
            attempts: poison::Attempts::default(),
            poisoned: Vec::new(),
            topics,
            revived,
        })
    }

    fn kafka(&self) -> &KafkaConfig {
        &self.fw.options.kafka
    }

    async fn run(&mut self, stop: CancellationToken) -> Result<(), ForwarderError> {
        self.plan().await?;
        loop {
            let (held, _, _) = self.fw.outbox.figures();
            let shared = &self.fw.shared;
            shared.metrics.backlog_records.set(held as i64);
            let in_flight = self.in_flight.len();
            shared.in_flight.store(in_flight as u64, Ordering::Relaxed);
            shared.metrics.in_flight.set(in_flight as i64);
            self.reap_ready();
            self.start_ack(false);
            self.watch_link();
            if stop.is_cancelled() {
                return self.drain().await;
            }
            if let Some(rewind) = self.rewind
                && self.in_flight.is_empty()
                && self.acking.is_none()
                && Instant::now() >= rewind.at
            {
                self.rewind = None;
                if rewind.recreate {
                    tracing::warn!("Recreating the Kafka producer after a fatal error");
                    self.producer = self.fw.producer(None)?;
                    self.fw.shared.metrics.producer_restarts.inc();
                }
                self.plan().await?;
                continue;
            }
            if !self.poisoned.is_empty() {
                self.move_aside().await?;
            }
            if self.rewind.is_none() && self.fill().await? {
                tokio::task::yield_now().await;
                continue;
            }
            let wake = self.next_wake();
            match self.wait(&stop, wake).await {
                Wake::Settled(settled) => self.settle(settled),
                Wake::Acked(done) => {
                    self.acking = None;
                    self.acked(done);
                }
                Wake::Revived => {
                    self.revived.mark_unchanged();
                    self.rewind.get_or_insert(Rewind {
                        at: Instant::now(),
                        recreate: false,
                    });
                }
                Wake::Other => {}
            }
        }
    }

    /// Waits for a delivery report, a finished ack, a commit, `stop` or `wake`.
    async fn wait(&mut self, stop: &CancellationToken, wake: Duration) -> Wake {
        let in_flight = &mut self.in_flight;
        let acking = &mut self.acking;
        let committed = &mut self.committed;
        let revived = &mut self.revived;
        tokio::select! {
            () = stop.cancelled() => Wake::Other,
            Some(settled) = in_flight.next(), if !in_flight.is_empty() => Wake::Settled(settled),
            done = async {
                match acking.as_mut() {
                    Some(handle) => handle.await,
                    None => std::future::pending().await,
                }
            } => Wake::Acked(done),
            _ = committed.changed() => Wake::Other,
            _ = revived.changed() => Wake::Revived,
            () = tokio::time::sleep(wake) => Wake::Other,
        }
    }

    /// Decides live_from and the backlog from what the outbox holds now.
    async fn plan(&mut self) -> Result<(), ForwarderError> {
        self.recovered = false;
        self.topics.reset();
        let next = *self.committed.borrow_and_update();
        let unsettled_below = self.unsettled.iter().filter(|s| **s < next).count() as u64;
        let per_device = self.kafka().order == BacklogOrder::PerDevice;
        let (below, gated) = with_reader(&mut self.reader, move |r| {
            let (count, _) = r.count_below(next)?;
            let gated = if per_device && count > 0 {
                r.devices_below(next)?
            } else {
                HashSet::new()
            };
            Ok((count, gated))
        })
        .await?;
        self.live_after = next.saturating_sub(1);
        if below > unsettled_below {
            tracing::info!(
                backlog = below - unsettled_below,
                live_from = next,
                gated_devices = gated.len(),
                "Forwarding a backlog; live records first"
            );
            self.backlog = Some(Backlog {
                pos: ReadPosition::START,
                below: next,
                gated,
                bucket: TokenBucket::new(self.kafka().backlog_rate),
            });
            self.fw.shared.set_state(State::Backfill);
        } else {
            self.backlog = None;
            self.fw.shared.set_state(State::Live);
        }
        Ok(())
    }

    /// Produces what the window has room for. True if it read anything (call again at once).
    async fn fill(&mut self) -> Result<bool, ForwarderError> {
        if self.ack_retry_at.is_some() {
            // Deletes fail (a full disk, an I/O error): producing more would only grow the
            // records Kafka has and the outbox still holds — memory here, duplicates after a
            // restart. Wait until deleting works again.
            return Ok(false);
        }
        if self.delivered.len() >= self.kafka().max_in_flight {
            // A window's worth delivered and not yet deleted: let the delete catch up first, so
            // what Kafka has and the outbox still holds stays within two windows even before a
            // failing delete is noticed.
            return Ok(false);
        }
        let room = self
            .kafka()
            .max_in_flight
            .saturating_sub(self.in_flight.len());
        if room == 0 {
            return Ok(false);
        }
        if let Some((live_from, backlog)) = self.topics.rescan() {
            if let Some(from) = live_from {
                self.live_after = self.live_after.min(from.saturating_sub(1));
            }
            if backlog && let Some(b) = self.backlog.as_mut() {
                b.pos = ReadPosition::START;
            }
        }
        let batch = room.min(self.kafka().read_batch);
        let after = self.live_after;
        // Nothing committed beyond the live cursor: no query (this runs on every wake-up, and
        // a rate-limited backlog wakes the forwarder often).
        let committed_next = *self.committed.borrow();
        let live = if committed_next > after.saturating_add(1) {
            with_reader(&mut self.reader, move |r| r.read_after(after, batch)).await?
        } else {
            Vec::new()
        };
        let mut progressed = !live.is_empty();
        for record in live {
            self.live_after = record.seq;
            let gated = self
                .backlog
                .as_ref()
                .is_some_and(|b| b.gated.contains(&record.device_id));
            if !gated {
                self.send(record, true).await;
                if self.rewind.is_some() {
                    return Ok(false);
                }
            }
        }
        let room = self
            .kafka()
            .max_in_flight
            .saturating_sub(self.in_flight.len());
        let read_batch = self.kafka().read_batch;
        let Some(backlog) = self.backlog.as_mut() else {
            return Ok(progressed);
        };
        // The backlog is read in batches (a full bucket: 50 ms of `backlog_rate`, at most the
        // window and `read_batch`), not a few records per wake-up: one query, one wake-up and
        // one hop to the reader's thread per batch is what keeps a rate-limited drain cheap.
        let want = backlog.bucket.batch(room.min(read_batch));
        let tokens = backlog.bucket.available();
        if want == 0 || tokens < want {
            return Ok(progressed);
        }
        let tokens = tokens.min(room).min(read_batch);
        let (pos, below) = (backlog.pos, backlog.below);
        let (page, next) = with_reader(&mut self.reader, move |r| {
            r.read_window(pos, 0..below, tokens, u64::MAX)
        })
        .await?;
        if page.is_empty() {
            if self.topics.backlog {
                // Records of a closed topic were skipped: not drained until they went.
                return Ok(progressed);
            }
            // Drained. Devices held back for order get their live records now: rescan from
            // live_from; everything already produced is unsettled and skipped.
            let Some(done) = self.backlog.take() else {
                return Ok(progressed);
            };
            if !done.gated.is_empty() {
                self.live_after = done.below.saturating_sub(1);
            }
            tracing::info!("Backlog drained");
            self.fw.shared.set_state(State::Live);
            return Ok(true);
        }
        progressed = true;
        if let Some(b) = self.backlog.as_mut() {
            b.pos = next;
            b.bucket.spend(page.len());
        }
        for record in page {
            self.send(record, false).await;
            if self.rewind.is_some() {
                return Ok(false);
            }
        }
        Ok(progressed)
    }

    /// Hands one record to the producer (or drops it per the rules). `live`: read by the live
    /// cursor (else the backlog's), for a rescan should its topic's window be full.
    async fn send(&mut self, record: StoredRecord, live: bool) {
        if self.unsettled.contains(&record.seq) {
            return;
        }
        let decision = self.fw.rules.decide(
            &rules::RecordView {
                device_id: &record.device_id,
                source: record.source,
                topic: &record.topic,
                seq: record.seq,
            },
            self.fw.tags.as_ref(),
        );
        let (topic, key) = match decision {
            rules::Decision::Drop { rule } => {
                self.fw
                    .shared
                    .metrics
                    .dropped
                    .get_or_create(&metrics::RuleLabel {
                        rule: rule.to_owned(),
                    })
                    .inc();
                self.fw.shared.count(&self.fw.shared.dropped, 1);
                self.unsettled.insert(record.seq);
                self.delivered.push(record.seq);
                return;
            }
            rules::Decision::Forward { topic, key } => (topic, key),
        };
        let (topic, open) = self.topics.admit(topic);
        if !open {
            // Its topic's share of the window is full: read again later (see [`TopicWindow`]).
            self.topics.skipped(topic, live.then_some(record.seq));
            return;
        }
        let key: Option<&str> = match key {
            RuleKey::Device => Some(&record.device_id),
            RuleKey::Topic => Some(&record.topic),
            RuleKey::None => None,
        };
        let headers = headers(&record, &self.fw.options.gateway_id, self.fw.outbox.id());
        self.produce(&record, topic, key, headers, None).await;
    }

    /// Produces `record` to `topic` (its own, or the dead-letter topic with `dead`), waiting
    /// for room in librdkafka's queue when needed. A record refused outright is handled like a
    /// failed delivery.
    async fn produce(
        &mut self,
        record: &StoredRecord,
        topic: TopicId,
        key: Option<&str>,
        headers: OwnedHeaders,
        dead: Option<Box<DeadLetterCause>>,
    ) {
        if self.in_flight.is_empty() {
            self.last_progress = Instant::now();
        }
        let name = self.topics.name(topic);
        let mut kafka_record = FutureRecord::<str, [u8]>::to(&name)
            .payload(&record.payload)
            .headers(headers)
            .timestamp(record.received_at_ms);
        if let Some(key) = key {
            kafka_record = kafka_record.key(key);
        }
        loop {
            match self.producer.send_result(kafka_record) {
                Ok(delivery) => {
                    let (seq, received_at_ms) = (record.seq, record.received_at_ms);
                    self.unsettled.insert(seq);
                    self.topics.produced(topic);
                    self.in_flight.push(Box::pin(async move {
                        let result = match delivery.await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err((e, _))) => Err(e),
                            Err(_) => Err(KafkaError::Canceled),
                        };
                        Settled {
                            seq,
                            received_at_ms,
                            topic,
                            dead,
                            result,
                        }
                    }));
                    self.fw.shared.metrics.produced.inc();
                    self.fw.shared.count(&self.fw.shared.produced, 1);
                    return;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned))
                    if !self.in_flight.is_empty() =>
                {
                    // librdkafka's queue is full: wait for a delivery, then try again.
                    kafka_record = returned;
                    if let Some(settled) = self.in_flight.next().await {
                        self.settle(settled);
                    }
                    if self.rewind.is_some() {
                        return;
                    }
                }
                Err((error, _)) => {
                    // Refused before it was queued (too large for the client, …): a failed
                    // delivery, classified like one.
                    self.unsettled.insert(record.seq);
                    self.failed(record.seq, topic, dead, &error);
                    return;
                }
            }
        }
    }

    /// Takes every delivery report that is ready without waiting.
    fn reap_ready(&mut self) {
        while let Some(Some(settled)) = futures_util::FutureExt::now_or_never(self.in_flight.next())
        {
            self.settle(settled);
        }
    }

    fn settle(&mut self, settled: Settled) {
        self.topics.settled(settled.topic, settled.result.is_ok());
        let shared = Arc::clone(&self.fw.shared);
        match settled.result {
            Ok(()) => {
                self.delivered.push(settled.seq);
                self.attempts.forget(settled.seq);
                if let Some(cause) = settled.dead {
                    // Kafka has its dead letter: the record leaves the outbox like a delivered
                    // one.
                    self.count_poison(cause.reason, "topic");
                    tracing::warn!(
                        seq = settled.seq,
                        reason = cause.reason,
                        error = %cause.error,
                        "Poison record moved to the dead-letter topic"
                    );
                } else {
                    shared.metrics.delivered.inc();
                    shared.count(&shared.delivered, 1);
                    let age = (now_unix_ms() - settled.received_at_ms).max(0) as f64 / 1000.0;
                    shared.metrics.delivery_latency.observe(age);
                }
                self.last_progress = Instant::now();
                self.link.contact();
                self.failure_backoff = self.kafka().reconnect_backoff_min;
                shared
                    .signals
                    .all_brokers_down
                    .store(false, Ordering::Relaxed);
                if shared.state() == State::Offline {
                    self.recover();
                }
            }
            Err(error) => self.failed(settled.seq, settled.topic, settled.dead, &error),
        }
    }

    /// A produce or a delivery of `seq` (unsettled) failed: an outage rewinds, a poison record
    /// is moved aside (the others go on), anything else is tried again up to
    /// `dead_letter.max_attempts` times ([`poison`]).
    fn failed(
        &mut self,
        seq: u64,
        topic: TopicId,
        dead: Option<Box<DeadLetterCause>>,
        error: &KafkaError,
    ) {
        let shared = &self.fw.shared;
        shared.metrics.failed.inc();
        shared.count(&shared.failed, 1);
        let verdict = poison::classify(error);
        if let Some(mut cause) = dead {
            if verdict == poison::Verdict::Outage {
                // Not its fault: it is still in the outbox and will be found poison again.
                self.unsettled.remove(&seq);
                self.fail(error);
            } else {
                cause.error = format!(
                    "{}; the dead-letter topic refused it too: {error}",
                    cause.error
                );
                self.poisoned.push(Poisoned {
                    seq,
                    cause: *cause,
                    local: true,
                });
            }
            return;
        }
        let reason = match verdict {
            poison::Verdict::Outage => None,
            poison::Verdict::Poison(reason) => Some(reason),
            poison::Verdict::Retry => {
                let max = self.kafka().dead_letter.max_attempts;
                self.attempts
                    .fail(seq, max)
                    .then_some(poison::Reason::Attempts)
            }
        };
        let Some(reason) = reason else {
            self.unsettled.remove(&seq);
            self.fail(error);
            return;
        };
        let attempts = match reason {
            poison::Reason::Attempts => self.attempts.of(seq),
            _ => self.attempts.of(seq) + 1,
        };
        self.fw.shared.signals.set_error(error.to_string());
        self.poisoned.push(Poisoned {
            seq,
            cause: DeadLetterCause {
                reason: reason.as_str(),
                error: error.to_string(),
                kafka_topic: self.topics.name(topic).to_string(),
                attempts,
            },
            local: self.kafka().dead_letter.topic.is_none(),
        });
    }

    /// Moves the poison records aside: to the dead-letter topic (deleted from the outbox once
    /// Kafka has them, see [`Self::settle`]) or into the outbox's dead-letter table.
    async fn move_aside(&mut self) -> Result<(), ForwarderError> {
        for poisoned in std::mem::take(&mut self.poisoned) {
            let Poisoned { seq, cause, local } = poisoned;
            let dead_topic = self.kafka().dead_letter.topic.clone();
            if let (false, Some(dead_topic)) = (local, dead_topic) {
                let record = with_reader(&mut self.reader, move |r| r.read_seq(seq)).await?;
                let Some(record) = record else {
                    self.unsettled.remove(&seq);
                    continue;
                };
                let (dead_topic, _) = self.topics.admit(&dead_topic);
                let headers = dead_letter_headers(
                    &record,
                    &self.fw.options.gateway_id,
                    self.fw.outbox.id(),
                    &cause,
                );
                let key = record.device_id.clone();
                self.produce(
                    &record,
                    dead_topic,
                    Some(&key),
                    headers,
                    Some(Box::new(cause)),
                )
                .await;
                continue;
            }
            match self.fw.outbox.dead_letter(seq, cause.clone()).await {
                Ok(_) => {
                    self.unsettled.remove(&seq);
                    self.attempts.forget(seq);
                    self.count_poison(cause.reason, "local");
                    tracing::error!(
                        seq,
                        reason = cause.reason,
                        error = %cause.error,
                        "Poison record moved to the outbox's dead-letter table (see `outpost dead-letters list`)"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, seq, "Moving a poison record aside failed; retrying");
                    self.poisoned.push(Poisoned { seq, cause, local });
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn count_poison(&self, reason: &'static str, to: &'static str) {
        self.fw.shared.count_poison(reason, to);
    }

    /// The first sign of Kafka after an outage: announce it once, clear the outage's error, and
    /// plan again at the next turn (live records first). The state stays Offline until that
    /// plan, while the rest of the in-flight records settle.
    fn recover(&mut self) {
        if self.recovered {
            return;
        }
        self.recovered = true;
        tracing::info!("Kafka is reachable again");
        self.fw.shared.signals.clear_error();
        self.rewind.get_or_insert(Rewind {
            at: Instant::now(),
            recreate: false,
        });
    }

    /// A produce or a delivery failed: stop producing, let in-flight records settle, then
    /// plan again from the outbox (recreating the producer after a fatal error).
    fn fail(&mut self, error: &KafkaError) {
        let fatal = error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal)
            || self.producer.client().fatal_error().is_some();
        if self.rewind.is_none() {
            tracing::warn!(%error, fatal, "Kafka delivery failed; sending again from the outbox");
        }
        self.fw.shared.signals.set_error(error.to_string());
        if fatal {
            // Nothing more will be delivered by this producer: fail what it holds now.
            self.producer
                .purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
        }
        let at = Instant::now() + self.failure_backoff;
        self.failure_backoff = (self.failure_backoff * 2).min(self.kafka().reconnect_backoff_max);
        let rewind = self.rewind.get_or_insert(Rewind {
            at,
            recreate: false,
        });
        rewind.recreate |= fatal;
    }

    /// Starts deleting delivered records (one ack at a time, grouped).
    fn start_ack(&mut self, force: bool) {
        if self.acking.is_some() || self.delivered.is_empty() {
            return;
        }
        if let Some(retry_at) = self.ack_retry_at
            && Instant::now() < retry_at
            && !force
        {
            return;
        }
        let due = force
            || self.delivered.len() >= 4096
            || self.in_flight.is_empty()
            || self.last_ack.elapsed() >= Duration::from_millis(10);
        if !due {
            return;
        }
        let seqs = std::mem::take(&mut self.delivered);
        let outbox = self.fw.outbox.clone();
        self.last_ack = Instant::now();
        self.acking = Some(tokio::spawn(async move {
            let result = outbox.ack(seqs.clone()).await;
            (seqs, result)
        }));
    }

    fn acked(&mut self, done: AckDone) {
        match done {
            Ok((seqs, Ok(_))) => {
                for seq in seqs {
                    self.unsettled.remove(&seq);
                }
                if self.ack_retry_at.take().is_some() {
                    tracing::info!("Deleting delivered records works again; forwarding resumes");
                    self.fw.shared.signals.clear_error();
                }
            }
            Ok((seqs, Err(e))) => {
                // Still in the outbox: try deleting them again in a moment. Kafka has them; a
                // restart before that succeeds sends them again (at-least-once). Meanwhile
                // nothing more is produced (see `fill`).
                if self.ack_retry_at.is_none() {
                    tracing::warn!(error = %e, "Deleting delivered records failed; forwarding pauses until it works again");
                }
                self.fw
                    .shared
                    .signals
                    .set_error(format!("deleting delivered records: {e}"));
                self.ack_retry_at = Some(Instant::now() + ACK_RETRY);
                self.delivered.extend(seqs);
            }
            Err(e) => tracing::error!(error = %e, "Ack task failed"),
        }
    }

    /// Offline detection. Without any sign of Kafka for `offline_after` — no acknowledgement of
    /// what is in flight or, with nothing in flight, no successful [`IdleProbe`] — the forwarder
    /// is Offline, whether or not records are waiting.
    fn watch_link(&mut self) {
        let shared = Arc::clone(&self.fw.shared);
        let offline_after = self.kafka().offline_after;
        let idle = self.in_flight.is_empty();
        if idle {
            let topic = &self.fw.options.kafka.default_topic;
            if self.link.poll(&self.producer, topic, offline_after) == Some(true)
                && shared.state() == State::Offline
            {
                shared
                    .signals
                    .all_brokers_down
                    .store(false, Ordering::Relaxed);
                self.recover();
            }
        }
        let silent = if idle {
            self.link.silent_for() >= offline_after
        } else {
            self.last_progress.elapsed() >= offline_after
        };
        let down = shared.signals.all_brokers_down.load(Ordering::Relaxed);
        let state = shared.state();
        if (silent || down) && state != State::Offline && state != State::Draining {
            tracing::warn!(
                in_flight = self.in_flight.len(),
                "Kafka unreachable; records stay in the outbox"
            );
            shared.set_state(State::Offline);
        }
    }

    fn next_wake(&mut self) -> Duration {
        let mut wake = Duration::from_millis(100);
        if !self.delivered.is_empty() {
            let ack_in = match self.ack_retry_at {
                Some(at) => at.saturating_duration_since(Instant::now()),
                None => Duration::from_millis(10),
            };
            wake = wake.min(ack_in);
        }
        let room = self
            .kafka()
            .max_in_flight
            .saturating_sub(self.in_flight.len())
            .min(self.kafka().read_batch);
        if let Some(b) = &self.backlog
            && room > 0
        {
            // A full window wakes on its deliveries instead.
            wake = wake.min(
                b.bucket
                    .wait_for(b.bucket.batch(room))
                    .max(Duration::from_millis(1)),
            );
        }
        if let Some(r) = &self.rewind {
            wake = wake.min(r.at.saturating_duration_since(Instant::now()));
        }
        wake
    }

    /// Shutdown: no more reading; give in-flight records `drain_timeout`, delete what was
    /// delivered.
    async fn drain(&mut self) -> Result<(), ForwarderError> {
        self.fw.shared.set_state(State::Draining);
        let deadline = tokio::time::Instant::now() + self.fw.options.drain_timeout;
        while !self.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, self.in_flight.next()).await {
                Ok(Some(settled)) => self.settle(settled),
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        in_flight = self.in_flight.len(),
                        "Shutdown: records still in flight stay in the outbox"
                    );
                    break;
                }
            }
        }
        if let Some(acking) = self.acking.take() {
            let done = acking.await;
            self.acked(done);
        }
        self.start_ack(true);
        if let Some(acking) = self.acking.take() {
            let done = acking.await;
            self.acked(done);
        }
        self.fw.shared.set_state(State::Stopped);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers as _;

    /// A topic without a recent acknowledgement holds at most its cap; one that flows may use
    /// the whole window; a closed topic is read again once it flows or has room.
    #[test]
    fn the_topic_window_caps_only_topics_that_do_not_flow() {
        let mut w = TopicWindow::new(2);
        let (a, open) = w.admit("a");
        assert!(open);
        w.produced(a);
        w.produced(a);
        assert!(!w.admit("a").1, "at its cap, nothing delivered yet");
        w.skipped(a, Some(7));
        let (b, open) = w.admit("b");
        assert!(open && b != a, "another topic is not held up");
        w.produced(a);
        w.settled(a, true);
        assert_eq!(w.rescan(), Some((Some(7), false)), "a delivery reopens it");
        assert_eq!(w.rescan(), None);
        assert!(w.admit("a").1, "flowing: over its cap");
        let mut stuck = TopicWindow::new(4);
        let (s, _) = stuck.admit("s");
        for _ in 0..4 {
            stuck.produced(s);
        }
        stuck.skipped(s, None);
        stuck.settled(s, false);
        assert_eq!(stuck.rescan(), None, "3 of 4 still in flight");
        stuck.settled(s, false);
        assert_eq!(
            stuck.rescan(),
            Some((None, true)),
            "half its cap: room again"
        );
    }

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
