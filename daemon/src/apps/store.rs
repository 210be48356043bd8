//! `apps.db`: the apps created through the API, one row per app holding its spec as JSON
//! (written before the change takes effect, read once at start; config apps are never stored),
//! `app_events`, every app's status changes (the newest [`EVENTS_PER_APP`] per app), and
//! `app_failed`, the apps given up on as FAILED (config and API apps alike), so that a daemon
//! restart adopts them as FAILED instead of running their crash loop again. A FAILED row holds
//! the digest of the spec that failed: a changed spec (or an API restart) clears it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use outpost_config::AppConfig;
use rusqlite::Connection;

/// A failure of `apps.db`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The change was not saved: report it; the desired set is unchanged.
    #[error("{path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// A stored spec no longer parses: the row is skipped at load.
    #[error("app \"{name}\" in {path}: {source}")]
    Spec {
        name: String,
        path: PathBuf,
        source: serde_json::Error,
    },
    /// Internal: the blocking task died.
    #[error("apps.db task failed: {0}")]
    Task(String),
}

/// Status changes kept per app.
pub const EVENTS_PER_APP: usize = 100;

/// One recorded status change of an app.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AppEvent {
    /// Unix milliseconds.
    pub at_ms: i64,
    /// `ACTIVE`, `INACTIVE` or `FAILED`.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// Restarts made by Outpost so far (since the daemon started).
    pub restarts: u64,
}

/// An app given up on as FAILED, as `app_failed` keeps it across daemon restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// [`super::reconcile::spec_digest`] of the spec that failed.
    pub spec_digest: String,
    pub reason: String,
    pub exit_code: Option<i64>,
    /// The engine's `finished_at` of the exit that made it FAILED: that exit is not counted
    /// again after a restart.
    pub finished_at: Option<String>,
    pub restarts: u64,
}

#[derive(Debug, Clone)]
pub struct AppStore {
    path: Arc<PathBuf>,
    conn: Arc<Mutex<Connection>>,
}

impl AppStore {
    /// Opens (creating) `apps.db` in `data_dir` and returns the saved specs. A row that does
    /// not parse is logged and skipped.
    pub fn open(data_dir: &Path) -> Result<(AppStore, Vec<AppConfig>), StoreError> {
        let path = data_dir.join("apps.db");
        let sqlite = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(sqlite)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS apps (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS app_events (
                 id        INTEGER PRIMARY KEY,
                 name      TEXT    NOT NULL,
                 at_ms     INTEGER NOT NULL,
                 state     TEXT    NOT NULL,
                 reason    TEXT,
                 exit_code INTEGER,
                 restarts  INTEGER NOT NULL,
                 seq       INTEGER NOT NULL DEFAULT 0  -- order within one process and millisecond
             );
             CREATE INDEX IF NOT EXISTS app_events_by_name ON app_events(name, id);
             CREATE TABLE IF NOT EXISTS app_failed (
                 name        TEXT PRIMARY KEY,
                 spec_digest TEXT    NOT NULL,
                 reason      TEXT    NOT NULL,
                 exit_code   INTEGER,
                 finished_at TEXT,             -- the engine's finished_at of the exit handled
                 restarts    INTEGER NOT NULL
             );",
        )
        .map_err(sqlite)?;
        let rows: Vec<(String, String)> = {
            let mut stmt = conn
                .prepare("SELECT name, spec FROM apps ORDER BY name")
                .map_err(sqlite)?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(sqlite)?
                .collect::<Result<_, _>>()
                .map_err(sqlite)?
        };
        let mut saved = Vec::with_capacity(rows.len());
        for (name, text) in rows {
            match serde_json::from_str::<AppConfig>(&text) {
                Ok(spec) => saved.push(spec),
                Err(source) => {
                    let e = StoreError::Spec {
                        name,
                        path: path.clone(),
                        source,
                    };
                    tracing::error!(error = %e, "Skipping a saved app");
                }
            }
        }
        Ok((
            AppStore {
                path: Arc::new(path),
                conn: Arc::new(Mutex::new(conn)),
            },
            saved,
        ))
    }

