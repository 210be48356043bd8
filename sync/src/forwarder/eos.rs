//! Exactly-once mode: one Kafka transaction per batch, with a checkpoint in the same
//! transaction.
//!
//! Each transaction carries a batch of outbox records plus one checkpoint record on
//! `kafka.checkpoint_topic` (compacted, keyed by gateway id) naming the batch's sequences. Only
//! after the commit are the records deleted from the outbox, and the next transaction begins only
//! after that deletion — so at most the last committed batch can still be in the outbox after a
//! crash. At start, the forwarder reads its last checkpoint (`read_committed`) and deletes those
//! sequences without producing them again. A transaction that fails before its commit is
//! requested is aborted: `read_committed` consumers never see its records, which are still in the
//! outbox and go in a later transaction. A failed commit is ambiguous (the broker may have applied
//! it and only the answer was lost), so it is treated like a restart: a new producer, then the
//! checkpoint read again. A new producer with the same `transactional.id` fences any zombie of a
//! previous process.
//!
//! Trade-offs (documented in `docs/KAFKA.md`): one batch in flight at a time (throughput is
//! bounded by the transaction round trip), no live-first during a backlog (records go in
//! priority and receive order), and librdkafka's message timeout cannot be infinite (a
//! transaction that cannot finish within it is aborted and retried from the outbox).

use std::time::Duration;

use outpost_config::RuleKey;
use outpost_pacing::Backoff;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::probe::IdleProbe;
use super::{
    Forwarder, ForwarderError, ForwarderOptions, Producer_, State, client, cloudevents,
    dead_letter_headers, metrics, poison, rules,
};
use crate::outbox::{DeadLetterCause, ReadPosition, now_unix_ms};

/// Poison records in exactly-once mode ([`poison`]): a transaction holding one is aborted, the
/// record moved aside, and the batch sent again at once without it — as its dead letter on the
/// dead-letter topic (committed with the checkpoint, so it too is there exactly once) or, with
/// no such topic or when that refuses it too, after moving it to the local dead-letter table.
#[derive(Debug, Default)]
struct Poison {
    attempts: poison::Attempts,
    /// Records whose next transaction carries their dead letter instead.
    dead: std::collections::HashMap<u64, DeadLetterCause>,
}

/// The checkpoint record's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub gateway: String,
    /// The outbox whose sequences these are ([`crate::Outbox::id`]); absent in checkpoints
    /// written before outboxes had ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox: Option<String>,
    /// Inclusive ranges of the outbox sequences committed in the transaction.
    pub seqs: Vec<(u64, u64)>,
    pub committed_at_ms: i64,
}

impl Checkpoint {
    /// The highest sequence the checkpoint names: of two checkpoints of one outbox, the one
    /// with the higher is the later (the forwarder commits in sequence order; wall clocks jump).
    pub fn last_seq(&self) -> u64 {
        self.seqs.iter().map(|&(_, last)| last).max().unwrap_or(0)
    }
}

fn ranges(mut seqs: Vec<u64>) -> Vec<(u64, u64)> {
    seqs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for seq in seqs {
        match out.last_mut() {
            Some((_, end)) if *end + 1 == seq => *end = seq,
            _ => out.push((seq, seq)),
        }
    }
    out
}

const TXN_TIMEOUT: Duration = Duration::from_secs(30);

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, KafkaError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(KafkaError::Canceled))
}

async fn new_producer(fw: &Forwarder) -> Result<Producer_, ForwarderError> {
    let id = format!("outpost-{}", fw.options.gateway_id);
    let producer = fw.producer(Some(&id))?;
    let p = producer.clone();
    blocking(move || p.init_transactions(TXN_TIMEOUT))
        .await
        .map_err(|e| ForwarderError::Producer(format!("init_transactions: {e}")))?;
    Ok(producer)
}

