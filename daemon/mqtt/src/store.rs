//! `sessions.db`: the durable half of the broker — persistent sessions, their subscriptions,
//! the QoS 1 and 2 messages queued for them, retained messages, and the broker clock.
//!
//! One writer thread owns the connection (not the runtime's blocking pool: a burst of other
//! blocking work never delays a commit). It takes every queued operation, applies them in one
//! transaction and commits once (`synchronous = FULL`: one fsync for the group), then answers
//! each. An answer therefore means *committed*: the broker acknowledges a publisher only after
//! the copies queued for persistent sessions are committed here, and a SUBACK of a persistent
//! session only after its subscription is.
//!
//! Queue rows are numbered per session **by the writer, at commit** (`no`), so numbers follow
//! commit order: when a row with number `n` is committed, every row of that session numbered
//! below `n` is too. The broker relies on that when it refills a connection from disk.
//!
//! The broker clock counts seconds the gateway ran, plus the downtime between two runs when the
//! wall clock is plausible (after 2024 and not behind the last run's): session and message
//! expiry then hold across restarts, and a Raspberry Pi booting in 1970 never expires anything
//! early — its downtime just does not count. It is written with every commit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use crate::codec::QoS;
use crate::codec::decode::Cursor;
use crate::codec::encode::put_varint;
use crate::codec::props::{self, PublishProps};

/// Operations waiting for the writer; when full, callers wait (back-pressure on publishers).
const QUEUE: usize = 4096;
/// Operations applied in one transaction at most.
const GROUP: usize = 1024;
/// 2024-01-01: wall clocks before this are not trusted for downtime.
const PLAUSIBLE_WALL_MS: i64 = 1_704_067_200_000;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The commit failed; nothing of the operation took effect. Refuse what depended on it.
    #[error("sessions.db: {0}")]
    Sqlite(String),
    /// The writer thread is gone (shutdown, or it failed).
    #[error("sessions.db writer stopped")]
    Closed,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e.to_string())
    }
}

/// A subscription as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSub {
    pub filter: String,
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub subscription_id: Option<u32>,
}

/// A persistent session as loaded at start.
#[derive(Debug, Clone)]
pub struct StoredSession {
    pub key: String,
    pub device_id: String,
    pub client_id: String,
    /// Session Expiry Interval in seconds.
    pub expiry: u32,
    /// Broker-clock second its last connection ended.
    pub disconnected_at: u64,
    pub subs: Vec<StoredSub>,
    /// Rows queued and their payload bytes.
    pub queued: u64,
    pub queued_bytes: u64,
}

/// One queued message of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedRow {
    /// Its number within the session (commit order).
    pub no: u64,
    pub qos: QoS,
    pub retain: bool,
    pub topic: String,
    pub payload: Bytes,
    pub props: PublishProps,
    /// Broker-clock second it expires (MQTT 5 Message Expiry Interval).
    pub expires_at: Option<u64>,
    /// It was sent at least once (a resend carries DUP).
    pub sent: bool,
    /// QoS 2: PUBREC came and PUBREL was committed: resend PUBREL, never the PUBLISH.
    pub released: bool,
}

/// A message to queue for a session.
#[derive(Debug, Clone)]
pub struct NewRow {
    pub session: String,
    pub qos: QoS,
    pub retain: bool,
    pub topic: String,
    pub payload: Bytes,
    pub props: PublishProps,
    pub expires_at: Option<u64>,
}

/// A retained message as stored.
#[derive(Debug, Clone)]
pub struct StoredRetained {
    pub topic: String,
    pub qos: QoS,
    pub payload: Bytes,
    pub props: PublishProps,
    pub expires_at: Option<u64>,
}

/// What `sessions.db` held at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub sessions: Vec<StoredSession>,
    pub retained: Vec<StoredRetained>,
    /// Broker-clock second at start.
    pub clock: u64,
    /// Set when a damaged file was moved aside: (where, why).
    pub quarantined: Option<(PathBuf, String)>,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Op {
    UpsertSession {
        key: String,
        device_id: String,
        client_id: String,
        expiry: u32,
        reply: Reply<()>,
    },
    Disconnected {
        key: String,
        expiry: u32,
        at: u64,
    },
    DeleteSession {
        key: String,
        reply: Reply<()>,
    },
    Subscribe {
        key: String,
        sub: StoredSub,
        reply: Reply<()>,
    },
    Unsubscribe {
        key: String,
        filter: String,
        reply: Reply<()>,
    },
    Enqueue {
        rows: Vec<NewRow>,
        /// Per session: drop this many of its oldest unsent rows first.
        evict: Vec<(String, usize)>,
        /// Idempotency keys of QoS 2 publishes these rows route (see [`Store::enqueue`]).
        routed: Vec<String>,
        reply: Reply<Enqueued>,
    },
    RoutedKeys {
        prefix: String,
        reply: Reply<Vec<String>>,
    },
    ForgetRouted {
        keys: Vec<String>,
        reply: Reply<()>,
    },
    Sent {
        key: String,
        no: u64,
    },
    Released {
        key: String,
        no: u64,
        reply: Reply<()>,
    },
    Acked {
        key: String,
        no: u64,
    },
    Retain {
        topic: String,
        message: Option<StoredRetained>,
        reply: Reply<()>,
    },
    LoadQueue {
        key: String,
        after: u64,
        limit: usize,
        reply: Reply<Vec<QueuedRow>>,
    },
}

