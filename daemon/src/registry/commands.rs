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
//!
//! **Commands from the cloud** (`kafka.commands`, see `outpost_sync::forwarder::commands`) are
//! stored by [`store_cloud`]: each carries the backend's id (`ref`, unique: a command seen once
//! is never queued again, see `command_refs`), a name, and where its status events go. Every
//! change of such a command writes a status event to `command_events` in the same transaction
//! (queued, rejected, delivered, acked, expired), and the offset read up to goes to
//! `kafka_offsets` in the transaction that stores the commands: a crash loses or repeats
//! nothing. `cloud_commands::relay` moves the events to the outbox in id order.
//!
//! A device acknowledges a delivered command with a result ([`ack`]): over MQTT on
//! `devices/<id>/acks/<command id>`, over HTTP with `POST /api/v1/device/commands/<id>/ack`.

use std::time::Duration;

use base64::Engine as _;
use outpost_sync::forwarder::commands::{Batch, CloudCommand, Payload, Read, Target};
use outpost_sync::outbox::rfc3339_utc;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::Serialize;
use serde_json::{Value, json};

pub const MAX_QUEUED: usize = 100;
pub const MAX_FINISHED: usize = 100;
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Backend command ids remembered to refuse a repeated one; the oldest are forgotten beyond.
pub const MAX_REFS: i64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandState {
    Queued,
    Delivered,
    Acked,
    Expired,
}

/// A command for a device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Command {
    pub id: i64,
    pub device_id: String,
    /// The backend's id, for commands from the cloud.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
    /// The command's name, for commands from the cloud.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// JSON arguments (`null` when the command carries bytes).
    pub payload: Value,
    /// Bytes arguments, base64, instead of `payload`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    pub state: CommandState,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub delivered_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked_at_ms: Option<i64>,
    /// What the device acknowledged with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(skip)]
    pub correlation: Option<String>,
}

impl Command {
    /// The payload as a device receives it: the JSON text, or the bytes.
    pub fn payload_bytes(&self) -> Vec<u8> {
        match &self.payload_base64 {
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap_or_default(),
            None => self.payload.to_string().into_bytes(),
        }
    }
}

const COLUMNS: &str = "id, device_id, payload, created_at_ms, expires_at_ms, delivered_at_ms, \
                       ref, name, binary, acked_at_ms, result, correlation";

fn from_row(r: &rusqlite::Row<'_>, now_ms: i64) -> rusqlite::Result<Command> {
    let payload: String = r.get(2)?;
    let expires_at_ms: i64 = r.get(4)?;
    let delivered_at_ms: Option<i64> = r.get(5)?;
    let binary: bool = r.get(8)?;
    let acked_at_ms: Option<i64> = r.get(9)?;
    let result: Option<String> = r.get(10)?;
    let state = match (acked_at_ms, delivered_at_ms) {
        (Some(_), _) => CommandState::Acked,
        (None, Some(_)) => CommandState::Delivered,
        (None, None) if expires_at_ms <= now_ms => CommandState::Expired,
        (None, None) => CommandState::Queued,
    };
    let (payload, payload_base64) = if binary {
        (Value::Null, Some(payload))
    } else {
        (serde_json::from_str(&payload).unwrap_or(Value::Null), None)
    };
    Ok(Command {
        id: r.get(0)?,
        device_id: r.get(1)?,
        command_id: r.get(6)?,
        name: r.get(7)?,
        payload,
        payload_base64,
        state,
        created_at_ms: r.get(3)?,
        expires_at_ms,
        delivered_at_ms,
        acked_at_ms,
        result: result.and_then(|t| serde_json::from_str(&t).ok()),
        correlation: r.get(11)?,
    })
}

/// Outcome of [`queue`].
pub enum Queued {
    Ok(Box<Command>),
    Full,
}

/// A command row to insert.
struct NewRow<'a> {
    device_id: &'a str,
    payload: &'a str,
    binary: bool,
    expires_at_ms: i64,
    cloud: Option<&'a CloudCommand>,
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
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let row = NewRow {
        device_id,
        payload,
        binary: false,
        expires_at_ms: now_ms.saturating_add(ttl_ms),
        cloud: None,
    };
    let queued = insert(&tx, &row, now_ms)?;
    tx.commit()?;
    Ok(queued)
}

