//! The durable outbox: a SQLite file between ingestion and the cloud.
//!
//! # Shape
//!
//! * [`open`] checks the file (quarantining a corrupt one), migrates it and returns an
//!   [`Outbox`] handle plus the [`OutboxWriter`] task the composition root spawns.
//! * [`Outbox`] is a cheap clonable handle. [`Outbox::append`] queues records on a bounded
//!   channel and resolves only after the writer has **committed** them (contract point 1); a full
//!   queue makes the appender wait, which is the back-pressure ingress passes on to devices.
//! * [`OutboxWriter`] owns the only write connection. It group-commits: it takes everything that
//!   is queued (up to `batch_max_records`, lingering up to `batch_max_delay`), writes it in one
//!   transaction with one fsync, and only then completes each append's future.
//! * [`OutboxReader`] is a separate read-only connection for the forwarder: highest priority
//!   first, oldest first within a priority, in bounded pages. [`Outbox::ack`] deletes delivered
//!   records through the writer, grouped into the same commits as appends.
//!
//! # Invariants
//!
//! * A record's sequence number is assigned in its commit and is strictly greater than every
//!   sequence committed before it, across restarts (kept in `meta.next_seq`).
//! * `meta.record_count`/`record_bytes` equal the rows' count and summed sizes after every commit.
//! * The byte cap counts [`Envelope::accounted_size`]; when it or the free-disk floor would be
//!   crossed, the route's policy applies: `reject` refuses the whole append request and stores
//!   nothing of it; `drop_oldest` evicts the route's oldest committed records first (never a record
//!   of the batch being committed, never another route's) and counts and logs the eviction.

pub mod disk;
pub mod inspect;
mod metrics;
mod open;
mod reader;
mod schema;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outpost_config::{Config, IntegrityCheck, Synchronous, WhenFull};
use tokio::sync::{mpsc, oneshot};

use crate::envelope::Envelope;

pub use metrics::{OutboxMetrics, RouteReason};
pub use open::{OpenError, Quarantine, kernel_boot_id, open};
pub use reader::{OutboxReader, ReadPosition};
pub use schema::CURRENT_VERSION as SCHEMA_VERSION;
pub use writer::OutboxWriter;

/// The file name of the outbox inside the data directory.
pub const FILE_NAME: &str = "outbox.db";

/// Everything the outbox needs, resolved from the config (or built directly by tests).
#[derive(Debug, Clone)]
pub struct OutboxOptions {
    /// The database file.
    pub path: PathBuf,
    pub synchronous: Synchronous,
    pub max_bytes: u64,
    pub min_free_disk: u64,
    /// `outbox.disk_reserve`: see [`disk`].
    pub disk_reserve: u64,
    pub max_record_bytes: u64,
    pub batch_max_records: usize,
    pub batch_max_delay: Duration,
    pub queue_capacity: usize,
    pub integrity_check: IntegrityCheck,
    pub routes: Vec<outpost_config::Route>,
}

impl OutboxOptions {
    /// Options for an outbox at `path` with the configuration defaults and only the default route.
    pub fn with_path(path: impl Into<PathBuf>) -> Self {
        let mut options = Self::from_config(&Config::default());
        options.path = path.into();
        options
    }

    pub fn from_config(config: &Config) -> Self {
        let o = &config.outbox;
        Self {
            path: config.data_dir().join(FILE_NAME),
            synchronous: o.synchronous,
            max_bytes: o.max_bytes.bytes(),
            min_free_disk: o.min_free_disk.bytes(),
            disk_reserve: o.disk_reserve.bytes(),
            max_record_bytes: o.max_record_bytes.bytes(),
            batch_max_records: o.batch_max_records,
            batch_max_delay: o.batch_max_delay,
            queue_capacity: o.queue_capacity,
            integrity_check: o.integrity_check,
            routes: config.routes(),
        }
    }
}

