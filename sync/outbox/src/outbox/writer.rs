//! The outbox writer: the only task that writes the database, committing in groups.
//!
//! One iteration of [`OutboxWriter::run`]: wait for the first request, gather what else is queued
//! (up to `batch_max_records`, lingering up to `batch_max_delay`), then hand the group to the
//! writer's own thread (which owns the connection), apply every request in **one** transaction,
//! commit (one fsync for the whole group), and complete each request's future. A failed commit rolls back and fails every request
//! of the group, so a completed append is always a committed one.
//!
//! Shutdown: when the token is cancelled the queue is closed to new requests, whatever is already
//! queued is still committed, and the WAL is checkpointed.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outpost_config::WhenFull;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio_util::sync::CancellationToken;

use super::disk::Reserve;
use super::{
    AckError, AppendError, DeadLetterAction, DeadLetterCause, FullReason, OutboxOptions, Pending,
    Request, Shared, disk, now_unix_ms,
};

/// How often an idle writer proves it is alive (for the watchdog).
const IDLE_BEAT: Duration = Duration::from_millis(500);
/// Records evicted per query while making room.
const EVICT_CHUNK: i64 = 256;
/// At most one eviction/rejection log line per route and reason in this interval; the counters
/// carry the exact numbers.
const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// The blocking commit thread panicked; the connection is gone. Restart the outbox.
    #[error("outbox writer thread failed: {0}")]
    Panicked(String),
}

/// Running totals, restored from `meta` (and the dead-letter table) at open and written back in
/// every commit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Totals {
    pub next_seq: u64,
    pub count: u64,
    pub bytes: u64,
    /// The dead-letter table's rows and bytes (not in `meta`: counted at open).
    pub dead_count: u64,
    pub dead_bytes: u64,
}

#[derive(Debug)]
pub(crate) struct WriterState {
    conn: Connection,
    dir: PathBuf,
    /// This start's row in `boots`; `None` when the disk was full at open (written with the
    /// first records instead).
    boot: Option<i64>,
    totals: Totals,
    quiet: LogLimiter,
    reserve: Reserve,
}

impl WriterState {
    pub fn new(
        conn: Connection,
        dir: PathBuf,
        boot: Option<i64>,
        totals: Totals,
        reserve: Reserve,
    ) -> Self {
        Self {
            conn,
            dir,
            boot,
            totals,
            quiet: LogLimiter::default(),
            reserve,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    max_bytes: u64,
    min_free_disk: u64,
    batch_max_records: usize,
    batch_max_delay: Duration,
}

/// The writer task. Spawn [`OutboxWriter::run`] once; appends complete only while it runs.
#[derive(Debug)]
pub struct OutboxWriter {
    rx: mpsc::Receiver<Box<Request>>,
    state: Option<WriterState>,
    shared: Arc<Shared>,
    limits: Limits,
}

type Job = Box<dyn FnOnce(&mut WriterState) + Send>;

/// The thread that owns the write connection: every commit, and the WAL checkpoint at shutdown,
/// runs there. Not the runtime's shared blocking pool: registry jobs (which wait on one mutex),
/// the forwarder's reads and DNS lookups queue there behind one another, and a burst of them
/// during a slow fsync would delay every acknowledgement of every protocol.
struct CommitThread {
    /// Capacity 1, and the writer awaits each job's result before it sends the next: a send
    /// never blocks the runtime.
    jobs: std::sync::mpsc::SyncSender<Job>,
}

impl CommitThread {
    fn spawn(mut state: WriterState) -> Result<Self, WriterError> {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(1);
        std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || {
                // Ends when the writer drops its sender (or a job panics: the connection is
                // gone with the thread, and the next job reports it).
                while let Ok(job) = rx.recv() {
                    job(&mut state);
                }
            })
            .map_err(|e| WriterError::Panicked(format!("cannot start the writer thread: {e}")))?;
        Ok(Self { jobs })
    }

    /// Runs `f` on the thread and waits for its result.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut WriterState) -> T + Send + 'static,
    ) -> Result<T, WriterError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |state| {
                let _ = tx.send(f(state));
            }))
            .map_err(|_| WriterError::Panicked("the writer thread is gone".into()))?;
        rx.await
            .map_err(|_| WriterError::Panicked("a commit panicked on the writer thread".into()))
    }
}

