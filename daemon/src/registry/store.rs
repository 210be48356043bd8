//! `registry.db`: the device inventory, persisted monitoring and queued commands (SQLite, WAL,
//! `synchronous=FULL`), separate from `outbox.db` so that neither can slow the other.
//!
//! Invariants:
//! - `PRAGMA user_version` is the schema version; each migration runs in its own transaction and
//!   bumps it, so an interrupted upgrade resumes. A file from a newer Outpost is refused, not
//!   touched.
//! - A corrupt file is never a crash loop (contract point 8): it is renamed to
//!   `registry.db.corrupt-<unix seconds>` (with its `-wal`/`-shm`), a fresh registry is created
//!   and the [`Quarantine`] is reported so the daemon raises an alarm. Other errors (permissions,
//!   a newer schema) stop the start instead.
//! - Secrets are never stored in clear: `devices.secret_hash` is the argon2id PHC string, and
//!   `devices.secret_digest` the SHA-256 of the secret once it is known to be right (generated
//!   here, or verified once against the hash). Secrets are 32 random bytes, so the digest cannot
//!   be reversed or guessed any more than the hash can (see `Registry::authenticate`).
//! - `device_status` and `commands` rows go with their device (`ON DELETE CASCADE`, foreign keys
//!   on).
//!
//! Every function here is blocking; [`super::Registry`] calls them on a blocking thread with the
//! one connection locked.

use std::fs;
use std::path::Path;
use std::time::Duration;

use outpost_config::IntegrityCheck;
use outpost_sync::sqlite::{self, MigrateError, QuarantineError};
use rusqlite::{Connection, ErrorCode, params};

use super::monitor::Monitor;
use super::{Device, Protocol, RegistryError};

/// A corrupt registry file that was moved aside at startup.
pub use outpost_sync::sqlite::Quarantine;

pub const FILE_NAME: &str = "registry.db";