/// Inserts a command unless the device's queue is full, keeping the newest [`MAX_FINISHED`]
/// finished ones.
fn insert(tx: &Transaction<'_>, row: &NewRow<'_>, now_ms: i64) -> rusqlite::Result<Queued> {
    let queued: i64 = tx.query_row(
        "SELECT count(*) FROM commands
         WHERE device_id = ?1 AND delivered_at_ms IS NULL AND expires_at_ms > ?2",
        params![row.device_id, now_ms],
        |r| r.get(0),
    )?;
    if queued >= MAX_QUEUED as i64 {
        return Ok(Queued::Full);
    }
    tx.execute(
        "DELETE FROM commands WHERE id IN (
             SELECT id FROM commands
             WHERE device_id = ?1 AND (delivered_at_ms IS NOT NULL OR expires_at_ms <= ?2)
             ORDER BY id DESC LIMIT -1 OFFSET ?3)",
        params![row.device_id, now_ms, MAX_FINISHED as i64],
    )?;
    let cloud = row.cloud;
    tx.execute(
        "INSERT INTO commands (device_id, payload, created_at_ms, expires_at_ms, ref, name, binary,
                               reply_topic, correlation)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            row.device_id,
            row.payload,
            now_ms,
            row.expires_at_ms,
            cloud.map(|c| &c.id),
            cloud.map(|c| &c.name),
            row.binary,
            cloud.and_then(|c| c.reply_topic.as_ref()),
            cloud.and_then(|c| c.correlation.as_ref()),
        ],
    )?;
    let id = tx.last_insert_rowid();
    let command = tx.query_row(
        &format!("SELECT {COLUMNS} FROM commands WHERE id = ?1"),
        [id],
        |r| from_row(r, now_ms),
    )?;
    Ok(Queued::Ok(Box::new(command)))
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
    for id in ids {
        n += deliver(&tx, device_id, *id, now_ms)?;
    }
    tx.commit()?;
    Ok(n)
}

/// Marks one queued, unexpired command delivered (with its status event); 0 if it was not.
fn deliver(tx: &Transaction<'_>, device_id: &str, id: i64, now_ms: i64) -> rusqlite::Result<usize> {
    let n = tx
        .prepare_cached(
            "UPDATE commands SET delivered_at_ms = ?3
             WHERE device_id = ?1 AND id = ?2 AND delivered_at_ms IS NULL AND expires_at_ms > ?3",
        )?
        .execute(params![device_id, id, now_ms])?;
    if n == 1 {
        event_for_row(tx, id, "delivered", None, now_ms)?;
    }
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
    for c in &mut taken {
        deliver(&tx, device_id, c.id, now_ms)?;
        c.state = CommandState::Delivered;
        c.delivered_at_ms = Some(now_ms);
    }
    tx.commit()?;
    Ok(taken)
}

/// Outcome of [`ack`].
#[derive(Debug, PartialEq)]
pub enum Acked {
    /// Acknowledged now, or already (an acknowledgement repeated is answered the same).
    Ok(Box<Command>),
    NotFound,
    /// Expired before it was delivered: too late to acknowledge.
    Expired,
}

/// A device's acknowledgement of its command `id`, with its `result`. A command acknowledged
/// while still queued (the device got it over MQTT before the delivery was recorded) is
/// delivered and acknowledged at once.
pub fn ack(
    conn: &mut Connection,
    device_id: &str,
    id: i64,
    result: &Value,
    now_ms: i64,
) -> rusqlite::Result<Acked> {
    let tx = conn.transaction()?;
    let Some(command) = get(&tx, device_id, id, now_ms)? else {
        return Ok(Acked::NotFound);
    };
    match command.state {
        CommandState::Acked => return Ok(Acked::Ok(Box::new(command))),
        CommandState::Expired => return Ok(Acked::Expired),
        CommandState::Queued => {
            deliver(&tx, device_id, id, now_ms)?;
        }
        CommandState::Delivered => {}
    }
    tx.execute(
        "UPDATE commands SET acked_at_ms = ?2, result = ?3 WHERE id = ?1",
        params![id, now_ms, result.to_string()],
    )?;
    event_for_row(&tx, id, "acked", Some(("result", result.clone())), now_ms)?;
    let command = get(&tx, device_id, id, now_ms)?;
    tx.commit()?;
    Ok(command.map_or(Acked::NotFound, |c| Acked::Ok(Box::new(c))))
}