impl OutboxWriter {
    pub(crate) fn new(
        rx: mpsc::Receiver<Box<Request>>,
        state: WriterState,
        shared: Arc<Shared>,
        options: &OutboxOptions,
    ) -> Self {
        Self {
            rx,
            state: Some(state),
            shared,
            limits: Limits {
                max_bytes: options.max_bytes,
                min_free_disk: options.min_free_disk,
                batch_max_records: options.batch_max_records.max(1),
                batch_max_delay: options.batch_max_delay,
            },
        }
    }

    /// Runs until `shutdown` is cancelled (or every handle is dropped) and the queue is drained.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), WriterError> {
        self.shared.beat();
        let Some(state) = self.state.take() else {
            return Err(WriterError::Panicked("writer state lost".into()));
        };
        let thread = CommitThread::spawn(state)?;
        // What the live connection really does (not what was asked): status and tests read it.
        let synchronous = thread
            .run(|state| {
                state
                    .conn
                    .pragma_query_value(None, "synchronous", |r| r.get::<_, i64>(0))
            })
            .await?;
        match synchronous {
            Ok(level) => self.shared.synchronous.store(level, Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %e, "Cannot read the outbox's synchronous setting"),
        }
        let mut closing = false;
        loop {
            let first = if closing {
                match self.rx.recv().await {
                    Some(request) => *request,
                    None => break,
                }
            } else {
                tokio::select! {
                    request = self.rx.recv() => match request {
                        Some(request) => *request,
                        None => break,
                    },
                    () = shutdown.cancelled() => {
                        // New appends now fail with `Closed`; queued ones are still committed.
                        self.rx.close();
                        closing = true;
                        continue;
                    }
                    () = tokio::time::sleep(IDLE_BEAT) => {
                        let shared = Arc::clone(&self.shared);
                        thread.run(move |state| check_disk(state, &shared)).await?;
                        self.shared.beat();
                        continue;
                    }
                }
            };
            let batch = self.gather(first).await;
            let (shared, limits) = (Arc::clone(&self.shared), self.limits);
            thread
                .run(move |state| {
                    commit_group(state, &shared, limits, batch);
                    check_disk(state, &shared);
                })
                .await?;
            self.shared.beat();
        }
        let _ = thread
            .run(|state| {
                // Fold the WAL back into the main file so a clean stop leaves one tidy file.
                if let Err(e) = state.conn.pragma_update(None, "wal_checkpoint", "TRUNCATE") {
                    tracing::warn!(error = %e, "Outbox checkpoint at shutdown failed");
                }
            })
            .await;
        tracing::info!("Outbox writer stopped; every queued append was committed or refused");
        Ok(())
    }

    /// Collects queued requests after `first` into one group.
    async fn gather(&mut self, first: Request) -> Vec<Request> {
        let mut records = weight(&first);
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + self.limits.batch_max_delay;
        while records < self.limits.batch_max_records {
            let next = match self.rx.try_recv() {
                Ok(request) => *request,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    if self.limits.batch_max_delay.is_zero() {
                        break;
                    }
                    match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                        Ok(Some(request)) => *request,
                        Ok(None) | Err(_) => break,
                    }
                }
            };
            records += weight(&next);
            batch.push(next);
        }
        batch
    }
}

fn weight(request: &Request) -> usize {
    match request {
        Request::Append { records, .. } => records.len().max(1),
        Request::Ack { .. }
        | Request::Release { .. }
        | Request::DeadLetter { .. }
        | Request::DeadLetters { .. } => 1,
    }
}

/// What became of one request inside the group, before the commit decides its fate.
enum Outcome {
    Appended(Vec<u64>),
    Refused(AppendError),
    Acked(u64),
    Released,
    DeadLettered(bool),
    /// Dead letters retried or dropped.
    Moved(u64),
}