/// Migrations in order; `MIGRATIONS[i]` upgrades version `i` to `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[
    // v1: devices, their persisted monitoring, and their command queue.
    "CREATE TABLE devices (
         id             TEXT    PRIMARY KEY,
         name           TEXT    NOT NULL,
         model          TEXT    NOT NULL,
         batch          TEXT    NOT NULL,
         firmware       TEXT    NOT NULL,
         location       TEXT    NOT NULL,
         tags           TEXT    NOT NULL,     -- JSON array of strings
         enabled        INTEGER NOT NULL,
         protocols      TEXT    NOT NULL,     -- comma-separated subset of mqtt,coap,http
         secret_hash    TEXT,                 -- argon2id PHC string; NULL: no secret
         source         TEXT    NOT NULL,     -- 'api' or 'driver:<name>'
         created_at_ms  INTEGER NOT NULL,
         updated_at_ms  INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE device_status (
         device_id      TEXT    PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
         last_seen_ms   INTEGER,
         messages       INTEGER NOT NULL,
         bytes          INTEGER NOT NULL,
         malformed      INTEGER NOT NULL,
         refused        INTEGER NOT NULL,
         dropped        INTEGER NOT NULL,
         rssi_dbm       REAL,
         rssi_at_ms     INTEGER,
         lat            REAL,
         lon            REAL,
         location_at_ms INTEGER
     ) WITHOUT ROWID;
     CREATE TABLE commands (
         id              INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused
         device_id       TEXT    NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
         payload         TEXT    NOT NULL,                    -- JSON
         created_at_ms   INTEGER NOT NULL,
         expires_at_ms   INTEGER,
         delivered_at_ms INTEGER
     );
     CREATE INDEX commands_by_device ON commands(device_id, id);",
    // v2: a device's own MQTT ACL (JSON arrays of patterns; NULL: the global `[mqtt.acl]`).
    "ALTER TABLE devices ADD COLUMN mqtt_publish TEXT;
     ALTER TABLE devices ADD COLUMN mqtt_subscribe TEXT;",
    // v3: the SHA-256 (hex) of a device's secret once known to be right; NULL: not yet (a
    // secret from before v3 is verified with argon2 once, then its digest is filled in).
    "ALTER TABLE devices ADD COLUMN secret_digest TEXT;",
    // v4: commands from the cloud (Kafka): the backend's id and command name, bytes payloads,
    // acknowledgements, status events waiting for the outbox, commands for the gateway itself,
    // the offset read up to, and the ids already seen (a command sent twice is queued once).
    "ALTER TABLE commands ADD COLUMN ref TEXT;           -- the backend's command id; NULL: API
     ALTER TABLE commands ADD COLUMN name TEXT;
     ALTER TABLE commands ADD COLUMN binary INTEGER NOT NULL DEFAULT 0;  -- payload: base64 text
     ALTER TABLE commands ADD COLUMN acked_at_ms INTEGER;
     ALTER TABLE commands ADD COLUMN result TEXT;        -- JSON the device acknowledged with
     ALTER TABLE commands ADD COLUMN reply_topic TEXT;
     ALTER TABLE commands ADD COLUMN correlation TEXT;
     ALTER TABLE commands ADD COLUMN expiry_reported INTEGER NOT NULL DEFAULT 0;
     CREATE INDEX commands_expiring ON commands(expires_at_ms)
         WHERE ref IS NOT NULL AND delivered_at_ms IS NULL AND expiry_reported = 0;
     CREATE TABLE command_refs (
         ref         TEXT    PRIMARY KEY,
         seen_at_ms  INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE INDEX command_refs_by_age ON command_refs(seen_at_ms);
     CREATE TABLE command_events (
         id          INTEGER PRIMARY KEY AUTOINCREMENT,
         device_id   TEXT    NOT NULL,             -- the record's key ('' for none)
         reply_topic TEXT,                         -- NULL: kafka.commands.status_topic
         event       TEXT    NOT NULL              -- the status event, JSON
     );
     CREATE TABLE gateway_commands (                 -- to carry out; deleted when done
         id            INTEGER PRIMARY KEY AUTOINCREMENT,
         ref           TEXT    NOT NULL,
         name          TEXT    NOT NULL,
         payload       TEXT    NOT NULL,               -- JSON
         expires_at_ms INTEGER NOT NULL,
         reply_topic   TEXT,
         correlation   TEXT
     );
     CREATE TABLE kafka_offsets (
         topic       TEXT    NOT NULL,
         partition   INTEGER NOT NULL,
         next_offset INTEGER NOT NULL,
         PRIMARY KEY (topic, partition)
     ) WITHOUT ROWID;",
    // v5: management API tokens created through the API (`registry::tokens`); the config's
    // `[[api.tokens]]` stay in the config.
    "CREATE TABLE api_tokens (
         name          TEXT    PRIMARY KEY,
         sha256        TEXT    NOT NULL,   -- hex SHA-256 of the token; never the token
         scopes        TEXT    NOT NULL,   -- comma-separated: read, write, admin
         created_at_ms INTEGER NOT NULL,
         created_by    TEXT    NOT NULL    -- who created it (a token name or local:uid=N)
     ) WITHOUT ROWID;",
];

/// A device's stored secret: the argon2id PHC string and, once known, the SHA-256 (hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSecret {
    pub hash: String,
    pub digest: Option<String>,
}

/// Opens (creating and migrating) the registry database. Blocking.
pub fn open(data_dir: &Path) -> Result<(Connection, Option<Quarantine>), RegistryError> {
    fs::create_dir_all(data_dir).map_err(|source| RegistryError::Io {
        path: data_dir.to_path_buf(),
        source,
    })?;
    let path = data_dir.join(FILE_NAME);
    // Always a quick check: unlike the outbox's, the registry's check has no setting.
    let quarantine = sqlite::quarantine_if_corrupt(
        &path,
        IntegrityCheck::Quick,
        "Registry database is corrupt: moved it aside and started an empty registry",
    )
    .map_err(|e| match e {
        QuarantineError::Check { path, source } => RegistryError::Open { path, source },
        QuarantineError::Move { path, source } => RegistryError::Io { path, source },
    })?;
    let sqlite = |source| RegistryError::Open {
        path: path.clone(),
        source,
    };
    let mut conn = Connection::open(&path).map_err(sqlite)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(sqlite)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), mode, "Registry database is not in WAL mode");
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sqlite)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(sqlite)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(sqlite)?;
    migrate(&mut conn, &path)?;
    Ok((conn, quarantine))
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), RegistryError> {
    sqlite::migrate(conn, MIGRATIONS, "Registry").map_err(|e| match e {
        MigrateError::TooNew { found, supported } => RegistryError::SchemaTooNew {
            path: path.to_path_buf(),
            found,
            supported,
        },
        MigrateError::Sqlite { source, .. } => RegistryError::Open {
            path: path.to_path_buf(),
            source,
        },
    })
}

