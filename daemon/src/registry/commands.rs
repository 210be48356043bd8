//! Commands queued for devices, stored in `registry.db` (table `commands`).
//!
//! A command is `queued` until a delivery path hands it to the device (`delivered`), or until
//! its TTL passes first (`expired`). Polling is at most once: a command is marked delivered in
//! the same transaction that reads it for the device (the HTTP device endpoint calls
//! [`super::Registry::take_pending_commands`]), so a response lost on the way is not retried.
//! Over MQTT (`ingress::bus`) a queued command is published on the device's command topic and
//! marked delivered ([`super::Registry::mark_delivered`]) once the server relayed it to the
//! device; until then it stays queued, and is published again when the device subscribes.
//!
//! Bounds (a device that never polls cannot fill the disk):
//! - at most [`MAX_QUEUED`] commands queued per device: queuing one more fails with
//!   [`super::RegistryError::CommandQueueFull`] (HTTP 409) until some are delivered or expire;
//! - at most [`MAX_FINISHED`] delivered or expired commands are kept per device for queries; older
//!   ones are deleted when a new command is queued;
//! - TTL defaults to [`DEFAULT_TTL`], at most [`MAX_TTL`]; payload at most [`MAX_PAYLOAD`] bytes
//!   of JSON.
//!
//! Expiry compares wall-clock times (creation + TTL): a command is management data, and a clock
//! jump can only expire it early or late, never lose a reading.

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

pub const MAX_QUEUED: usize = 100;
pub const MAX_FINISHED: usize = 100;
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
pub const MAX_PAYLOAD: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandState {
    Queued,
    Delivered,
    Expired,
}

/// A command for a device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Command {
    pub id: i64,
    pub device_id: String,
    pub payload: serde_json::Value,
    pub state: CommandState,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub delivered_at_ms: Option<i64>,
}

const COLUMNS: &str = "id, device_id, payload, created_at_ms, expires_at_ms, delivered_at_ms";

fn from_row(r: &rusqlite::Row<'_>, now_ms: i64) -> rusqlite::Result<Command> {
    let payload: String = r.get(2)?;
    let expires_at_ms: i64 = r.get(4)?;
    let delivered_at_ms: Option<i64> = r.get(5)?;
    let state = match delivered_at_ms {
        Some(_) => CommandState::Delivered,
        None if expires_at_ms <= now_ms => CommandState::Expired,
        None => CommandState::Queued,
    };
    Ok(Command {
        id: r.get(0)?,
        device_id: r.get(1)?,
        payload: serde_json::from_str(&payload).unwrap_or(serde_json::Value::Null),
        state,
        created_at_ms: r.get(3)?,
        expires_at_ms,
        delivered_at_ms,
    })
}

/// Outcome of [`queue`].
pub enum Queued {
    Ok(Command),
    Full,
}

/// Queues a command (the caller checked that the device exists).
pub fn queue(
    conn: &mut Connection,
    device_id: &str,
    payload: &str,
    ttl: Duration,
    now_ms: i64,
) -> rusqlite::Result<Queued> {
    let tx = conn.transaction()?;
    let queued: i64 = tx.query_row(
        "SELECT count(*) FROM commands
         WHERE device_id = ?1 AND delivered_at_ms IS NULL AND expires_at_ms > ?2",
        params![device_id, now_ms],
        |r| r.get(0),
    )?;
    if queued >= MAX_QUEUED as i64 {
        return Ok(Queued::Full);
    }
    // Keep the newest MAX_FINISHED finished commands of this device.
    tx.execute(
        "DELETE FROM commands WHERE id IN (
             SELECT id FROM commands
             WHERE device_id = ?1 AND (delivered_at_ms IS NOT NULL OR expires_at_ms <= ?2)
             ORDER BY id DESC LIMIT -1 OFFSET ?3)",
        params![device_id, now_ms, MAX_FINISHED as i64],
    )?;
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let expires = now_ms.saturating_add(ttl_ms);
    tx.execute(
        "INSERT INTO commands (device_id, payload, created_at_ms, expires_at_ms)
         VALUES (?1, ?2, ?3, ?4)",
        params![device_id, payload, now_ms, expires],
    )?;
    let id = tx.last_insert_rowid();
    let command = tx.query_row(
        &format!("SELECT {COLUMNS} FROM commands WHERE id = ?1"),
        [id],
        |r| from_row(r, now_ms),
    )?;
    tx.commit()?;
    Ok(Queued::Ok(command))
}

/// Every kept command of a device, oldest first.
pub fn list(conn: &Connection, device_id: &str, now_ms: i64) -> rusqlite::Result<Vec<Command>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM commands WHERE device_id = ?1 ORDER BY id"
    ))?;
    let rows = stmt.query_map([device_id], |r| from_row(r, now_ms))?;
    rows.collect()
}

pub fn get(
    conn: &Connection,
    device_id: &str,
    id: i64,
    now_ms: i64,
) -> rusqlite::Result<Option<Command>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM commands WHERE device_id = ?1 AND id = ?2"),
        params![device_id, id],
        |r| from_row(r, now_ms),
    )
    .optional()
}

/// Queued commands of a device, oldest first, at most `max`; not marked.
pub fn pending(
    conn: &Connection,
    device_id: &str,
    max: usize,
    now_ms: i64,
) -> rusqlite::Result<Vec<Command>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM commands
         WHERE device_id = ?1 AND delivered_at_ms IS NULL AND expires_at_ms > ?2
         ORDER BY id LIMIT ?3"
    ))?;
    let rows = stmt.query_map(
        params![device_id, now_ms, i64::try_from(max).unwrap_or(i64::MAX)],
        |r| from_row(r, now_ms),
    )?;
    rows.collect()
}

/// Marks queued commands of a device delivered; returns how many were.
pub fn mark_delivered(
    conn: &mut Connection,
    device_id: &str,
    ids: &[i64],
    now_ms: i64,
) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let mut n = 0;
    {
        let mut stmt = tx.prepare_cached(
            "UPDATE commands SET delivered_at_ms = ?3
             WHERE device_id = ?1 AND id = ?2 AND delivered_at_ms IS NULL AND expires_at_ms > ?3",
        )?;
        for id in ids {
            n += stmt.execute(params![device_id, id, now_ms])?;
        }
    }
    tx.commit()?;
    Ok(n)
}

/// Reads up to `max` queued commands and marks them delivered, in one transaction.
pub fn take_pending(
    conn: &mut Connection,
    device_id: &str,
    max: usize,
    now_ms: i64,
) -> rusqlite::Result<Vec<Command>> {
    let tx = conn.transaction()?;
    let mut taken = pending(&tx, device_id, max, now_ms)?;
    {
        let mut stmt =
            tx.prepare_cached("UPDATE commands SET delivered_at_ms = ?2 WHERE id = ?1")?;
        for c in &mut taken {
            stmt.execute(params![c.id, now_ms])?;
            c.state = CommandState::Delivered;
            c.delivered_at_ms = Some(now_ms);
        }
    }
    tx.commit()?;
    Ok(taken)
}