/// Why an outbox refused an append because it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullReason {
    /// The byte cap (`outbox.max_bytes`) would be exceeded.
    ByteCap,
    /// Free disk space would fall below `outbox.min_free_disk`.
    DiskFloor,
    /// The filesystem is full (whoever filled it): appends wait until it has room for the
    /// disk reserve again (see [`disk`]).
    DiskFull,
}

impl FullReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FullReason::ByteCap => "byte_cap",
            FullReason::DiskFloor => "disk_floor",
            FullReason::DiskFull => "disk_full",
        }
    }
}

/// Why an append did not complete. Nothing of a failed append request was stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// The outbox is full and the route's policy is `reject` (or eviction could not free enough).
    /// Refuse the device with back-pressure: it should retry later.
    #[error("outbox full ({}) for route `{route}`", reason.as_str())]
    Full { route: String, reason: FullReason },
    /// The record exceeds `outbox.max_record_bytes`. Refuse it permanently.
    #[error("record of {size} bytes exceeds the {max} byte limit")]
    TooLarge { size: u64, max: u64 },
    /// The envelope names a route the outbox does not know: a wiring bug in the caller.
    #[error("unknown route `{0}`")]
    UnknownRoute(String),
    /// The commit failed (disk full, I/O error) and was rolled back. Refuse; the device retries.
    #[error("outbox commit failed: {0}")]
    Storage(String),
    /// The outbox is shutting down. Refuse; the device retries after the restart.
    #[error("outbox is closed")]
    Closed,
    /// An edge rule's schema refused the record before it reached the outbox (never returned
    /// by the outbox itself). Refuse permanently, naming the rule and what is wrong.
    #[error("payload refused by edge rule `{rule}`: {error}")]
    Invalid { rule: String, error: String },
}

/// Why an ack did not complete. The records stay and will be forwarded again (at-least-once).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("outbox commit failed: {0}")]
    Storage(String),
    #[error("outbox is closed")]
    Closed,
}

/// A record ready for the writer: the envelope plus what its route says.
#[derive(Debug)]
pub(crate) struct Pending {
    pub envelope: Envelope,
    pub priority: u8,
    pub when_full: WhenFull,
    pub size: u64,
}

#[derive(Debug)]
pub(crate) enum Request {
    Append {
        records: Vec<Pending>,
        /// Idempotency key (one record): stored only if the key is new.
        key: Option<String>,
        queued_at: Instant,
        reply: oneshot::Sender<Result<Vec<u64>, AppendError>>,
    },
    /// Forgets idempotency keys: these, and every key starting with `prefix`.
    Release {
        keys: Vec<String>,
        prefix: Option<String>,
        reply: oneshot::Sender<Result<(), AckError>>,
    },
    Ack {
        seqs: Vec<u64>,
        reply: oneshot::Sender<Result<u64, AckError>>,
    },
    /// Moves a record Kafka refused for good to the dead-letter table.
    DeadLetter {
        seq: u64,
        why: DeadLetterCause,
        reply: oneshot::Sender<Result<bool, AckError>>,
    },
    /// Dead letters back into `records` (same sequences; `None`: all), or dropped for good.
    DeadLetters {
        seqs: Option<Vec<u64>>,
        action: DeadLetterAction,
        reply: oneshot::Sender<Result<u64, AckError>>,
    },
}

/// Why the forwarder gave up on a record (stored with it in the dead-letter table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterCause {
    /// `too_large`, `invalid_record`, `topic_authorization`, `invalid_topic`, `unknown_topic`,
    /// `attempts` (docs/KAFKA.md, "Poison records").
    pub reason: &'static str,
    /// The last error, as Kafka's client reported it.
    pub error: String,
    /// The Kafka topic the forwarder tried.
    pub kafka_topic: String,
    pub attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadLetterAction {
    Retry,
    Drop,
}

/// A record in the dead-letter table, as the API and the CLI list it (the payload is not
/// listed: it can be megabytes; its size is).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    pub seq: u64,
    pub device_id: String,
    pub source: String,
    pub topic: String,
    pub route: String,
    pub received_at_ms: i64,
    pub content_type: Option<String>,
    pub size: u64,
    pub reason: String,
    pub error: String,
    pub kafka_topic: String,
    pub attempts: u32,
    pub dead_at_ms: i64,
}