/// Applies a group of requests in one transaction and completes their futures. Blocking.
fn commit_group(state: &mut WriterState, shared: &Shared, limits: Limits, batch: Vec<Request>) {
    let started = Instant::now();
    let before = state.totals;
    let boot_before = state.boot;
    let disk_full = shared.disk_full.load(Ordering::Relaxed);
    let WriterState {
        conn,
        dir,
        boot,
        totals,
        quiet,
        reserve: _,
    } = state;
    let result = (|| -> rusqlite::Result<Vec<Outcome>> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut room = Room::measure(dir, limits, shared, quiet);
        let group_first_seq = totals.next_seq;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut deleted_any = false;
        {
            // Prepared once per group: most requests carry a single record.
            let mut insert_stmt = tx.prepare_cached(INSERT_SQL)?;
            for request in &batch {
                // Stored before under the same key: that record's sequence, nothing new.
                if let Request::Append { key: Some(key), .. } = request
                    && let Some(seq) = keyed_seq(&tx, key)?
                {
                    outcomes.push(Outcome::Appended(vec![seq]));
                    continue;
                }
                outcomes.push(match request {
                    Request::Append { records, .. } if disk_full => {
                        Outcome::Refused(refuse_disk_full(records, shared, quiet))
                    }
                    Request::Append { records, key, .. } => {
                        let verdict =
                            room.admit(&tx, records, totals, group_first_seq, shared, quiet)?;
                        deleted_any |= room.evicted_any;
                        match verdict {
                            Err(refusal) => Outcome::Refused(refusal),
                            Ok(()) => {
                                let boot_id = match *boot {
                                    Some(id) => id,
                                    None => *boot.insert(super::open::insert_boot(&tx)?),
                                };
                                let seqs = insert(&mut insert_stmt, boot_id, records, totals)?;
                                if let (Some(key), Some(seq)) = (key, seqs.first()) {
                                    tx.execute(
                                        "INSERT INTO dedupe (key, seq) VALUES (?1, ?2)",
                                        (key, *seq as i64),
                                    )?;
                                }
                                Outcome::Appended(seqs)
                            }
                        }
                    }
                    Request::Release { keys, prefix, .. } => {
                        let mut stmt = tx.prepare_cached("DELETE FROM dedupe WHERE key = ?1")?;
                        for key in keys {
                            stmt.execute([key])?;
                        }
                        if let Some(prefix) = prefix {
                            // Keys are text: the range [prefix, prefix + U+10FFFF) is the prefix.
                            tx.execute(
                                "DELETE FROM dedupe WHERE key >= ?1 AND key < ?1 || char(1114111)",
                                [prefix],
                            )?;
                        }
                        Outcome::Released
                    }
                    Request::Ack { seqs, .. } => {
                        deleted_any = true;
                        Outcome::Acked(delete(&tx, seqs, totals)?)
                    }
                    Request::DeadLetter { seq, why, .. } => {
                        deleted_any = true;
                        Outcome::DeadLettered(bury(&tx, *seq, why, totals)?)
                    }
                    Request::DeadLetters { seqs, action, .. } => {
                        // Retried records may be older than every held one.
                        deleted_any = true;
                        Outcome::Moved(dead_letters(&tx, seqs.as_deref(), *action, totals)?)
                    }
                });
            }
        }
        tx.execute(
            "UPDATE meta SET next_seq = ?1, record_count = ?2, record_bytes = ?3 WHERE id = 1",
            (
                totals.next_seq as i64,
                totals.count as i64,
                totals.bytes as i64,
            ),
        )?;
        if deleted_any || before.count == 0 {
            let oldest: Option<i64> = tx
                .query_row(
                    "SELECT received_at_ms FROM records ORDER BY seq LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            shared
                .oldest_received_ms
                .store(oldest.unwrap_or(i64::MIN), Ordering::Relaxed);
        }
        tx.commit()?;
        Ok(outcomes)
    })();

    let metrics = &shared.metrics;
    match result {
        Ok(outcomes) => {
            metrics.commits.inc();
            metrics
                .commit_duration
                .observe(started.elapsed().as_secs_f64());
            let totals = state.totals;
            shared.records.store(totals.count, Ordering::Relaxed);
            shared.bytes.store(totals.bytes, Ordering::Relaxed);
            metrics.records.set(totals.count as i64);
            metrics.bytes.set(totals.bytes as i64);
            if totals.next_seq != before.next_seq {
                shared.next_seq.send_replace(totals.next_seq);
            }
            shared
                .dead_letters
                .store(totals.dead_count, Ordering::Relaxed);
            shared
                .dead_letter_bytes
                .store(totals.dead_bytes, Ordering::Relaxed);
            metrics.dead_letters.set(totals.dead_count as i64);
            let retried = batch.iter().zip(&outcomes).any(|(request, outcome)| {
                matches!(
                    (request, outcome),
                    (
                        Request::DeadLetters {
                            action: DeadLetterAction::Retry,
                            ..
                        },
                        Outcome::Moved(n)
                    ) if *n > 0
                )
            });
            if retried {
                shared.revived.send_modify(|generation| *generation += 1);
            }
            for (request, outcome) in batch.into_iter().zip(outcomes) {
                complete(request, outcome, shared);
            }
        }
        Err(e) => {
            // Rolled back: nothing of this group exists, so nothing of it may be acknowledged.
            state.totals = before;
            state.boot = boot_before;
            metrics.commit_errors.inc();
            let message = e.to_string();
            tracing::error!(error = %message, requests = batch.len(), "Outbox commit failed; the group was refused");
            let full = crate::sqlite::is_disk_full(&e);
            if full {
                disk_is_full(&state.reserve, shared);
            }
            for request in batch {
                match request {
                    Request::Append { records, reply, .. } if full => {
                        let refusal = refuse_disk_full(&records, shared, &mut state.quiet);
                        let _ = reply.send(Err(refusal));
                    }
                    Request::Append { records, reply, .. } => {
                        for r in &records {
                            metrics.rejected(&r.envelope.route, "storage_error", 1);
                        }
                        let _ = reply.send(Err(AppendError::Storage(message.clone())));
                    }
                    Request::Ack { reply, .. } => {
                        let _ = reply.send(Err(AckError::Storage(message.clone())));
                    }
                    Request::Release { reply, .. } => {
                        let _ = reply.send(Err(AckError::Storage(message.clone())));
                    }
                    Request::DeadLetter { reply, .. } => {
                        let _ = reply.send(Err(AckError::Storage(message.clone())));
                    }
                    Request::DeadLetters { reply, .. } => {
                        let _ = reply.send(Err(AckError::Storage(message.clone())));
                    }
                }
            }
        }
    }
}

