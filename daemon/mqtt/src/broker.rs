//! The routing core: sessions, subscriptions, retained messages, wills, expiry.
//!
//! ```text
//!  connection (PUBLISH) ──plan──> targets ──outbox commit──> commit (sessions.db) ──ack──> deliver
//!                                                                                      │
//!  session queues (memory; persistent ones backed by sessions.db rows) <──────────────┘
//!        └──> the session's connection writes them out (window = client's Receive Maximum)
//! ```
//!
//! A publish goes in three steps, so that an acknowledgement always means durable:
//! 1. [`Broker::plan`] (no I/O): which sessions get it, at which QoS (the lower of the
//!    publish's and the subscription's, MQTT-3.8.4-6), with which subscription identifiers,
//!    and whether a persistent session's full queue refuses it (policy `reject`).
//! 2. After the outbox commit, [`Broker::commit`]: the copies for **persistent** sessions at
//!    QoS 1 or 2 become rows of `sessions.db`, and a retained message is stored, in one group
//!    commit. Only then is the publisher acknowledged.
//! 3. [`Broker::deliver`]: the copies go into the sessions' memory queues and their
//!    connections are woken.
//!
//! Persistent sessions (expiry > 0) hold in memory only what their connection is about to
//! send: every QoS 1/2 message for them is a row on disk, numbered in commit order, and a
//! session without a connection holds nothing in memory but counters. On reconnect (and
//! whenever its memory queue runs dry while rows wait on disk) the connection reads its rows
//! back in pages ([`Broker::refill`]); rows already sent come back with DUP, rows whose PUBREC
//! came come back as PUBREL. A persistent delivery's packet identifier is derived from its row
//! number, so it is the same after a restart (MQTT-4.4.0-1) without being written down.
//!
//! Sessions without expiry live in memory only and end with their connection.
//!
//! Locks: the session table, the subscription tree, the retained map and each session's state
//! are separate `std::sync` locks, never held across an `.await` and never nested except
//! table → session state.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, Identity, Record};
use crate::codec::props::PublishProps;
use crate::codec::{QoS, Will};
use crate::metrics::MqttMetrics;
use crate::settings::Settings;
use crate::store::{
    Clock, Loaded, NewRow, QueuedRow, Store, StoreError, StoredRetained, StoredSub,
};
use crate::topic::{self, SubTree};

/// Rows read back from disk at once.
const PAGE: usize = 256;
/// How long a new connection waits for the one it takes over to let go of the session.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);
/// Jobs for the housekeeping task (wills, deletions); when full, they are done at once in a
/// best-effort way (logged).
const JOBS: usize = 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An application message as routed: shared by every session that gets it.
#[derive(Debug)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 properties (no topic alias, no subscription identifiers: those are per hop).
    pub props: PublishProps,
    /// Broker-clock second its Message Expiry Interval ends.
    pub expires_at: Option<u64>,
    /// The publishing session (for No Local); `None` for the gateway's own messages.
    pub origin: Option<u64>,
}

/// The options of one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub subscription_id: Option<u32>,
}

/// One message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: Arc<Message>,
    /// Effective QoS: the publish's, lowered to the subscription's.
    pub qos: QoS,
    pub retain: bool,
    pub sub_ids: Vec<u32>,
    /// Its row in `sessions.db` (persistent sessions, QoS 1 and 2).
    pub no: Option<u64>,
    /// Sent before: a resend carries DUP.
    pub sent: bool,
    /// QoS 2 whose PUBREC came: PUBREL is what goes out.
    pub released: bool,
}

/// A QoS 1 or 2 delivery written to the client and not yet acknowledged.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub delivery: Delivery,
    /// PUBREC came (QoS 2): waiting for PUBCOMP.
    pub released: bool,
}

/// The connection currently attached to a session.
#[derive(Debug)]
pub struct Owner {
    pub conn: u64,
    /// Cancelled to make the connection close (takeover, shutdown).
    pub kick: CancellationToken,
    /// Cancelled once the connection has let go of the session.
    pub gone: CancellationToken,
}

/// A will waiting for its connection to end.
#[derive(Debug, Clone)]
pub struct PendingWill {
    pub identity: Identity,
    pub will: Will,
}

/// The mutable part of a session.
#[derive(Debug, Default)]
pub struct SessionState {
    /// Session Expiry Interval (seconds); 0: ends with its connection.
    pub expiry: u32,
    /// Bumped by every attach: timers of an older generation are void.
    pub generation: u64,
    pub subs: HashMap<String, SubOptions>,
    /// Deliveries waiting for the connection.
    pub queue: VecDeque<Delivery>,
    /// Persistent: the highest row number in memory (queued, in flight or done).
    pub mem_high: u64,
    /// Persistent: rows may wait on disk above `mem_high`.
    pub spilled: bool,
    /// Bumped whenever a delivery could not go to memory (see [`Broker::refill`]).
    pub spill_marks: u64,
    /// Persistent: rows on disk and their payload bytes.
    pub stored: u64,
    pub stored_bytes: u64,
    pub inflight: BTreeMap<u16, Outbound>,
    pub owner: Option<Owner>,
    /// The current connection's will.
    pub will: Option<PendingWill>,
    next_pkid: u16,
}

impl SessionState {
    pub fn persistent(&self) -> bool {
        self.expiry > 0
    }

    /// A free packet identifier for a memory-only delivery.
    fn alloc_pkid(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return Some(self.next_pkid);
            }
        }
        None
    }
}

/// The packet identifier of a persistent session's row: the same after every restart.
pub fn row_pkid(no: u64) -> u16 {
    u16::try_from((no.saturating_sub(1) % 65_535) + 1).unwrap_or(1)
}