pub fn protocols_to_text(protocols: &[Protocol]) -> String {
    protocols
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn protocols_from_text(text: &str) -> Vec<Protocol> {
    text.split(',').filter_map(Protocol::parse).collect()
}

fn acl_to_text(patterns: Option<&[String]>) -> Option<String> {
    patterns.map(|p| serde_json::to_string(p).unwrap_or_else(|_| "[]".to_owned()))
}

/// A stored ACL list; an unreadable one (never written by Outpost) allows nothing rather than
/// falling back to the wider global default.
fn acl_from_text(text: Option<String>) -> Option<Vec<String>> {
    text.map(|t| serde_json::from_str(&t).unwrap_or_default())
}

/// Every device with its stored secret.
pub fn load_devices(conn: &Connection) -> rusqlite::Result<Vec<(Device, Option<StoredSecret>)>> {
    let mut stmt = conn.prepare(
        "SELECT id, name, model, batch, firmware, location, tags, enabled, protocols,
                secret_hash, source, created_at_ms, updated_at_ms, mqtt_publish, mqtt_subscribe,
                secret_digest
         FROM devices ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        let tags: String = r.get(6)?;
        let secret_hash: Option<String> = r.get(9)?;
        let secret_digest: Option<String> = r.get(15)?;
        Ok((
            Device {
                id: r.get(0)?,
                name: r.get(1)?,
                model: r.get(2)?,
                batch: r.get(3)?,
                firmware: r.get(4)?,
                location: r.get(5)?,
                tags: serde_json::from_str(&tags).unwrap_or_default(),
                enabled: r.get(7)?,
                protocols: protocols_from_text(&r.get::<_, String>(8)?),
                has_secret: secret_hash.is_some(),
                source: r.get(10)?,
                mqtt_publish: acl_from_text(r.get(13)?),
                mqtt_subscribe: acl_from_text(r.get(14)?),
                created_at_ms: r.get(11)?,
                updated_at_ms: r.get(12)?,
                state: super::State::Offline,
                last_seen_ms: None,
            },
            secret_hash.map(|hash| StoredSecret {
                hash,
                digest: secret_digest,
            }),
        ))
    })?;
    rows.collect()
}