/// Refuses an append because the disk is full: counted, logged at most every [`LOG_EVERY`].
fn refuse_disk_full(records: &[Pending], shared: &Shared, quiet: &mut LogLimiter) -> AppendError {
    let route = records.first().map_or("default", |r| &*r.envelope.route);
    shared
        .metrics
        .rejected(route, FullReason::DiskFull.as_str(), records.len() as u64);
    if quiet.allow(route, "disk_full") {
        tracing::warn!(
            route,
            records = records.len(),
            "Disk full: refusing appends until there is room again"
        );
    }
    AppendError::Full {
        route: route.to_owned(),
        reason: FullReason::DiskFull,
    }
}

/// The disk was found full: release the reserve (deletes need room too) and refuse appends.
fn disk_is_full(reserve: &Reserve, shared: &Shared) {
    if !shared.disk_full.swap(true, Ordering::Relaxed) {
        tracing::error!("Disk full: appends are refused; delivered records are still deleted");
    }
    shared.metrics.disk_full.set(1);
    reserve.release();
}

/// Looks at the filesystem after each group and at idle beats: the disk filling up (by anyone)
/// or having room for the reserve again. See [`super::disk`].
pub(crate) fn check_disk(state: &WriterState, shared: &Shared) {
    let reserve = &state.reserve;
    if shared.disk_full.load(Ordering::Relaxed) {
        if !reserve.disk_full() && reserve.take() {
            shared.disk_full.store(false, Ordering::Relaxed);
            shared.metrics.disk_full.set(0);
            tracing::info!(
                "Disk space is back: the reserve is taken again and appends are accepted"
            );
        }
    } else if reserve.disk_full() {
        disk_is_full(reserve, shared);
    }
}

/// The sequence of the record stored under idempotency key `key`, if any.
fn keyed_seq(tx: &Transaction<'_>, key: &str) -> rusqlite::Result<Option<u64>> {
    tx.prepare_cached("SELECT seq FROM dedupe WHERE key = ?1")?
        .query_row([key], |r| r.get::<_, i64>(0))
        .optional()
        .map(|seq| seq.map(|s| s as u64))
}

