//! The at-least-once forwarder as a state machine: outbox → [`Sink`] → delete.
//!
//! # Phases
//!
//! The pump is in exactly one [`Phase`]; the phase decides what it may do (read and produce, or
//! wait for in-flight records to settle) and which state the status shows. Every change of
//! phase goes through [`Pump::enter`].
//!
//! ```text
//!              ┌──── backlog drained ────┐
//!   plan ──> Backfill ──────────────────> Live
//!     ▲        │  │                        │  │
//!     │        │  └─ silent / brokers down ┼──┴─> Offline ──first ack or probe──┐
//!     │        └──── failed delivery ──────┴───────┬─────────failed delivery     │
//!     │                                            ▼                             ▼
//!     └──── in flight settled, backoff over ── Rewinding <───────────────────────┘
//!
//!   any ──stop──> Draining ──in flight settled or drain_timeout──> Stopped
//! ```
//!
//! * **Live** and **Backfill** ([`Phase::produces`]): the cursors ([`Cursors`]) read the outbox
//!   and produce into the window (`max_in_flight`). Live: one cursor in sequence order, woken
//!   by the outbox's commit watch. Backfill: records below `live_from` (the sequence at the
//!   moment of the plan) are the backlog; a second cursor drains it at most `backlog_rate`
//!   records per second, in batches (one read per 50 ms of rate), while the live cursor keeps
//!   forwarding; with `order = "per_device"` the live cursor skips devices that have a backlog
//!   and rescans from `live_from` once it is drained.
//! * **Offline**: no sign of Kafka for `offline_after` — records in flight and none
//!   acknowledged, or nothing in flight and no answer to the [`IdleProbe`] — or librdkafka
//!   reports every broker down. The cursors still fill the window: what the client holds goes
//!   out the moment a broker answers (librdkafka never expires it, see [`super::client`]); the
//!   rest waits in the outbox. The first acknowledgement or successful probe ends it, once: the
//!   recovery is logged and the last error cleared, and the pump rewinds to plan again with live
//!   records first.
//! * **Rewinding**: nothing is produced until every in-flight record has settled and the
//!   backoff has passed; then the pump plans again from the outbox, which holds exactly the
//!   undelivered records, so a device's records are produced again in receive order. Entered on
//!   a failed delivery (an outage, or an error not known to be permanent: the backoff doubles
//!   per rewind up to `reconnect_backoff_max` and resets on a delivery; a fatal error also
//!   recreates the sink), at the end of an outage, and when dead letters are put back into the
//!   outbox (they are below the cursors). The state shown stays what it was ([`Link`]).
//! * **Draining**: on shutdown nothing is read; in-flight records get `drain_timeout`.
//!   Unacknowledged ones stay in the outbox and are sent again after the restart.
//!
//! The deleting side is its own small machine ([`Deleter`]): delivered sequences are deleted in
//! groups, one delete at a time; while a delete fails (a full disk) — and while a window's worth
//! of delivered records waits for one — nothing is produced, whatever the phase.
//!
//! # Invariants
//!
//! * A record is deleted from the outbox only after its delivery report succeeded (or a drop /
//!   sample rule decided not to forward it).
//! * `unsettled` holds every sequence that was produced (or dropped) and is not yet deleted. Any
//!   cursor may read a record again (after a rescan or a new plan); a record whose sequence is
//!   unsettled is skipped, so a record is never in flight twice.
//! * A record Kafka refuses for good ([`poison`]) is moved aside — to the dead-letter topic or
//!   the outbox's dead-letter table — without a rewind; it stays unsettled until it is.
//! * A topic without a recent acknowledgement holds at most its share of the window
//!   ([`TopicWindow`]).
//! * The pump never waits inside a produce: a record the client has no room for (its queue is
//!   full) is skipped and read again after the next delivery report, so `stop`, the link watch
//!   and deletes keep working while a broker is gone.
//!
//! The unit tests ([`tests`]) drive every transition against a fake sink that acks, fails,
//! hangs or refuses each record as the test says.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outpost_config::{BacklogOrder, KafkaConfig, RuleKey};
use outpost_pacing::{Backoff, TokenBucket};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::probe::IdleProbe;
use super::sink::{Outgoing, Refused, Report, Reports, Sink};
use super::window::{TopicId, TopicWindow};
use super::{
    Forwarder, ForwarderError, State, cloudevents, dead_letter_headers, metrics, poison, rules,
    with_reader,
};
use crate::envelope::StoredRecord;
use crate::outbox::{AckError, DeadLetterCause, Outbox, OutboxReader, ReadPosition, now_unix_ms};

