//! Opening the outbox: integrity check, quarantine of a corrupt file, pragmas, migrations.
//!
//! A corrupt file must never cause a crash loop (contract point 8): it is renamed aside to
//! `outbox.db.corrupt-<unix seconds>` (with its `-wal`/`-shm` companions), a fresh outbox is
//! created, and the [`Quarantine`] is reported as an alarm in logs, metrics and status. Errors that
//! are *not* corruption (permissions, a newer schema, I/O) are returned: quarantining a healthy
//! file because of them would throw away good data.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64};
use std::time::Instant;

use outpost_config::Synchronous;
use rusqlite::{Connection, OptionalExtension};
use tokio::sync::mpsc;

use super::disk::Reserve;
use super::schema;
use super::writer::{OutboxWriter, Totals, WriterState};
use super::{Outbox, OutboxMetrics, OutboxOptions, RouteInfo, Shared, now_unix_ms};
use crate::sqlite::{self, MigrateError, QuarantineError};

/// A corrupt outbox file that was moved aside at startup.
pub use crate::sqlite::Quarantine;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The data directory or file cannot be created or read. Fix permissions or the path.
    #[error("outbox {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// SQLite refused an operation that is not explained by corruption.
    #[error("outbox {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// The schema cannot be brought to this build's version. Do not start.
    #[error("outbox {path}: {source}")]
    Schema {
        path: PathBuf,
        #[source]
        source: MigrateError,
    },
}

/// Opens (or creates) the outbox. Blocking: call it before the runtime's hot path or in
/// `spawn_blocking`. The returned writer must be spawned for appends and acks to complete.
pub fn open(options: OutboxOptions) -> Result<(Outbox, OutboxWriter), OpenError> {
    let path = options.path.clone();
    let dir = path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    fs::create_dir_all(&dir).map_err(|source| OpenError::Io {
        path: dir.clone(),
        source,
    })?;

    let quarantine = sqlite::quarantine_if_corrupt(
        &path,
        options.integrity_check,
        "Outbox database is corrupt: moved it aside and started a fresh outbox",
    )
    .map_err(|e| match e {
        QuarantineError::Check { path, source } => OpenError::Sqlite { path, source },
        QuarantineError::Move { path, source } => OpenError::Io { path, source },
    })?;
    let sqlite = |source| OpenError::Sqlite {
        path: path.clone(),
        source,
    };

    // A full filesystem must not stop the start: SQLite needs room even to open (its shared
    // memory file) and to delete. See `disk`.
    let reserve = Reserve::new(&dir, options.disk_reserve);
    let disk_full = if reserve.disk_full() {
        reserve.release();
        true
    } else {
        !reserve.take()
    };
    let mut conn = Connection::open(&path).map_err(sqlite)?;
    configure(&conn, options.synchronous).map_err(sqlite)?;
    schema::migrate(&mut conn).map_err(|source| OpenError::Schema {
        path: path.clone(),
        source,
    })?;

    let (mut next_seq, count, bytes, outbox_id, unnamed_checkpoints): (
        i64,
        i64,
        i64,
        String,
        bool,
    ) = conn
        .query_row(
            "SELECT next_seq, record_count, record_bytes, outbox_id, unnamed_checkpoints \
             FROM meta WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .map_err(sqlite)?;
    if next_seq == 1
        && let Some(floor) = sequence_floor(&path)
    {
        // Written before anything else: a crash right after this leaves a file that still
        // starts above the quarantined ones (and the floor is found again anyway).
        conn.execute("UPDATE meta SET next_seq = ?1 WHERE id = 1", [floor])
            .map_err(sqlite)?;
        tracing::warn!(
            next_seq = floor,
            "A quarantined outbox lies beside this new one: its sequences continue above the old file's"
        );
        next_seq = floor;
    }
    // This boot's row; on a full disk it is written with the first records instead.
    let boot = match insert_boot(&conn) {
        Ok(boot) => Some(boot),
        Err(e) if disk_full || crate::sqlite::is_disk_full(&e) => {
            tracing::warn!(error = %e, "Disk full: starting without writing; appends wait for space");
            None
        }
        Err(e) => return Err(sqlite(e)),
    };
    let oldest: Option<i64> = conn
        .query_row(
            "SELECT received_at_ms FROM records ORDER BY seq LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(sqlite)?;

    let (dead, dead_bytes): (i64, i64) = conn
        .query_row(
            "SELECT count(*), coalesce(sum(size), 0) FROM dead_letters",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(sqlite)?;
    if dead > 0 {
        tracing::warn!(
            records = dead,
            bytes = dead_bytes,
            "The outbox holds dead letters (records Kafka refused for good): see `outpost dead-letters list`"
        );
    }

    let metrics = OutboxMetrics::default();
    metrics.dead_letters.set(dead);
    metrics.records.set(count);
    metrics.bytes.set(bytes);
    if quarantine.is_some() {
        metrics.corruption_alarm.set(1);
    }
    let routes = options
        .routes
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                RouteInfo {
                    priority: r.priority,
                    when_full: r.when_full,
                },
            )
        })
        .collect::<HashMap<_, _>>();
    let shared = Arc::new(Shared {
        path: path.clone(),
        max_record_bytes: options.max_record_bytes,
        routes,
        metrics,
        quarantine,
        started: Instant::now(),
        writer_heartbeat_ms: AtomicU64::new(0),
        records: AtomicU64::new(count as u64),
        bytes: AtomicU64::new(bytes as u64),
        oldest_received_ms: AtomicI64::new(oldest.unwrap_or(i64::MIN)),
        next_seq: tokio::sync::watch::Sender::new(next_seq as u64),
        outbox_id: Arc::from(outbox_id.as_str()),
        unnamed_checkpoints,
        dead_letters: AtomicU64::new(dead as u64),
        dead_letter_bytes: AtomicU64::new(dead_bytes as u64),
        revived: tokio::sync::watch::Sender::new(0),
        synchronous: AtomicI64::new(-1),
        disk_full: AtomicBool::new(disk_full),
    });
    shared.metrics.disk_full.set(i64::from(disk_full));
    tracing::info!(
        path = %path.display(),
        outbox_id = %outbox_id,
        records = count,
        bytes,
        next_seq,
        "Outbox opened"
    );

    let (tx, rx) = mpsc::channel(options.queue_capacity.max(1));
    let totals = Totals {
        next_seq: next_seq as u64,
        count: count as u64,
        bytes: bytes as u64,
        dead_count: dead as u64,
        dead_bytes: dead_bytes as u64,
    };
    let state = WriterState::new(conn, dir, boot, totals, reserve);
    let writer = OutboxWriter::new(rx, state, Arc::clone(&shared), &options);
    Ok((Outbox { tx, shared }, writer))
}