/// One session (a client id of a device), with or without a connection.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    /// `<device id>|<client id>`, both escaped (see [`session_key`]).
    pub key: Arc<str>,
    pub device_id: Arc<str>,
    pub client_id: Arc<str>,
    pub state: Mutex<SessionState>,
    /// Woken when deliveries are queued.
    pub wake: Notify,
}

impl Session {
    pub fn lock(&self) -> MutexGuard<'_, SessionState> {
        lock(&self.state)
    }

    /// The prefix of this session's idempotency keys in the outbox.
    pub fn key_prefix(&self) -> String {
        format!("{}|", self.key)
    }
}

/// `<device id>|<client id>`, each with `%` and `|` percent-encoded so that no two (device,
/// client) pairs share a key.
pub fn session_key(device_id: &str, client_id: &str) -> String {
    let escape = |s: &str| s.replace('%', "%25").replace('|', "%7C");
    format!("{}|{}", escape(device_id), escape(client_id))
}

/// What a subscription match gives a session: its QoS, retain flag, subscription ids.
type Match = (QoS, bool, Vec<u32>);

/// A publish's targets, before its commit.
#[derive(Debug)]
pub struct Plan {
    pub msg: Arc<Message>,
    targets: Vec<Target>,
    /// The idempotency key of a persistent session's QoS 2 publish: committed with the rows it
    /// routes (see [`Broker::routed_keys`]).
    pub routed_key: Option<String>,
}

impl Plan {
    /// Whether any subscription matched.
    pub fn routed(&self) -> bool {
        !self.targets.is_empty()
    }

    /// Whether [`Broker::commit`] has anything to write for it (copies for persistent
    /// sessions, an eviction, a retained message); most publishes have not.
    pub fn needs_commit(&self) -> bool {
        self.msg.retain || self.targets.iter().any(|t| t.row || t.evict > 0)
    }
}

#[derive(Debug)]
struct Target {
    session: Arc<Session>,
    qos: QoS,
    retain: bool,
    sub_ids: Vec<u32>,
    /// A row in `sessions.db` (persistent session, QoS 1/2).
    row: bool,
    /// Oldest unsent rows to drop first (`drop_oldest`).
    evict: usize,
    /// Set by the commit.
    no: Option<u64>,
}

/// Why a publish cannot be routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanError {
    /// A persistent session's queue is full (`reject`), or the byte budget of all queues is.
    QueueFull,
    /// The retained-message cap is reached and this would be a new one.
    RetainedFull,
}

/// What [`Broker::attach`] gives a new connection.
#[derive(Debug)]
pub struct Attached {
    pub session: Arc<Session>,
    /// The session existed (MQTT's session present).
    pub present: bool,
    pub conn: u64,
    pub kick: CancellationToken,
    pub gone: CancellationToken,
}

/// Why [`Broker::attach`] refused.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// `mqtt.sessions.max_persistent` sessions exist already.
    #[error("too many persistent sessions")]
    TooManyPersistent,
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// What a connection asks for at CONNECT.
#[derive(Debug)]
pub struct AttachRequest {
    pub identity: Identity,
    pub client_id: String,
    pub clean_start: bool,
    /// The granted Session Expiry Interval (seconds).
    pub expiry: u32,
    pub will: Option<Will>,
}

/// What a connection's end means for its session.
#[derive(Debug, Clone, Copy)]
pub struct Detach {
    /// Publish the will (false after a normal DISCONNECT).
    pub will: bool,
    /// The Session Expiry Interval from now on (MQTT 5 DISCONNECT may change it).
    pub expiry: u32,
}

#[derive(Debug)]
enum Job {
    /// Publish a will (its session's generation checked when `guard` is set).
    Will {
        will: Box<PendingWill>,
        origin: u64,
        guard: Option<(u64, u64)>,
    },
    /// A session ended: forget its rows and its outbox keys.
    Forget { key: Arc<str>, prefix: String },
}

#[derive(Debug)]
enum Timer {
    Will {
        will: Box<PendingWill>,
        session: u64,
        generation: u64,
    },
    Expire {
        session: u64,
        generation: u64,
    },
}

#[derive(Debug, Default)]
struct Sessions {
    by_key: HashMap<Arc<str>, Arc<Session>>,
    by_id: HashMap<u64, Arc<Session>>,
    next_id: u64,
    persistent: usize,
}

/// The broker. Shared by every connection (`Arc`).
pub struct Broker {
    pub settings: Settings,
    pub backend: Arc<dyn Backend>,
    /// Per-device rate limits (`[mqtt.limits]`; none while both rates are 0).
    pub limiters: crate::limits::Limiters,
    store: Option<Store>,
    clock: Clock,
    pub metrics: MqttMetrics,
    sessions: Mutex<Sessions>,
    subs: RwLock<SubTree<SubOptions>>,
    retained: RwLock<HashMap<Arc<str>, Arc<Message>>>,
    /// Payload bytes of every persistent session's rows.
    queued_bytes: AtomicU64,
    next_conn: AtomicU64,
    timers: Mutex<BTreeMap<(u64, u64), Timer>>,
    timer_seq: AtomicU64,
    timers_changed: Notify,
    jobs: mpsc::Sender<Job>,
    jobs_rx: Mutex<Option<mpsc::Receiver<Job>>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

impl Broker {
    /// A broker over `store` (and what it loaded), or memory only without one.
    pub fn new(
        settings: Settings,
        backend: Arc<dyn Backend>,
        store: Option<(Store, Loaded)>,
        metrics: MqttMetrics,
    ) -> Arc<Broker> {
        let (store, loaded) = match store {
            Some((s, l)) => (Some(s), l),
            None => (None, Loaded::default()),
        };
        let (jobs, jobs_rx) = mpsc::channel(JOBS);
        let broker = Arc::new(Broker {
            limiters: crate::limits::Limiters::new(&settings.limits),
            settings,
            backend,
            store,
            clock: Clock::new(loaded.clock),
            metrics,
            sessions: Mutex::default(),
            subs: RwLock::default(),
            retained: RwLock::default(),
            queued_bytes: AtomicU64::new(0),
            next_conn: AtomicU64::new(1),
            timers: Mutex::default(),
            timer_seq: AtomicU64::new(0),
            timers_changed: Notify::new(),
            jobs,
            jobs_rx: Mutex::new(Some(jobs_rx)),
        });
        broker.restore(loaded);
        broker
    }