#[cfg(test)]
mod tests;

/// Makes the sink: once at the start, again after a fatal error.
pub(super) type MakeSink = Box<dyn Fn() -> Result<Arc<dyn Sink>, ForwarderError> + Send + Sync>;

/// What the pump may do next (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Live,
    Backfill,
    Offline,
    Rewinding(Rewind),
    Draining,
    Stopped,
}

impl Phase {
    /// The state the status and the metrics show.
    fn shown(self) -> State {
        match self {
            Phase::Live => State::Live,
            Phase::Backfill => State::Backfill,
            Phase::Offline => State::Offline,
            Phase::Rewinding(r) => match r.link {
                Link::Up(state) => state,
                Link::Down | Link::Back => State::Offline,
            },
            Phase::Draining => State::Draining,
            Phase::Stopped => State::Stopped,
        }
    }

    /// Whether the cursors may read and produce.
    fn produces(self) -> bool {
        matches!(self, Phase::Live | Phase::Backfill | Phase::Offline)
    }
}

/// A rewind in progress: plan again once nothing is in flight and `at` has passed.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rewind {
    at: Instant,
    /// A fatal error: make a new sink before planning.
    recreate: bool,
    link: Link,
}

/// What a rewinding pump knows of Kafka, for the state it shows meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Reachable (a failed delivery, or dead letters put back, started the rewind): the state
    /// shown stays `Live` / `Backfill`.
    Up(State),
    /// Unreachable: `Offline`.
    Down,
    /// Reachable again after an outage, announced once: still `Offline` until the plan.
    Back,
}

/// A produced record awaiting its delivery report, under the token it was sent with.
struct InFlight {
    seq: u64,
    received_at_ms: i64,
    /// The Kafka topic it went to (for the per-topic window).
    topic: TopicId,
    /// Set when this was the record's dead letter, produced to the dead-letter topic.
    dead: Option<Box<DeadLetterCause>>,
}

/// The clock, read once per batch of delivery reports.
#[derive(Clone, Copy)]
struct Now {
    instant: Instant,
    unix_ms: i64,
}

impl Now {
    fn read() -> Self {
        Self {
            instant: Instant::now(),
            unix_ms: now_unix_ms(),
        }
    }
}

/// Where the cursors are. Rebuilt by every plan.
#[derive(Debug, Default)]
struct Cursors {
    /// The live cursor: every record with a sequence up to this was looked at.
    live_after: u64,
    /// The backlog cursor: `Some` from a plan that found a backlog until it is drained (in
    /// `Backfill` always; in `Offline` it may be either).
    backlog: Option<Backlog>,
}

#[derive(Debug)]
struct Backlog {
    pos: ReadPosition,
    /// Records below this sequence are the backlog (`live_from`).
    below: u64,
    /// `per_device`: devices whose live records wait for the backlog.
    gated: HashSet<String>,
    bucket: BacklogRate,
}

/// Records per second for the backlog, with a burst of 50 ms (also the batch it is read in).
#[derive(Debug)]
struct BacklogRate {
    bucket: TokenBucket,
}

impl BacklogRate {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            bucket: TokenBucket::new(rate, rate / 20.0, Instant::now()),
        }
    }

    /// Whole tokens now.
    fn available(&mut self) -> usize {
        self.bucket.refill(Instant::now());
        self.bucket.tokens().max(0.0).floor() as usize
    }

    fn spend(&mut self, n: usize) {
        self.bucket.spend(n as f64);
    }

    /// The batch to wait for: a full bucket, or `limit` if smaller (never 0 unless `limit` is).
    fn batch(&self, limit: usize) -> usize {
        (self.bucket.capacity() as usize).max(1).min(limit)
    }

    /// How long until `n` tokens are available.
    fn wait_for(&self, n: usize) -> Duration {
        self.bucket.wait_for(n as f64)
    }
}

/// The sequences a delete removed, and its outcome.
type AckResult = (Vec<u64>, Result<u64, AckError>);
type AckDone = Result<AckResult, tokio::task::JoinError>;

/// How long after a failed delete of delivered records the forwarder tries again.
const ACK_RETRY: Duration = Duration::from_millis(500);

