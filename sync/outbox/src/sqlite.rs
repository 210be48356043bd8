//! What every Outpost SQLite file does when it is opened: check its integrity, move it aside when
//! it is corrupt, and migrate its schema. Shared by the outbox and the device registry.
//!
//! Contract:
//! - Only corruption leads to quarantine: a failed check, or SQLite calling the file corrupt or
//!   not a database. Any other error (permissions, I/O, a newer schema) is returned, because
//!   moving a healthy file aside would throw its data away.
//! - A quarantined file keeps its `-wal`/`-shm` companions beside it under a name that is never
//!   reused, so a later quarantine cannot overwrite an earlier one.
//! - `PRAGMA user_version` is the schema version. Each migration runs in its own transaction and
//!   bumps it, so an interrupted upgrade resumes where it stopped; a file from a newer build is
//!   refused and left untouched.
//!
//! Callers wrap the errors in their own and supply the words of the log lines (`alarm`, `what`),
//! so an operator sees which database a line is about.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use outpost_config::IntegrityCheck;
use rusqlite::{Connection, ErrorCode, OpenFlags};

/// A corrupt database that was moved aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantine {
    /// Where the corrupt file now lives.
    pub moved_to: PathBuf,
    /// What the integrity check or SQLite said.
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    /// The check failed for a reason other than corruption (permissions, I/O, a lock): the file
    /// may be healthy and was left in place. Do not start.
    #[error("checking {path}: {source}")]
    Check {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// A file (the database or one of its companions) could not be renamed; the database may be
    /// half moved. Do not start.
    #[error("moving {path} aside: {source}")]
    Move {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Runs `check` on the database at `path`, if there is one, and [`quarantine`]s it when it is
/// corrupt: the check found problems, or SQLite said the file is corrupt or not a database.
/// `Ok(None)`: no file, or a sound one.
///
/// A quarantine is logged at ERROR with `alarm` as the message, which names the database and
/// what happens next (operators and end-to-end tests look for it); the caller raises its alarm.
pub fn quarantine_if_corrupt(
    path: &Path,
    check: IntegrityCheck,
    alarm: &str,
) -> Result<Option<Quarantine>, QuarantineError> {
    if !path.exists() {
        return Ok(None);
    }
    let reason = match integrity(path, check) {
        Ok(None) => return Ok(None),
        Ok(Some(problems)) => problems,
        Err(e) if is_corruption(&e) => e.to_string(),
        Err(source) => {
            return Err(QuarantineError::Check {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let moved_to = quarantine(path)?;
    tracing::error!(
        path = %path.display(),
        moved_to = %moved_to.display(),
        reason = %reason,
        "{alarm}"
    );
    Ok(Some(Quarantine { moved_to, reason }))
}

/// Runs `check` on an existing file: `Ok(None)` if it is sound, `Ok(Some(problems))` if the check
/// reported any. Even with [`IntegrityCheck::Off`] the header is read, so a file that is not a
/// database fails (see [`is_corruption`]).
pub fn integrity(path: &Path, check: IntegrityCheck) -> rusqlite::Result<Option<String>> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // Reading the schema forces SQLite to parse the header: garbage fails here with NOTADB.
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    })?;
    let pragma = match check {
        IntegrityCheck::Off => return Ok(None),
        IntegrityCheck::Quick => "PRAGMA quick_check(20)",
        IntegrityCheck::Full => "PRAGMA integrity_check(20)",
    };
    let mut stmt = conn.prepare(pragma)?;
    let lines = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(if lines.len() == 1 && lines[0] == "ok" {
        None
    } else {
        Some(lines.join("; "))
    })
}

/// Whether SQLite's error means the file itself is damaged (corrupt, or not a database).
pub fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// Whether SQLite's error means the filesystem is full ("database or disk is full", or an I/O
/// error while growing a file, which is how a full disk shows in the shared-memory file).
pub fn is_disk_full(e: &rusqlite::Error) -> bool {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => {
            f.code == ErrorCode::DiskFull
                || matches!(
                    f.extended_code,
                    rusqlite::ffi::SQLITE_IOERR_WRITE
                        | rusqlite::ffi::SQLITE_IOERR_SHMSIZE
                        | rusqlite::ffi::SQLITE_IOERR_TRUNCATE
                        | rusqlite::ffi::SQLITE_IOERR_FSYNC
                )
        }
        _ => false,
    }
}

/// Renames the database at `path` with its `-wal` and `-shm` companions to
/// `<path>.corrupt-<unix seconds>` (plus `.1`, `.2`, … if that name is taken) and returns the new
/// path of the database. Companions that do not exist are skipped. Fails only with
/// [`QuarantineError::Move`].
pub fn quarantine(path: &Path) -> Result<PathBuf, QuarantineError> {
    let moved_to = quarantine_path(path);
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", path.display()));
        let to = PathBuf::from(format!("{}{suffix}", moved_to.display()));
        match fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(QuarantineError::Move { path: from, source }),
        }
    }
    Ok(moved_to)
}