/// How many records before the end of a checkpoint partition the search for this gateway's last
/// checkpoint starts; each miss widens the window eightfold, down to the partition's start.
const FIRST_WINDOW: i64 = 256;

/// How long reading one window of a checkpoint partition may take before recovery gives up (and
/// is retried): a partial read could return an older checkpoint, and the records of the last
/// committed transaction would then be sent twice.
const WINDOW_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The last checkpoint this gateway committed for this outbox (`owns`), read with
/// `read_committed`.
///
/// The topic is compacted by key on a real broker, but compaction is lazy: until it runs, every
/// checkpoint ever written is there, one per transaction of every gateway sharing the topic. So
/// each partition is read backwards in growing windows from its end until one holds a checkpoint
/// of this gateway and outbox; the latest of those (by sequence, should the key have moved
/// partitions: wall clocks jump) is the answer. Checkpoints of another outbox of the same gateway
/// (the file before a quarantine or a wiped data directory) are skipped: their sequences are not
/// this outbox's.
fn read_checkpoint(
    options: &ForwarderOptions,
    owns: impl Fn(&Checkpoint) -> bool,
) -> Result<Option<Checkpoint>, String> {
    let mut config = client::common_config(&options.kafka, &options.client_id)?;
    config
        .set(
            "group.id",
            format!("outpost-checkpoint-{}", options.gateway_id),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = config.create().map_err(|e| e.to_string())?;
    let topic = &options.kafka.checkpoint_topic;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut latest: Option<Checkpoint> = None;
    for partition in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let mut window = FIRST_WINDOW;
        loop {
            let start = high.saturating_sub(window).max(low);
            if start >= high {
                break;
            }
            if let Some(found) = last_in(&consumer, options, &owns, partition, start)? {
                if latest
                    .as_ref()
                    .is_none_or(|l| found.last_seq() > l.last_seq())
                {
                    latest = Some(found);
                }
                break;
            }
            if start == low {
                break;
            }
            window = window.saturating_mul(8);
        }
    }
    Ok(latest)
}

/// The last checkpoint of this gateway and outbox in `partition` of the checkpoint topic from offset
/// `start` to the partition's end (for `read_committed`, its last stable offset: an open
/// transaction's records are not readable yet, and an aborted one's never).
fn last_in(
    consumer: &BaseConsumer,
    options: &ForwarderOptions,
    owns: &impl Fn(&Checkpoint) -> bool,
    partition: i32,
    start: i64,
) -> Result<Option<Checkpoint>, String> {
    let topic = &options.kafka.checkpoint_topic;
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition, Offset::Offset(start))
        .map_err(|e| e.to_string())?;
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let mut last = None;
    let deadline = std::time::Instant::now() + WINDOW_READ_TIMEOUT;
    loop {
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "reading checkpoints from {topic} [{partition}] at offset {start} took longer than {WINDOW_READ_TIMEOUT:?}"
            ));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) if p == partition => return Ok(last),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(message)) => {
                if message.key() == Some(options.gateway_id.as_bytes())
                    && let Some(value) = message.payload()
                    && let Ok(checkpoint) = serde_json::from_slice::<Checkpoint>(value)
                    && owns(&checkpoint)
                {
                    last = Some(checkpoint);
                }
            }
        }
    }
}