/// Delivered records waiting to be deleted from the outbox, and the delete in progress.
struct Deleter {
    delivered: Vec<u64>,
    state: Deleting,
    last: Instant,
}

enum Deleting {
    Idle,
    /// A delete runs; `retry`: it retries after a failure (producing still waits for it).
    Running {
        task: JoinHandle<AckResult>,
        retry: bool,
    },
    /// The last delete failed (a full disk, an I/O error): try again at `retry_at`.
    Failing {
        retry_at: Instant,
    },
}

impl Deleter {
    fn new() -> Self {
        Self {
            delivered: Vec::new(),
            state: Deleting::Idle,
            last: Instant::now(),
        }
    }

    /// Whether producing must wait for deletes. While they fail, producing more would only grow
    /// what Kafka has and the outbox still holds — memory here, duplicates after a restart. And
    /// a window's worth of delivered records waits for its delete first, so what Kafka has and
    /// the outbox still holds stays within two windows even before a failing delete is noticed.
    fn holds(&self, window: usize) -> bool {
        matches!(
            self.state,
            Deleting::Failing { .. } | Deleting::Running { retry: true, .. }
        ) || self.delivered.len() >= window
    }

    fn running(&self) -> bool {
        matches!(self.state, Deleting::Running { .. })
    }

    /// Starts a grouped delete when one is due: 4,096 records waiting, nothing in flight
    /// (`idle`), 10 ms since the last, or `force`; after a failure not before its retry time.
    fn start(&mut self, outbox: &Outbox, force: bool, idle: bool) {
        let retry = match self.state {
            Deleting::Running { .. } => return,
            Deleting::Failing { retry_at } if !force && Instant::now() < retry_at => return,
            Deleting::Failing { .. } => true,
            Deleting::Idle => false,
        };
        if self.delivered.is_empty() {
            return;
        }
        let due = force
            || self.delivered.len() >= 4096
            || idle
            || self.last.elapsed() >= Duration::from_millis(10);
        if !due {
            return;
        }
        let seqs = std::mem::take(&mut self.delivered);
        let outbox = outbox.clone();
        self.last = Instant::now();
        let task = tokio::spawn(async move {
            let result = outbox.ack(seqs.clone()).await;
            (seqs, result)
        });
        self.state = Deleting::Running { task, retry };
    }

    /// The running delete's outcome (pending while none runs).
    async fn join(&mut self) -> AckDone {
        match &mut self.state {
            Deleting::Running { task, .. } => task.await,
            _ => std::future::pending().await,
        }
    }

    /// A delete finished: the sequences it removed from the outbox.
    fn finished(&mut self, done: AckDone, signals: &super::LinkSignals) -> Vec<u64> {
        let retry = matches!(self.state, Deleting::Running { retry: true, .. });
        self.state = Deleting::Idle;
        match done {
            Ok((seqs, Ok(_))) => {
                if retry {
                    tracing::info!("Deleting delivered records works again; forwarding resumes");
                    signals.clear_error();
                }
                seqs
            }
            Ok((seqs, Err(e))) => {
                // Still in the outbox: try again in a moment. Kafka has them; a restart before
                // that succeeds sends them again (at-least-once).
                if !retry {
                    tracing::warn!(error = %e, "Deleting delivered records failed; forwarding pauses until it works again");
                }
                signals.set_error(format!("deleting delivered records: {e}"));
                self.state = Deleting::Failing {
                    retry_at: Instant::now() + ACK_RETRY,
                };
                self.delivered.extend(seqs);
                Vec::new()
            }
            Err(e) => {
                tracing::error!(error = %e, "Ack task failed");
                Vec::new()
            }
        }
    }

    /// When the next delete is due, if any records wait.
    fn due_in(&self) -> Option<Duration> {
        if self.delivered.is_empty() {
            return None;
        }
        Some(match self.state {
            Deleting::Failing { retry_at } => retry_at.saturating_duration_since(Instant::now()),
            _ => Duration::from_millis(10),
        })
    }
}

enum Wake {
    Deleted(AckDone),
    /// Dead letters were put back: plan again (they are below the cursors).
    Revived,
    Other,
}

/// The client's queue had no room for a record; it gives back the dead-letter cause it was
/// produced with, if any.
struct ClientFull(Option<Box<DeadLetterCause>>);