#[derive(Debug, Clone, Copy)]
struct RouteInfo {
    priority: u8,
    when_full: WhenFull,
}

/// State shared by the handle, the writer and whoever reports on them.
#[derive(Debug)]
pub(crate) struct Shared {
    pub path: PathBuf,
    pub max_record_bytes: u64,
    routes: HashMap<String, RouteInfo>,
    pub metrics: OutboxMetrics,
    pub quarantine: Option<Quarantine>,
    pub started: Instant,
    /// Milliseconds since `started` at which the writer last proved it was making progress
    /// (finished a commit, or sat idle with nothing queued).
    pub writer_heartbeat_ms: AtomicU64,
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    /// Wall-clock receipt time of the oldest held record, `i64::MIN` when empty.
    pub oldest_received_ms: AtomicI64,
    /// The next sequence number to be assigned, published after every commit: every record
    /// with a smaller sequence is committed (or already deleted). The forwarder waits on it.
    pub next_seq: tokio::sync::watch::Sender<u64>,
    /// The outbox's identity (`meta.outbox_id`), given when the file was created.
    pub outbox_id: Arc<str>,
    /// `meta.unnamed_checkpoints`: see [`Outbox::owns_checkpoint`].
    pub unnamed_checkpoints: bool,
    /// The filesystem is full: appends are refused, the disk reserve is released (see
    /// [`disk`]).
    pub disk_full: AtomicBool,
    /// Records and bytes in the dead-letter table.
    pub dead_letters: AtomicU64,
    pub dead_letter_bytes: AtomicU64,
    /// Bumped after every commit that moved dead letters back into `records`: their sequences
    /// are below what the forwarder has read, so it plans again.
    pub revived: tokio::sync::watch::Sender<u64>,
    /// `PRAGMA synchronous` as the running writer's connection reports it (0 OFF, 1 NORMAL,
    /// 2 FULL, 3 EXTRA); -1 until the writer has started.
    pub synchronous: AtomicI64,
}

impl Shared {
    pub fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.writer_heartbeat_ms.store(ms, Ordering::Relaxed);
    }
}

/// Handle to the outbox. Clone it freely; all clones feed the same writer.
#[derive(Debug, Clone)]
pub struct Outbox {
    /// Boxed: the channel allocates its slots in blocks of 32, and a block of unboxed requests
    /// is over 1 KiB, which glibc's malloc serves only after consolidating its fast bins (a
    /// measurable share of the MQTT front's CPU); a block of pointers is a small allocation.
    tx: mpsc::Sender<Box<Request>>,
    shared: Arc<Shared>,
}

impl Outbox {
    /// The outbox's identity: random, given when the file was created, sent with every record as
    /// `outpost-outbox`. A new file (after a quarantine, or a wiped data directory) gets a new one.
    pub fn id(&self) -> &str {
        &self.shared.outbox_id
    }

    /// Whether an exactly-once checkpoint naming `outbox` (`None`: written before outboxes had
    /// ids) describes this outbox's records. One of another outbox — the file before a
    /// quarantine, a wiped data directory — never does: its sequences are not this file's.
    pub fn owns_checkpoint(&self, outbox: Option<&str>) -> bool {
        match outbox {
            Some(id) => id == &*self.shared.outbox_id,
            None => self.shared.unnamed_checkpoints,
        }
    }

    /// Appends one record; resolves with its sequence number once it is committed.
    pub async fn append(&self, envelope: Envelope) -> Result<u64, AppendError> {
        let seqs = self.append_all(vec![envelope]).await?;
        seqs.first().copied().ok_or(AppendError::Closed)
    }

    /// Appends records atomically: either all are committed (sequence numbers returned in
    /// order) or none is.
    pub async fn append_all(&self, envelopes: Vec<Envelope>) -> Result<Vec<u64>, AppendError> {
        self.append_request(envelopes, None).await
    }