pub(super) async fn run(fw: Forwarder, stop: CancellationToken) -> Result<(), ForwarderError> {
    let shared = std::sync::Arc::clone(&fw.shared);
    let kafka = fw.options.kafka.clone();
    let mut reader = Some(fw.reader()?);
    let mut committed = fw.outbox.committed();
    let mut backoff = Backoff::new(kafka.reconnect_backoff_min, kafka.reconnect_backoff_max);
    let mut producer: Option<Producer_> = None;
    let mut recovered = false;
    let mut link = IdleProbe::new();
    let mut poisoned = Poison::default();

    loop {
        if stop.is_cancelled() {
            shared.set_state(State::Stopped);
            return Ok(());
        }
        if producer.is_none() || !recovered {
            // `init_transactions` and the checkpoint read can take their full timeouts (30 s)
            // against an unreachable broker: the status says so after `offline_after`.
            let preparing = prepare(&fw, &mut producer, &mut recovered);
            tokio::pin!(preparing);
            let prepared = tokio::select! {
                r = &mut preparing => r,
                () = tokio::time::sleep(kafka.offline_after) => {
                    if shared.state() != State::Offline {
                        tracing::warn!("Kafka (exactly-once) not reachable yet; records stay in the outbox");
                        shared.set_state(State::Offline);
                    }
                    preparing.await
                }
            };
            match prepared {
                Ok(()) => link.contact(),
                Err(e) => {
                    tracing::warn!(error = %e, "Kafka (exactly-once) not ready; retrying");
                    shared.signals.set_error(e);
                    shared.set_state(State::Offline);
                    sleep_or_stop(&stop, &mut backoff).await;
                    continue;
                }
            }
        }
        let Some(p) = producer.clone() else {
            continue;
        };
        let batch = kafka.read_batch;
        let (page, _) = super::with_reader(&mut reader, move |r| {
            r.read_window(ReadPosition::START, 0..u64::MAX, batch, u64::MAX)
        })
        .await?;
        if page.is_empty() {
            // Nothing to send, so no commit tells whether Kafka is there: probe it.
            let offline_after = kafka.offline_after;
            let probe = std::sync::Arc::new(p.clone());
            if link.poll(&probe, &kafka.default_topic, offline_after) == Some(true)
                && shared.state() == State::Offline
            {
                tracing::info!("Kafka is reachable again");
                shared.signals.clear_error();
            }
            if link.silent_for() >= offline_after {
                if shared.state() != State::Offline {
                    tracing::warn!("Kafka unreachable; records stay in the outbox");
                    shared.set_state(State::Offline);
                }
            } else {
                shared.set_state(State::Live);
            }
            tokio::select! {
                () = stop.cancelled() => {}
                _ = committed.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            continue;
        }
        match transaction(&fw, &p, page, &mut poisoned).await {
            Ok(seqs) => {
                if debug_crash_after_commit() {
                    kill_this_process();
                }
                shared.metrics.transactions.inc();
                backoff.reset();
                link.contact();
                if shared.state() == State::Offline {
                    tracing::info!("Kafka is reachable again");
                    shared.signals.clear_error();
                }
                shared.set_state(State::Live);
                // The next transaction begins only after this deletion (see the module docs).
                while let Err(e) = fw.outbox.ack(seqs.clone()).await {
                    tracing::warn!(error = %e, "Deleting committed records failed; retrying");
                    if stop.is_cancelled() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            Err(TxnFailed::Poison { seq, cause, local }) => {
                // Not an outage: abort, move the record aside, and go on at once.
                shared.signals.set_error(cause.error.clone());
                let q = p.clone();
                if blocking(move || q.abort_transaction(TXN_TIMEOUT))
                    .await
                    .is_err()
                {
                    producer = None;
                    shared.metrics.producer_restarts.inc();
                }
                shared.metrics.transaction_aborts.inc();
                if local {
                    poisoned.dead.remove(&seq);
                    match fw.outbox.dead_letter(seq, cause.clone()).await {
                        Ok(_) => {
                            poisoned.attempts.forget(seq);
                            fw.shared.buried(seq, &cause);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, seq, "Moving a poison record aside failed; retrying");
                            sleep_or_stop(&stop, &mut backoff).await;
                        }
                    }
                } else {
                    tracing::warn!(
                        seq,
                        reason = cause.reason,
                        error = %cause.error,
                        "Poison record: its dead letter goes in the next transaction"
                    );
                    poisoned.dead.insert(seq, cause);
                }
            }
            Err(TxnFailed::BeforeCommit { error, fatal }) => {
                shared.metrics.transaction_aborts.inc();
                shared.signals.set_error(error.to_string());
                tracing::warn!(%error, fatal, "Kafka transaction failed; its records are sent again");
                let q = p.clone();
                let aborted = blocking(move || q.abort_transaction(TXN_TIMEOUT)).await;
                if fatal || aborted.is_err() {
                    producer = None;
                    shared.metrics.producer_restarts.inc();
                }
                shared.set_state(State::Offline);
                sleep_or_stop(&stop, &mut backoff).await;
            }
            Err(TxnFailed::InCommit { error }) => {
                // The commit was requested: the broker may have applied it even though the
                // answer never came back (a connection lost after EndTxn, a retried EndTxn the
                // coordinator no longer recognises). Aborting now and sending the page again
                // would duplicate it. Instead a new producer fences this one — its
                // `init_transactions` returns only once the coordinator has settled the open
                // transaction — and recovery reads the checkpoint again: if the transaction
                // committed, its checkpoint is the last one and its records leave the outbox
                // without being sent twice; if not, they go in a later transaction.
                shared.metrics.transaction_aborts.inc();
                shared.signals.set_error(error.to_string());
                tracing::warn!(
                    %error,
                    "Kafka transaction commit failed; checking the checkpoint before sending its records again"
                );
                producer = None;
                recovered = false;
                shared.metrics.producer_restarts.inc();
                shared.set_state(State::Offline);
                sleep_or_stop(&stop, &mut backoff).await;
            }
        }
    }
}

/// Creates the transactional producer (fencing older instances) and, once per run, deletes the
/// records the last checkpoint says were committed.
async fn prepare(
    fw: &Forwarder,
    producer: &mut Option<Producer_>,
    recovered: &mut bool,
) -> Result<(), String> {
    if producer.is_none() {
        *producer = Some(new_producer(fw).await.map_err(|e| e.to_string())?);
    }
    if !*recovered {
        let options = fw.options.clone();
        let outbox = fw.outbox.clone();
        let owns = move |c: &Checkpoint| outbox.owns_checkpoint(c.outbox.as_deref());
        let checkpoint = tokio::task::spawn_blocking(move || read_checkpoint(&options, owns))
            .await
            .map_err(|e| e.to_string())??;
        if let Some(checkpoint) = checkpoint {
            let seqs: Vec<u64> = checkpoint.seqs.iter().flat_map(|(a, b)| *a..=*b).collect();
            let deleted = fw.outbox.ack(seqs).await.map_err(|e| e.to_string())?;
            tracing::info!(
                deleted,
                "Exactly-once: records of the last committed transaction removed from the outbox"
            );
        }
        *recovered = true;
    }
    Ok(())
}

/// Test-only fault hook, in debug builds only (release builds ignore it): when
/// `OUTPOST_DEBUG_FAIL` names `kafka-commit-crash`, the process kills itself right after its
/// [`CRASH_AFTER_COMMITS`]th committed transaction, before those records leave the outbox — the
/// one moment when only the checkpoint says they were sent. A `kill -9` from outside can land
/// there only by chance.
fn debug_crash_after_commit() -> bool {
    static COMMITS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    outpost_config::debug_fault_requested("kafka-commit-crash")
        && COMMITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == CRASH_AFTER_COMMITS
}

/// See [`debug_crash_after_commit`].
const CRASH_AFTER_COMMITS: u32 = 3;

/// SIGKILL to ourselves: no destructor, no flush, no core file — what `kill -9` does.
fn kill_this_process() {
    tracing::error!("fault injected by OUTPOST_DEBUG_FAIL: killing the process after a commit");
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
}

async fn sleep_or_stop(stop: &CancellationToken, backoff: &mut Backoff) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(backoff.failed()) => {}
    }
}

