//! What the MQTT server needs from the rest of the gateway, as one narrow trait: who a client is
//! ([`Backend::authenticate`], [`Backend::check`]), where a publish is made durable
//! ([`Backend::store`], the outbox), and a few notifications. The daemon implements it on the
//! registry and the outbox; [`fake::FakeBackend`] implements it for tests, with commits that can
//! be held, released or failed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use bytestring::ByteString;

use crate::acl::Acl;
use crate::codec::QoS;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An authenticated client.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The device id its records carry; `anonymous/<client id>` for anonymous clients.
    pub device_id: Arc<str>,
    pub acl: Acl,
    /// A registered device (per-device metrics, monitoring, revocation checks); false for
    /// anonymous clients.
    pub registered: bool,
    /// The backend's token of the credentials checked at CONNECT (see [`Backend::check`]).
    pub grant: u64,
}

/// What a CONNECT presents.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// The client identifier (an assigned one when the client sent none).
    pub client_id: &'a str,
    /// Subject CN and SAN DNS names of a verified TLS client certificate.
    pub cert_names: &'a [String],
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthRefusal {
    /// Unknown device or wrong secret: 3.1.1 0x04, MQTT 5 0x86.
    BadCredentials,
    /// Disabled, MQTT not allowed, no credentials: 3.1.1 0x05, MQTT 5 0x87.
    NotAuthorized,
}

/// A publish as the outbox stores it.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub content_type: Option<ByteString>,
    /// MQTT 5 user properties, in order.
    pub user: Vec<(ByteString, ByteString)>,
    /// A will, published by the server because its client went away.
    pub will: bool,
}

/// Why the outbox did not take a publish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreRefusal {
    /// Full (`reject` policy): MQTT 5 0x97, 3.1.1 no ack.
    #[error("outbox full: {0}")]
    Full(String),
    /// Never storable (too large): close the connection.
    #[error("record refused: {0}")]
    Never(String),
    /// Storage failed or the gateway is shutting down: MQTT 5 0x80, 3.1.1 no ack.
    #[error("outbox unavailable: {0}")]
    Unavailable(String),
    /// An edge rule's schema refused the payload: MQTT 5 0x99 (payload format invalid), 3.1.1
    /// no ack (it has no negative ack; `on_invalid = "dead_letter"` suits 3.1.1 devices).
    #[error("{0}")]
    Invalid(String),
}

/// A traffic event for the device's monitoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// A publish was stored (payload bytes).
    Accepted { bytes: u64 },
    /// A packet of this client was malformed.
    Malformed,
    /// A CONNECT or packet was refused.
    Refused,
}

pub trait Backend: Send + Sync + 'static {
    /// Checks a CONNECT's credentials (password, or a certificate naming a device, or none when
    /// anonymous clients are allowed). An unknown device and a wrong secret must take the same
    /// time, so that timing does not tell which device ids exist.
    fn authenticate<'a>(
        &'a self,
        credentials: Credentials<'a>,
    ) -> BoxFuture<'a, Result<Identity, AuthRefusal>>;

    /// Whether `identity` may still act: the device is enabled, may use MQTT, and its
    /// credentials did not change since CONNECT. Cheap (memory only): called for every publish
    /// and subscribe, so that a device disabled or rotated through the API is refused from its
    /// very next packet. `Err` says why (the connection is then closed).
    fn check(&self, identity: &Identity) -> Result<(), String>;

    /// Appends a publish to the outbox; resolves after the commit, with its sequence number.
    /// `key` (a persistent session's QoS 2 packet) makes it idempotent: a record stored under
    /// the same key is not stored again, its sequence number is returned (exactly once into the
    /// outbox across reconnects and restarts). The key is held until [`Backend::release`].
    fn store(
        &self,
        identity: &Identity,
        record: Record,
        key: Option<String>,
    ) -> BoxFuture<'static, Result<u64, StoreRefusal>>;

    /// Forgets idempotency keys (their PUBREL came); resolves after the commit.
    fn release(&self, keys: Vec<String>) -> BoxFuture<'static, Result<(), String>>;

    /// Forgets every idempotency key starting with `prefix` (a session discarded or expired).
    fn release_prefix(&self, prefix: String) -> BoxFuture<'static, Result<(), String>>;

    /// The idempotency keys starting with `prefix` (a resumed session's QoS 2 packets awaiting
    /// PUBREL).
    fn held_keys(&self, prefix: String) -> BoxFuture<'static, Result<Vec<String>, String>>;

    /// A traffic event of a registered device.
    fn observe(&self, device_id: &str, event: Observation);

    /// A SUBSCRIBE of this client was granted (queued commands may go out now).
    fn subscribed(&self, identity: &Identity);

    /// A PUBLISH on `topic` was written to this client (command delivery).
    fn delivered(&self, identity: &Identity, topic: &str);
}

/// A backend for tests: every device authenticates with the password `secret` and an ACL
/// allowing everything; the outbox is a list whose commits can be held, failed or released.
pub mod fake {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::sync::watch;

    use super::*;