    /// Appends `envelope` unless a record was stored under `key` before (and the key not
    /// released since): then nothing is stored and that record's sequence is returned. The key
    /// is committed in the same transaction as the record, so the check holds across a crash.
    pub async fn append_once(&self, envelope: Envelope, key: String) -> Result<u64, AppendError> {
        let seqs = self.append_request(vec![envelope], Some(key)).await?;
        seqs.first().copied().ok_or(AppendError::Closed)
    }

    /// Forgets idempotency keys: `keys`, and with `prefix` every key that starts with it.
    /// Resolves after the commit.
    pub async fn release_keys(
        &self,
        keys: Vec<String>,
        prefix: Option<String>,
    ) -> Result<(), AckError> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Box::new(Request::Release {
                keys,
                prefix,
                reply,
            }))
            .await
            .map_err(|_| AckError::Closed)?;
        done.await.map_err(|_| AckError::Closed)?
    }

    /// The idempotency keys held that start with `prefix`.
    pub fn held_keys(&self, prefix: &str) -> Result<Vec<String>, rusqlite::Error> {
        self.reader()?.keys_with_prefix(prefix)
    }

    async fn append_request(
        &self,
        envelopes: Vec<Envelope>,
        key: Option<String>,
    ) -> Result<Vec<u64>, AppendError> {
        let records = self.prepare(envelopes)?;
        let (reply, done) = oneshot::channel();
        let request = Request::Append {
            records,
            key,
            queued_at: Instant::now(),
            reply,
        };
        // A full queue makes us wait here: that is the back-pressure on ingress.
        self.tx
            .send(Box::new(request))
            .await
            .map_err(|_| AppendError::Closed)?;
        done.await.map_err(|_| AppendError::Closed)?
    }

    fn prepare(&self, envelopes: Vec<Envelope>) -> Result<Vec<Pending>, AppendError> {
        let mut records = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            let Some(route) = self.shared.routes.get(&*envelope.route) else {
                return Err(AppendError::UnknownRoute(envelope.route.to_string()));
            };
            let priority = envelope.priority.unwrap_or(route.priority);
            let size = envelope.accounted_size();
            if size > self.shared.max_record_bytes {
                self.shared
                    .metrics
                    .rejected(&envelope.route, "too_large", 1);
                return Err(AppendError::TooLarge {
                    size,
                    max: self.shared.max_record_bytes,
                });
            }
            records.push(Pending {
                envelope,
                priority,
                when_full: route.when_full,
                size,
            });
        }
        Ok(records)
    }

    /// Deletes delivered records. Unknown sequence numbers (already acked or evicted) are ignored;
    /// resolves with how many records were deleted, after the deletion is committed.
    pub async fn ack(&self, seqs: Vec<u64>) -> Result<u64, AckError> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Box::new(Request::Ack { seqs, reply }))
            .await
            .map_err(|_| AckError::Closed)?;
        done.await.map_err(|_| AckError::Closed)?
    }

    /// Moves the record `seq` to the dead-letter table with `why`, after Kafka refused it for
    /// good. Resolves after the commit: true if it was moved, false if it is no longer in the
    /// outbox (already acknowledged or evicted).
    pub async fn dead_letter(&self, seq: u64, why: DeadLetterCause) -> Result<bool, AckError> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Box::new(Request::DeadLetter { seq, why, reply }))
            .await
            .map_err(|_| AckError::Closed)?;
        done.await.map_err(|_| AckError::Closed)?
    }

    /// Puts dead letters back into the outbox to be forwarded again, under their own sequences
    /// (`None`: every dead letter). Resolves with how many moved, after the commit; the
    /// forwarder picks them up at once (see [`Outbox::revived`]).
    pub async fn retry_dead_letters(&self, seqs: Option<Vec<u64>>) -> Result<u64, AckError> {
        self.dead_letters_request(seqs, DeadLetterAction::Retry)
            .await
    }

    /// Deletes dead letters for good (`None`: all). Resolves with how many, after the commit.
    pub async fn drop_dead_letters(&self, seqs: Option<Vec<u64>>) -> Result<u64, AckError> {
        self.dead_letters_request(seqs, DeadLetterAction::Drop)
            .await
    }

    async fn dead_letters_request(
        &self,
        seqs: Option<Vec<u64>>,
        action: DeadLetterAction,
    ) -> Result<u64, AckError> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Box::new(Request::DeadLetters {
                seqs,
                action,
                reply,
            }))
            .await
            .map_err(|_| AckError::Closed)?;
        done.await.map_err(|_| AckError::Closed)?
    }

    /// Up to `limit` dead letters with a sequence above `after`, oldest first. Blocking (a
    /// read-only connection of its own): call it off the async threads.
    pub fn list_dead_letters(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, rusqlite::Error> {
        self.reader()?.dead_letters(after, limit)
    }

    /// Whether the filesystem is full: appends are refused until it has room for the disk
    /// reserve again; deletes go on. An alarm.
    pub fn disk_full(&self) -> bool {
        self.shared.disk_full.load(Ordering::Relaxed)
    }

    /// Records and bytes in the dead-letter table: an alarm when not zero.
    pub fn dead_letter_figures(&self) -> (u64, u64) {
        (
            self.shared.dead_letters.load(Ordering::Relaxed),
            self.shared.dead_letter_bytes.load(Ordering::Relaxed),
        )
    }

    /// Changes whenever dead letters were put back into the outbox.
    pub fn revived(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.revived.subscribe()
    }

    /// Watches the next sequence number to be assigned: it changes after every commit that
    /// added records, and every record below it is committed. The forwarder waits on it.
    pub fn committed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.next_seq.subscribe()
    }

    /// Opens a new read-only connection for the forwarder (or a test).
    pub fn reader(&self) -> Result<OutboxReader, rusqlite::Error> {
        OutboxReader::open(&self.shared.path)
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    pub fn metrics(&self) -> &OutboxMetrics {
        &self.shared.metrics
    }

    /// The durability the running writer's connection really has (`PRAGMA synchronous` read back
    /// on the writer thread): `"full"`, `"normal"`, …; `None` before the writer started.
    pub fn synchronous(&self) -> Option<&'static str> {
        match self.shared.synchronous.load(Ordering::Relaxed) {
            0 => Some("off"),
            1 => Some("normal"),
            2 => Some("full"),
            3 => Some("extra"),
            _ => None,
        }
    }

    /// The corrupt file this outbox replaced at startup, if any: an alarm for status reports.
    pub fn quarantine(&self) -> Option<&Quarantine> {
        self.shared.quarantine.as_ref()
    }

    /// How long ago the writer last proved it was making progress. The systemd watchdog is fed
    /// only while this is small.
    pub fn writer_idle_for(&self) -> Duration {
        let now = self.shared.started.elapsed().as_millis() as u64;
        let beat = self.shared.writer_heartbeat_ms.load(Ordering::Relaxed);
        Duration::from_millis(now.saturating_sub(beat))
    }

    /// True once the writer has stopped accepting appends.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Records and bytes held, and the oldest record's wall-clock receipt time.
    pub fn figures(&self) -> (u64, u64, Option<i64>) {
        let oldest = self.shared.oldest_received_ms.load(Ordering::Relaxed);
        (
            self.shared.records.load(Ordering::Relaxed),
            self.shared.bytes.load(Ordering::Relaxed),
            (oldest != i64::MIN).then_some(oldest),
        )
    }

    /// Refreshes gauges that depend on the time of the scrape (the oldest record's age).
    pub fn refresh_gauges(&self, now_ms: i64) {
        let (_, _, oldest) = self.figures();
        let age = oldest.map_or(0.0, |ms| (now_ms.saturating_sub(ms)).max(0) as f64 / 1000.0);
        self.shared.metrics.oldest_age_seconds.set(age);
    }
}

