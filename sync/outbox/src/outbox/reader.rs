//! Reading the outbox for the forwarder: highest priority first, oldest first within a priority,
//! in pages of bounded size.
//!
//! A reader has its own read-only connection. Under WAL it sees only committed records and never
//! blocks the writer. Reading does not remove anything: records go only through
//! [`Outbox::ack`](super::Outbox::ack) after delivery.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use rusqlite::{Connection, OpenFlags, Row};

use crate::envelope::{Source, StoredRecord};

/// Where a page starts: after `after_seq` within `priority`, then every lower priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPosition {
    pub priority: u8,
    pub after_seq: u64,
}

impl ReadPosition {
    /// The beginning: the oldest record of the highest priority.
    pub const START: ReadPosition = ReadPosition {
        priority: u8::MAX,
        after_seq: 0,
    };

    /// The position just after `record`.
    pub fn after(record: &StoredRecord) -> Self {
        Self {
            priority: record.priority,
            after_seq: record.seq,
        }
    }
}

const COLUMNS: &str = "seq, priority, route, boot, device_id, source, topic, received_at_ms, \
                       content_type, headers, payload, size";

#[derive(Debug)]
pub struct OutboxReader {
    conn: Connection,
    boots: HashMap<i64, Arc<str>>,
}

impl OutboxReader {
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self {
            conn,
            boots: HashMap::new(),
        })
    }

    /// Up to `max_records` records after `from`, stopping early once `max_bytes` of payload are
    /// in the page (a page always holds at least one record when any is left). Returns the page
    /// and the position after its last record (`from` itself when the page is empty).
    pub fn read_page(
        &mut self,
        from: ReadPosition,
        max_records: usize,
        max_bytes: u64,
    ) -> rusqlite::Result<(Vec<StoredRecord>, ReadPosition)> {
        self.read_window(from, 0..u64::MAX, max_records, max_bytes)
    }

    /// [`read_page`](Self::read_page) restricted to records whose sequence is in `seqs`: the
    /// forwarder reads a backlog (below some sequence) and live records (from it) separately.
    pub fn read_window(
        &mut self,
        from: ReadPosition,
        seqs: std::ops::Range<u64>,
        max_records: usize,
        max_bytes: u64,
    ) -> rusqlite::Result<(Vec<StoredRecord>, ReadPosition)> {
        let mut page = Vec::new();
        let mut bytes = 0u64;
        let limit = max_records.max(1) as i64;
        let low = seqs.start.min(i64::MAX as u64) as i64;
        let high = seqs.end.min(i64::MAX as u64) as i64;
        let same_priority = format!(
            "SELECT {COLUMNS} FROM records WHERE priority = ?1 AND seq > ?2 \
             AND seq >= ?3 AND seq < ?4 ORDER BY seq LIMIT ?5"
        );
        let lower = format!(
            "SELECT {COLUMNS} FROM records WHERE priority < ?1 AND seq >= ?2 AND seq < ?3 \
             ORDER BY priority DESC, seq LIMIT ?4"
        );
        let rows = {
            let mut stmt = self.conn.prepare_cached(&same_priority)?;
            let rows = stmt
                .query_map(
                    (from.priority, from.after_seq as i64, low, high, limit),
                    RawRow::from_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let missing = limit - rows.len() as i64;
            let mut rows = rows;
            if missing > 0 {
                let mut stmt = self.conn.prepare_cached(&lower)?;
                rows.extend(
                    stmt.query_map((from.priority, low, high, missing), RawRow::from_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()?,
                );
            }
            rows
        };
        for raw in rows {
            if !page.is_empty() && bytes + raw.size > max_bytes {
                break;
            }
            bytes += raw.size;
            let boot_id = self.boot_id(raw.boot)?;
            page.push(raw.into_record(boot_id));
        }
        let next = page.last().map_or(from, ReadPosition::after);
        Ok((page, next))
    }

    /// Up to `max_records` records with a sequence above `after_seq`, in sequence order
    /// (whatever their priority): the forwarder's live cursor, which forwards fresh records as
    /// they are committed.
    pub fn read_after(
        &mut self,
        after_seq: u64,
        max_records: usize,
    ) -> rusqlite::Result<Vec<StoredRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM records WHERE seq > ?1 ORDER BY seq LIMIT ?2");
        let rows = {
            let mut stmt = self.conn.prepare_cached(&sql)?;
            stmt.query_map(
                (
                    after_seq.min(i64::MAX as u64) as i64,
                    max_records.max(1) as i64,
                ),
                RawRow::from_row,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?
        };
        let mut page = Vec::with_capacity(rows.len());
        for raw in rows {
            let boot_id = self.boot_id(raw.boot)?;
            page.push(raw.into_record(boot_id));
        }
        Ok(page)
    }

    /// The record `seq`, if it is still held.
    pub fn read_seq(&mut self, seq: u64) -> rusqlite::Result<Option<StoredRecord>> {
        let page = self.read_after(seq.saturating_sub(1), 1)?;
        Ok(page.into_iter().find(|r| r.seq == seq))
    }

    /// The devices with records below sequence `below`: after an outage, these devices have a
    /// backlog their live records must wait behind (per-device order).
    pub fn devices_below(&mut self, below: u64) -> rusqlite::Result<HashSet<String>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT DISTINCT device_id FROM records WHERE seq < ?1")?;
        let devices = stmt
            .query_map([below.min(i64::MAX as u64) as i64], |r| r.get(0))?
            .collect::<rusqlite::Result<HashSet<String>>>()?;
        Ok(devices)
    }

    /// How many records, and how many bytes, are held below sequence `below`.
    pub fn count_below(&mut self, below: u64) -> rusqlite::Result<(u64, u64)> {
        let (count, bytes): (i64, i64) = self.conn.query_row(
            "SELECT count(*), coalesce(sum(size), 0) FROM records WHERE seq < ?1",
            [below.min(i64::MAX as u64) as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((count as u64, bytes as u64))
    }

    /// Up to `limit` dead letters with a sequence above `after`, in sequence order.
    pub fn dead_letters(
        &mut self,
        after: u64,
        limit: usize,
    ) -> rusqlite::Result<Vec<super::DeadLetter>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, device_id, source, topic, route, received_at_ms, content_type, size, \
             reason, error, kafka_topic, attempts, dead_at_ms FROM dead_letters WHERE seq > ?1 \
             ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(
            (after.min(i64::MAX as u64) as i64, limit.max(1) as i64),
            |r| {
                Ok(super::DeadLetter {
                    seq: r.get::<_, i64>(0)? as u64,
                    device_id: r.get(1)?,
                    source: r.get(2)?,
                    topic: r.get(3)?,
                    route: r.get(4)?,
                    received_at_ms: r.get(5)?,
                    content_type: r.get(6)?,
                    size: r.get::<_, i64>(7)? as u64,
                    reason: r.get(8)?,
                    error: r.get(9)?,
                    kafka_topic: r.get(10)?,
                    attempts: r.get(11)?,
                    dead_at_ms: r.get(12)?,
                })
            },
        )?;
        rows.collect()
    }

    /// The idempotency keys that start with `prefix`, in order.
    pub fn keys_with_prefix(&mut self, prefix: &str) -> rusqlite::Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key FROM dedupe WHERE key >= ?1 ORDER BY key")?;
        let mut keys = Vec::new();
        for key in stmt.query_map([prefix], |r| r.get::<_, String>(0))? {
            let key = key?;
            if !key.starts_with(prefix) {
                break;
            }
            keys.push(key);
        }
        Ok(keys)
    }

    /// Every record, in forwarding order. For tests and tools on small outboxes only: it holds
    /// the whole outbox in memory.
    pub fn read_all(&mut self) -> rusqlite::Result<Vec<StoredRecord>> {
        let mut all = Vec::new();
        let mut at = ReadPosition::START;
        loop {
            let (page, next) = self.read_page(at, 1024, u64::MAX)?;
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
            at = next;
        }
    }

    fn boot_id(&mut self, boot: i64) -> rusqlite::Result<Arc<str>> {
        if let Some(id) = self.boots.get(&boot) {
            return Ok(Arc::clone(id));
        }
        let id: String =
            self.conn
                .query_row("SELECT boot_id FROM boots WHERE id = ?1", [boot], |r| {
                    r.get(0)
                })?;
        let id: Arc<str> = id.into();
        self.boots.insert(boot, Arc::clone(&id));
        Ok(id)
    }
}

