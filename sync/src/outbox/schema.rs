//! The outbox schema and its migrations.
//!
//! `PRAGMA user_version` holds the schema version. Each migration runs in its own transaction and
//! bumps the version, so an interrupted upgrade resumes where it stopped. A file written by a newer
//! Outpost is refused (not quarantined): its data is fine, this binary just cannot read it. The
//! mechanics live in [`crate::sqlite::migrate`]; this module owns the outbox's steps.

use rusqlite::Connection;

use crate::sqlite::{self, MigrateError};

pub use crate::sqlite::user_version as version;

/// Migrations in order; `MIGRATIONS[i]` upgrades version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // v1: records, boots, and a one-row meta table with the running totals.
    "CREATE TABLE records (
         seq            INTEGER PRIMARY KEY,  -- gateway sequence, never reused (see meta.next_seq)
         priority       INTEGER NOT NULL,
         route          TEXT    NOT NULL,
         boot           INTEGER NOT NULL REFERENCES boots(id),
         received_at_ms INTEGER NOT NULL,     -- wall clock at receipt: informational only
         device_id      TEXT    NOT NULL,
         source         TEXT    NOT NULL,
         topic          TEXT    NOT NULL,
         content_type   TEXT,
         headers        TEXT,                 -- JSON array of [name, value] pairs, NULL if none
         payload        BLOB    NOT NULL,
         size           INTEGER NOT NULL      -- bytes charged against the byte cap
     );
     -- The forwarder reads highest priority first, oldest first within a priority.
     CREATE INDEX records_by_priority ON records(priority DESC, seq);
     CREATE TABLE boots (
         id             INTEGER PRIMARY KEY,
         boot_id        TEXT    NOT NULL,
         opened_at_ms   INTEGER NOT NULL
     );
     -- Totals kept in the same transactions as the rows they count, so they are exact after any
     -- crash and `outpost buffer verify` can cross-check them.
     CREATE TABLE meta (
         id             INTEGER PRIMARY KEY CHECK (id = 1),
         next_seq       INTEGER NOT NULL,
         record_count   INTEGER NOT NULL,
         record_bytes   INTEGER NOT NULL
     );
     INSERT INTO meta (id, next_seq, record_count, record_bytes) VALUES (1, 1, 0, 0);",
    // v2: idempotency keys. An append with a key stores its record only if the key is new,
    // in the same transaction; the key stays (with the record's sequence) until released.
    // MQTT uses them for a persistent session's QoS 2 packets: exactly once into the outbox
    // across reconnects and restarts. Independent of the record's life (a record forwarded
    // and deleted keeps its key until the PUBREL).
    "CREATE TABLE dedupe (
         key  TEXT    PRIMARY KEY,
         seq  INTEGER NOT NULL
     ) WITHOUT ROWID;",
];

/// The schema version this binary writes.
pub const CURRENT_VERSION: u32 = MIGRATIONS.len() as u32;

/// Brings the schema up to [`CURRENT_VERSION`].
pub fn migrate(conn: &mut Connection) -> Result<(), MigrateError> {
    sqlite::migrate(conn, MIGRATIONS, "Outbox")
}