/// Why a transaction did not commit, and so what its records' fate can be.
enum TxnFailed {
    /// Failed before the commit was requested: nothing of it is visible to `read_committed`
    /// readers, and aborting it is safe. `fatal`: the producer cannot go on.
    BeforeCommit { error: KafkaError, fatal: bool },
    /// `commit_transaction` failed: the commit may or may not have been applied.
    InCommit { error: KafkaError },
    /// Record `seq` is poison (or its dead letter was refused too: `local`). Abort, move it
    /// aside, go on.
    Poison {
        seq: u64,
        cause: DeadLetterCause,
        local: bool,
    },
}

/// What a failed produce or delivery of `seq` (to `topic`; `dead`: its dead letter) means for
/// the transaction: see [`poison`].
fn record_failed(
    fw: &Forwarder,
    producer: &Producer_,
    poisoned: &mut Poison,
    seq: u64,
    topic: &str,
    error: KafkaError,
) -> TxnFailed {
    fw.shared.metrics.failed.inc();
    fw.shared.count(&fw.shared.failed, 1);
    let verdict = poison::classify(&error);
    if verdict == poison::Verdict::Outage {
        return before_commit(error, producer);
    }
    if let Some(cause) = poisoned.dead.get(&seq) {
        let mut cause = cause.clone();
        cause.error = format!(
            "{}; the dead-letter topic refused it too: {error}",
            cause.error
        );
        return TxnFailed::Poison {
            seq,
            cause,
            local: true,
        };
    }
    let dead_letter = &fw.options.kafka.dead_letter;
    let reason = match verdict {
        poison::Verdict::Poison(reason) => reason,
        _ if poisoned.attempts.fail(seq, dead_letter.max_attempts) => poison::Reason::Attempts,
        _ => return before_commit(error, producer),
    };
    let attempts = match reason {
        poison::Reason::Attempts => poisoned.attempts.of(seq),
        _ => poisoned.attempts.of(seq) + 1,
    };
    TxnFailed::Poison {
        seq,
        cause: DeadLetterCause {
            reason: reason.as_str(),
            error: error.to_string(),
            kafka_topic: topic.to_owned(),
            attempts,
        },
        local: dead_letter.topic.is_none(),
    }
}