fn complete(request: Request, outcome: Outcome, shared: &Shared) {
    let metrics = &shared.metrics;
    match (request, outcome) {
        (
            Request::Append {
                reply, queued_at, ..
            },
            Outcome::Appended(seqs),
        ) => {
            metrics.appended_records.inc_by(seqs.len() as u64);
            metrics
                .append_latency
                .observe(queued_at.elapsed().as_secs_f64());
            // The appender may have gone away (client disconnected): nothing to do then.
            let _ = reply.send(Ok(seqs));
        }
        (Request::Append { reply, .. }, Outcome::Refused(refusal)) => {
            let _ = reply.send(Err(refusal));
        }
        (Request::Ack { reply, .. }, Outcome::Acked(n)) => {
            metrics.acked_records.inc_by(n);
            let _ = reply.send(Ok(n));
        }
        (Request::Release { reply, .. }, Outcome::Released) => {
            let _ = reply.send(Ok(()));
        }
        (Request::DeadLetter { reply, .. }, Outcome::DeadLettered(moved)) => {
            let _ = reply.send(Ok(moved));
        }
        (Request::DeadLetters { reply, .. }, Outcome::Moved(n)) => {
            let _ = reply.send(Ok(n));
        }
        (request, _) => mismatched(request),
    }
}

/// A request completed with another request's outcome: a bug in [`commit_group`].
fn mismatched(request: Request) {
    let why = "internal: mismatched outcome";
    match request {
        Request::Append { reply, .. } => {
            let _ = reply.send(Err(AppendError::Storage(why.into())));
        }
        Request::Ack { reply, .. } | Request::DeadLetters { reply, .. } => {
            let _ = reply.send(Err(AckError::Storage(why.into())));
        }
        Request::Release { reply, .. } => {
            let _ = reply.send(Err(AckError::Storage(why.into())));
        }
        Request::DeadLetter { reply, .. } => {
            let _ = reply.send(Err(AckError::Storage(why.into())));
        }
    }
}

const INSERT_SQL: &str = "INSERT INTO records (seq, priority, route, boot, received_at_ms, \
     device_id, source, topic, content_type, headers, payload, size) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)";

fn insert(
    stmt: &mut rusqlite::CachedStatement<'_>,
    boot: i64,
    records: &[Pending],
    totals: &mut Totals,
) -> rusqlite::Result<Vec<u64>> {
    let mut seqs = Vec::with_capacity(records.len());
    // One buffer for every record's headers JSON: the writer thread is shared by all ingress.
    let mut headers_json = Vec::new();
    for record in records {
        let e = &record.envelope;
        let seq = totals.next_seq;
        let headers = if e.headers.is_empty() {
            None
        } else {
            headers_json.clear();
            // Serialising strings into a Vec cannot fail, and the JSON is UTF-8.
            let _ = serde_json::to_writer(&mut headers_json, &e.headers);
            std::str::from_utf8(&headers_json).ok()
        };
        stmt.execute(rusqlite::params![
            seq as i64,
            record.priority,
            &*e.route,
            boot,
            e.received_at_ms,
            e.device_id,
            e.source.as_str(),
            e.topic,
            e.content_type,
            headers,
            &e.payload[..],
            record.size as i64,
        ])?;
        totals.next_seq += 1;
        totals.count += 1;
        totals.bytes += record.size;
        seqs.push(seq);
    }
    Ok(seqs)
}

/// Deletes the records of `seqs` (any order, duplicates and unknown sequences allowed). One
/// statement per run of consecutive sequences, not per record: the forwarder acknowledges
/// mostly contiguous runs, and a statement execution costs more than the rows it removes.
fn delete(tx: &Transaction<'_>, seqs: &[u64], totals: &mut Totals) -> rusqlite::Result<u64> {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut stmt =
        tx.prepare_cached("DELETE FROM records WHERE seq BETWEEN ?1 AND ?2 RETURNING size")?;
    let mut deleted = 0;
    let mut i = 0;
    while i < sorted.len() {
        // Every sequence of the run `first..=last` is in `seqs`: deleting the range removes
        // exactly those records.
        let first = sorted[i];
        let mut last = first;
        while i + 1 < sorted.len() && sorted[i + 1] == last + 1 {
            i += 1;
            last = sorted[i];
        }
        i += 1;
        let mut rows = stmt.query((first as i64, last as i64))?;
        while let Some(row) = rows.next()? {
            let size: i64 = row.get(0)?;
            deleted += 1;
            totals.count -= 1;
            totals.bytes = totals.bytes.saturating_sub(size as u64);
        }
    }
    Ok(deleted)
}

/// The columns `records` and `dead_letters` share, in order.
const RECORD_COLUMNS: &str = "seq, priority, route, boot, received_at_ms, device_id, source, \
     topic, content_type, headers, payload, size";