/// Reports commands from the cloud that expired before delivery (`expired` events); returns
/// how many.
pub fn report_expired(conn: &mut Connection, now_ms: i64) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let ids: Vec<i64> = tx
        .prepare_cached(
            "SELECT id FROM commands
             WHERE ref IS NOT NULL AND delivered_at_ms IS NULL AND expiry_reported = 0
               AND expires_at_ms <= ?1
             ORDER BY id LIMIT 1000",
        )?
        .query_map([now_ms], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for id in &ids {
        tx.execute(
            "UPDATE commands SET expiry_reported = 1 WHERE id = ?1",
            [id],
        )?;
        event_for_row(&tx, *id, "expired", None, now_ms)?;
    }
    tx.commit()?;
    Ok(ids.len())
}

/// Stores what the commands consumer read, and the offset after it, in one transaction.
/// Returns the commands queued (for the MQTT delivery path, after the commit).
/// Commands for the gateway itself are stored for [`next_gateway_command`] when `gateway` is
/// true (`kafka.commands.gateway`), else rejected.
pub fn store_cloud(
    conn: &mut Connection,
    batch: &Batch,
    gateway: bool,
    now_ms: i64,
) -> rusqlite::Result<Vec<Command>> {
    let tx = conn.transaction()?;
    let mut queued = Vec::new();
    for read in &batch.reads {
        match read {
            Read::Command(c) => {
                if let Some(command) = store_one(&tx, c, gateway, now_ms)? {
                    queued.push(command);
                }
            }
            Read::Invalid {
                id,
                device,
                correlation,
                reason,
            } => {
                let fresh = match id {
                    Some(id) => remember(&tx, id, now_ms)?,
                    None => true,
                };
                if fresh {
                    let base = Base {
                        command_id: id.as_deref(),
                        device: device.as_deref().unwrap_or(""),
                        name: None,
                        correlation: correlation.as_deref(),
                        reply_topic: None,
                    };
                    event(
                        &tx,
                        &base,
                        "rejected",
                        Some(("reason", json!(reason))),
                        now_ms,
                    )?;
                }
            }
        }
    }
    tx.execute(
        "INSERT INTO kafka_offsets (topic, partition, next_offset) VALUES (?1, ?2, ?3)
         ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
        params![batch.topic, batch.partition, batch.next_offset],
    )?;
    tx.commit()?;
    Ok(queued)
}

/// One command from the cloud: queued, or rejected or expired with its event; `None` unless
/// queued. A command id already seen is skipped without an event.
fn store_one(
    tx: &Transaction<'_>,
    c: &CloudCommand,
    gateway: bool,
    now_ms: i64,
) -> rusqlite::Result<Option<Command>> {
    if !remember(tx, &c.id, now_ms)? {
        tracing::info!(command = %c.id, "Command already seen: not queued again");
        return Ok(None);
    }
    let device = match &c.target {
        Target::Device(d) => d.as_str(),
        Target::Gateway => "",
    };
    let base = Base {
        command_id: Some(&c.id),
        device,
        name: Some(&c.name),
        correlation: c.correlation.as_deref(),
        reply_topic: c.reply_topic.as_deref(),
    };
    let reject = |reason: String| -> rusqlite::Result<Option<Command>> {
        event(
            tx,
            &base,
            "rejected",
            Some(("reason", json!(reason))),
            now_ms,
        )?;
        Ok(None)
    };
    if c.target == Target::Gateway {
        if !gateway {
            return reject(
                "commands to the gateway itself are off (kafka.commands.gateway = false)".into(),
            );
        }
        if c.expires_at_ms <= now_ms {
            event(tx, &base, "expired", None, now_ms)?;
            return Ok(None);
        }
        let payload = match &c.payload {
            Payload::Json(v) => v.to_string(),
            Payload::Bytes(_) => return reject("payload: gateway actions take JSON".into()),
        };
        tx.execute(
            "INSERT INTO gateway_commands (ref, name, payload, expires_at_ms, reply_topic,
                                           correlation)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                c.id,
                c.name,
                payload,
                c.expires_at_ms,
                c.reply_topic,
                c.correlation
            ],
        )?;
        event(tx, &base, "queued", None, now_ms)?;
        return Ok(None);
    }
    let found: Option<(bool, String)> = tx
        .query_row(
            "SELECT enabled, protocols FROM devices WHERE id = ?1",
            [device],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((enabled, protocols)) = found else {
        return reject(format!("unknown device \"{device}\""));
    };
    if !enabled {
        return reject(format!("device \"{device}\" is disabled"));
    }
    if protocols.is_empty() {
        return reject(format!(
            "protocol not allowed: device \"{device}\" may use none of mqtt, coap, http"
        ));
    }
    if c.expires_at_ms <= now_ms {
        event(tx, &base, "expired", None, now_ms)?;
        return Ok(None);
    }
    let (payload, binary) = match &c.payload {
        Payload::Json(v) => (v.to_string(), false),
        Payload::Bytes(b) => (base64::engine::general_purpose::STANDARD.encode(b), true),
    };
    if payload.len() > MAX_PAYLOAD {
        return reject(format!("payload: at most {MAX_PAYLOAD} bytes"));
    }
    let row = NewRow {
        device_id: device,
        payload: &payload,
        binary,
        expires_at_ms: c.expires_at_ms,
        cloud: Some(c),
    };
    match insert(tx, &row, now_ms)? {
        Queued::Ok(command) => {
            event_for_row(tx, command.id, "queued", None, now_ms)?;
            Ok(Some(*command))
        }
        Queued::Full => reject(format!(
            "device \"{device}\" already has {MAX_QUEUED} queued commands"
        )),
    }
}