/// Milliseconds since the Unix epoch by the wall clock (0 if the clock is before 1970).
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// RFC 3339 in UTC for Unix milliseconds: `2024-05-01T12:00:00Z`, or with `millis`
/// `2024-05-01T12:00:00.123Z` (proleptic Gregorian calendar, no time zone database needed).
pub fn rfc3339_utc(unix_ms: i64, millis: bool) -> String {
    let (days, ms_of_day) = (
        unix_ms.div_euclid(86_400_000),
        unix_ms.rem_euclid(86_400_000),
    );
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let seconds = ms_of_day / 1000;
    let fraction = if millis {
        format!(".{:03}", ms_of_day % 1000)
    } else {
        String::new()
    };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{fraction}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// Unix milliseconds of an RFC 3339 date-time (`2024-05-01T12:00:00Z`,
/// `2024-05-01T14:00:00.5+02:00`; `t`/`z` and a space for `T` accepted as RFC 3339 allows);
/// `None` when `text` is not one. The inverse of [`rfc3339_utc`]; fractions beyond
/// milliseconds are truncated.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(range)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0_i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let separators = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if b.len() < 20
        || separators.iter().any(|&(i, c)| b[i] != c)
        || !matches!(b[10], b'T' | b't' | b' ')
    {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let valid = (1..=12).contains(&month)
        && day >= 1
        && day <= month_days[(month - 1) as usize]
        && hour < 24
        && minute < 60
        && second <= 60;
    if !valid {
        return None;
    }
    let mut rest = &b[19..];
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix(b".") {
        let n = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        millis = fraction[..n.min(3)]
            .iter()
            .fold(0_i64, |m, d| m * 10 + i64::from(d - b'0'))
            * 10_i64.pow(3 - n.min(3) as u32);
        rest = &fraction[n..];
    }
    let offset_minutes = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let number = |hi: u8, lo: u8| {
                (hi.is_ascii_digit() && lo.is_ascii_digit())
                    .then(|| i64::from(hi - b'0') * 10 + i64::from(lo - b'0'))
            };
            let (h, m) = (number(*h1, *h2)?, number(*m1, *m2)?);
            if h > 23 || m > 59 {
                return None;
            }
            if *sign == b'-' {
                -(h * 60 + m)
            } else {
                h * 60 + m
            }
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm), the inverse of `rfc3339_utc`'s.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    Some(seconds * 1000 + millis)
}