/// What an enqueue did: the numbers of the new rows (in the order given) and, per session,
/// the rows it evicted as (number, payload bytes).
#[derive(Debug, Clone, Default)]
pub struct Enqueued {
    pub numbers: Vec<u64>,
    pub evicted: Vec<(String, Vec<(u64, u64)>)>,
}

/// The handle of the writer thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    /// Cancelled when the writer thread ends (shutdown, a panic, or the debug fault hook).
    stopped: tokio_util::sync::CancellationToken,
}

/// Cancels its token when dropped: the writer thread's end, however it ends.
struct StopGuard(tokio_util::sync::CancellationToken);

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS meta (
        id        INTEGER PRIMARY KEY CHECK (id = 1),
        clock     INTEGER NOT NULL,   -- broker-clock seconds at the last commit
        wall_ms   INTEGER NOT NULL    -- wall clock at the last commit
    );
    INSERT OR IGNORE INTO meta (id, clock, wall_ms) VALUES (1, 0, 0);
    CREATE TABLE IF NOT EXISTS sessions (
        key             TEXT PRIMARY KEY,  -- <device id>|<client id>, escaped
        device_id       TEXT NOT NULL,
        client_id       TEXT NOT NULL,
        expiry          INTEGER NOT NULL,  -- Session Expiry Interval, seconds
        disconnected_at INTEGER,           -- broker clock; NULL while connected
        next_no         INTEGER NOT NULL DEFAULT 1  -- the next row number: never reused
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS subscriptions (
        session  TEXT NOT NULL,
        filter   TEXT NOT NULL,
        options  INTEGER NOT NULL,         -- qos | no_local << 2 | retain_as_published << 3
        sub_id   INTEGER,
        PRIMARY KEY (session, filter)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS messages (
        session    TEXT NOT NULL,
        no         INTEGER NOT NULL,       -- per session, in commit order
        qos        INTEGER NOT NULL,
        retain     INTEGER NOT NULL,
        topic      TEXT NOT NULL,
        payload    BLOB NOT NULL,
        props      BLOB,                   -- MQTT 5 property section, as on the wire
        expires_at INTEGER,                -- broker clock
        sent       INTEGER NOT NULL DEFAULT 0,
        released   INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (session, no)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS routed (
        key        TEXT PRIMARY KEY          -- a persistent session's QoS 2 idempotency key
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS retained (
        topic      TEXT PRIMARY KEY,
        qos        INTEGER NOT NULL,
        payload    BLOB NOT NULL,
        props      BLOB,
        expires_at INTEGER
    ) WITHOUT ROWID;
";

fn encode_props(p: &PublishProps) -> Option<Vec<u8>> {
    if p.is_empty() {
        return None;
    }
    let mut out = BytesMut::new();
    put_varint(&mut out, p.wire_len());
    p.put(&mut out);
    Some(out.to_vec())
}

fn decode_props(blob: Option<Vec<u8>>) -> PublishProps {
    let Some(blob) = blob else {
        return PublishProps::default();
    };
    let mut c = Cursor::new(Bytes::from(blob));
    // Written by `encode_props`; a row that does not read back loses its properties, not its
    // message.
    props::read_stored(&mut c).unwrap_or_default()
}

fn qos_of(v: i64) -> QoS {
    QoS::from_u8(u8::try_from(v).unwrap_or(0)).unwrap_or(QoS::AtMostOnce)
}

impl Store {
    /// Opens (creating) `path`; a file that cannot be opened or fails `quick_check` is moved
    /// aside and a fresh one started. Spawns the writer thread.
    pub fn open(path: &Path) -> Result<(Store, Loaded), StoreError> {
        let mut quarantined = None;
        let conn = match open_checked(path) {
            Ok(c) => c,
            Err(why) => {
                let moved = quarantine(path);
                tracing::error!(path = %path.display(), moved_to = %moved.display(), error = %why, "sessions.db is damaged; moved aside, starting without persistent sessions");
                quarantined = Some((moved, why));
                open_checked(path).map_err(StoreError::Sqlite)?
            }
        };
        let mut loaded = load(&conn)?;
        loaded.quarantined = quarantined;
        let (tx, rx) = mpsc::channel(QUEUE);
        let clock = Clock::new(loaded.clock);
        let stopped = tokio_util::sync::CancellationToken::new();
        let guard = StopGuard(stopped.clone());
        std::thread::Builder::new()
            .name("mqtt-sessions".to_owned())
            .spawn(move || {
                let _guard = guard;
                // Debug builds: `OUTPOST_DEBUG_FAIL=mqtt-sessions` stops the writer at once.
                if outpost_config::debug_fault_requested("mqtt-sessions") {
                    return;
                }
                Writer::new(conn, clock).run(rx);
            })
            .map_err(|e| StoreError::Sqlite(format!("starting the writer thread: {e}")))?;
        Ok((Store { tx, stopped }, loaded))
    }

    /// Resolves when the writer thread has ended. While the daemon runs that is a failure:
    /// persistent sessions can no longer be served (see the daemon's `mqtt-sessions`
    /// subsystem).
    pub async fn stopped(&self) {
        self.stopped.cancelled().await;
    }

    async fn call<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(op(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Sends an operation nobody waits for (its loss in a crash is harmless; see each caller).
    fn tell(&self, op: Op) {
        if let Err(e) = self.tx.try_send(op) {
            tracing::debug!(error = %e, "sessions.db writer busy; a bookkeeping update was skipped");
        }
    }

    pub async fn upsert_session(
        &self,
        key: &str,
        device_id: &str,
        client_id: &str,
        expiry: u32,
    ) -> Result<(), StoreError> {
        self.call(|reply| Op::UpsertSession {
            key: key.to_owned(),
            device_id: device_id.to_owned(),
            client_id: client_id.to_owned(),
            expiry,
            reply,
        })
        .await
    }

    /// The session's connection ended at broker second `at` (with its final expiry). Lost in a
    /// crash, the session counts as disconnected at the next start.
    pub fn disconnected(&self, key: &str, expiry: u32, at: u64) {
        self.tell(Op::Disconnected {
            key: key.to_owned(),
            expiry,
            at,
        });
    }

    pub async fn delete_session(&self, key: &str) -> Result<(), StoreError> {
        self.call(|reply| Op::DeleteSession {
            key: key.to_owned(),
            reply,
        })
        .await
    }

    pub async fn subscribe(&self, key: &str, sub: StoredSub) -> Result<(), StoreError> {
        self.call(|reply| Op::Subscribe {
            key: key.to_owned(),
            sub,
            reply,
        })
        .await
    }

    pub async fn unsubscribe(&self, key: &str, filter: &str) -> Result<(), StoreError> {
        self.call(|reply| Op::Unsubscribe {
            key: key.to_owned(),
            filter: filter.to_owned(),
            reply,
        })
        .await
    }

    /// Queues `rows` (after evicting, per session, its oldest unsent rows); resolves once
    /// committed. `routed` are the idempotency keys of the QoS 2 publishes these rows come
    /// from, committed with them: a retransmission of such a publish after a crash is known to
    /// be routed already (and is routed if its key is missing).
    pub async fn enqueue(
        &self,
        rows: Vec<NewRow>,
        evict: Vec<(String, usize)>,
        routed: Vec<String>,
    ) -> Result<Enqueued, StoreError> {
        self.call(|reply| Op::Enqueue {
            rows,
            evict,
            routed,
            reply,
        })
        .await
    }

    /// The routed keys starting with `prefix`.
    pub async fn routed_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.call(|reply| Op::RoutedKeys {
            prefix: prefix.to_owned(),
            reply,
        })
        .await
    }

    /// Forgets routed keys (their PUBREL came); resolves once committed, so that a reused
    /// packet identifier is never taken for routed.
    pub async fn forget_routed(&self, keys: Vec<String>) -> Result<(), StoreError> {
        self.call(|reply| Op::ForgetRouted { keys, reply }).await
    }

    /// A row was written to the client. Lost in a crash, its resend lacks the DUP flag.
    pub fn sent(&self, key: &str, no: u64) {
        self.tell(Op::Sent {
            key: key.to_owned(),
            no,
        });
    }

    /// A QoS 2 row got its PUBREC: committed before PUBREL is sent, so that after a crash
    /// PUBREL is resent, never the PUBLISH (which the client would take for a new message).
    pub async fn released(&self, key: &str, no: u64) -> Result<(), StoreError> {
        self.call(|reply| Op::Released {
            key: key.to_owned(),
            no,
            reply,
        })
        .await
    }

    /// A row was acknowledged (PUBACK, PUBCOMP) or dropped. Lost in a crash, a QoS 1 row is
    /// sent again (at least once) and a released QoS 2 row gets its PUBREL again (harmless).
    pub fn acked(&self, key: &str, no: u64) {
        self.tell(Op::Acked {
            key: key.to_owned(),
            no,
        });
    }

    /// Sets (`Some`) or clears the retained message of `topic`.
    pub async fn retain(
        &self,
        topic: &str,
        message: Option<StoredRetained>,
    ) -> Result<(), StoreError> {
        self.call(|reply| Op::Retain {
            topic: topic.to_owned(),
            message,
            reply,
        })
        .await
    }

    /// The session's rows numbered above `after`, oldest first, at most `limit`.
    pub async fn load_queue(
        &self,
        key: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<QueuedRow>, StoreError> {
        self.call(|reply| Op::LoadQueue {
            key: key.to_owned(),
            after,
            limit,
            reply,
        })
        .await
    }
}

fn open_checked(path: &Path) -> Result<Connection, String> {
    let conn = Connection::open(path).map_err(|e| e.to_string())?;
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
        .map_err(|e| e.to_string())?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if check != "ok" {
        return Err(format!("quick_check: {check}"));
    }
    conn.execute_batch(SCHEMA).map_err(|e| e.to_string())?;
    Ok(conn)
}

/// Moves `path` and its WAL companions aside; returns where it went.
fn quarantine(path: &Path) -> PathBuf {
    let moved = PathBuf::from(format!("{}.corrupt-{}", path.display(), wall_ms()));
    let _ = std::fs::rename(path, &moved);
    for suffix in ["-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", path.display()));
        let to = PathBuf::from(format!("{}{suffix}", moved.display()));
        let _ = std::fs::rename(from, to);
    }
    moved
}

fn load(conn: &Connection) -> Result<Loaded, StoreError> {
    let (clock, wall): (i64, i64) =
        conn.query_row("SELECT clock, wall_ms FROM meta WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let now = wall_ms();
    let downtime = if wall >= PLAUSIBLE_WALL_MS && now >= wall {
        (now - wall) / 1000
    } else {
        0
    };
    let clock = u64::try_from(clock + downtime).unwrap_or(0);
    let mut sessions: HashMap<String, StoredSession> = HashMap::new();
    {
        let mut stmt = conn
            .prepare("SELECT key, device_id, client_id, expiry, disconnected_at FROM sessions")?;
        let rows = stmt.query_map([], |r| {
            Ok(StoredSession {
                key: r.get(0)?,
                device_id: r.get(1)?,
                client_id: r.get(2)?,
                expiry: u32::try_from(r.get::<_, i64>(3)?).unwrap_or(u32::MAX),
                // Connected when the last run ended: its end counts from this start.
                disconnected_at: r
                    .get::<_, Option<i64>>(4)?
                    .map_or(clock, |at| u64::try_from(at).unwrap_or(0)),
                subs: Vec::new(),
                queued: 0,
                queued_bytes: 0,
            })
        })?;
        for s in rows {
            let s = s?;
            sessions.insert(s.key.clone(), s);
        }
    }
    {
        let mut stmt =
            conn.prepare("SELECT session, filter, options, sub_id FROM subscriptions")?;
        let rows = stmt.query_map([], |r| {
            let options: i64 = r.get(2)?;
            Ok((
                r.get::<_, String>(0)?,
                StoredSub {
                    filter: r.get(1)?,
                    qos: qos_of(options & 3),
                    no_local: options & 4 != 0,
                    retain_as_published: options & 8 != 0,
                    subscription_id: r
                        .get::<_, Option<i64>>(3)?
                        .and_then(|v| u32::try_from(v).ok()),
                },
            ))
        })?;
        for row in rows {
            let (session, sub) = row?;
            if let Some(s) = sessions.get_mut(&session) {
                s.subs.push(sub);
            }
        }
    }
    {
        let mut stmt = conn.prepare(
            "SELECT session, COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages GROUP BY session",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (session, n, bytes) = row?;
            if let Some(s) = sessions.get_mut(&session) {
                s.queued = u64::try_from(n).unwrap_or(0);
                s.queued_bytes = u64::try_from(bytes).unwrap_or(0);
            }
        }
    }
    let mut retained = Vec::new();
    {
        let mut stmt =
            conn.prepare("SELECT topic, qos, payload, props, expires_at FROM retained")?;
        let rows = stmt.query_map([], |r| {
            Ok(StoredRetained {
                topic: r.get(0)?,
                qos: qos_of(r.get(1)?),
                payload: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                props: decode_props(r.get(3)?),
                expires_at: r
                    .get::<_, Option<i64>>(4)?
                    .and_then(|v| u64::try_from(v).ok()),
            })
        })?;
        for row in rows {
            retained.push(row?);
        }
    }
    Ok(Loaded {
        sessions: sessions.into_values().collect(),
        retained,
        clock,
        quarantined: None,
    })
}

/// The broker clock: seconds since a base loaded from `sessions.db`. Monotonic (tokio's
/// clock, which tests can pause and advance).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: u64,
    started: tokio::time::Instant,
}

impl Clock {
    pub fn new(base: u64) -> Clock {
        Clock {
            base,
            started: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> u64 {
        self.base + self.started.elapsed().as_secs()
    }
}

struct Writer {
    conn: Connection,
    clock: Clock,
    /// Next row number per session (cleared when a commit fails: numbers are re-read).
    next_no: HashMap<String, u64>,
}

/// Where the result of an operation goes once the group's commit decides.
enum Answer {
    None,
    Unit(Reply<()>),
    Enqueued(Reply<Enqueued>, Enqueued),
    Rows(Reply<Vec<QueuedRow>>, Vec<QueuedRow>),
    Keys(Reply<Vec<String>>, Vec<String>),
}

impl Answer {
    fn finish(self, result: Result<(), StoreError>) {
        match (self, result) {
            (Answer::None, _) => {}
            (Answer::Unit(r), res) => {
                let _ = r.send(res);
            }
            (Answer::Enqueued(r, v), res) => {
                let _ = r.send(res.map(|()| v));
            }
            (Answer::Rows(r, v), res) => {
                let _ = r.send(res.map(|()| v));
            }
            (Answer::Keys(r, v), res) => {
                let _ = r.send(res.map(|()| v));
            }
        }
    }
}

/// An operation without its reply.
enum Action {
    UpsertSession {
        key: String,
        device_id: String,
        client_id: String,
        expiry: u32,
    },
    Disconnected {
        key: String,
        expiry: u32,
        at: u64,
    },
    DeleteSession(String),
    Subscribe(String, StoredSub),
    Unsubscribe(String, String),
    Enqueue(Vec<NewRow>, Vec<(String, usize)>, Vec<String>),
    RoutedKeys(String),
    ForgetRouted(Vec<String>),
    Sent(String, u64),
    Released(String, u64),
    Acked(String, u64),
    Retain(String, Option<StoredRetained>),
    LoadQueue(String, u64, usize),
}

fn split(op: Op) -> (Action, Answer) {
    match op {
        Op::UpsertSession {
            key,
            device_id,
            client_id,
            expiry,
            reply,
        } => (
            Action::UpsertSession {
                key,
                device_id,
                client_id,
                expiry,
            },
            Answer::Unit(reply),
        ),
        Op::Disconnected { key, expiry, at } => {
            (Action::Disconnected { key, expiry, at }, Answer::None)
        }
        Op::DeleteSession { key, reply } => (Action::DeleteSession(key), Answer::Unit(reply)),
        Op::Subscribe { key, sub, reply } => (Action::Subscribe(key, sub), Answer::Unit(reply)),
        Op::Unsubscribe { key, filter, reply } => {
            (Action::Unsubscribe(key, filter), Answer::Unit(reply))
        }
        Op::Enqueue {
            rows,
            evict,
            routed,
            reply,
        } => (
            Action::Enqueue(rows, evict, routed),
            Answer::Enqueued(reply, Enqueued::default()),
        ),
        Op::RoutedKeys { prefix, reply } => {
            (Action::RoutedKeys(prefix), Answer::Keys(reply, Vec::new()))
        }
        Op::ForgetRouted { keys, reply } => (Action::ForgetRouted(keys), Answer::Unit(reply)),
        Op::Sent { key, no } => (Action::Sent(key, no), Answer::None),
        Op::Released { key, no, reply } => (Action::Released(key, no), Answer::Unit(reply)),
        Op::Acked { key, no } => (Action::Acked(key, no), Answer::None),
        Op::Retain {
            topic,
            message,
            reply,
        } => (Action::Retain(topic, message), Answer::Unit(reply)),
        Op::LoadQueue {
            key,
            after,
            limit,
            reply,
        } => (
            Action::LoadQueue(key, after, limit),
            Answer::Rows(reply, Vec::new()),
        ),
    }
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Writer {
    fn new(conn: Connection, clock: Clock) -> Writer {
        Writer {
            conn,
            clock,
            next_no: HashMap::new(),
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        while let Some(first) = rx.blocking_recv() {
            let mut group = vec![first];
            while group.len() < GROUP {
                match rx.try_recv() {
                    Ok(op) => group.push(op),
                    Err(_) => break,
                }
            }
            self.apply(group);
        }
        if let Err(e) = self.conn.pragma_update(None, "wal_checkpoint", "TRUNCATE") {
            tracing::warn!(error = %e, "sessions.db checkpoint at shutdown failed");
        }
    }

    fn apply(&mut self, group: Vec<Op>) {
        let (actions, mut answers): (Vec<Action>, Vec<Answer>) =
            group.into_iter().map(split).unzip();
        let Writer {
            conn,
            clock,
            next_no,
        } = self;
        let result = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for (action, answer) in actions.into_iter().zip(answers.iter_mut()) {
                apply_one(&tx, next_no, action, answer)?;
            }
            tx.execute(
                "UPDATE meta SET clock = ?1, wall_ms = ?2 WHERE id = 1",
                (i64_of(clock.now()), wall_ms()),
            )?;
            tx.commit()
        })();
        let result = result.map_err(|e| {
            // Rolled back: the row numbers handed out in this group are free again.
            next_no.clear();
            tracing::error!(error = %e, "sessions.db commit failed; its operations were refused");
            StoreError::from(e)
        });
        for answer in answers {
            answer.finish(result.clone());
        }
    }
}

fn apply_one(
    tx: &rusqlite::Transaction<'_>,
    next_no: &mut HashMap<String, u64>,
    action: Action,
    answer: &mut Answer,
) -> rusqlite::Result<()> {
    match action {
        Action::UpsertSession {
            key,
            device_id,
            client_id,
            expiry,
        } => {
            tx.execute(
                "INSERT INTO sessions (key, device_id, client_id, expiry, disconnected_at)
                 VALUES (?1, ?2, ?3, ?4, NULL)
                 ON CONFLICT(key) DO UPDATE SET expiry = excluded.expiry, disconnected_at = NULL",
                (&key, &device_id, &client_id, i64::from(expiry)),
            )?;
        }
        Action::Disconnected { key, expiry, at } => {
            tx.execute(
                "UPDATE sessions SET expiry = ?2, disconnected_at = ?3 WHERE key = ?1",
                (&key, i64::from(expiry), i64_of(at)),
            )?;
        }
        Action::DeleteSession(key) => {
            tx.execute(
                "DELETE FROM routed WHERE key >= ?1 AND key < ?1 || char(1114111)",
                [format!("{key}|")],
            )?;
            tx.execute("DELETE FROM sessions WHERE key = ?1", [&key])?;
            tx.execute("DELETE FROM subscriptions WHERE session = ?1", [&key])?;
            tx.execute("DELETE FROM messages WHERE session = ?1", [&key])?;
            next_no.remove(&key);
        }
        Action::Subscribe(key, sub) => {
            let options = sub.qos as i64
                | (i64::from(sub.no_local) << 2)
                | (i64::from(sub.retain_as_published) << 3);
            tx.execute(
                "INSERT INTO subscriptions (session, filter, options, sub_id) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(session, filter) DO UPDATE SET options = excluded.options, sub_id = excluded.sub_id",
                (&key, &sub.filter, options, sub.subscription_id.map(i64::from)),
            )?;
        }
        Action::Unsubscribe(key, filter) => {
            tx.execute(
                "DELETE FROM subscriptions WHERE session = ?1 AND filter = ?2",
                (&key, &filter),
            )?;
        }
        Action::Enqueue(rows, evict, routed) => {
            let mut done = Enqueued::default();
            for key in routed {
                tx.execute("INSERT OR IGNORE INTO routed (key) VALUES (?1)", [key])?;
            }
            for (key, n) in evict {
                let mut stmt = tx.prepare_cached(
                    "DELETE FROM messages WHERE session = ?1 AND no IN (
                         SELECT no FROM messages WHERE session = ?1 AND sent = 0
                         ORDER BY no LIMIT ?2) RETURNING no, LENGTH(payload)",
                )?;
                let mut gone: Vec<(u64, u64)> = stmt
                    .query_map((&key, i64::try_from(n).unwrap_or(i64::MAX)), |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                    })?
                    .map(|r| {
                        r.map(|(no, len)| {
                            (
                                u64::try_from(no).unwrap_or(0),
                                u64::try_from(len).unwrap_or(0),
                            )
                        })
                    })
                    .collect::<rusqlite::Result<_>>()?;
                gone.sort_unstable();
                done.evicted.push((key, gone));
            }
            let mut insert = tx.prepare_cached(
                "INSERT INTO messages (session, no, qos, retain, topic, payload, props, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            let mut touched = Vec::new();
            for row in rows {
                let no = match next_no.get(&row.session) {
                    Some(n) => *n,
                    None => {
                        // Numbers never go back, even once every row was acknowledged: the
                        // session keeps its next number.
                        let next: Option<i64> = tx
                            .query_row(
                                "SELECT next_no FROM sessions WHERE key = ?1",
                                [&row.session],
                                |r| r.get(0),
                            )
                            .optional()?;
                        next.map_or(1, |n| u64::try_from(n).unwrap_or(1))
                    }
                };
                insert.execute(rusqlite::params![
                    &row.session,
                    i64_of(no),
                    row.qos as i64,
                    row.retain,
                    &row.topic,
                    &row.payload[..],
                    encode_props(&row.props),
                    row.expires_at.map(i64_of),
                ])?;
                if !touched.contains(&row.session) {
                    touched.push(row.session.clone());
                }
                next_no.insert(row.session, no + 1);
                done.numbers.push(no);
            }
            for key in touched {
                if let Some(n) = next_no.get(&key) {
                    tx.execute(
                        "UPDATE sessions SET next_no = ?2 WHERE key = ?1",
                        (&key, i64_of(*n)),
                    )?;
                }
            }
            if let Answer::Enqueued(_, v) = answer {
                *v = done;
            }
        }
        Action::RoutedKeys(prefix) => {
            let mut stmt = tx.prepare_cached(
                "SELECT key FROM routed WHERE key >= ?1 AND key < ?1 || char(1114111) ORDER BY key",
            )?;
            let keys = stmt
                .query_map([prefix], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            if let Answer::Keys(_, v) = answer {
                *v = keys;
            }
        }
        Action::ForgetRouted(keys) => {
            let mut stmt = tx.prepare_cached("DELETE FROM routed WHERE key = ?1")?;
            for key in keys {
                stmt.execute([key])?;
            }
        }
        Action::Sent(key, no) => {
            tx.execute(
                "UPDATE messages SET sent = 1 WHERE session = ?1 AND no = ?2",
                (&key, i64_of(no)),
            )?;
        }
        Action::Released(key, no) => {
            tx.execute(
                "UPDATE messages SET sent = 1, released = 1 WHERE session = ?1 AND no = ?2",
                (&key, i64_of(no)),
            )?;
        }
        Action::Acked(key, no) => {
            tx.execute(
                "DELETE FROM messages WHERE session = ?1 AND no = ?2",
                (&key, i64_of(no)),
            )?;
        }
        Action::Retain(topic, message) => match message {
            None => {
                tx.execute("DELETE FROM retained WHERE topic = ?1", [&topic])?;
            }
            Some(m) => {
                tx.execute(
                    "INSERT INTO retained (topic, qos, payload, props, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(topic) DO UPDATE SET qos = excluded.qos, payload = excluded.payload,
                         props = excluded.props, expires_at = excluded.expires_at",
                    rusqlite::params![
                        &topic,
                        m.qos as i64,
                        &m.payload[..],
                        encode_props(&m.props),
                        m.expires_at.map(i64_of),
                    ],
                )?;
            }
        },
        Action::LoadQueue(key, after, limit) => {
            let mut stmt = tx.prepare_cached(
                "SELECT no, qos, retain, topic, payload, props, expires_at, sent, released
                 FROM messages WHERE session = ?1 AND no > ?2 ORDER BY no LIMIT ?3",
            )?;
            let rows = stmt
                .query_map(
                    (
                        &key,
                        i64_of(after),
                        i64::try_from(limit).unwrap_or(i64::MAX),
                    ),
                    |r| {
                        Ok(QueuedRow {
                            no: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                            qos: qos_of(r.get(1)?),
                            retain: r.get(2)?,
                            topic: r.get(3)?,
                            payload: Bytes::from(r.get::<_, Vec<u8>>(4)?),
                            props: decode_props(r.get(5)?),
                            expires_at: r
                                .get::<_, Option<i64>>(6)?
                                .and_then(|v| u64::try_from(v).ok()),
                            sent: r.get(7)?,
                            released: r.get(8)?,
                        })
                    },
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            if let Answer::Rows(_, v) = answer {
                *v = rows;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn row(session: &str, topic: &str) -> NewRow {
        NewRow {
            session: session.into(),
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            payload: Bytes::from_static(b"p"),
            props: PublishProps {
                content_type: Some("text/plain".into()),
                user: vec![("k".into(), "v".into())],
                ..PublishProps::default()
            },
            expires_at: Some(99),
        }
    }

    #[tokio::test]
    async fn sessions_subscriptions_and_queues_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.db");
        let (store, loaded) = Store::open(&path).unwrap();
        assert!(loaded.sessions.is_empty() && loaded.quarantined.is_none());
        store.upsert_session("d|c", "d", "c", 300).await.unwrap();
        let sub = StoredSub {
            filter: "a/#".into(),
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: false,
            subscription_id: Some(7),
        };
        store.subscribe("d|c", sub.clone()).await.unwrap();
        let done = store
            .enqueue(
                vec![row("d|c", "a/1"), row("d|c", "a/2"), row("d|c", "a/3")],
                vec![],
                vec!["d|c|7".into()],
            )
            .await
            .unwrap();
        assert_eq!(done.numbers, [1, 2, 3]);
        store.released("d|c", 2).await.unwrap();
        store.acked("d|c", 1);
        // Evicting the oldest unsent one: 3 (1 is gone, 2 was sent).
        let done = store
            .enqueue(vec![row("d|c", "a/4")], vec![("d|c".into(), 1)], vec![])
            .await
            .unwrap();
        assert_eq!(done.numbers, [4]);
        assert_eq!(done.evicted, [("d|c".to_owned(), vec![(3, 1)])]);
        store
            .retain(
                "r/1",
                Some(StoredRetained {
                    topic: "r/1".into(),
                    qos: QoS::AtLeastOnce,
                    payload: Bytes::from_static(b"kept"),
                    props: PublishProps::default(),
                    expires_at: None,
                }),
            )
            .await
            .unwrap();
        store.disconnected("d|c", 300, 5);
        assert_eq!(store.routed_keys("d|c|").await.unwrap(), ["d|c|7"]);
        store.forget_routed(vec!["d|c|7".into()]).await.unwrap();
        assert!(store.routed_keys("d|c|").await.unwrap().is_empty());
        let rows = store.load_queue("d|c", 0, 10).await.unwrap();
        assert_eq!(rows.iter().map(|r| r.no).collect::<Vec<_>>(), [2, 4]);
        assert!(rows[0].released && rows[0].sent && !rows[1].sent);
        assert_eq!(rows[1].props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(rows[1].expires_at, Some(99));
        drop(store);

        // Reopened (the writer finishes what it was given before its channel closes).
        let loaded = loop {
            let (store, loaded) = Store::open(&path).unwrap();
            if loaded.sessions.first().is_some_and(|s| s.queued == 2) {
                break (store, loaded).1;
            }
            drop(store);
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let s = &loaded.sessions[0];
        assert_eq!(
            (s.key.as_str(), s.expiry, s.disconnected_at),
            ("d|c", 300, 5)
        );
        assert_eq!(s.subs, [sub]);
        assert_eq!((s.queued, s.queued_bytes), (2, 2));
        assert_eq!(loaded.retained[0].payload, Bytes::from_static(b"kept"));
    }

    #[tokio::test]
    async fn numbers_continue_after_a_reopen_and_deleting_a_session_removes_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.db");
        let (store, _) = Store::open(&path).unwrap();
        store.upsert_session("k", "d", "c", 10).await.unwrap();
        store
            .enqueue(vec![row("k", "t")], vec![], vec![])
            .await
            .unwrap();
        drop(store);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (store, _) = Store::open(&path).unwrap();
        let done = store
            .enqueue(vec![row("k", "t")], vec![], vec![])
            .await
            .unwrap();
        assert_eq!(done.numbers, [2]);
        store.acked("k", 1);
        store.acked("k", 2);
        drop(store);
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Every row acknowledged, then a reopen: the numbers still do not go back.
        let (store, _) = Store::open(&path).unwrap();
        let done = store
            .enqueue(vec![row("k", "t")], vec![], vec![])
            .await
            .unwrap();
        assert_eq!(done.numbers, [3]);
        store.delete_session("k").await.unwrap();
        assert!(store.load_queue("k", 0, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_damaged_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.db");
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        let (store, loaded) = Store::open(&path).unwrap();
        let (moved, _) = loaded.quarantined.expect("quarantined");
        assert!(moved.exists());
        store.upsert_session("k", "d", "c", 1).await.unwrap();
    }
}