    /// What held commits do when released.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Verdict {
        Commit,
        Refuse(StoreRefusal),
    }

    #[derive(Debug, Default)]
    pub struct State {
        /// Stored records in the order the store calls were first polled (like the outbox's
        /// queue): (that order, sequence, device, record).
        pub records: Vec<(u64, u64, String, Record)>,
        pub keys: BTreeMap<String, u64>,
        pub disabled: BTreeSet<String>,
        pub delivered: Vec<(String, String)>,
        pub subscribed: Vec<String>,
    }

    #[derive(Debug)]
    struct Inner {
        state: Mutex<State>,
        next_seq: AtomicU64,
        next_ticket: AtomicU64,
        /// `None`: commits wait; `Some`: they take this verdict.
        gate: watch::Sender<Option<Verdict>>,
        held: AtomicU64,
    }

    /// Cheap to clone; clones share everything.
    #[derive(Debug, Clone)]
    pub struct FakeBackend {
        inner: Arc<Inner>,
    }

    impl Default for FakeBackend {
        fn default() -> Self {
            FakeBackend {
                inner: Arc::new(Inner {
                    state: Mutex::default(),
                    next_seq: AtomicU64::new(1),
                    next_ticket: AtomicU64::new(0),
                    gate: watch::channel(Some(Verdict::Commit)).0,
                    held: AtomicU64::new(0),
                }),
            }
        }
    }

    impl Inner {
        fn lock(&self) -> std::sync::MutexGuard<'_, State> {
            self.state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }
    }

    impl FakeBackend {
        pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
            self.inner.lock()
        }

        /// Commits from now on wait until [`FakeBackend::open`].
        pub fn hold(&self) {
            self.inner.gate.send_replace(None);
        }

        /// Lets held and later commits through with `verdict`.
        pub fn open(&self, verdict: Verdict) {
            self.inner.gate.send_replace(Some(verdict));
        }

        /// Commits waiting at the gate.
        pub fn held(&self) -> u64 {
            self.inner.held.load(Ordering::SeqCst)
        }

        pub fn disable(&self, device: &str) {
            self.lock().disabled.insert(device.to_owned());
        }

        /// Topics of the stored records, in order.
        pub fn topics(&self) -> Vec<String> {
            let mut records: Vec<(u64, String)> = self
                .lock()
                .records
                .iter()
                .map(|(ticket, _, _, r)| (*ticket, r.topic.to_string()))
                .collect();
            records.sort();
            records.into_iter().map(|(_, t)| t).collect()
        }
    }

    impl Backend for FakeBackend {
        fn authenticate<'a>(
            &'a self,
            c: Credentials<'a>,
        ) -> BoxFuture<'a, Result<Identity, AuthRefusal>> {
            Box::pin(async move {
                let Some(user) = c.username else {
                    return Err(AuthRefusal::NotAuthorized);
                };
                if c.password != Some(&b"secret"[..]) {
                    return Err(AuthRefusal::BadCredentials);
                }
                if self.lock().disabled.contains(user) {
                    return Err(AuthRefusal::NotAuthorized);
                }
                Ok(Identity {
                    device_id: Arc::from(user),
                    acl: Acl::allow_all(),
                    registered: true,
                    grant: 0,
                })
            })
        }

        fn check(&self, identity: &Identity) -> Result<(), String> {
            if self.lock().disabled.contains(&*identity.device_id) {
                Err("disabled".into())
            } else {
                Ok(())
            }
        }

        fn store(
            &self,
            identity: &Identity,
            record: Record,
            key: Option<String>,
        ) -> BoxFuture<'static, Result<u64, StoreRefusal>> {
            let inner = Arc::clone(&self.inner);
            let mut gate = inner.gate.subscribe();
            let device = identity.device_id.to_string();
            Box::pin(async move {
                let ticket = inner.next_ticket.fetch_add(1, Ordering::SeqCst);
                let verdict = loop {
                    if let Some(v) = gate.borrow_and_update().clone() {
                        break v;
                    }
                    inner.held.fetch_add(1, Ordering::SeqCst);
                    let changed = gate.changed().await;
                    inner.held.fetch_sub(1, Ordering::SeqCst);
                    if changed.is_err() {
                        return Err(StoreRefusal::Unavailable("closed".into()));
                    }
                };
                if let Verdict::Refuse(r) = verdict {
                    return Err(r);
                }
                let mut state = inner.lock();
                if let Some(k) = &key
                    && let Some(seq) = state.keys.get(k)
                {
                    return Ok(*seq);
                }
                let seq = inner.next_seq.fetch_add(1, Ordering::SeqCst);
                if let Some(k) = key {
                    state.keys.insert(k, seq);
                }
                state.records.push((ticket, seq, device, record));
                Ok(seq)
            })
        }

        fn release(&self, keys: Vec<String>) -> BoxFuture<'static, Result<(), String>> {
            let mut state = self.lock();
            for k in keys {
                state.keys.remove(&k);
            }
            Box::pin(async { Ok(()) })
        }

        fn release_prefix(&self, prefix: String) -> BoxFuture<'static, Result<(), String>> {
            self.lock().keys.retain(|k, _| !k.starts_with(&prefix));
            Box::pin(async { Ok(()) })
        }

        fn held_keys(&self, prefix: String) -> BoxFuture<'static, Result<Vec<String>, String>> {
            let keys = self
                .lock()
                .keys
                .keys()
                .filter(|k| k.starts_with(&prefix))
                .cloned()
                .collect();
            Box::pin(async move { Ok(keys) })
        }

        fn observe(&self, _device_id: &str, _event: Observation) {}

        fn subscribed(&self, identity: &Identity) {
            self.lock().subscribed.push(identity.device_id.to_string());
        }

        fn delivered(&self, identity: &Identity, topic: &str) {
            self.lock()
                .delivered
                .push((identity.device_id.to_string(), topic.to_owned()));
        }
    }
}