/// Moves record `seq` to the dead-letter table with `why`. False if it is not held (already
/// acknowledged, evicted or dead-lettered).
fn bury(
    tx: &Transaction<'_>,
    seq: u64,
    why: &DeadLetterCause,
    totals: &mut Totals,
) -> rusqlite::Result<bool> {
    let moved = tx.execute(
        &format!(
            "INSERT INTO dead_letters ({RECORD_COLUMNS}, reason, error, kafka_topic, attempts, \
             dead_at_ms) SELECT {RECORD_COLUMNS}, ?2, ?3, ?4, ?5, ?6 FROM records WHERE seq = ?1"
        ),
        rusqlite::params![
            seq as i64,
            why.reason,
            why.error,
            why.kafka_topic,
            why.attempts,
            now_unix_ms()
        ],
    )?;
    if moved == 0 {
        return Ok(false);
    }
    let size: i64 = tx.query_row(
        "DELETE FROM records WHERE seq = ?1 RETURNING size",
        [seq as i64],
        |r| r.get(0),
    )?;
    totals.count -= 1;
    totals.bytes = totals.bytes.saturating_sub(size as u64);
    totals.dead_count += 1;
    totals.dead_bytes += size as u64;
    Ok(true)
}

/// Retries (back into `records`, same sequence) or drops the dead letters `seqs` (`None`: all).
/// Returns how many rows it moved or deleted; unknown sequences are ignored.
fn dead_letters(
    tx: &Transaction<'_>,
    seqs: Option<&[u64]>,
    action: DeadLetterAction,
    totals: &mut Totals,
) -> rusqlite::Result<u64> {
    let (filter, every): (&str, Vec<i64>) = match seqs {
        Some(seqs) => ("WHERE seq = ?1", seqs.iter().map(|&s| s as i64).collect()),
        None => ("", vec![0]),
    };
    let mut n = 0u64;
    for seq in every {
        let bind = |sql: &str| -> Vec<i64> {
            if sql.contains("?1") {
                vec![seq]
            } else {
                vec![]
            }
        };
        if action == DeadLetterAction::Retry {
            let sql = format!(
                "INSERT INTO records ({RECORD_COLUMNS}) SELECT {RECORD_COLUMNS} FROM dead_letters \
                 {filter}"
            );
            tx.execute(&sql, rusqlite::params_from_iter(bind(&sql)))?;
        }
        let sql = format!("DELETE FROM dead_letters {filter} RETURNING size");
        let mut stmt = tx.prepare(&sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(bind(&sql)))?;
        while let Some(row) = rows.next()? {
            let size = row.get::<_, i64>(0)? as u64;
            n += 1;
            totals.dead_count = totals.dead_count.saturating_sub(1);
            totals.dead_bytes = totals.dead_bytes.saturating_sub(size);
            if action == DeadLetterAction::Retry {
                totals.count += 1;
                totals.bytes += size;
            }
        }
    }
    Ok(n)
}

/// The space accounting of one group: the byte cap and the free-disk floor.
struct Room {
    limits: Limits,
    /// Free bytes on the data filesystem at the start of the group minus what the group has
    /// written so far; `None` when there is no floor (or statvfs failed, which is logged).
    disk_free: Option<u64>,
    evicted_any: bool,
}

impl Room {
    fn measure(
        dir: &std::path::Path,
        limits: Limits,
        shared: &Shared,
        quiet: &mut LogLimiter,
    ) -> Self {
        let disk_free = if limits.min_free_disk == 0 {
            None
        } else {
            match disk::available_bytes(dir) {
                Ok(free) => Some(free),
                Err(e) => {
                    if quiet.allow("statvfs", "error") {
                        tracing::warn!(dir = %dir.display(), error = %e, "Cannot read free disk space; the disk floor is not enforced");
                    }
                    let _ = shared;
                    None
                }
            }
        };
        Self {
            limits,
            disk_free,
            evicted_any: false,
        }
    }

