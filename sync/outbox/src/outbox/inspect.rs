//! Read-only inspection of an outbox file for `outpost buffer stats|verify`.
//!
//! Works on a live daemon's file without disturbing it: a read-only connection under WAL never
//! blocks the writer (a long `verify` may only postpone a checkpoint until it finishes).

use std::fs;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::schema;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// There is no outbox at that path: wrong data directory, or the daemon never ran.
    #[error("no outbox at {0}")]
    Missing(PathBuf),
    #[error("reading outbox {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouteStats {
    pub route: String,
    pub priority: u8,
    pub records: u64,
    pub bytes: u64,
    pub oldest_received_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub path: PathBuf,
    pub schema_version: u32,
    /// The outbox's identity (`outpost-outbox` on every record); `None` for a file not yet
    /// upgraded to schema 3 by a running daemon.
    pub outbox_id: Option<String>,
    pub records: u64,
    pub bytes: u64,
    pub oldest_seq: Option<u64>,
    pub newest_seq: Option<u64>,
    pub next_seq: u64,
    pub oldest_received_ms: Option<i64>,
    pub file_bytes: u64,
    pub wal_bytes: u64,
    pub boots: u64,
    pub routes: Vec<RouteStats>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verification {
    pub path: PathBuf,
    /// Empty when the file is sound.
    pub problems: Vec<String>,
}

fn open_read_only(path: &Path) -> Result<Connection, InspectError> {
    if !path.exists() {
        return Err(InspectError::Missing(path.to_path_buf()));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| InspectError::Sqlite {
        path: path.to_path_buf(),
        source,
    })?;
    let _ = conn.busy_timeout(std::time::Duration::from_secs(5));
    Ok(conn)
}

/// Counts, sizes and per-route figures, read in one consistent snapshot.
pub fn stats(path: &Path) -> Result<Stats, InspectError> {
    let mut conn = open_read_only(path)?;
    let sqlite = |source| InspectError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let tx = conn.transaction().map_err(sqlite)?;
    let schema_version = schema::version(&tx).map_err(sqlite)?;
    let (records, bytes, oldest_seq, newest_seq): (i64, i64, Option<i64>, Option<i64>) = tx
        .query_row(
            "SELECT count(*), coalesce(sum(size), 0), min(seq), max(seq) FROM records",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .map_err(sqlite)?;
    let next_seq: i64 = tx
        .query_row("SELECT next_seq FROM meta WHERE id = 1", [], |r| r.get(0))
        .map_err(sqlite)?;
    let outbox_id: Option<String> = if schema_version >= 3 {
        tx.query_row("SELECT outbox_id FROM meta WHERE id = 1", [], |r| r.get(0))
            .map_err(sqlite)?
    } else {
        None
    };
    let oldest_received_ms: Option<i64> = tx
        .query_row(
            "SELECT received_at_ms FROM records ORDER BY seq LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(sqlite)?;
    let boots: i64 = tx
        .query_row("SELECT count(*) FROM boots", [], |r| r.get(0))
        .map_err(sqlite)?;
    let routes = {
        let mut stmt = tx
            .prepare(
                "SELECT route, priority, count(*), sum(size), min(received_at_ms) FROM records \
                 GROUP BY route, priority ORDER BY priority DESC, route",
            )
            .map_err(sqlite)?;
        stmt.query_map([], |r| {
            Ok(RouteStats {
                route: r.get(0)?,
                priority: r.get(1)?,
                records: r.get::<_, i64>(2)? as u64,
                bytes: r.get::<_, i64>(3)? as u64,
                oldest_received_ms: r.get(4)?,
            })
        })
        .map_err(sqlite)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sqlite)?
    };
    let size_of = |p: PathBuf| fs::metadata(p).map_or(0, |m| m.len());
    Ok(Stats {
        path: path.to_path_buf(),
        schema_version,
        outbox_id,
        records: records as u64,
        bytes: bytes as u64,
        oldest_seq: oldest_seq.map(|s| s as u64),
        newest_seq: newest_seq.map(|s| s as u64),
        next_seq: next_seq as u64,
        oldest_received_ms,
        file_bytes: size_of(path.to_path_buf()),
        wal_bytes: size_of(PathBuf::from(format!("{}-wal", path.display()))),
        boots: boots as u64,
        routes,
    })
}

/// SQLite's full integrity check plus the outbox's own invariants (schema version, totals in
/// `meta` equal to the rows, no sequence at or beyond `next_seq`).
pub fn verify(path: &Path) -> Result<Verification, InspectError> {
    let mut conn = open_read_only(path)?;
    let sqlite = |source| InspectError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let mut problems = Vec::new();
    let tx = conn.transaction().map_err(sqlite)?;
    {
        let mut stmt = tx.prepare("PRAGMA integrity_check(100)").map_err(sqlite)?;
        let lines = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(sqlite)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(sqlite)?;
        if !(lines.len() == 1 && lines[0] == "ok") {
            problems.extend(lines.into_iter().map(|l| format!("sqlite: {l}")));
        }
    }
    let version = schema::version(&tx).map_err(sqlite)?;
    if version != schema::CURRENT_VERSION {
        problems.push(format!(
            "schema version {version}, this build expects {}",
            schema::CURRENT_VERSION
        ));
        return Ok(Verification {
            path: path.to_path_buf(),
            problems,
        });
    }
    let (count, bytes, max_seq): (i64, i64, Option<i64>) = tx
        .query_row(
            "SELECT count(*), coalesce(sum(size), 0), max(seq) FROM records",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(sqlite)?;
    let (next_seq, meta_count, meta_bytes): (i64, i64, i64) = tx
        .query_row(
            "SELECT next_seq, record_count, record_bytes FROM meta WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(sqlite)?;
    if meta_count != count {
        problems.push(format!(
            "meta.record_count is {meta_count} but {count} records exist"
        ));
    }
    if meta_bytes != bytes {
        problems.push(format!(
            "meta.record_bytes is {meta_bytes} but records sum to {bytes}"
        ));
    }
    if let Some(max) = max_seq.filter(|&m| m >= next_seq) {
        problems.push(format!(
            "record seq {max} is not below meta.next_seq {next_seq}"
        ));
    }
    Ok(Verification {
        path: path.to_path_buf(),
        problems,
    })
}