fn quarantine_path(path: &Path) -> PathBuf {
    let secs = crate::outbox::now_unix_ms() / 1000;
    let base = format!("{}.corrupt-{secs}", path.display());
    let mut candidate = PathBuf::from(&base);
    let mut n = 1;
    while candidate.exists() {
        candidate = PathBuf::from(format!("{base}.{n}"));
        n += 1;
    }
    candidate
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The file was written by a newer Outpost. Refuse to start; do not touch the file.
    #[error("schema version {found} is newer than this build supports ({supported})")]
    TooNew { found: u32, supported: u32 },
    /// SQLite failed while migrating; the failed step rolled back. `to` is 0 when the version
    /// could not even be read. Do not start.
    #[error("migrating schema to version {to}: {source}")]
    Sqlite {
        to: u32,
        #[source]
        source: rusqlite::Error,
    },
}

/// The schema version stored in the file (`PRAGMA user_version`; 0 for a new file).
pub fn user_version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
}

/// Brings the schema up to version `migrations.len()`, where `migrations[i]` is the SQL that
/// upgrades version `i` to `i + 1`. Each step runs in its own transaction and is logged as
/// "`<what>` schema migrated", so `what` is the capitalised name of the database ("Outbox").
pub fn migrate(conn: &mut Connection, migrations: &[&str], what: &str) -> Result<(), MigrateError> {
    let supported = migrations.len() as u32;
    let found = user_version(conn).map_err(|source| MigrateError::Sqlite { to: 0, source })?;
    if found > supported {
        return Err(MigrateError::TooNew { found, supported });
    }
    for (from, sql) in migrations.iter().enumerate().skip(found as usize) {
        let to = from as u32 + 1;
        let step = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", to)?;
            tx.commit()
        };
        step(conn).map_err(|source| MigrateError::Sqlite { to, source })?;
        tracing::info!(version = to, "{what} schema migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEPS: &[&str] = &["CREATE TABLE a (x)", "CREATE TABLE b (y)"];

    #[test]
    fn migrate_resumes_and_refuses_a_newer_file() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, &STEPS[..1], "Test").unwrap();
        assert_eq!(user_version(&conn).unwrap(), 1);
        migrate(&mut conn, STEPS, "Test").unwrap();
        assert_eq!(user_version(&conn).unwrap(), 2);
        let err = migrate(&mut conn, &STEPS[..1], "Test").unwrap_err();
        assert!(
            matches!(
                err,
                MigrateError::TooNew {
                    found: 2,
                    supported: 1
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_failed_step_rolls_back_and_keeps_the_version() {
        let mut conn = Connection::open_in_memory().unwrap();
        let err = migrate(&mut conn, &["CREATE TABLE a (x)", "NOT SQL"], "Test").unwrap_err();
        assert!(matches!(err, MigrateError::Sqlite { to: 2, .. }), "{err}");
        assert_eq!(user_version(&conn).unwrap(), 1);
    }

    #[test]
    fn garbage_is_quarantined_even_without_a_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        fs::write(&path, b"not a database, not at all").unwrap();
        let q = quarantine_if_corrupt(&path, IntegrityCheck::Off, "test")
            .unwrap()
            .expect("garbage is corrupt");
        assert!(!path.exists());
        assert!(q.moved_to.exists());
        assert!(
            quarantine_if_corrupt(&path, IntegrityCheck::Quick, "test")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn quarantine_moves_the_companions_and_never_reuses_a_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let mut moved = Vec::new();
        for _ in 0..2 {
            for suffix in ["", "-wal", "-shm"] {
                fs::write(format!("{}{suffix}", path.display()), suffix).unwrap();
            }
            let to = quarantine(&path).unwrap();
            for suffix in ["", "-wal", "-shm"] {
                let from = format!("{}{suffix}", path.display());
                let at = format!("{}{suffix}", to.display());
                assert!(!Path::new(&from).exists(), "{from}");
                assert_eq!(fs::read_to_string(&at).unwrap(), suffix, "{at}");
            }
            moved.push(to);
        }
        assert_ne!(moved[0], moved[1]);
    }

    #[test]
    fn a_sound_file_is_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let mut conn = Connection::open(&path).unwrap();
        migrate(&mut conn, STEPS, "Test").unwrap();
        drop(conn);
        for check in [IntegrityCheck::Quick, IntegrityCheck::Full] {
            assert!(
                quarantine_if_corrupt(&path, check, "test")
                    .unwrap()
                    .is_none()
            );
        }
        assert!(path.exists());
    }
}