/// Records a backend command id; false if it was already known.
fn remember(tx: &Transaction<'_>, id: &str, now_ms: i64) -> rusqlite::Result<bool> {
    let fresh = tx
        .prepare_cached("INSERT OR IGNORE INTO command_refs (ref, seen_at_ms) VALUES (?1, ?2)")?
        .execute(params![id, now_ms])?;
    Ok(fresh == 1)
}

/// Forgets the oldest backend command ids beyond [`MAX_REFS`] (run now and then: a command
/// repeated after that many newer ones would be queued again).
pub fn forget_old_refs(conn: &Connection) -> rusqlite::Result<usize> {
    conn.execute(
        "DELETE FROM command_refs WHERE seen_at_ms <= (
             SELECT seen_at_ms FROM command_refs ORDER BY seen_at_ms DESC LIMIT 1 OFFSET ?1)",
        [MAX_REFS],
    )
}

/// What every status event of a command says.
struct Base<'a> {
    command_id: Option<&'a str>,
    device: &'a str,
    name: Option<&'a str>,
    correlation: Option<&'a str>,
    reply_topic: Option<&'a str>,
}

/// [`Base`] as stored with a command.
struct StoredBase {
    device: String,
    command_id: Option<String>,
    name: Option<String>,
    correlation: Option<String>,
    reply_topic: Option<String>,
}

/// Writes a status event of a stored command, if it came from the cloud.
fn event_for_row(
    tx: &Transaction<'_>,
    id: i64,
    status: &str,
    extra: Option<(&str, Value)>,
    now_ms: i64,
) -> rusqlite::Result<()> {
    let row = tx
        .query_row(
            "SELECT device_id, ref, name, correlation, reply_topic FROM commands WHERE id = ?1",
            [id],
            |r| {
                Ok(StoredBase {
                    device: r.get(0)?,
                    command_id: r.get(1)?,
                    name: r.get(2)?,
                    correlation: r.get(3)?,
                    reply_topic: r.get(4)?,
                })
            },
        )
        .optional()?;
    let Some(row) = row.filter(|r| r.command_id.is_some()) else {
        return Ok(()); // an API command: no status events
    };
    let base = Base {
        command_id: row.command_id.as_deref(),
        device: &row.device,
        name: row.name.as_deref(),
        correlation: row.correlation.as_deref(),
        reply_topic: row.reply_topic.as_deref(),
    };
    event(tx, &base, status, extra, now_ms)
}