    /// Resolves when the session store's writer has stopped (never without a store).
    pub async fn store_stopped(&self) {
        match &self.store {
            Some(store) => store.stopped().await,
            None => std::future::pending().await,
        }
    }

    /// Broker-clock seconds now.
    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    fn restore(&self, loaded: Loaded) {
        let now = self.clock.now();
        let mut table = lock(&self.sessions);
        let mut tree = self.subs.write().unwrap_or_else(PoisonError::into_inner);
        for stored in loaded.sessions {
            table.next_id += 1;
            let id = table.next_id;
            let mut state = SessionState {
                expiry: stored.expiry.max(1),
                spilled: stored.queued > 0,
                stored: stored.queued,
                stored_bytes: stored.queued_bytes,
                ..SessionState::default()
            };
            for sub in stored.subs {
                let opts = SubOptions {
                    qos: sub.qos,
                    no_local: sub.no_local,
                    retain_as_published: sub.retain_as_published,
                    subscription_id: sub.subscription_id,
                };
                tree.insert(&sub.filter, id, opts.clone());
                state.subs.insert(sub.filter, opts);
            }
            self.queued_bytes
                .fetch_add(stored.queued_bytes, Ordering::Relaxed);
            self.metrics
                .queued
                .inc_by(i64::try_from(stored.queued).unwrap_or(i64::MAX));
            let session = Arc::new(Session {
                id,
                key: Arc::from(stored.key),
                device_id: Arc::from(stored.device_id),
                client_id: Arc::from(stored.client_id),
                state: Mutex::new(state),
                wake: Notify::new(),
            });
            let due = stored
                .disconnected_at
                .saturating_add(u64::from(stored.expiry));
            self.schedule(
                due.max(now),
                Timer::Expire {
                    session: id,
                    generation: 0,
                },
            );
            table
                .by_key
                .insert(Arc::clone(&session.key), Arc::clone(&session));
            table.by_id.insert(id, session);
            table.persistent += 1;
        }
        self.metrics.sessions.set(table.by_id.len() as i64);
        self.metrics
            .persistent_sessions
            .set(table.persistent as i64);
        drop(tree);
        drop(table);
        let mut retained = self
            .retained
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for r in loaded.retained {
            if r.expires_at.is_some_and(|at| at <= now) {
                continue;
            }
            let topic: Arc<str> = Arc::from(r.topic);
            retained.insert(
                Arc::clone(&topic),
                Arc::new(Message {
                    topic,
                    payload: r.payload,
                    qos: r.qos,
                    retain: true,
                    props: r.props,
                    expires_at: r.expires_at,
                    origin: None,
                }),
            );
        }
        self.metrics.retained.set(retained.len() as i64);
    }

    fn schedule(&self, due: u64, timer: Timer) {
        let seq = self.timer_seq.fetch_add(1, Ordering::Relaxed);
        lock(&self.timers).insert((due, seq), timer);
        self.timers_changed.notify_one();
    }

    fn job(&self, job: Job) {
        if let Err(e) = self.jobs.try_send(job) {
            tracing::warn!(error = %e, "MQTT housekeeping queue full; a will or session clean-up was skipped");
        }
    }

    // ---- sessions -----------------------------------------------------------------------------

    /// Attaches a new connection to its session: takes it over from an older connection
    /// (which is told to close), discards it on Clean Start, creates it when missing.
    pub async fn attach(&self, req: AttachRequest) -> Result<Attached, AttachError> {
        let key: Arc<str> = Arc::from(session_key(&req.identity.device_id, &req.client_id));
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let kick = CancellationToken::new();
        let gone = CancellationToken::new();
        let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
        let claimed = loop {
            let outcome = {
                let mut table = lock(&self.sessions);
                let existing = table.by_key.get(&key).cloned();
                let busy = existing.as_ref().and_then(|s| {
                    s.lock().owner.as_ref().map(|o| {
                        o.kick.cancel();
                        o.gone.clone()
                    })
                });
                match busy {
                    Some(g) if tokio::time::Instant::now() < deadline => Err(g),
                    _ => Ok(self.claim(&mut table, &key, existing, &req, conn, &kick, &gone)),
                }
            };
            match outcome {
                Err(g) => {
                    let _ = tokio::time::timeout_at(deadline, g.cancelled()).await;
                }
                Ok(claimed) => break claimed?,
            }
        };
        if let Some(old) = claimed.discarded {
            self.forget(old).await;
        }
        let session = claimed.session;
        let expiry = session.lock().expiry;
        if expiry > 0
            && let Some(store) = &self.store
            && let Err(e) = store
                .upsert_session(&session.key, &session.device_id, &session.client_id, expiry)
                .await
        {
            self.detach(
                &session,
                conn,
                Detach {
                    will: false,
                    expiry,
                },
            );
            return Err(e.into());
        }
        Ok(Attached {
            session,
            present: claimed.present,
            conn,
            kick,
            gone,
        })
    }