struct RawRow {
    seq: i64,
    priority: u8,
    route: String,
    boot: i64,
    device_id: String,
    source: Source,
    topic: String,
    received_at_ms: i64,
    content_type: Option<String>,
    headers: Option<String>,
    payload: Vec<u8>,
    size: u64,
}

impl RawRow {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            seq: r.get(0)?,
            priority: r.get(1)?,
            route: r.get(2)?,
            boot: r.get(3)?,
            device_id: r.get(4)?,
            // Only this crate writes the column; an unknown value would mean a newer writer,
            // and the schema version check refuses those. Fall back rather than fail the page.
            source: r
                .get_ref(5)?
                .as_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(Source::Driver),
            topic: r.get(6)?,
            received_at_ms: r.get(7)?,
            content_type: r.get(8)?,
            headers: r.get(9)?,
            payload: r.get(10)?,
            size: r.get::<_, i64>(11)? as u64,
        })
    }

    fn into_record(self, boot_id: Arc<str>) -> StoredRecord {
        StoredRecord {
            seq: self.seq as u64,
            priority: self.priority,
            route: self.route,
            boot_id,
            device_id: self.device_id,
            source: self.source,
            topic: self.topic,
            received_at_ms: self.received_at_ms,
            content_type: self.content_type,
            headers: self
                .headers
                .and_then(|h| serde_json::from_str(&h).ok())
                .unwrap_or_default(),
            payload: self.payload,
            size: self.size,
        }
    }
}