/// A record found poison, waiting to be moved aside (its sequence stays unsettled meanwhile).
#[derive(Debug)]
struct Poisoned {
    seq: u64,
    cause: DeadLetterCause,
    /// The dead-letter topic refused it too (or there is none): the local table.
    local: bool,
}

pub(super) struct Pump {
    fw: Forwarder,
    make_sink: MakeSink,
    sink: Arc<dyn Sink>,
    /// The sink's delivery reports, and the list they are taken into (kept to reuse it).
    reports: Arc<Reports>,
    taken: Vec<Report>,
    reader: Option<OutboxReader>,
    committed: watch::Receiver<u64>,
    /// Dead letters put back into the outbox (below the cursors): plan again.
    revived: watch::Receiver<u64>,
    phase: Phase,
    cursors: Cursors,
    /// Records the sink holds, by token; tokens count up (wrapping), so a report of a sink that
    /// was replaced can never settle a record of the new one.
    in_flight: HashMap<usize, InFlight>,
    next_token: usize,
    unsettled: HashSet<u64>,
    deleter: Deleter,
    /// The rewinds' backoff: doubles per rewind, reset by a delivery.
    failure_backoff: Backoff,
    /// The last acknowledgement, or when the window last started filling from empty.
    last_progress: Instant,
    /// Whether Kafka answers while nothing is in flight.
    link: IdleProbe,
    attempts: poison::Attempts,
    poisoned: Vec<Poisoned>,
    topics: TopicWindow,
    /// The client refused a record for a full queue: nothing is produced until a delivery report
    /// frees room; then the skipped records are read again (a [`TopicWindow`] rescan).
    client_full: bool,
}

impl Pump {
    pub(super) fn new(fw: Forwarder, make_sink: MakeSink) -> Result<Self, ForwarderError> {
        let sink = make_sink()?;
        let reports = sink.reports();
        let reader = Some(fw.reader()?);
        let committed = fw.outbox.committed();
        let revived = fw.outbox.revived();
        let failure_backoff = Backoff::new(
            fw.options.kafka.reconnect_backoff_min,
            fw.options.kafka.reconnect_backoff_max,
        );
        let topics = TopicWindow::new(fw.options.kafka.topic_in_flight_cap());
        Ok(Self {
            fw,
            make_sink,
            sink,
            reports,
            taken: Vec::new(),
            reader,
            committed,
            revived,
            phase: Phase::Stopped,
            cursors: Cursors::default(),
            in_flight: HashMap::new(),
            next_token: 0,
            unsettled: HashSet::new(),
            deleter: Deleter::new(),
            failure_backoff,
            last_progress: Instant::now(),
            link: IdleProbe::new(),
            attempts: poison::Attempts::default(),
            poisoned: Vec::new(),
            topics,
            client_full: false,
        })
    }

    fn kafka(&self) -> &KafkaConfig {
        &self.fw.options.kafka
    }

