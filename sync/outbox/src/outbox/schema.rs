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
    // v3: the outbox's identity. A random id given once, when the file is created (or upgraded),
    // and sent with every record (`outpost-outbox`): sequences are unique per outbox, and an
    // exactly-once checkpoint names the outbox it belongs to, so one written by an older file
    // (before a quarantine, a reinstall) never deletes this file's records.
    // `unnamed_checkpoints`: whether exactly-once checkpoints written before outboxes had ids
    // (they name no outbox) may be this file's — only if it was upgraded after it had given out
    // sequences. A file created with this schema never honours them: an older file's checkpoint
    // would otherwise delete its unsent records that reuse the same numbers.
    "ALTER TABLE meta ADD COLUMN outbox_id TEXT;
     ALTER TABLE meta ADD COLUMN unnamed_checkpoints INTEGER NOT NULL DEFAULT 0;
     UPDATE meta SET outbox_id = lower(hex(randomblob(16))), unnamed_checkpoints = (next_seq > 1)
      WHERE id = 1;",
    // v4: dead letters. A record Kafka refuses for good (too large, invalid, a topic the broker
    // refuses) moves here from `records`, in one transaction, with why: it no longer blocks the
    // others, and nothing is lost — an operator lists, retries (back into `records`, same
    // sequence) or drops it. Not counted in meta's totals (those are the forwarding backlog);
    // the writer counts the table at open, and its bytes count against the byte cap.
    "CREATE TABLE dead_letters (
         seq            INTEGER PRIMARY KEY,
         priority       INTEGER NOT NULL,
         route          TEXT    NOT NULL,
         boot           INTEGER NOT NULL REFERENCES boots(id),
         received_at_ms INTEGER NOT NULL,
         device_id      TEXT    NOT NULL,
         source         TEXT    NOT NULL,
         topic          TEXT    NOT NULL,
         content_type   TEXT,
         headers        TEXT,
         payload        BLOB    NOT NULL,
         size           INTEGER NOT NULL,
         reason         TEXT    NOT NULL,     -- too_large, invalid_record, ... (docs/KAFKA.md)
         error          TEXT    NOT NULL,     -- the last error, as Kafka's client said it
         kafka_topic    TEXT    NOT NULL,     -- where the forwarder tried to send it
         attempts       INTEGER NOT NULL,
         dead_at_ms     INTEGER NOT NULL
     );",
];

/// The schema version this binary writes.
pub const CURRENT_VERSION: u32 = MIGRATIONS.len() as u32;

/// Brings the schema up to [`CURRENT_VERSION`].
pub fn migrate(conn: &mut Connection) -> Result<(), MigrateError> {
    sqlite::migrate(conn, MIGRATIONS, "Outbox")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report

    use super::*;

    fn identity(conn: &Connection) -> (String, bool, i64) {
        conn.query_row(
            "SELECT outbox_id, unnamed_checkpoints, next_seq FROM meta WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
    }

    #[test]
    fn only_an_upgraded_outbox_that_gave_out_sequences_honours_unnamed_checkpoints() {
        let mut fresh = Connection::open_in_memory().unwrap();
        migrate(&mut fresh).unwrap();
        let (id, unnamed, _) = identity(&fresh);
        assert_eq!(id.len(), 32, "{id}");
        assert!(
            !unnamed,
            "a new file never takes an older file's checkpoint"
        );

        // A file of schema 2 that had stored records, upgraded: its checkpoints (without an
        // outbox id) may be its own.
        let mut used = Connection::open_in_memory().unwrap();
        sqlite::migrate(&mut used, &MIGRATIONS[..2], "Outbox").unwrap();
        used.execute("UPDATE meta SET next_seq = 42 WHERE id = 1", [])
            .unwrap();
        migrate(&mut used).unwrap();
        let (other, unnamed, next) = identity(&used);
        assert!(unnamed && next == 42);
        assert_ne!(other, id, "every outbox its own id");

        let mut unused = Connection::open_in_memory().unwrap();
        sqlite::migrate(&mut unused, &MIGRATIONS[..2], "Outbox").unwrap();
        migrate(&mut unused).unwrap();
        assert!(
            !identity(&unused).1,
            "no sequence given out: no checkpoint can be its own"
        );
    }
}