    /// The synchronous part of [`Broker::attach`], under the session table's lock.
    #[allow(clippy::too_many_arguments)]
    fn claim(
        &self,
        table: &mut Sessions,
        key: &Arc<str>,
        existing: Option<Arc<Session>>,
        req: &AttachRequest,
        conn: u64,
        kick: &CancellationToken,
        gone: &CancellationToken,
    ) -> Result<Claimed, AttachError> {
        let owner = || Owner {
            conn,
            kick: kick.clone(),
            gone: gone.clone(),
        };
        let will = req.will.clone().map(|will| PendingWill {
            identity: req.identity.clone(),
            will,
        });
        if let Some(s) = existing.as_ref().filter(|_| !req.clean_start) {
            let mut st = s.lock();
            if st.persistent() {
                // Resume: a forced takeover leaves the old connection without a session.
                st.owner = Some(owner());
                st.generation += 1;
                st.expiry = req.expiry.max(1);
                st.will = will;
                st.queue.clear();
                st.inflight.clear();
                st.mem_high = 0;
                st.spilled = st.stored > 0;
                drop(st);
                // A resumed session's pending will is void (MQTT-3.1.3-9): the generation
                // changed, so its timer does nothing.
                return Ok(Claimed {
                    session: Arc::clone(s),
                    present: true,
                    discarded: None,
                });
            }
        }
        let discarded = existing.map(|old| self.remove(table, &old));
        let persistent = req.expiry > 0;
        if persistent && table.persistent >= self.settings.sessions.max_persistent {
            return Err(AttachError::TooManyPersistent);
        }
        table.next_id += 1;
        let id = table.next_id;
        let session = Arc::new(Session {
            id,
            key: Arc::clone(key),
            device_id: Arc::clone(&req.identity.device_id),
            client_id: Arc::from(req.client_id.as_str()),
            state: Mutex::new(SessionState {
                expiry: req.expiry,
                generation: 1,
                owner: Some(owner()),
                will,
                ..SessionState::default()
            }),
            wake: Notify::new(),
        });
        table.by_key.insert(Arc::clone(key), Arc::clone(&session));
        table.by_id.insert(id, Arc::clone(&session));
        table.persistent += usize::from(persistent);
        self.metrics.sessions.set(table.by_id.len() as i64);
        self.metrics
            .persistent_sessions
            .set(table.persistent as i64);
        Ok(Claimed {
            session,
            present: false,
            discarded,
        })
    }