#[cfg(test)]
mod tests {
    use super::{parse_rfc3339, rfc3339_utc};

    #[test]
    fn rfc3339_parses_back_what_it_formats_and_honours_offsets() {
        for ms in [0, 951_782_400_123, 1_796_000_000_999, -86_400_000] {
            assert_eq!(parse_rfc3339(&rfc3339_utc(ms, true)), Some(ms));
            assert_eq!(
                parse_rfc3339(&rfc3339_utc(ms, false)),
                Some(ms - ms.rem_euclid(1000))
            );
        }
        assert_eq!(parse_rfc3339("1970-01-01T02:00:00.5+02:00"), Some(500));
        assert_eq!(parse_rfc3339("1970-01-01t00:00:00.123456z"), Some(123));
        assert_eq!(parse_rfc3339("1969-12-31 23:30:00-00:30"), Some(0));
        for bad in [
            "",
            "1970-01-01",
            "1970-01-01T00:00:00",
            "1970-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "1970-01-01T24:00:00Z",
            "1970-01-01T00:00:00.Z",
            "1970-01-01T00:00:00+2:00",
            "1970-01-01T00:00:00Z ",
            "１970-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn rfc3339_in_utc_with_and_without_milliseconds() {
        assert_eq!(rfc3339_utc(0, false), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339_utc(951_782_400_123, true),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            rfc3339_utc(1_714_564_800_123, false),
            "2024-05-01T12:00:00Z"
        );
        assert_eq!(
            rfc3339_utc(1_796_619_600_999, true),
            "2026-12-07T05:00:00.999Z"
        );
        assert_eq!(rfc3339_utc(-1, true), "1969-12-31T23:59:59.999Z");
    }
}