    /// Makes room for `records` or says why not. May evict (drop_oldest routes only).
    fn admit(
        &mut self,
        tx: &Transaction<'_>,
        records: &[Pending],
        totals: &mut Totals,
        group_first_seq: u64,
        shared: &Shared,
        quiet: &mut LogLimiter,
    ) -> rusqlite::Result<Result<(), AppendError>> {
        self.evicted_any = false;
        let need: u64 = records.iter().map(|r| r.size).sum();
        let Some((reason, mut shortfall)) = self.shortfall(totals, need) else {
            self.consume(need);
            return Ok(Ok(()));
        };
        let refuse = |route: &str, quiet: &mut LogLimiter| {
            shared
                .metrics
                .rejected(route, reason_label(reason), records.len() as u64);
            if quiet.allow(route, reason_label(reason)) {
                tracing::warn!(
                    route,
                    reason = reason_label(reason),
                    records = records.len(),
                    "Outbox full: refusing appends (policy reject)"
                );
            }
            AppendError::Full {
                route: route.to_owned(),
                reason,
            }
        };
        if let Some(rejecting) = records.iter().find(|r| r.when_full == WhenFull::Reject) {
            return Ok(Err(refuse(&rejecting.envelope.route, quiet)));
        }
        // drop_oldest: evict the oldest committed records of the routes in this request.
        let routes: BTreeSet<(&str, u8)> = records
            .iter()
            .map(|r| (&*r.envelope.route, r.priority))
            .collect();
        for (route, priority) in &routes {
            if shortfall == 0 {
                break;
            }
            let (n, freed) = evict(tx, route, *priority, group_first_seq, shortfall, totals)?;
            if n > 0 {
                self.evicted_any = true;
                shared.metrics.dropped(route, reason_label(reason), n);
                if quiet.allow(route, "evicted") {
                    tracing::warn!(
                        route,
                        reason = reason_label(reason),
                        records = n,
                        bytes = freed,
                        "Outbox full: evicted oldest records (policy drop_oldest)"
                    );
                }
                // Freed pages are reused by SQLite, so they count as disk room too.
                if let Some(free) = self.disk_free.as_mut() {
                    *free += freed;
                }
            }
            shortfall = shortfall.saturating_sub(freed);
        }
        match self.shortfall(totals, need) {
            None => {
                self.consume(need);
                Ok(Ok(()))
            }
            Some(_) => Ok(Err(refuse(&records[0].envelope.route, quiet))),
        }
    }

    /// How many bytes are missing for `need` more, and which limit is hit first.
    fn shortfall(&self, totals: &Totals, need: u64) -> Option<(FullReason, u64)> {
        // Dead letters are on the same disk: they count against the cap until dropped.
        let after = totals.bytes + totals.dead_bytes + need;
        if after > self.limits.max_bytes {
            return Some((FullReason::ByteCap, after - self.limits.max_bytes));
        }
        let free = self.disk_free?;
        let wanted = need + self.limits.min_free_disk;
        (free < wanted).then(|| (FullReason::DiskFloor, wanted - free))
    }

    fn consume(&mut self, bytes: u64) {
        if let Some(free) = self.disk_free.as_mut() {
            *free = free.saturating_sub(bytes);
        }
    }
}

fn reason_label(reason: FullReason) -> &'static str {
    reason.as_str()
}

/// Deletes the oldest records of `route` committed before this group until `bytes` are freed.
fn evict(
    tx: &Transaction<'_>,
    route: &str,
    priority: u8,
    before_seq: u64,
    bytes: u64,
    totals: &mut Totals,
) -> rusqlite::Result<(u64, u64)> {
    let mut select = tx.prepare_cached(
        "SELECT seq, size FROM records WHERE priority = ?1 AND route = ?2 AND seq < ?3 \
         ORDER BY seq LIMIT ?4",
    )?;
    let mut remove = tx.prepare_cached("DELETE FROM records WHERE seq = ?1")?;
    let (mut records, mut freed) = (0u64, 0u64);
    while freed < bytes {
        let victims = select
            .query_map((priority, route, before_seq as i64, EVICT_CHUNK), |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        if victims.is_empty() {
            break;
        }
        for (seq, size) in victims {
            remove.execute([seq])?;
            records += 1;
            freed += size as u64;
            totals.count -= 1;
            totals.bytes = totals.bytes.saturating_sub(size as u64);
            if freed >= bytes {
                break;
            }
        }
    }
    Ok((records, freed))
}

/// Allows one log line per key per [`LOG_EVERY`].
#[derive(Debug, Default)]
struct LogLimiter {
    last: std::collections::HashMap<(String, &'static str), Instant>,
}

impl LogLimiter {
    fn allow(&mut self, key: &str, kind: &'static str) -> bool {
        let now = Instant::now();
        match self.last.entry((key.to_owned(), kind)) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(now);
                true
            }
            std::collections::hash_map::Entry::Occupied(mut slot) => {
                if now.duration_since(*slot.get()) >= LOG_EVERY {
                    slot.insert(now);
                    true
                } else {
                    false
                }
            }
        }
    }
}