    /// Takes a session out of the table and the subscription tree (its owner, if any, was
    /// told to close). Returns what must still be done for it.
    fn remove(&self, table: &mut Sessions, session: &Arc<Session>) -> Discarded {
        table.by_key.remove(&session.key);
        table.by_id.remove(&session.id);
        let mut st = session.lock();
        let had_rows = st.persistent();
        table.persistent -= usize::from(had_rows && table.persistent > 0);
        self.metrics.sessions.set(table.by_id.len() as i64);
        self.metrics
            .persistent_sessions
            .set(table.persistent as i64);
        let filters: Vec<String> = st.subs.drain().map(|(f, _)| f).collect();
        self.queued_bytes.fetch_sub(
            st.stored_bytes
                .min(self.queued_bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        self.metrics
            .queued
            .dec_by(i64::try_from(st.stored).unwrap_or(0));
        st.stored = 0;
        st.stored_bytes = 0;
        st.generation += 1;
        let will = st.will.take();
        drop(st);
        let mut tree = self.subs.write().unwrap_or_else(PoisonError::into_inner);
        for f in &filters {
            tree.remove(f, session.id);
        }
        drop(tree);
        // A disconnected session's delayed will is due now: the session ended.
        let mut wills: Vec<PendingWill> = will.into_iter().collect();
        lock(&self.timers).retain(|_, t| match t {
            Timer::Will {
                will, session: id, ..
            } if *id == session.id => {
                wills.push((**will).clone());
                false
            }
            _ => true,
        });
        Discarded {
            key: Arc::clone(&session.key),
            prefix: session.key_prefix(),
            had_rows,
            wills,
            origin: session.id,
        }
    }

    /// Finishes a removal: publishes the wills due and forgets the stored state.
    async fn forget(&self, old: Discarded) {
        for will in old.wills {
            self.publish_will(will, old.origin).await;
        }
        if old.had_rows {
            if let Some(store) = &self.store
                && let Err(e) = store.delete_session(&old.key).await
            {
                tracing::warn!(session = %old.key, error = %e, "Could not delete a session from sessions.db");
            }
            if let Err(e) = self.backend.release_prefix(old.prefix).await {
                tracing::warn!(session = %old.key, error = %e, "Could not release a session's QoS 2 keys");
            }
        }
    }

    /// A connection ends: its session keeps its state (expiry > 0, until the expiry) or ends.
    /// The will is published at once, or after its delay when the session outlives the
    /// connection (unless the session is taken up again first). Never waits: what needs I/O
    /// goes to the housekeeping task.
    pub fn detach(&self, session: &Arc<Session>, conn: u64, how: Detach) {
        let mut table = lock(&self.sessions);
        let mut st = session.lock();
        if st.owner.as_ref().map(|o| o.conn) != Some(conn) {
            return; // taken over meanwhile
        }
        let Some(owner) = st.owner.take() else {
            return;
        };
        let will = st.will.take().filter(|_| how.will);
        if st.persistent() {
            st.expiry = how.expiry;
        }
        if st.expiry == 0 {
            drop(st);
            let old = self.remove(&mut table, session);
            drop(table);
            for w in old.wills.iter().cloned().chain(will) {
                self.job(Job::Will {
                    will: Box::new(w),
                    origin: session.id,
                    guard: None,
                });
            }
            if old.had_rows {
                self.job(Job::Forget {
                    key: old.key,
                    prefix: old.prefix,
                });
            }
        } else {
            // Every QoS 1/2 delivery is a row: memory is given up, the next connection reads
            // the rows back.
            st.queue.clear();
            st.inflight.clear();
            st.mem_high = 0;
            st.spilled = st.stored > 0;
            let now = self.clock.now();
            let (expiry, generation) = (st.expiry, st.generation);
            drop(st);
            drop(table);
            if let Some(store) = &self.store {
                store.disconnected(&session.key, expiry, now);
            }
            if let Some(w) = will {
                let delay = w.will.props.delay.unwrap_or(0).min(expiry);
                if delay == 0 {
                    self.job(Job::Will {
                        will: Box::new(w),
                        origin: session.id,
                        guard: None,
                    });
                } else {
                    self.schedule(
                        now + u64::from(delay),
                        Timer::Will {
                            will: Box::new(w),
                            session: session.id,
                            generation,
                        },
                    );
                }
            }
            self.schedule(
                now + u64::from(expiry),
                Timer::Expire {
                    session: session.id,
                    generation,
                },
            );
        }
        owner.gone.cancel();
    }

    /// Closes every connection (shutdown): each detaches as after a network failure, except
    /// that wills are not published (the gateway, not the client, went away).
    pub fn kick_all(&self) {
        let table = lock(&self.sessions);
        for s in table.by_id.values() {
            if let Some(o) = &s.lock().owner {
                o.kick.cancel();
            }
        }
    }

    /// Sessions in the table (for tests and status).
    pub fn session_count(&self) -> usize {
        lock(&self.sessions).by_id.len()
    }

    /// A session by key (tests).
    pub fn session(&self, device_id: &str, client_id: &str) -> Option<Arc<Session>> {
        lock(&self.sessions)
            .by_key
            .get(session_key(device_id, client_id).as_str())
            .cloned()
    }

    // ---- subscriptions ------------------------------------------------------------------------

    /// Adds or replaces a subscription; returns whether it existed. A persistent session's
    /// subscription is committed before this returns.
    pub async fn subscribe(
        &self,
        session: &Arc<Session>,
        filter: &str,
        opts: SubOptions,
    ) -> Result<bool, StoreError> {
        let (existed, persistent) = {
            let mut st = session.lock();
            let existed = st.subs.insert(filter.to_owned(), opts.clone()).is_some();
            (existed, st.persistent())
        };
        self.subs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(filter, session.id, opts.clone());
        if persistent && let Some(store) = &self.store {
            store
                .subscribe(
                    &session.key,
                    StoredSub {
                        filter: filter.to_owned(),
                        qos: opts.qos,
                        no_local: opts.no_local,
                        retain_as_published: opts.retain_as_published,
                        subscription_id: opts.subscription_id,
                    },
                )
                .await?;
        }
        Ok(existed)
    }

    /// Removes a subscription; returns whether it existed.
    pub async fn unsubscribe(
        &self,
        session: &Arc<Session>,
        filter: &str,
    ) -> Result<bool, StoreError> {
        let (existed, persistent) = {
            let mut st = session.lock();
            (st.subs.remove(filter).is_some(), st.persistent())
        };
        if existed {
            self.subs
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(filter, session.id);
            if persistent && let Some(store) = &self.store {
                store.unsubscribe(&session.key, filter).await?;
            }
        }
        Ok(existed)
    }

    /// Plans the retained messages a new subscription gets (retain flag set, MQTT-3.3.1-9).
    pub fn retained_for(
        &self,
        session: &Arc<Session>,
        filter: &str,
        opts: &SubOptions,
    ) -> Vec<Plan> {
        let now = self.clock.now();
        let matching: Vec<Arc<Message>> = self
            .retained
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|m| topic::matches(filter, &m.topic))
            .filter(|m| m.expires_at.is_none_or(|at| at > now))
            .cloned()
            .collect();
        let persistent = session.lock().persistent();
        matching
            .into_iter()
            .map(|msg| {
                let qos = msg.qos.min(opts.qos);
                let row = persistent && qos != QoS::AtMostOnce && self.store.is_some();
                Plan {
                    routed_key: None,
                    targets: vec![Target {
                        session: Arc::clone(session),
                        qos,
                        retain: true,
                        sub_ids: opts.subscription_id.into_iter().collect(),
                        row,
                        evict: 0,
                        no: None,
                    }],
                    msg,
                }
            })
            .collect()
    }

    // ---- publishing ---------------------------------------------------------------------------

    /// Step 1 of a publish (no I/O): its targets, and whether a full queue refuses it.
    pub fn plan(&self, msg: Arc<Message>) -> Result<Plan, PlanError> {
        if msg.retain && !msg.payload.is_empty() {
            let retained = self.retained.read().unwrap_or_else(PoisonError::into_inner);
            if !retained.contains_key(&msg.topic) && retained.len() >= self.settings.max_retained {
                return Err(PlanError::RetainedFull);
            }
        }
        let mut found: BTreeMap<u64, Match> = BTreeMap::new();
        self.subs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .for_each_match(&msg.topic, |id, o| {
                if o.no_local && msg.origin == Some(id) {
                    return;
                }
                let e = found
                    .entry(id)
                    .or_insert((QoS::AtMostOnce, false, Vec::new()));
                e.0 = e.0.max(msg.qos.min(o.qos));
                e.1 |= o.retain_as_published && msg.retain;
                if let Some(sid) = o.subscription_id {
                    e.2.push(sid);
                }
            });
        let sessions: Vec<(Arc<Session>, Match)> = {
            let table = lock(&self.sessions);
            found
                .into_iter()
                .filter_map(|(id, t)| table.by_id.get(&id).map(|s| (Arc::clone(s), t)))
                .collect()
        };
        let len = msg.payload.len() as u64;
        let mut budget = self.queued_bytes.load(Ordering::Relaxed);
        let mut targets = Vec::with_capacity(sessions.len());
        for (session, (qos, retain, sub_ids)) in sessions {
            let (row, evict) = {
                let st = session.lock();
                let row = st.persistent() && qos != QoS::AtMostOnce && self.store.is_some();
                let mut evict = 0;
                if row {
                    budget += len;
                    if budget > self.settings.sessions.max_queued_bytes.bytes() {
                        return Err(PlanError::QueueFull);
                    }
                    if st.stored as usize >= self.settings.sessions.max_queued_messages {
                        if !self.settings.drop_oldest() {
                            return Err(PlanError::QueueFull);
                        }
                        evict = 1;
                    }
                }
                (row, evict)
            };
            targets.push(Target {
                session,
                qos,
                retain,
                sub_ids,
                row,
                evict,
                no: None,
            });
        }
        Ok(Plan {
            msg,
            targets,
            routed_key: None,
        })
    }

    /// Step 2 of a publish: persistent sessions' copies (and a retained message) committed to
    /// `sessions.db`. Several plans share one commit.
    pub async fn commit(&self, mut plans: Vec<Plan>) -> Result<Vec<Plan>, StoreError> {
        if let Some(store) = &self.store {
            let mut rows = Vec::new();
            let mut evict = Vec::new();
            let mut routed = Vec::new();
            for plan in &plans {
                if let Some(key) = &plan.routed_key
                    && plan.targets.iter().any(|t| t.row)
                {
                    routed.push(key.clone());
                }
                for t in &plan.targets {
                    if t.row {
                        let mut props = plan.msg.props.clone();
                        props.subscription_ids.clone_from(&t.sub_ids);
                        rows.push(NewRow {
                            session: t.session.key.to_string(),
                            qos: t.qos,
                            retain: t.retain,
                            topic: plan.msg.topic.to_string(),
                            payload: plan.msg.payload.clone(),
                            props,
                            expires_at: plan.msg.expires_at,
                        });
                    }
                    if t.evict > 0 {
                        evict.push((t.session.key.to_string(), t.evict));
                    }
                }
            }
            if !rows.is_empty() || !evict.is_empty() {
                let done = store.enqueue(rows, evict, routed).await?;
                let mut numbers = done.numbers.into_iter();
                for plan in &mut plans {
                    let len = plan.msg.payload.len() as u64;
                    for t in &mut plan.targets {
                        if t.row {
                            t.no = numbers.next();
                            let mut st = t.session.lock();
                            st.stored += 1;
                            st.stored_bytes += len;
                            self.queued_bytes.fetch_add(len, Ordering::Relaxed);
                            self.metrics.queued.inc();
                        }
                    }
                }
                for (key, gone) in done.evicted {
                    self.evicted(&plans, &key, &gone);
                }
            }
            for plan in &plans {
                if plan.msg.retain {
                    let stored = (!plan.msg.payload.is_empty()).then(|| StoredRetained {
                        topic: plan.msg.topic.to_string(),
                        qos: plan.msg.qos,
                        payload: plan.msg.payload.clone(),
                        props: plan.msg.props.clone(),
                        expires_at: plan.msg.expires_at,
                    });
                    store.retain(&plan.msg.topic, stored).await?;
                }
            }
        }
        for plan in &plans {
            if plan.msg.retain {
                let mut retained = self
                    .retained
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                if plan.msg.payload.is_empty() {
                    retained.remove(&plan.msg.topic);
                } else {
                    retained.insert(Arc::clone(&plan.msg.topic), Arc::clone(&plan.msg));
                }
                self.metrics.retained.set(retained.len() as i64);
            }
        }
        Ok(plans)
    }

    /// Rows a full queue dropped: out of memory and the counters.
    fn evicted(&self, plans: &[Plan], key: &str, gone: &[(u64, u64)]) {
        let Some(session) = plans
            .iter()
            .flat_map(|p| &p.targets)
            .find(|t| &*t.session.key == key)
            .map(|t| Arc::clone(&t.session))
        else {
            return;
        };
        let mut st = session.lock();
        for (no, bytes) in gone {
            st.queue.retain(|d| d.no != Some(*no));
            st.stored = st.stored.saturating_sub(1);
            st.stored_bytes = st.stored_bytes.saturating_sub(*bytes);
            self.queued_bytes.fetch_sub(
                (*bytes).min(self.queued_bytes.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
            self.metrics.queued.dec();
            self.metrics.drop_message("queue_full");
        }
        if !gone.is_empty() {
            tracing::debug!(session = %key, dropped = gone.len(), "Session queue full: dropped its oldest messages");
        }
    }

    /// Step 3 of a publish: the copies go to the sessions' memory queues (a persistent
    /// session without a connection has its rows; see the module docs for when a row goes to
    /// memory and when it waits on disk).
    pub fn deliver(&self, plans: Vec<Plan>) {
        for plan in plans {
            for t in plan.targets {
                let d = Delivery {
                    msg: Arc::clone(&plan.msg),
                    qos: t.qos,
                    retain: t.retain,
                    sub_ids: t.sub_ids,
                    no: t.no,
                    sent: false,
                    released: false,
                };
                let mut st = t.session.lock();
                if st.owner.is_none() {
                    if d.no.is_some() {
                        st.spilled = true;
                        st.spill_marks += 1;
                    }
                    continue;
                }
                match d.no {
                    Some(no) if no <= st.mem_high => continue,
                    Some(no) if st.spilled || no != st.mem_high + 1 => {
                        st.spilled = true;
                        st.spill_marks += 1;
                    }
                    Some(no) => {
                        st.mem_high = no;
                        st.queue.push_back(d);
                    }
                    None => {
                        if st.queue.len() >= self.settings.sessions.max_queued_messages {
                            // Memory-only deliveries are the ones to drop: rows are on disk.
                            let oldest = self
                                .settings
                                .drop_oldest()
                                .then(|| st.queue.iter().position(|q| q.no.is_none()))
                                .flatten();
                            self.metrics.drop_message("queue_full");
                            match oldest {
                                Some(i) => {
                                    st.queue.remove(i);
                                }
                                None => continue,
                            }
                        }
                        st.queue.push_back(d);
                    }
                }
                drop(st);
                t.session.wake.notify_one();
            }
        }
    }

    /// A message of the gateway itself (the local bus): planned, committed and delivered.
    /// Returns whether a subscription matched; a full queue drops it (counted).
    pub async fn publish_local(&self, msg: Message) -> Result<bool, StoreError> {
        let plan = match self.plan(Arc::new(msg)) {
            Ok(p) => p,
            Err(_) => {
                self.metrics.drop_message("queue_full");
                return Ok(false);
            }
        };
        let routed = plan.routed();
        let plans = self.commit(vec![plan]).await?;
        self.deliver(plans);
        Ok(routed)
    }

    async fn publish_will(&self, w: PendingWill, origin: u64) {
        let will = w.will;
        let now = self.clock.now();
        let msg = Message {
            topic: Arc::from(will.topic.as_str()),
            payload: will.payload.clone(),
            qos: will.qos,
            retain: will.retain,
            expires_at: will
                .props
                .message
                .message_expiry
                .map(|s| now + u64::from(s)),
            props: will.props.message.clone(),
            origin: Some(origin),
        };
        // Like every reading, the will is kept in the outbox (best effort: no one waits).
        let record = Record {
            topic: Arc::clone(&msg.topic),
            payload: msg.payload.clone(),
            qos: msg.qos,
            retain: msg.retain,
            content_type: msg.props.content_type.clone(),
            user: msg.props.user.clone(),
            will: true,
        };
        if let Err(e) = self.backend.store(&w.identity, record, None).await {
            tracing::warn!(device = %w.identity.device_id, error = %e, "Will not stored in the outbox");
        }
        self.metrics.wills.inc();
        tracing::debug!(device = %w.identity.device_id, topic = %msg.topic, "Publishing a will");
        if let Err(e) = self.publish_local(msg).await {
            tracing::warn!(device = %w.identity.device_id, error = %e, "Will not routed");
        }
    }

    // ---- a connection's outbound side ---------------------------------------------------------

    /// The next packet for `session`'s connection, keeping at most `window` QoS 1/2 deliveries
    /// unacknowledged; `fits` says whether a delivery fits the client's Maximum Packet Size.
    /// Expired and oversized deliveries are dropped (and counted) on the way.
    pub fn next_out(
        &self,
        session: &Session,
        window: usize,
        fits: impl Fn(&Delivery) -> bool,
    ) -> Option<Out> {
        let now = self.clock.now();
        let mut st = session.lock();
        loop {
            if st.inflight.len() >= window {
                return None;
            }
            let d = st.queue.pop_front()?;
            let expired = d.msg.expires_at.is_some_and(|at| at <= now);
            if expired || !fits(&d) {
                self.metrics
                    .drop_message(if expired { "expired" } else { "too_large" });
                if let Some(no) = d.no {
                    self.forget_row(session, &mut st, no, d.msg.payload.len() as u64);
                }
                continue;
            }
            if d.qos == QoS::AtMostOnce {
                return Some(Out::Publish {
                    pkid: 0,
                    delivery: d,
                });
            }
            let pkid = match d.no {
                Some(no) => row_pkid(no),
                None => match st.alloc_pkid() {
                    Some(p) => p,
                    None => {
                        st.queue.push_front(d);
                        return None;
                    }
                },
            };
            if st.inflight.contains_key(&pkid) {
                // The row 65,535 numbers earlier is still unacknowledged: wait for it.
                st.queue.push_front(d);
                return None;
            }
            if d.released {
                st.inflight.insert(
                    pkid,
                    Outbound {
                        delivery: d,
                        released: true,
                    },
                );
                return Some(Out::PubRel(pkid));
            }
            if let (Some(no), false, Some(store)) = (d.no, d.sent, &self.store) {
                store.sent(&session.key, no);
            }
            st.inflight.insert(
                pkid,
                Outbound {
                    delivery: d.clone(),
                    released: false,
                },
            );
            return Some(Out::Publish { pkid, delivery: d });
        }
    }

    fn forget_row(&self, session: &Session, st: &mut SessionState, no: u64, bytes: u64) {
        if let Some(store) = &self.store {
            store.acked(&session.key, no);
        }
        st.stored = st.stored.saturating_sub(1);
        st.stored_bytes = st.stored_bytes.saturating_sub(bytes);
        self.queued_bytes.fetch_sub(
            bytes.min(self.queued_bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        self.metrics.queued.dec();
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) of a delivery: it is done. False for an unknown id.
    pub fn acknowledged(&self, session: &Session, pkid: u16) -> bool {
        let mut st = session.lock();
        let Some(o) = st.inflight.remove(&pkid) else {
            return false;
        };
        if let Some(no) = o.delivery.no {
            self.forget_row(session, &mut st, no, o.delivery.msg.payload.len() as u64);
        }
        drop(st);
        session.wake.notify_one();
        true
    }

    /// PUBREC of a QoS 2 delivery. `Release(Some(no))`: commit [`Store::released`] before
    /// sending PUBREL; `Release(None)`: send PUBREL now; `Done`: an error code ended it.
    pub fn pubrec(&self, session: &Session, pkid: u16, code: u8) -> PubRec {
        let mut st = session.lock();
        let Some(o) = st.inflight.get_mut(&pkid) else {
            return PubRec::Unknown;
        };
        if code >= 0x80 {
            let o = st.inflight.remove(&pkid);
            if let Some(o) = o
                && let Some(no) = o.delivery.no
            {
                self.forget_row(session, &mut st, no, o.delivery.msg.payload.len() as u64);
            }
            drop(st);
            session.wake.notify_one();
            return PubRec::Done;
        }
        o.released = true;
        PubRec::Release(o.delivery.no)
    }

    /// The routed keys of a session (see [`Store::enqueue`]): its QoS 2 publishes whose
    /// copies for persistent sessions were committed. Empty without a store.
    pub async fn routed_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        match &self.store {
            Some(store) => store.routed_keys(prefix).await,
            None => Ok(Vec::new()),
        }
    }

    /// Forgets routed keys (their PUBREL came).
    pub async fn forget_routed(&self, keys: Vec<String>) -> Result<(), StoreError> {
        match &self.store {
            Some(store) => store.forget_routed(keys).await,
            None => Ok(()),
        }
    }

    /// Commits that a row got its PUBREC (see [`Store::released`]).
    pub async fn released(&self, session: &Session, no: u64) -> Result<(), StoreError> {
        match &self.store {
            Some(store) => store.released(&session.key, no).await,
            None => Ok(()),
        }
    }

    /// Reads `session`'s next rows from disk into memory, if it has spilled rows and the
    /// connection (`generation`) is still the current one.
    pub async fn refill(&self, session: &Session, generation: u64) -> Result<(), StoreError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let (after, marks) = {
            let st = session.lock();
            if !st.spilled || st.generation != generation {
                return Ok(());
            }
            (st.mem_high, st.spill_marks)
        };
        let rows = store.load_queue(&session.key, after, PAGE).await?;
        let full = rows.len() == PAGE;
        let now = self.clock.now();
        let mut st = session.lock();
        if st.generation != generation {
            return Ok(());
        }
        for row in rows {
            if row.no <= st.mem_high {
                continue;
            }
            st.mem_high = row.no;
            if row.expires_at.is_some_and(|at| at <= now) && !row.released {
                self.metrics.drop_message("expired");
                self.forget_row(session, &mut st, row.no, row.payload.len() as u64);
                continue;
            }
            let d = delivery_of(row);
            st.queue.push_back(d);
        }
        if !full && st.spill_marks == marks {
            st.spilled = false;
        }
        drop(st);
        session.wake.notify_one();
        Ok(())
    }

    // ---- housekeeping -------------------------------------------------------------------------

    /// Runs wills, session expiry and clean-ups until `stop`. Spawned once by the server.
    pub async fn housekeeping(self: Arc<Self>, stop: CancellationToken) {
        let Some(mut jobs) = lock(&self.jobs_rx).take() else {
            return;
        };
        loop {
            let next = lock(&self.timers).keys().next().map(|(due, _)| *due);
            let sleep = match next {
                Some(due) => Duration::from_secs(due.saturating_sub(self.clock.now())),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                () = stop.cancelled() => return,
                Some(job) = jobs.recv() => self.run_job(job).await,
                () = self.timers_changed.notified() => {}
                () = tokio::time::sleep(sleep) => {
                    let now = self.clock.now();
                    let due: Vec<Timer> = {
                        let mut timers = lock(&self.timers);
                        let later = timers.split_off(&(now + 1, 0));
                        std::mem::replace(&mut *timers, later).into_values().collect()
                    };
                    for timer in due {
                        self.fire(timer).await;
                    }
                }
            }
        }
    }

    async fn run_job(&self, job: Job) {
        match job {
            Job::Will {
                will,
                origin,
                guard,
            } => {
                if guard.is_none_or(|(id, generation)| self.dormant(id, generation)) {
                    self.publish_will(*will, origin).await;
                }
            }
            Job::Forget { key, prefix } => {
                self.forget(Discarded {
                    key,
                    prefix,
                    had_rows: true,
                    wills: Vec::new(),
                    origin: 0,
                })
                .await;
            }
        }
    }

    /// Whether session `id` is still at `generation` without a connection.
    fn dormant(&self, id: u64, generation: u64) -> bool {
        lock(&self.sessions).by_id.get(&id).is_some_and(|s| {
            let st = s.lock();
            st.generation == generation && st.owner.is_none()
        })
    }

    async fn fire(&self, timer: Timer) {
        match timer {
            Timer::Will {
                will,
                session,
                generation,
            } => {
                if self.dormant(session, generation) {
                    self.publish_will(*will, session).await;
                }
            }
            Timer::Expire {
                session,
                generation,
            } => {
                let old = {
                    let mut table = lock(&self.sessions);
                    let Some(s) = table.by_id.get(&session).cloned() else {
                        return;
                    };
                    {
                        let st = s.lock();
                        // A restored session's timer has generation 0, which it still has
                        // until a connection attaches.
                        if st.generation != generation || st.owner.is_some() {
                            return;
                        }
                    }
                    self.remove(&mut table, &s)
                };
                self.metrics.sessions_expired.inc();
                tracing::debug!(session = %old.key, "Session expired");
                self.forget(old).await;
            }
        }
    }
}

/// A packet the connection is to write next.
#[derive(Debug)]
pub enum Out {
    /// `pkid` 0 for QoS 0.
    Publish { pkid: u16, delivery: Delivery },
    /// A QoS 2 delivery whose PUBREC came before a reconnect.
    PubRel(u16),
}

/// What a PUBREC means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubRec {
    Unknown,
    Done,
    Release(Option<u64>),
}

#[derive(Debug)]
struct Claimed {
    session: Arc<Session>,
    present: bool,
    discarded: Option<Discarded>,
}

#[derive(Debug)]
struct Discarded {
    key: Arc<str>,
    prefix: String,
    had_rows: bool,
    wills: Vec<PendingWill>,
    origin: u64,
}

fn delivery_of(row: QueuedRow) -> Delivery {
    let mut props = row.props;
    let sub_ids = std::mem::take(&mut props.subscription_ids);
    Delivery {
        msg: Arc::new(Message {
            topic: Arc::from(row.topic),
            payload: row.payload,
            qos: row.qos,
            retain: row.retain,
            props,
            expires_at: row.expires_at,
            origin: None,
        }),
        qos: row.qos,
        retain: row.retain,
        sub_ids,
        no: Some(row.no),
        sent: row.sent,
        released: row.released,
    }
}