/// Inserts a device; `Ok(false)` if its id is taken.
pub fn insert_device(
    conn: &Connection,
    d: &Device,
    secret: Option<&StoredSecret>,
) -> rusqlite::Result<bool> {
    let tags = serde_json::to_string(&d.tags).unwrap_or_else(|_| "[]".to_owned());
    let result = conn.execute(
        "INSERT INTO devices (id, name, model, batch, firmware, location, tags, enabled, protocols,
                              secret_hash, source, created_at_ms, updated_at_ms, mqtt_publish,
                              mqtt_subscribe, secret_digest)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        params![
            d.id,
            d.name,
            d.model,
            d.batch,
            d.firmware,
            d.location,
            tags,
            d.enabled,
            protocols_to_text(&d.protocols),
            secret.map(|s| &s.hash),
            d.source,
            d.created_at_ms,
            d.updated_at_ms,
            acl_to_text(d.mqtt_publish.as_deref()),
            acl_to_text(d.mqtt_subscribe.as_deref()),
            secret.and_then(|s| s.digest.as_ref())
        ],
    );
    match result {
        Ok(_) => Ok(true),
        Err(e) if e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes every inventory field of `d` except the secret; `Ok(false)` if it does not exist.
pub fn update_device(conn: &Connection, d: &Device) -> rusqlite::Result<bool> {
    let tags = serde_json::to_string(&d.tags).unwrap_or_else(|_| "[]".to_owned());
    let n = conn.execute(
        "UPDATE devices SET name = ?2, model = ?3, batch = ?4, firmware = ?5, location = ?6,
                tags = ?7, enabled = ?8, protocols = ?9, updated_at_ms = ?10,
                mqtt_publish = ?11, mqtt_subscribe = ?12
         WHERE id = ?1",
        params![
            d.id,
            d.name,
            d.model,
            d.batch,
            d.firmware,
            d.location,
            tags,
            d.enabled,
            protocols_to_text(&d.protocols),
            d.updated_at_ms,
            acl_to_text(d.mqtt_publish.as_deref()),
            acl_to_text(d.mqtt_subscribe.as_deref())
        ],
    )?;
    Ok(n == 1)
}

/// Replaces a device's secret; `Ok(false)` if it does not exist.
pub fn set_secret(
    conn: &Connection,
    id: &str,
    secret: &StoredSecret,
    updated_at_ms: i64,
) -> rusqlite::Result<bool> {
    let n = conn.execute(
        "UPDATE devices SET secret_hash = ?2, secret_digest = ?3, updated_at_ms = ?4 WHERE id = ?1",
        params![id, secret.hash, secret.digest, updated_at_ms],
    )?;
    Ok(n == 1)
}

/// Records the digest of a secret just verified against `hash`, unless the device's secret
/// changed meanwhile; `Ok(false)` then.
pub fn set_secret_digest(
    conn: &Connection,
    id: &str,
    hash: &str,
    digest: &str,
) -> rusqlite::Result<bool> {
    let n = conn.execute(
        "UPDATE devices SET secret_digest = ?3 WHERE id = ?1 AND secret_hash = ?2",
        params![id, hash, digest],
    )?;
    Ok(n == 1)
}

/// Deletes a device with its status and commands; `Ok(false)` if it did not exist.
pub fn delete_device(conn: &Connection, id: &str) -> rusqlite::Result<bool> {
    Ok(conn.execute("DELETE FROM devices WHERE id = ?1", [id])? == 1)
}

/// The persisted monitoring of every device.
pub fn load_status(conn: &Connection) -> rusqlite::Result<Vec<(String, Monitor)>> {
    let mut stmt = conn.prepare(
        "SELECT device_id, last_seen_ms, messages, bytes, malformed, refused, dropped,
                rssi_dbm, rssi_at_ms, lat, lon, location_at_ms
         FROM device_status",
    )?;
    let rows = stmt.query_map([], |r| {
        let lat: Option<f64> = r.get(9)?;
        let lon: Option<f64> = r.get(10)?;
        Ok((
            r.get::<_, String>(0)?,
            Monitor {
                last_seen_ms: r.get(1)?,
                messages: r.get::<_, i64>(2)?.max(0) as u64,
                bytes: r.get::<_, i64>(3)?.max(0) as u64,
                malformed: r.get::<_, i64>(4)?.max(0) as u64,
                refused: r.get::<_, i64>(5)?.max(0) as u64,
                dropped: r.get::<_, i64>(6)?.max(0) as u64,
                rssi_dbm: r.get(7)?,
                rssi_at_ms: r.get(8)?,
                location: lat.zip(lon),
                location_at_ms: r.get(11)?,
                ..Monitor::default()
            },
        ))
    })?;
    rows.collect()
}

/// Saves monitoring snapshots in one transaction. Rows of devices deleted meanwhile are skipped.
pub fn save_status(conn: &mut Connection, rows: &[(String, Monitor)]) -> rusqlite::Result<()> {
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO device_status (device_id, last_seen_ms, messages, bytes, malformed,
                                        refused, dropped, rssi_dbm, rssi_at_ms, lat, lon,
                                        location_at_ms)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12
             WHERE EXISTS (SELECT 1 FROM devices WHERE id = ?1)
             ON CONFLICT (device_id) DO UPDATE SET
                 last_seen_ms = excluded.last_seen_ms, messages = excluded.messages,
                 bytes = excluded.bytes, malformed = excluded.malformed,
                 refused = excluded.refused, dropped = excluded.dropped,
                 rssi_dbm = excluded.rssi_dbm, rssi_at_ms = excluded.rssi_at_ms,
                 lat = excluded.lat, lon = excluded.lon,
                 location_at_ms = excluded.location_at_ms",
        )?;
        for (id, m) in rows {
            stmt.execute(params![
                id,
                m.last_seen_ms,
                clamp(m.messages),
                clamp(m.bytes),
                clamp(m.malformed),
                clamp(m.refused),
                clamp(m.dropped),
                m.rssi_dbm,
                m.rssi_at_ms,
                m.location.map(|l| l.0),
                m.location.map(|l| l.1),
                m.location_at_ms
            ])?;
        }
    }
    tx.commit()
}