fn before_commit(error: KafkaError, producer: &Producer_) -> TxnFailed {
    let fatal = producer.client().fatal_error().is_some()
        || error.rdkafka_error_code() == Some(rdkafka::error::RDKafkaErrorCode::Fatal);
    TxnFailed::BeforeCommit { error, fatal }
}

/// One transaction: the page's records and the checkpoint. Returns the sequences to delete.
async fn transaction(
    fw: &Forwarder,
    producer: &Producer_,
    page: Vec<crate::StoredRecord>,
    poisoned: &mut Poison,
) -> Result<Vec<u64>, TxnFailed> {
    producer
        .begin_transaction()
        .map_err(|e| before_commit(e, producer))?;
    let shared = &fw.shared;
    let mut deliveries = Vec::with_capacity(page.len());
    let mut seqs = Vec::with_capacity(page.len());
    let mut dead_letters = Vec::new();
    // One rule list for the whole transaction, even if a reload replaces it meanwhile.
    let rules = fw.rules.load();
    for record in &page {
        seqs.push(record.seq);
        if let Some(cause) = poisoned.dead.get(&record.seq)
            && let Some(dead_topic) = &fw.options.kafka.dead_letter.topic
        {
            let headers =
                dead_letter_headers(record, &fw.options.gateway_id, fw.outbox.id(), cause);
            let r = FutureRecord::<str, [u8]>::to(dead_topic)
                .payload(&record.payload)
                .headers(headers)
                .key(&record.device_id)
                .timestamp(record.received_at_ms);
            match producer.send_result(r) {
                Ok(delivery) => {
                    deliveries.push((
                        record.seq,
                        dead_topic.as_str(),
                        record.received_at_ms,
                        delivery,
                    ));
                }
                Err((e, _)) => {
                    return Err(record_failed(
                        fw, producer, poisoned, record.seq, dead_topic, e,
                    ));
                }
            }
            dead_letters.push(record.seq);
            continue;
        }
        let decision = rules.decide(
            &rules::RecordView {
                device_id: &record.device_id,
                source: record.source,
                topic: &record.topic,
                seq: record.seq,
            },
            fw.tags.as_ref(),
        );
        let (topic, key, cloudevents) = match decision {
            rules::Decision::Drop { rule } => {
                shared
                    .metrics
                    .dropped
                    .get_or_create(&metrics::RuleLabel {
                        rule: rule.to_owned(),
                    })
                    .inc();
                continue;
            }
            rules::Decision::Forward {
                topic,
                key,
                cloudevents,
            } => (topic, key, cloudevents),
        };
        let (gateway_id, outbox_id) = (&fw.options.gateway_id, fw.outbox.id());
        let (headers, payload) = cloudevents::encode(record, gateway_id, outbox_id, cloudevents);
        let mut r = FutureRecord::<str, [u8]>::to(topic)
            .payload(&payload)
            .headers(headers)
            .timestamp(record.received_at_ms);
        match key {
            RuleKey::Device => r = r.key(&record.device_id),
            RuleKey::Topic => r = r.key(&record.topic),
            RuleKey::None => {}
        }
        match producer.send_result(r) {
            Ok(delivery) => deliveries.push((record.seq, topic, record.received_at_ms, delivery)),
            Err((e, _)) => {
                return Err(record_failed(fw, producer, poisoned, record.seq, topic, e));
            }
        }
        shared.metrics.produced.inc();
    }
    let checkpoint = Checkpoint {
        gateway: fw.options.gateway_id.clone(),
        outbox: Some(fw.outbox.id().to_owned()),
        seqs: ranges(seqs.clone()),
        committed_at_ms: now_unix_ms(),
    };
    let value = serde_json::to_vec(&checkpoint).unwrap_or_default();
    let r = FutureRecord::<str, [u8]>::to(&fw.options.kafka.checkpoint_topic)
        .key(&fw.options.gateway_id)
        .payload(&value);
    let checkpoint_delivery = producer
        .send_result(r)
        .map_err(|(e, _)| before_commit(e, producer))?;
    for (seq, topic, received_at_ms, delivery) in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {
                let age = (now_unix_ms() - received_at_ms).max(0) as f64 / 1000.0;
                shared.metrics.delivery_latency.observe(age);
            }
            Ok(Err((e, _))) => {
                return Err(record_failed(fw, producer, poisoned, seq, topic, e));
            }
            Err(_) => return Err(before_commit(KafkaError::Canceled, producer)),
        }
    }
    match checkpoint_delivery.await {
        Ok(Ok(_)) => {}
        Ok(Err((e, _))) => return Err(before_commit(e, producer)),
        Err(_) => return Err(before_commit(KafkaError::Canceled, producer)),
    }
    let p = producer.clone();
    blocking(move || p.commit_transaction(TXN_TIMEOUT))
        .await
        .map_err(|error| TxnFailed::InCommit { error })?;
    for seq in &seqs {
        poisoned.attempts.forget(*seq);
    }
    for seq in &dead_letters {
        if let Some(cause) = poisoned.dead.remove(seq) {
            fw.shared.count_poison(cause.reason, "topic");
        }
    }
    let delivered = (page.len() - dead_letters.len()) as u64;
    shared.metrics.delivered.inc_by(delivered);
    shared.count(&shared.delivered, delivered);
    Ok(seqs)
}

#[cfg(test)]
mod tests {
    use super::ranges;

    #[test]
    fn sequences_become_ranges() {
        assert_eq!(ranges(vec![5, 1, 2, 3, 9, 10]), [(1, 3), (5, 5), (9, 10)]);
        assert!(ranges(vec![]).is_empty());
    }
}