    /// The only place the phase changes; the status follows it.
    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        self.fw.shared.set_state(phase.shown());
    }

    pub(super) async fn run(&mut self, stop: CancellationToken) -> Result<(), ForwarderError> {
        self.plan().await?;
        loop {
            self.publish_gauges();
            self.reap_ready();
            self.deleter
                .start(&self.fw.outbox, false, self.in_flight.is_empty());
            self.watch_link();
            if stop.is_cancelled() {
                return self.drain().await;
            }
            if let Phase::Rewinding(rewind) = self.phase
                && self.in_flight.is_empty()
                && !self.deleter.running()
                && Instant::now() >= rewind.at
            {
                if rewind.recreate {
                    tracing::warn!("Recreating the Kafka producer after a fatal error");
                    self.sink = (self.make_sink)()?;
                    self.reports = self.sink.reports();
                    self.fw.shared.metrics.producer_restarts.inc();
                }
                self.plan().await?;
                continue;
            }
            if !self.poisoned.is_empty() {
                self.move_aside().await?;
            }
            if self.fill().await? {
                tokio::task::yield_now().await;
                continue;
            }
            let wake = self.next_wake();
            match self.wait(&stop, wake).await {
                Wake::Deleted(done) => self.deleted(done),
                Wake::Revived => {
                    self.revived.mark_unchanged();
                    self.rewind(Instant::now(), false);
                }
                Wake::Other => {}
            }
        }
    }

    fn publish_gauges(&self) {
        let (held, _, _) = self.fw.outbox.figures();
        let shared = &self.fw.shared;
        shared.metrics.backlog_records.set(held as i64);
        let in_flight = self.in_flight.len();
        shared.in_flight.store(in_flight as u64, Ordering::Relaxed);
        shared.metrics.in_flight.set(in_flight as i64);
    }

    /// Waits for delivery reports, a finished delete, a commit, `stop` or `wake`. Reports are
    /// taken at the top of the loop ([`Self::reap_ready`]).
    async fn wait(&mut self, stop: &CancellationToken, wake: Duration) -> Wake {
        let reports = Arc::clone(&self.reports);
        let deleter = &mut self.deleter;
        let committed = &mut self.committed;
        let revived = &mut self.revived;
        tokio::select! {
            () = stop.cancelled() => Wake::Other,
            () = reports.arrived(), if !self.in_flight.is_empty() => Wake::Other,
            done = deleter.join() => Wake::Deleted(done),
            _ = committed.changed() => Wake::Other,
            _ = revived.changed() => Wake::Revived,
            () = tokio::time::sleep(wake) => Wake::Other,
        }
    }

    /// Decides `live_from` and the backlog from what the outbox holds now: Backfill if records
    /// below it wait (that are not in flight), else Live.
    async fn plan(&mut self) -> Result<(), ForwarderError> {
        self.topics.reset();
        self.client_full = false;
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
        self.cursors.live_after = next.saturating_sub(1);
        if below > unsettled_below {
            tracing::info!(
                backlog = below - unsettled_below,
                live_from = next,
                gated_devices = gated.len(),
                "Forwarding a backlog; live records first"
            );
            self.cursors.backlog = Some(Backlog {
                pos: ReadPosition::START,
                below: next,
                gated,
                bucket: BacklogRate::new(self.kafka().backlog_rate),
            });
            self.enter(Phase::Backfill);
        } else {
            self.cursors.backlog = None;
            self.enter(Phase::Live);
        }
        Ok(())
    }

    fn room(&self) -> usize {
        self.kafka()
            .max_in_flight
            .saturating_sub(self.in_flight.len())
    }

    /// Produces what the window has room for. True if it read anything (call again at once).
    async fn fill(&mut self) -> Result<bool, ForwarderError> {
        if !self.phase.produces()
            || self.client_full
            || self.deleter.holds(self.kafka().max_in_flight)
        {
            return Ok(false);
        }
        let room = self.room();
        if room == 0 {
            return Ok(false);
        }
        if let Some((live_from, backlog)) = self.topics.rescan() {
            if let Some(from) = live_from {
                self.cursors.live_after = self.cursors.live_after.min(from.saturating_sub(1));
            }
            if backlog && let Some(b) = self.cursors.backlog.as_mut() {
                b.pos = ReadPosition::START;
            }
        }
        let batch = room.min(self.kafka().read_batch);
        let after = self.cursors.live_after;
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
            self.cursors.live_after = record.seq;
            let gated = self
                .cursors
                .backlog
                .as_ref()
                .is_some_and(|b| b.gated.contains(&record.device_id));
            if !gated {
                self.send(record, true);
                if !self.phase.produces() || self.client_full {
                    return Ok(false);
                }
            }
        }
        let room = self.room();
        let read_batch = self.kafka().read_batch;
        let Some(backlog) = self.cursors.backlog.as_mut() else {
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
                // Records of a closed topic were skipped: not drained until they went. Count
                // the read as a batch, so the cursor looks again after a bucket's time (the
                // topic's rescan restarts it sooner), not at every wake-up.
                if let Some(b) = self.cursors.backlog.as_mut() {
                    b.bucket.spend(tokens);
                }
                return Ok(progressed);
            }
            self.backlog_drained();
            return Ok(true);
        }
        progressed = true;
        if let Some(b) = self.cursors.backlog.as_mut() {
            b.pos = next;
            b.bucket.spend(page.len());
        }
        for record in page {
            self.send(record, false);
            if !self.phase.produces() || self.client_full {
                return Ok(false);
            }
        }
        Ok(progressed)
    }

    /// Every backlog record was produced. Devices held back for order get their live records
    /// now: rescan from `live_from` (everything already produced is unsettled and skipped).
    fn backlog_drained(&mut self) {
        let Some(done) = self.cursors.backlog.take() else {
            return;
        };
        if !done.gated.is_empty() {
            self.cursors.live_after = done.below.saturating_sub(1);
        }
        tracing::info!("Backlog drained");
        if self.phase == Phase::Backfill {
            self.enter(Phase::Live);
        }
    }

    /// Hands one record to the sink (or drops it per the rules). `live`: read by the live
    /// cursor (else the backlog's), for a rescan should its topic's window be full.
    fn send(&mut self, record: StoredRecord, live: bool) {
        if self.unsettled.contains(&record.seq) {
            return;
        }
        let rules = self.fw.rules.load();
        let decision = rules.decide(
            &rules::RecordView {
                device_id: &record.device_id,
                source: record.source,
                topic: &record.topic,
                seq: record.seq,
            },
            self.fw.tags.as_ref(),
        );
        let (topic, key, cloudevents) = match decision {
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
                self.deleter.delivered.push(record.seq);
                return;
            }
            rules::Decision::Forward {
                topic,
                key,
                cloudevents,
            } => (topic, key, cloudevents),
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
        let (gateway_id, outbox_id) = (&self.fw.options.gateway_id, self.fw.outbox.id());
        let (headers, payload) = cloudevents::encode(&record, gateway_id, outbox_id, cloudevents);
        if self
            .produce(&record, &payload, topic, key, headers, None)
            .is_err()
        {
            // Read it again once the client has room (see `client_full`).
            self.topics.skipped(topic, live.then_some(record.seq));
        }
    }

    /// Produces `record` to `topic` (its own, or the dead-letter topic with `dead`). A record
    /// refused outright is handled like a failed delivery; one the client has no room for comes
    /// back as [`ClientFull`] (nothing changed; see `client_full`).
    fn produce(
        &mut self,
        record: &StoredRecord,
        payload: &[u8],
        topic: TopicId,
        key: Option<&str>,
        headers: OwnedHeaders,
        dead: Option<Box<DeadLetterCause>>,
    ) -> Result<(), ClientFull> {
        if self.in_flight.is_empty() {
            self.last_progress = Instant::now();
        }
        let name = self.topics.name(topic);
        let outgoing = Outgoing {
            topic: &name,
            key,
            payload,
            headers,
            timestamp_ms: record.received_at_ms,
        };
        let token = self.next_token;
        let error = match self.sink.send(outgoing, token) {
            Ok(()) => {
                self.next_token = token.wrapping_add(1);
                let (seq, received_at_ms) = (record.seq, record.received_at_ms);
                self.unsettled.insert(seq);
                self.topics.produced(topic);
                self.in_flight.insert(
                    token,
                    InFlight {
                        seq,
                        received_at_ms,
                        topic,
                        dead,
                    },
                );
                self.fw.shared.metrics.produced.inc();
                self.fw.shared.count(&self.fw.shared.produced, 1);
                return Ok(());
            }
            Err(Refused::QueueFull(_)) if !self.in_flight.is_empty() => {
                // The client's queue is full (`queue.buffering.max.kbytes`): nothing more until
                // a delivery report frees room. Not waited for here: the pump keeps answering
                // `stop`, watching the link and deleting meanwhile.
                self.client_full = true;
                return Err(ClientFull(dead));
            }
            // Full with nothing in flight to free it: the client is stuck, an outage.
            Err(Refused::QueueFull(_)) => {
                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
            }
            Err(Refused::Error(error)) => error,
        };
        // Refused before it was queued (too large for the client, …): a failed delivery,
        // classified like one.
        self.unsettled.insert(record.seq);
        self.failed(record.seq, topic, dead, &error);
        Ok(())
    }

    /// Settles every delivery report that arrived, without waiting; the clock is read once for
    /// the batch.
    fn reap_ready(&mut self) {
        let mut taken = std::mem::take(&mut self.taken);
        self.reports.take(&mut taken);
        if !taken.is_empty() {
            let now = Now::read();
            for (token, result) in taken.drain(..) {
                // None: a report of a sink that was replaced (its records settled already).
                if let Some(record) = self.in_flight.remove(&token) {
                    self.settle(record, result, now);
                }
            }
        }
        self.taken = taken;
    }

    fn settle(&mut self, settled: InFlight, result: Result<(), KafkaError>, now: Now) {
        self.topics.settled(settled.topic, result.is_ok());
        if std::mem::take(&mut self.client_full) {
            // Room again: read what was skipped while the client was full.
            self.topics.rescan_due();
        }
        let shared = Arc::clone(&self.fw.shared);
        match result {
            Ok(()) => {
                self.deleter.delivered.push(settled.seq);
                self.attempts.forget(settled.seq);
                if let Some(cause) = settled.dead {
                    // Kafka has its dead letter: the record leaves the outbox like a delivered
                    // one.
                    shared.count_poison(cause.reason, "topic");
                    tracing::warn!(
                        seq = settled.seq,
                        reason = cause.reason,
                        error = %cause.error,
                        "Poison record moved to the dead-letter topic"
                    );
                } else {
                    shared.metrics.delivered.inc();
                    shared.count(&shared.delivered, 1);
                    let age = (now.unix_ms - settled.received_at_ms).max(0) as f64 / 1000.0;
                    shared.metrics.delivery_latency.observe(age);
                }
                self.last_progress = now.instant;
                self.link.contact_at(now.instant);
                self.failure_backoff.reset();
                shared
                    .signals
                    .all_brokers_down
                    .store(false, Ordering::Relaxed);
                self.recover();
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
        if self.client_full {
            return Ok(());
        }
        let mut pending = std::mem::take(&mut self.poisoned).into_iter();
        while let Some(poisoned) = pending.next() {
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
                // A dead letter goes as it was stored, with Outpost's headers only.
                let produced = self.produce(
                    &record,
                    &record.payload,
                    dead_topic,
                    Some(&key),
                    headers,
                    Some(Box::new(cause)),
                );
                if let Err(ClientFull(Some(cause))) = produced {
                    // Tried again once the client has room.
                    self.poisoned.push(Poisoned {
                        seq,
                        cause: *cause,
                        local,
                    });
                    self.poisoned.extend(pending);
                    return Ok(());
                }
                continue;
            }
            match self.fw.outbox.dead_letter(seq, cause.clone()).await {
                Ok(_) => {
                    self.unsettled.remove(&seq);
                    self.attempts.forget(seq);
                    self.fw.shared.buried(seq, &cause);
                }
                Err(e) => {
                    // This one and the rest stay poisoned (and unsettled): tried again next turn.
                    tracing::warn!(error = %e, seq, "Moving a poison record aside failed; retrying");
                    self.poisoned.push(Poisoned { seq, cause, local });
                    self.poisoned.extend(pending);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// A sign of Kafka (an acknowledgement, a successful probe). Ends an outage, once: the
    /// recovery is announced, the outage's error cleared, and the pump rewinds to plan again
    /// (live records first). The state stays Offline until that plan, while the rest of the
    /// in-flight records settle.
    fn recover(&mut self) {
        let rewind = match self.phase {
            Phase::Offline => Rewind {
                at: Instant::now(),
                recreate: false,
                link: Link::Back,
            },
            Phase::Rewinding(r) if r.link == Link::Down => Rewind {
                link: Link::Back,
                ..r
            },
            _ => return,
        };
        tracing::info!("Kafka is reachable again");
        self.fw.shared.signals.clear_error();
        self.enter(Phase::Rewinding(rewind));
    }

    /// Stops producing and plans again at `at` once in-flight records settled (or widens the
    /// rewind in progress).
    fn rewind(&mut self, at: Instant, recreate: bool) {
        let rewind = match self.phase {
            Phase::Live | Phase::Backfill => Rewind {
                at,
                recreate,
                link: Link::Up(self.phase.shown()),
            },
            Phase::Offline => Rewind {
                at,
                recreate,
                link: Link::Down,
            },
            Phase::Rewinding(r) => Rewind {
                recreate: r.recreate || recreate,
                ..r
            },
            // Shutting down: what did not go stays in the outbox.
            Phase::Draining | Phase::Stopped => return,
        };
        self.enter(Phase::Rewinding(rewind));
    }

    /// A produce or a delivery failed for a reason that is not the record's: rewind after the
    /// backoff (which doubles per rewind), recreating the sink after a fatal error.
    fn fail(&mut self, error: &KafkaError) {
        let fatal =
            error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) || self.sink.is_fatal();
        self.fw.shared.signals.set_error(error.to_string());
        if fatal {
            // Nothing more will be delivered by this sink: fail what it holds now.
            self.sink.purge();
        }
        let mut at = Instant::now();
        if self.phase.produces() {
            tracing::warn!(%error, fatal, "Kafka delivery failed; sending again from the outbox");
            at += self.failure_backoff.failed();
        }
        self.rewind(at, fatal);
    }

    fn deleted(&mut self, done: AckDone) {
        for seq in self.deleter.finished(done, &self.fw.shared.signals) {
            self.unsettled.remove(&seq);
        }
    }

    /// Offline detection. Without any sign of Kafka for `offline_after` — no acknowledgement of
    /// what is in flight or, with nothing in flight, no successful [`IdleProbe`] — or with
    /// every broker down, Kafka is unreachable, whether or not records are waiting.
    fn watch_link(&mut self) {
        let shared = Arc::clone(&self.fw.shared);
        let offline_after = self.kafka().offline_after;
        let idle = self.in_flight.is_empty();
        // With records in flight their acknowledgements are the sign of life. When none came
        // for half of `offline_after` the probe asks too: a partition without a leader holds
        // its records while every broker answers, and that is not an outage (Offline would
        // end in a rewind that waits for the stuck records, holding every other topic).
        let stale = !idle && self.last_progress.elapsed() >= offline_after / 2;
        if idle || stale {
            let topic = &self.fw.options.kafka.default_topic;
            // A probe that answers ends an idle outage (with records in flight, their first
            // acknowledgement does); while Kafka is reachable it must not clear an "all brokers
            // down" that librdkafka reported after the probe was sent.
            if self.link.poll(&self.sink, topic, offline_after) == Some(true)
                && idle
                && self.phase.shown() == State::Offline
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
            self.last_progress.elapsed() >= offline_after && self.link.silent_for() >= offline_after
        };
        let down = shared.signals.all_brokers_down.load(Ordering::Relaxed);
        if !(silent || down) {
            return;
        }
        let phase = match self.phase {
            Phase::Live | Phase::Backfill => Phase::Offline,
            Phase::Rewinding(r) if matches!(r.link, Link::Up(_)) => Phase::Rewinding(Rewind {
                link: Link::Down,
                ..r
            }),
            _ => return,
        };
        tracing::warn!(
            in_flight = self.in_flight.len(),
            "Kafka unreachable; records stay in the outbox"
        );
        self.enter(phase);
    }

    fn next_wake(&mut self) -> Duration {
        let mut wake = Duration::from_millis(100);
        if let Some(delete_in) = self.deleter.due_in() {
            wake = wake.min(delete_in);
        }
        let room = self.room().min(self.kafka().read_batch);
        if self.phase.produces()
            && !self.deleter.holds(self.kafka().max_in_flight)
            && let Some(b) = &self.cursors.backlog
            && room > 0
        {
            // A full window wakes on its deliveries instead.
            wake = wake.min(
                b.bucket
                    .wait_for(b.bucket.batch(room))
                    .max(Duration::from_millis(1)),
            );
        }
        // A rewind whose backoff is over waits for its in-flight records (their reports wake
        // the pump), not for the clock: a zero wake here would spin for a whole outage.
        if let Phase::Rewinding(r) = self.phase
            && let Some(left) = r.at.checked_duration_since(Instant::now())
            && !left.is_zero()
        {
            wake = wake.min(left);
        }
        wake
    }

    /// Shutdown: no more reading; give in-flight records `drain_timeout`, delete what was
    /// delivered.
    async fn drain(&mut self) -> Result<(), ForwarderError> {
        self.enter(Phase::Draining);
        let deadline = tokio::time::Instant::now() + self.fw.options.drain_timeout;
        loop {
            self.reap_ready();
            if self.in_flight.is_empty() {
                break;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                tracing::warn!(
                    in_flight = self.in_flight.len(),
                    "Shutdown: records still in flight stay in the outbox"
                );
                break;
            }
            // Woken by the next batch of reports; the list is also looked at every 100 ms, so
            // no wake-up can be missed for longer than that.
            let reports = Arc::clone(&self.reports);
            let slice = (deadline - now).min(Duration::from_millis(100));
            let _ = tokio::time::timeout(slice, reports.arrived()).await;
        }
        for force in [false, true] {
            if force {
                self.deleter.start(&self.fw.outbox, true, true);
            }
            if self.deleter.running() {
                let done = self.deleter.join().await;
                self.deleted(done);
            }
        }
        self.enter(Phase::Stopped);
        Ok(())
    }
}
