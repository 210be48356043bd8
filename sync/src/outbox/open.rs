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
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Instant;

use outpost_config::Synchronous;
use rusqlite::{Connection, OptionalExtension};
use tokio::sync::mpsc;

use super::schema;
use super::writer::{OutboxWriter, WriterState};
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

    let mut conn = Connection::open(&path).map_err(sqlite)?;
    configure(&conn, options.synchronous).map_err(sqlite)?;
    schema::migrate(&mut conn).map_err(|source| OpenError::Schema {
        path: path.clone(),
        source,
    })?;

    let (next_seq, count, bytes): (i64, i64, i64) = conn
        .query_row(
            "SELECT next_seq, record_count, record_bytes FROM meta WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(sqlite)?;
    conn.execute(
        "INSERT INTO boots (boot_id, opened_at_ms) VALUES (?1, ?2)",
        (kernel_boot_id(), now_unix_ms()),
    )
    .map_err(sqlite)?;
    let boot = conn.last_insert_rowid();
    let oldest: Option<i64> = conn
        .query_row(
            "SELECT received_at_ms FROM records ORDER BY seq LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(sqlite)?;

    let metrics = OutboxMetrics::default();
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
    });
    tracing::info!(
        path = %path.display(),
        records = count,
        bytes,
        next_seq,
        "Outbox opened"
    );

    let (tx, rx) = mpsc::channel(options.queue_capacity.max(1));
    let state = WriterState::new(conn, dir, boot, next_seq as u64, count as u64, bytes as u64);
    let writer = OutboxWriter::new(rx, state, Arc::clone(&shared), &options);
    Ok((Outbox { tx, shared }, writer))
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