/// Writes a status event for the relay to the outbox (the gateway id is added there).
fn event(
    tx: &Transaction<'_>,
    base: &Base<'_>,
    status: &str,
    extra: Option<(&str, Value)>,
    now_ms: i64,
) -> rusqlite::Result<()> {
    let mut value = json!({
        "command_id": base.command_id,
        "device": base.device,
        "status": status,
        "at": rfc3339_utc(now_ms, true),
        "at_ms": now_ms,
    });
    if base.device.is_empty() {
        // A command for the gateway itself (or a record that named no device).
        value["device"] = Value::Null;
        value["target"] = json!("gateway");
    }
    if let Some(name) = base.name {
        value["name"] = json!(name);
    }
    if let Some(correlation) = base.correlation {
        value["correlation"] = json!(correlation);
    }
    if let Some((key, v)) = extra {
        value[key] = v;
    }
    tx.prepare_cached(
        "INSERT INTO command_events (device_id, reply_topic, event) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![base.device, base.reply_topic, value.to_string()])?;
    Ok(())
}

/// A status event waiting for the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusEvent {
    pub id: i64,
    pub device_id: String,
    pub reply_topic: Option<String>,
    pub event: String,
}

/// The oldest status events, at most `max`.
pub fn status_events(conn: &Connection, max: usize) -> rusqlite::Result<Vec<StatusEvent>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, device_id, reply_topic, event FROM command_events ORDER BY id LIMIT ?1",
    )?;
    let rows = stmt.query_map([i64::try_from(max).unwrap_or(i64::MAX)], |r| {
        Ok(StatusEvent {
            id: r.get(0)?,
            device_id: r.get(1)?,
            reply_topic: r.get(2)?,
            event: r.get(3)?,
        })
    })?;
    rows.collect()
}

/// Deletes the status events up to `last_id` (the outbox has them).
pub fn delete_status_events(conn: &Connection, last_id: i64) -> rusqlite::Result<usize> {
    conn.execute("DELETE FROM command_events WHERE id <= ?1", [last_id])
}

/// The stored next offset of a commands partition.
pub fn next_offset(
    conn: &Connection,
    topic: &str,
    partition: i32,
) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT next_offset FROM kafka_offsets WHERE topic = ?1 AND partition = ?2",
        params![topic, partition],
        |r| r.get(0),
    )
    .optional()
}

/// A command for the gateway itself, waiting to be carried out.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayCommand {
    pub id: i64,
    pub command_id: String,
    pub name: String,
    pub payload: Value,
    pub expires_at_ms: i64,
}

/// The oldest command for the gateway itself, if any.
pub fn next_gateway_command(conn: &Connection) -> rusqlite::Result<Option<GatewayCommand>> {
    conn.query_row(
        "SELECT id, ref, name, payload, expires_at_ms FROM gateway_commands ORDER BY id LIMIT 1",
        [],
        |r| {
            let payload: String = r.get(3)?;
            Ok(GatewayCommand {
                id: r.get(0)?,
                command_id: r.get(1)?,
                name: r.get(2)?,
                payload: serde_json::from_str(&payload).unwrap_or(Value::Null),
                expires_at_ms: r.get(4)?,
            })
        },
    )
    .optional()
}

/// How a command for the gateway ended.
#[derive(Debug, Clone, PartialEq)]
pub enum GatewayOutcome {
    /// Carried out: `acked` with this result.
    Done(Value),
    /// Could not be carried out: `failed` with this reason.
    Failed(String),
    /// Its expiry passed before it was carried out.
    Expired,
}

/// Removes a command for the gateway and writes its final status event, in one transaction.
pub fn finish_gateway_command(
    conn: &mut Connection,
    id: i64,
    outcome: &GatewayOutcome,
    now_ms: i64,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    let row: Option<(String, String, Option<String>, Option<String>)> = tx
        .query_row(
            "DELETE FROM gateway_commands WHERE id = ?1
             RETURNING ref, name, correlation, reply_topic",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    if let Some((command_id, name, correlation, reply_topic)) = row {
        let base = Base {
            command_id: Some(&command_id),
            device: "",
            name: Some(&name),
            correlation: correlation.as_deref(),
            reply_topic: reply_topic.as_deref(),
        };
        match outcome {
            GatewayOutcome::Done(result) => {
                event(
                    &tx,
                    &base,
                    "acked",
                    Some(("result", result.clone())),
                    now_ms,
                )?;
            }
            GatewayOutcome::Failed(reason) => {
                event(
                    &tx,
                    &base,
                    "failed",
                    Some(("reason", json!(reason))),
                    now_ms,
                )?;
            }
            GatewayOutcome::Expired => event(&tx, &base, "expired", None, now_ms)?,
        }
    }
    tx.commit()
}