    async fn run(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<()> + Send + 'static,
    ) -> Result<(), StoreError> {
        let (conn, path) = (Arc::clone(&self.conn), Arc::clone(&self.path));
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&conn).map_err(|source| StoreError::Sqlite {
                path: path.to_path_buf(),
                source,
            })
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    pub async fn save(&self, spec: AppConfig) -> Result<(), StoreError> {
        let text = serde_json::to_string(&spec).map_err(|source| StoreError::Spec {
            name: spec.name.clone(),
            path: self.path.to_path_buf(),
            source,
        })?;
        self.run(move |c| {
            c.execute(
                "INSERT INTO apps (name, spec) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET spec = excluded.spec",
                (&spec.name, &text),
            )
            .map(drop)
        })
        .await
    }

    /// Records a status change of `name`, keeping the newest [`EVENTS_PER_APP`] of that app.
    /// Events are written by background tasks that may run out of order; `order` (increasing
    /// within a process) with the timestamp gives the order they happened in.
    pub async fn record(
        &self,
        name: String,
        event: AppEvent,
        order: u64,
    ) -> Result<(), StoreError> {
        self.run(move |c| {
            c.execute(
                "INSERT INTO app_events (name, at_ms, state, reason, exit_code, restarts, seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                (
                    &name,
                    event.at_ms,
                    &event.state,
                    &event.reason,
                    event.exit_code,
                    event.restarts as i64,
                    order as i64,
                ),
            )?;
            c.execute(
                "DELETE FROM app_events WHERE name = ?1 AND id <= (
                     SELECT id FROM app_events WHERE name = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                (&name, EVENTS_PER_APP as i64),
            )
            .map(drop)
        })
        .await
    }

    /// The FAILED apps, by name (read once at start).
    pub fn failures(&self) -> Result<Vec<(String, Failure)>, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let read = || -> rusqlite::Result<Vec<(String, Failure)>> {
            let mut stmt = conn.prepare(
                "SELECT name, spec_digest, reason, exit_code, finished_at, restarts
                 FROM app_failed ORDER BY name",
            )?;
            stmt.query_map([], |r| {
                Ok((
                    r.get(0)?,
                    Failure {
                        spec_digest: r.get(1)?,
                        reason: r.get(2)?,
                        exit_code: r.get(3)?,
                        finished_at: r.get(4)?,
                        restarts: r.get::<_, i64>(5)? as u64,
                    },
                ))
            })?
            .collect()
        };
        read().map_err(|source| StoreError::Sqlite {
            path: self.path.to_path_buf(),
            source,
        })
    }

    /// Remembers that `name` FAILED (replacing an earlier failure of it).
    pub async fn save_failure(&self, name: String, f: Failure) -> Result<(), StoreError> {
        self.run(move |c| {
            c.execute(
                "INSERT INTO app_failed (name, spec_digest, reason, exit_code, finished_at, restarts)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(name) DO UPDATE SET spec_digest = excluded.spec_digest,
                     reason = excluded.reason, exit_code = excluded.exit_code,
                     finished_at = excluded.finished_at, restarts = excluded.restarts",
                (
                    &name,
                    &f.spec_digest,
                    &f.reason,
                    f.exit_code,
                    &f.finished_at,
                    f.restarts as i64,
                ),
            )
            .map(drop)
        })
        .await
    }

    /// Forgets a FAILED state (restarted, changed, deleted, or running again).
    pub async fn clear_failure(&self, name: String) -> Result<(), StoreError> {
        self.run(move |c| {
            c.execute("DELETE FROM app_failed WHERE name = ?1", [&name])
                .map(drop)
        })
        .await
    }

    /// The recorded status changes of `name`, newest first.
    pub async fn events(&self, name: String) -> Result<Vec<AppEvent>, StoreError> {
        let (conn, path) = (Arc::clone(&self.conn), Arc::clone(&self.path));
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            let read = || -> rusqlite::Result<Vec<AppEvent>> {
                let mut stmt = conn.prepare_cached(
                    "SELECT at_ms, state, reason, exit_code, restarts FROM app_events
                     WHERE name = ?1 ORDER BY at_ms DESC, seq DESC",
                )?;
                stmt.query_map([&name], |r| {
                    Ok(AppEvent {
                        at_ms: r.get(0)?,
                        state: r.get(1)?,
                        reason: r.get(2)?,
                        exit_code: r.get(3)?,
                        restarts: r.get::<_, i64>(4)? as u64,
                    })
                })?
                .collect()
            };
            read().map_err(|source| StoreError::Sqlite {
                path: path.to_path_buf(),
                source,
            })
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    pub async fn delete(&self, name: String) -> Result<(), StoreError> {
        self.run(move |c| {
            c.execute("DELETE FROM apps WHERE name = ?1", [&name])
                .map(drop)
        })
        .await
    }
}
