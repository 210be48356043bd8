//! `apps.db`: the apps created through the API, one row per app holding its spec as JSON.
//! Written before the change takes effect, read once at start. Config apps are never stored.

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
             CREATE TABLE IF NOT EXISTS apps (name TEXT PRIMARY KEY, spec TEXT NOT NULL);",
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

    pub async fn delete(&self, name: String) -> Result<(), StoreError> {
        self.run(move |c| {
            c.execute("DELETE FROM apps WHERE name = ?1", [&name])
                .map(drop)
        })
        .await
    }
}