/// Records this start in `boots` (the kernel boot id every record of this run refers to).
pub(crate) fn insert_boot(conn: &Connection) -> rusqlite::Result<i64> {
    conn.execute(
        "INSERT INTO boots (boot_id, opened_at_ms) VALUES (?1, ?2)",
        (kernel_boot_id(), now_unix_ms()),
    )?;
    Ok(conn.last_insert_rowid())
}

/// Connection settings of the write connection.
fn configure(conn: &Connection, synchronous: Synchronous) -> rusqlite::Result<()> {
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!("journal_mode WAL refused (got {mode})")),
        ));
    }
    conn.pragma_update(
        None,
        "synchronous",
        match synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        },
    )?;
    // Keep the WAL from growing without bound on a gateway's small disk after a checkpoint.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    // Readers (`outpost buffer stats`, the forwarder) never make the writer fail; they may only
    // delay a checkpoint.
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(())
}

/// The kernel's id for this boot: records received in one boot can be ordered by it even when the
/// wall clock was wrong. A random id when the kernel does not offer one.
pub fn kernel_boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map_or_else(
        |_| {
            format!(
                "unknown-{:x}",
                now_unix_ms() ^ i64::from(std::process::id())
            )
        },
        |s| s.trim().to_owned(),
    )
}

/// Where a new outbox's sequences start when quarantined outboxes lie beside it: above the highest
/// sequence any of them used, so that `(outpost-gateway, outpost-seq)` never names two records a
/// consumer could confuse. A file that cannot be read counts with a floor derived from the wall
/// clock ([`clock_floor`]). `None` when there is no quarantined file (a first start: sequence 1).
fn sequence_floor(path: &Path) -> Option<i64> {
    let dir = path.parent()?;
    let prefix = format!("{}.corrupt-", path.file_name()?.to_string_lossy());
    let quarantined = fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&prefix) && !n.ends_with("-wal") && !n.ends_with("-shm")
            })
        })
        .collect::<Vec<_>>();
    quarantined
        .iter()
        .map(|p| {
            highest_next_seq(p).unwrap_or_else(|e| {
                tracing::warn!(file = %p.display(), error = %e, "Cannot read the sequences of a quarantined outbox: continuing from a floor derived from the clock");
                clock_floor()
            })
        })
        .max()
}

/// The next sequence a (quarantined) outbox file would have given: above its `meta.next_seq` and
/// its highest record, whichever is higher (a corrupt file may disagree with itself).
fn highest_next_seq(path: &Path) -> rusqlite::Result<i64> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let from_meta: i64 =
        conn.query_row("SELECT next_seq FROM meta WHERE id = 1", [], |r| r.get(0))?;
    let from_records: Option<i64> =
        conn.query_row("SELECT max(seq) FROM records", [], |r| r.get(0))?;
    Ok(from_meta.max(from_records.map_or(1, |s| s + 1)))
}

/// A sequence floor from the wall clock: Unix milliseconds × 1,000. Above anything an outbox
/// started from sequence 1 can reach, and above the sequences of an outbox that itself started
/// from an earlier floor unless it stored more than 1,000 records per millisecond on average since
/// (the writer commits at most a few hundred). Stays below 2^53 (exact in JSON and doubles) until
/// the year 2255. Only as good as the clock: a gateway without a real-time clock that starts in
/// 1970 gets a floor that may be too low, which is logged.
fn clock_floor() -> i64 {
    let ms = now_unix_ms();
    if ms < 1_577_836_800_000 {
        tracing::warn!(
            unix_ms = ms,
            "The wall clock is before 2020: the sequence floor derived from it may reuse old sequences"
        );
    }
    ms.max(1).saturating_mul(1_000)
}
