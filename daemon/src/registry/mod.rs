//! The device registry: inventory, credentials, monitoring and command queues.
//!
//! Every ingress path asks the registry who a device is ([`Registry::authenticate`],
//! [`Registry::identify`]) and tells it what the device did ([`Registry::observe`]); the
//! management API edits the inventory and reads the monitoring.
//!
//! Invariants:
//! - **No SQLite on the request path.** The inventory lives in an in-memory index (a `BTreeMap`
//!   by id, so listing is in stable id order) that is updated right after each committed change,
//!   with the database connection still locked, so index and file never disagree in order.
//!   Authentication, identification and monitoring read only memory; `observe` is a map update
//!   under a short lock.
//! - **Secrets are never kept in clear.** They are 32 random bytes generated here, returned once
//!   by [`Registry::create`] / [`Registry::rotate_secret`], and stored as an argon2id hash plus,
//!   once the secret is known to be right, its SHA-256 digest ([`secrets`], [`store`]). A right
//!   secret is recognised by its digest (microseconds, also right after a restart, so a storm
//!   of reconnecting devices is not a queue of argon2 runs); everything else — a wrong secret,
//!   an unknown device, a secret whose digest is not known yet — costs one argon2 verification
//!   on a blocking thread, at most [`VERIFY_CONCURRENCY`] at a time (19 MiB each). For a
//!   256-bit random secret the digest is as hard to invert as the argon2 hash; argon2's cost
//!   protects guessable passwords, which these never are, and it stays as the price of every
//!   refusal (timing tells nothing, guessing is throttled).
//! - **Bounded memory.** The index and the monitoring map hold at most one entry per registered
//!   device; traffic for unknown ids is not recorded per device.
//! - Lock order: database connection → index → monitoring map. No lock is held across `.await`.
//!
//! Monitoring semantics (state, rates) are in [`monitor`]; command queue rules in [`commands`];
//! the file and its migrations in [`store`].
//!
//! Wiring (`app/storage.rs`): open with `Registry::open(&data_dir, config.devices.offline_after)` in
//! `spawn_blocking` before ingress starts; raise an alarm if `registry.quarantine()` is `Some`;
//! spawn `registry.clone().run_flusher(shutdown_token)` as task `registry-flush` (it flushes every
//! [`FLUSH_INTERVAL`] and once more when cancelled — cancel it after ingress has stopped so the
//! last counts are saved); hand clones to the ingress paths and to `api::ApiState`.

mod automatic;
pub mod commands;
pub mod monitor;
mod requests;
pub mod secrets;
pub mod store;
pub mod tokens;

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use outpost_sync::outbox::now_unix_ms;
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, broadcast};
use tokio_util::sync::CancellationToken;

pub use automatic::Admission;
pub use commands::Command;
pub use monitor::{DeviceStatus, State, Traffic};
pub use requests::{DeviceChanges, NewDevice};
pub use store::Quarantine;

/// How often [`Registry::run_flusher`] persists the monitoring.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(10);
/// Most argon2 verifications running at once.
pub const VERIFY_CONCURRENCY: usize = 2;
/// Queued commands kept for a slow MQTT delivery path before it misses some.
const COMMAND_EVENTS: usize = 256;

/// Default and largest page of [`Registry::list`].
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;
/// Longest secret worth verifying.
pub const MAX_SECRET_LEN: usize = 1024;
/// Most patterns in a device's `mqtt_publish` or `mqtt_subscribe`.
pub const MAX_ACL_PATTERNS: usize = 32;
/// Longest ACL pattern, in bytes.
pub const MAX_ACL_PATTERN_LEN: usize = 256;
/// Most tags per device.
pub const MAX_TAGS: usize = 32;

/// A protocol a device may use to reach the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Mqtt,
    Coap,
    Http,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Mqtt, Protocol::Coap, Protocol::Http];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Mqtt => "mqtt",
            Protocol::Coap => "coap",
            Protocol::Http => "http",
        }
    }

    pub fn parse(text: &str) -> Option<Protocol> {
        match text {
            "mqtt" => Some(Protocol::Mqtt),
            "coap" => Some(Protocol::Coap),
            "http" => Some(Protocol::Http),
            _ => None,
        }
    }
}

/// Why a device was refused. Ingress paths should answer `UnknownDevice` and `BadSecret` alike
/// (e.g. both 401) so that a caller cannot probe which ids exist. `authenticate` checks the
/// secret before `Disabled` and `ProtocolNotAllowed`, so those two are only revealed to a caller
/// that holds the device's secret. None of these is counted here: report it with
/// `observe(id, Traffic::Refused)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("unknown device")]
    UnknownDevice,
    #[error("wrong or missing device secret")]
    BadSecret,
    #[error("device is disabled")]
    Disabled,
    #[error("device may not use this protocol")]
    ProtocolNotAllowed,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No device with this id. Answer 404.
    #[error("no device \"{id}\"")]
    NotFound { id: String },
    /// A device with this id exists. Answer 409.
    #[error("device \"{id}\" already exists")]
    AlreadyExists { id: String },
    /// A field of a request is invalid. Answer 422 naming the field.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The device already has the maximum of queued commands. Answer 409; retry after it polled.
    #[error("device \"{id}\" already has {limit} queued commands")]
    CommandQueueFull { id: String, limit: usize },
    /// The data directory cannot be created. Fix permissions or the path; do not start.
    #[error("registry {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// SQLite refused to open or migrate the file (not corruption). Do not start.
    #[error("registry {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// The file was written by a newer Outpost. Do not start; do not touch the file.
    #[error(
        "registry {path}: schema version {found} is newer than this build supports ({supported})"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// A database operation failed; nothing of it took effect. Answer 500; retry later.
    #[error("registry database: {0}")]
    Storage(#[from] rusqlite::Error),
    /// Hashing a new secret failed; nothing was changed. Answer 500.
    #[error("hashing the device secret: {0}")]
    Hash(String),
    /// The blocking task running the operation panicked or was cancelled. Answer 500.
    #[error("registry task failed: {0}")]
    Task(String),
}

/// A device as the API shows it. `state` and `last_seen_ms` are filled from the monitoring when
/// the device is read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Device {
    pub id: String,
    /// Display name.
    pub name: String,
    pub model: String,
    /// Serial or batch number.
    pub batch: String,
    pub firmware: String,
    /// Free text, e.g. "pump house, rack 2".
    pub location: String,
    pub tags: Vec<String>,
    pub enabled: bool,
    /// The protocols it may use; empty for devices that only a driver reads.
    pub protocols: Vec<Protocol>,
    /// Whether it has a secret (the secret itself is never shown again).
    pub has_secret: bool,
    /// `api` or `driver:<name>`.
    pub source: String,
    /// MQTT topic filters (with `{id}`) this device may publish to, replacing `[mqtt.acl]`
    /// `publish` for it; `None`: the global list. Used at the device's next CONNECT.
    pub mqtt_publish: Option<Vec<String>>,
    /// Likewise for `[mqtt.acl]` `subscribe`.
    pub mqtt_subscribe: Option<Vec<String>>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub state: State,
    pub last_seen_ms: Option<i64>,
}

impl Device {
    /// A device registered by a driver (`source` `driver:<name>`): no secret, no protocols,
    /// enabled, no inventory fields.
    fn automatic(id: &str, source: &str, now_ms: i64) -> Device {
        Device {
            id: id.to_owned(),
            name: String::new(),
            model: String::new(),
            batch: String::new(),
            firmware: String::new(),
            location: String::new(),
            tags: Vec::new(),
            enabled: true,
            protocols: Vec::new(),
            has_secret: false,
            source: source.to_owned(),
            mqtt_publish: None,
            mqtt_subscribe: None,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            state: State::Online,
            last_seen_ms: None,
        }
    }
}

/// A page of [`Registry::list`].
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub devices: Vec<Device>,
    /// Pass as `cursor` to get the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Filters and position of [`Registry::list`].
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub tag: Option<String>,
    pub state: Option<State>,
    /// 1 to [`MAX_PAGE`]; 0 means [`DEFAULT_PAGE`].
    pub limit: usize,
    /// Devices with ids after this one.
    pub cursor: Option<String>,
}

/// The registry: cheap to clone, shared by every ingress path and the API.
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    conn: Mutex<Connection>,
    index: RwLock<BTreeMap<String, Entry>>,
    monitors: Mutex<HashMap<String, monitor::Monitor>>,
    verify_permits: Semaphore,
    /// argon2 verifications run (real and stand-in), for tests of the equal-cost rule.
    verifications: AtomicU64,
    offline_after: Duration,
    quarantine: Option<Quarantine>,
    /// Commands just queued, for the MQTT delivery path (lossy: a command missed there stays
    /// queued for polling).
    command_events: broadcast::Sender<Command>,
    automatic: automatic::AutomaticCap,
}

#[derive(Debug, Clone)]
struct Entry {
    device: Device,
    secret: Option<Secret>,
}

/// A device's secret as the registry knows it (never in clear).
#[derive(Debug, Clone)]
struct Secret {
    /// argon2id PHC string.
    hash: Arc<str>,
    /// SHA-256 of the secret, once known to be right (generated here or verified once).
    digest: Option<secrets::Sha256Digest>,
}

impl Secret {
    fn from_stored(stored: store::StoredSecret) -> Secret {
        Secret {
            hash: Arc::from(stored.hash),
            digest: stored.digest.as_deref().and_then(secrets::parse_sha256_hex),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves its data consistent: recover from a poisoned lock.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    fn index_read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn index_write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Entry>> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fills the monitoring-derived fields of a device.
    fn view(
        &self,
        device: &Device,
        monitors: &HashMap<String, monitor::Monitor>,
        now: Instant,
        now_ms: i64,
    ) -> Device {
        let mut d = device.clone();
        let m = monitors.get(&d.id);
        d.last_seen_ms = m.and_then(|m| m.last_seen_ms);
        d.state = m.map_or(
            if d.enabled {
                State::Offline
            } else {
                State::Disabled
            },
            |m| m.state(d.enabled, self.offline_after, now, now_ms),
        );
        d
    }

    /// Replaces (or inserts) a device in the index. Called with the connection locked, after
    /// the commit.
    fn install(&self, device: Device, secret: Option<Secret>) {
        let id = device.id.clone();
        self.index_write()
            .insert(id.clone(), Entry { device, secret });
        lock(&self.monitors).entry(id).or_default();
    }

    fn remove(&self, id: &str) {
        if let Some(gone) = self.index_write().remove(id) {
            self.automatic.removed(id, &gone.device.source);
        }
        lock(&self.monitors).remove(id);
    }
}

/// Checks a device id: `[A-Za-z0-9._:-]{1,128}` (the rule lives in the config crate, which
/// checks ids written in the configuration the same way).
pub fn validate_id(id: &str) -> Result<(), String> {
    outpost_config::check_device_id(id)
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> RegistryError {
    RegistryError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), RegistryError> {
    if value.chars().count() > max {
        return Err(invalid(field, format!("at most {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(())
}

fn check_tags(tags: &[String]) -> Result<(), RegistryError> {
    if tags.len() > MAX_TAGS {
        return Err(invalid("tags", format!("at most {MAX_TAGS} tags")));
    }
    for (i, tag) in tags.iter().enumerate() {
        let ok = !tag.is_empty()
            && tag.len() <= 64
            && tag.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-' | '=' | '/')
            });
        if !ok {
            return Err(invalid(
                format!("tags[{i}]"),
                "a tag is 1 to 64 of letters, digits, '.', '_', ':', '-', '=', '/'",
            ));
        }
    }
    Ok(())
}

fn normalize_protocols(mut p: Vec<Protocol>) -> Vec<Protocol> {
    p.sort();
    p.dedup();
    p
}

fn normalize_tags(tags: Vec<String>) -> Vec<String> {
    let mut seen = Vec::with_capacity(tags.len());
    for t in tags {
        if !seen.contains(&t) {
            seen.push(t);
        }
    }
    seen
}

/// Checks a device's own MQTT ACL patterns with the rule `[mqtt.acl]` is checked with.
fn check_acl(field: &str, patterns: Option<&[String]>) -> Result<(), RegistryError> {
    let Some(patterns) = patterns else {
        return Ok(());
    };
    if patterns.len() > MAX_ACL_PATTERNS {
        return Err(invalid(
            field,
            format!("at most {MAX_ACL_PATTERNS} patterns"),
        ));
    }
    for (i, pattern) in patterns.iter().enumerate() {
        let field = || format!("{field}[{i}]");
        if pattern.len() > MAX_ACL_PATTERN_LEN {
            return Err(invalid(
                field(),
                format!("at most {MAX_ACL_PATTERN_LEN} bytes"),
            ));
        }
        if pattern.contains('\0') {
            return Err(invalid(field(), "must not contain NUL"));
        }
        outpost_config::check_acl_pattern(pattern).map_err(|e| invalid(field(), e))?;
    }
    Ok(())
}

/// Checks every inventory field of a device (not the id).
fn check_device(d: &Device) -> Result<(), RegistryError> {
    check_text("name", &d.name, 256)?;
    check_text("model", &d.model, 128)?;
    check_text("batch", &d.batch, 128)?;
    check_text("firmware", &d.firmware, 128)?;
    check_text("location", &d.location, 256)?;
    check_tags(&d.tags)?;
    check_acl("mqtt_publish", d.mqtt_publish.as_deref())?;
    check_acl("mqtt_subscribe", d.mqtt_subscribe.as_deref())
}

impl Registry {
    /// Opens (creating or migrating) `registry.db` in `data_dir` and loads the inventory and
    /// the persisted monitoring into memory. Blocking.
    pub fn open(data_dir: &Path, offline_after: Duration) -> Result<Registry, RegistryError> {
        let (conn, quarantine) = store::open(data_dir)?;
        // Made now (blocking is fine here), so that no refused login ever pays for making it.
        let _ = secrets::dummy_hash();
        let path = data_dir.join(store::FILE_NAME);
        let devices = store::load_devices(&conn).map_err(|source| RegistryError::Open {
            path: path.clone(),
            source,
        })?;
        let status = store::load_status(&conn).map_err(|source| RegistryError::Open {
            path: path.clone(),
            source,
        })?;
        let mut index = BTreeMap::new();
        for (device, secret) in devices {
            index.insert(
                device.id.clone(),
                Entry {
                    device,
                    secret: secret.map(Secret::from_stored),
                },
            );
        }
        let mut monitors: HashMap<String, monitor::Monitor> = index
            .keys()
            .map(|id| (id.clone(), Default::default()))
            .collect();
        for (id, m) in status {
            if let Some(slot) = monitors.get_mut(&id) {
                *slot = m;
            }
        }
        tracing::info!(path = %path.display(), devices = index.len(), "Device registry opened");
        let driver_sourced = index
            .values()
            .filter(|e| automatic::is_driver_source(&e.device.source))
            .count();
        Ok(Registry {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                index: RwLock::new(index),
                monitors: Mutex::new(monitors),
                verify_permits: Semaphore::new(VERIFY_CONCURRENCY),
                verifications: AtomicU64::new(0),
                offline_after,
                quarantine,
                command_events: broadcast::channel(COMMAND_EVENTS).0,
                automatic: automatic::AutomaticCap::new(driver_sourced),
            }),
        })
    }

    /// Caps the devices drivers register by themselves (`devices.max_automatic`; no cap until
    /// called). See [`automatic`].
    pub fn limit_automatic(&self, max: usize) {
        self.inner.automatic.set_max(max);
    }

    /// Registers `outpost_devices_automatic` and `outpost_devices_unregistered_readings_total`.
    pub fn register_metrics(&self, metrics: &mut prometheus_client::registry::Registry) {
        self.inner.automatic.register_metrics(metrics);
    }

    /// The standing alarm of the registry, if any: `devices.max_automatic` reached while
    /// unknown devices keep reporting.
    pub fn alarm(&self) -> Option<String> {
        self.inner.automatic.alarm()
    }

    /// `readings` of `device` (admitted as [`Admission::TakeUnregistered`]) were stored.
    pub fn stored_unregistered(&self, device: &str, readings: u64) {
        self.inner.automatic.unregistered(device, readings);
    }

    /// The corrupt file moved aside at open, if any: raise an alarm.
    pub fn quarantine(&self) -> Option<&Quarantine> {
        self.inner.quarantine.as_ref()
    }

    /// Number of registered devices.
    pub fn len(&self) -> usize {
        self.inner.index_read().len()
    }

    /// Runs `f` with the connection locked on a blocking thread.
    async fn blocking<R, F>(&self, f: F) -> Result<R, RegistryError>
    where
        R: Send + 'static,
        F: FnOnce(&Inner, &mut Connection) -> Result<R, RegistryError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mut conn = lock(&inner.conn);
            f(&inner, &mut conn)
        })
        .await
        .map_err(|e| RegistryError::Task(e.to_string()))?
    }

    // ---- device-facing ----------------------------------------------------------------------

    /// Checks a device's secret and whether it may connect over `protocol`. A right secret is
    /// recognised by its digest (fast); a wrong one, an unknown device and a secret whose digest
    /// is not known yet cost one argon2 verification each (see the module docs).
    pub async fn authenticate(
        &self,
        device_id: &str,
        secret: &str,
        protocol: Protocol,
    ) -> Result<(), Refusal> {
        // Generated secrets are 64 characters: anything empty or huge is wrong without argon2.
        if secret.is_empty() || secret.len() > MAX_SECRET_LEN {
            return match self.credentials(device_id) {
                Err(Refusal::UnknownDevice) => Err(Refusal::UnknownDevice),
                _ => Err(Refusal::BadSecret),
            };
        }
        let digest = secrets::sha256(secret.as_bytes());
        // A rotation that lands while a verification runs changes the hash: verify again
        // against the new state rather than accept a secret that was just replaced.
        for _ in 0..3 {
            let known = match self.credentials(device_id) {
                Ok(s) => s,
                Err(refusal) => {
                    // An unknown device (or one without a secret) costs one argon2
                    // verification like a wrong secret: timing must not tell which ids exist.
                    self.verify_slowly(secret, Arc::from(secrets::dummy_hash()))
                        .await;
                    return Err(refusal);
                }
            };
            if let Some(right) = &known.digest {
                if secrets::digest_eq(right, &digest) {
                    return self.identify(device_id, protocol);
                }
                // Wrong: it still costs what a verification costs.
                self.verify_slowly(secret, known.hash).await;
                return Err(Refusal::BadSecret);
            }
            if !self.verify_slowly(secret, Arc::clone(&known.hash)).await {
                return Err(Refusal::BadSecret);
            }
            if self.remember_digest(device_id, &known.hash, digest) {
                return self.identify(device_id, protocol);
            }
        }
        Err(Refusal::BadSecret)
    }

    /// One argon2 verification of `secret` against `hash`, on a blocking thread, at most
    /// [`VERIFY_CONCURRENCY`] at a time.
    async fn verify_slowly(&self, secret: &str, hash: Arc<str>) -> bool {
        let Ok(_permit) = self.inner.verify_permits.acquire().await else {
            return false;
        };
        self.inner.verifications.fetch_add(1, Ordering::Relaxed);
        let secret = secret.to_owned();
        tokio::task::spawn_blocking(move || secrets::verify(&secret, &hash))
            .await
            .unwrap_or(false)
    }

    /// After a successful verification against `hash`: keeps the secret's digest, in memory at
    /// once and in `registry.db` in the background, so its next logins (also after a restart)
    /// need no argon2. False if the device's secret changed meanwhile (verify again).
    fn remember_digest(
        &self,
        device_id: &str,
        hash: &Arc<str>,
        digest: secrets::Sha256Digest,
    ) -> bool {
        {
            let mut index = self.inner.index_write();
            match index.get_mut(device_id).and_then(|e| e.secret.as_mut()) {
                Some(s) if s.hash == *hash => s.digest = Some(digest),
                _ => return false,
            }
        }
        let (registry, id, hash) = (self.clone(), device_id.to_owned(), hash.to_string());
        tokio::spawn(async move {
            let saved = registry
                .blocking(move |_, conn| {
                    Ok(store::set_secret_digest(
                        conn,
                        &id,
                        &hash,
                        &secrets::hex(&digest),
                    )?)
                })
                .await;
            if let Err(e) = saved {
                // Only speed is lost: the next start verifies this secret with argon2 again.
                tracing::warn!(error = %e, "Could not save a verified secret digest");
            }
        });
        true
    }

    /// The stored secret of a device.
    fn credentials(&self, device_id: &str) -> Result<Secret, Refusal> {
        let index = self.inner.index_read();
        let entry = index.get(device_id).ok_or(Refusal::UnknownDevice)?;
        entry.secret.clone().ok_or(Refusal::BadSecret)
    }

    /// argon2 verifications run so far (real ones and the stand-in for unknown devices).
    #[cfg(test)]
    pub fn verifications(&self) -> u64 {
        self.inner.verifications.load(Ordering::Relaxed)
    }

    /// A fingerprint of the device's current secret (its stored hash): it changes when the
    /// secret is rotated, so a connection authenticated with the old one can tell. `None` for
    /// unknown devices and devices without a secret.
    pub fn credential_stamp(&self, device_id: &str) -> Option<u64> {
        let index = self.inner.index_read();
        let hash = index.get(device_id)?.secret.as_ref()?.hash.clone();
        let digest = secrets::sha256(hash.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        Some(u64::from_le_bytes(first))
    }

    /// Without a secret: the device exists, is enabled and may use `protocol`. For paths where
    /// identity comes from elsewhere (plain CoAP from an allowed network, a TLS certificate).
    pub fn identify(&self, device_id: &str, protocol: Protocol) -> Result<(), Refusal> {
        let index = self.inner.index_read();
        let entry = index.get(device_id).ok_or(Refusal::UnknownDevice)?;
        if !entry.device.enabled {
            return Err(Refusal::Disabled);
        }
        if !entry.device.protocols.contains(&protocol) {
            return Err(Refusal::ProtocolNotAllowed);
        }
        Ok(())
    }

    /// Records one traffic event. Never blocks on I/O; events for unknown devices are ignored.
    pub fn observe(&self, device_id: &str, event: Traffic) {
        self.observe_at(device_id, event, Instant::now(), now_unix_ms());
    }

    fn observe_at(&self, device_id: &str, event: Traffic, now: Instant, now_ms: i64) {
        if let Some(m) = lock(&self.inner.monitors).get_mut(device_id) {
            m.apply(event, now, now_ms);
        }
    }

    /// For drivers: the device is unreachable (port gone, slave not answering); it is reported
    /// offline until it is seen again. Unknown devices are ignored. Memory only, no I/O.
    pub fn mark_offline(&self, device_id: &str, reason: &str) {
        if let Some(m) = lock(&self.inner.monitors).get_mut(device_id) {
            m.offline_reason = Some(reason.to_owned());
            m.dirty = true;
        }
    }

    /// For drivers: registers an unknown device (source e.g. `driver:<name>`, no secret, no
    /// protocols, enabled) and marks the device seen. Known devices are only marked seen (no
    /// I/O). Counting its messages is `observe`'s job.
    ///
    /// [`Admission::Refuse`] if the device is disabled or its id is invalid (logged, not
    /// registered); [`Admission::TakeUnregistered`] for an unknown device beyond
    /// `devices.max_automatic` (the caller reports the readings with
    /// [`Registry::stored_unregistered`]).
    pub async fn register_seen(&self, device_id: &str, source: &str) -> Admission {
        let now = Instant::now();
        let now_ms = now_unix_ms();
        let admission = |enabled: bool| {
            if enabled {
                Admission::Take
            } else {
                Admission::Refuse
            }
        };
        let known = self
            .inner
            .index_read()
            .get(device_id)
            .map(|e| e.device.enabled);
        if let Some(enabled) = known {
            if let Some(m) = lock(&self.inner.monitors).get_mut(device_id) {
                m.seen(now, now_ms);
            }
            return admission(enabled);
        }
        if let Err(e) = validate_id(device_id) {
            tracing::warn!(device = device_id, source, error = %e, "Not registering a device with an invalid id");
            return Admission::Refuse;
        }
        if !self.inner.automatic.has_room() {
            return Admission::TakeUnregistered;
        }
        let device = Device::automatic(device_id, source, now_ms);
        let result = self
            .blocking(move |inner, conn| {
                // Registered by someone else meanwhile: fine, it exists.
                if store::insert_device(conn, &device, None)? {
                    tracing::info!(device = %device.id, source = %device.source, "Device registered automatically");
                    inner.automatic.added(&device.id, &device.source);
                    inner.install(device, None);
                }
                Ok(())
            })
            .await;
        if let Err(e) = result {
            // Take the reading anyway: a registry failure must not cost data.
            tracing::warn!(device = device_id, source, error = %e, "Cannot register device");
            return Admission::Take;
        }
        let enabled = self
            .inner
            .index_read()
            .get(device_id)
            .is_none_or(|e| e.device.enabled);
        if let Some(m) = lock(&self.inner.monitors).get_mut(device_id) {
            m.seen(now, now_ms);
        }
        admission(enabled)
    }

    /// For drivers, at start-up: the devices their configuration names (`(device id, source)`,
    /// source `driver:<name>`) are registered like [`Registry::register_seen`] would, without
    /// being marked seen. A device never heard from (no `last_seen`) is reported offline with
    /// `offline_reason` "not heard from yet" until its first reading — so a Modbus slave that
    /// never answered is visible in the API, not a 404 (docs/DRIVERS.md).
    pub async fn register_configured(&self, devices: Vec<(String, String)>) {
        let now_ms = now_unix_ms();
        let mut fresh = Vec::new();
        for (id, source) in &devices {
            if self.inner.index_read().contains_key(id) {
                continue;
            }
            match validate_id(id) {
                Ok(()) => fresh.push(Device::automatic(id, source, now_ms)),
                Err(e) => {
                    tracing::warn!(device = %id, source = %source, error = %e, "Not registering a configured device with an invalid id");
                }
            }
        }
        if !fresh.is_empty() {
            let result = self
                .blocking(move |inner, conn| {
                    let tx = conn.transaction()?;
                    let mut added = Vec::new();
                    for device in fresh {
                        if store::insert_device(&tx, &device, None)? {
                            added.push(device);
                        }
                    }
                    tx.commit()?;
                    for device in added {
                        tracing::info!(device = %device.id, source = %device.source, "Configured device registered");
                        inner.install(device, None);
                    }
                    Ok(())
                })
                .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "Cannot register the devices named in the drivers' configuration");
            }
        }
        {
            let index = self.inner.index_read();
            let driver_sourced = index
                .values()
                .filter(|e| automatic::is_driver_source(&e.device.source))
                .map(|e| e.device.id.as_str());
            self.inner.automatic.set_configured(
                devices.iter().map(|(id, _)| id.clone()).collect(),
                driver_sourced,
            );
        }
        let mut monitors = lock(&self.inner.monitors);
        for (id, source) in &devices {
            if let Some(m) = monitors.get_mut(id.as_str())
                && m.last_seen_ms.is_none()
                && m.offline_reason.is_none()
            {
                m.offline_reason = Some(format!("not heard from yet (configured for {source})"));
            }
        }
    }

    // ---- monitoring persistence ---------------------------------------------------------------

    /// Persists the monitoring of every device that changed since the last flush.
    pub async fn flush(&self) -> Result<(), RegistryError> {
        let dirty: Vec<(String, monitor::Monitor)> = {
            let mut monitors = lock(&self.inner.monitors);
            monitors
                .iter_mut()
                .filter(|(_, m)| m.dirty)
                .map(|(id, m)| {
                    m.dirty = false;
                    (id.clone(), m.clone())
                })
                .collect()
        };
        if dirty.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = dirty.iter().map(|(id, _)| id.clone()).collect();
        let result = self
            .blocking(move |_, conn| Ok(store::save_status(conn, &dirty)?))
            .await;
        if result.is_err() {
            // Try again next time.
            let mut monitors = lock(&self.inner.monitors);
            for id in ids {
                if let Some(m) = monitors.get_mut(&id) {
                    m.dirty = true;
                }
            }
        }
        result
    }

    /// Flushes every [`FLUSH_INTERVAL`] until `stop` is cancelled, then once more.
    pub async fn run_flusher(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.flush().await {
                tracing::warn!(error = %e, "Persisting device monitoring failed; will retry");
            }
        }
        match self.flush().await {
            Ok(()) => tracing::info!("Device monitoring saved"),
            Err(e) => tracing::error!(error = %e, "Saving device monitoring at shutdown failed"),
        }
    }

    // ---- management -----------------------------------------------------------------------------

    /// One device, or `None`.
    pub fn get(&self, id: &str) -> Option<Device> {
        let index = self.inner.index_read();
        let entry = index.get(id)?;
        let monitors = lock(&self.inner.monitors);
        Some(
            self.inner
                .view(&entry.device, &monitors, Instant::now(), now_unix_ms()),
        )
    }

    /// A page of devices in id order, filtered by tag and state.
    pub fn list(&self, query: &ListQuery) -> Result<Page, RegistryError> {
        let limit = match query.limit {
            0 => DEFAULT_PAGE,
            n if n <= MAX_PAGE => n,
            _ => return Err(invalid("limit", format!("must be 1 to {MAX_PAGE}"))),
        };
        let (now, now_ms) = (Instant::now(), now_unix_ms());
        let index = self.inner.index_read();
        let monitors = lock(&self.inner.monitors);
        let start = match &query.cursor {
            Some(c) => Bound::Excluded(c.clone()),
            None => Bound::Unbounded,
        };
        let mut devices = Vec::new();
        let mut more = false;
        for entry in index.range((start, Bound::Unbounded)).map(|(_, e)| e) {
            if let Some(tag) = &query.tag
                && !entry.device.tags.contains(tag)
            {
                continue;
            }
            let view = self.inner.view(&entry.device, &monitors, now, now_ms);
            if query.state.is_some_and(|s| s != view.state) {
                continue;
            }
            if devices.len() == limit {
                more = true;
                break;
            }
            devices.push(view);
        }
        let next_cursor = if more {
            devices.last().map(|d| d.id.clone())
        } else {
            None
        };
        Ok(Page {
            devices,
            next_cursor,
        })
    }

    /// Creates a device with a fresh secret; returns it and the secret (shown this once).
    pub async fn create(&self, new: NewDevice) -> Result<(Device, String), RegistryError> {
        validate_id(&new.id).map_err(|m| invalid("id", m))?;
        let now_ms = now_unix_ms();
        let device = Device {
            id: new.id,
            name: new.name,
            model: new.model,
            batch: new.batch,
            firmware: new.firmware,
            location: new.location,
            tags: normalize_tags(new.tags),
            enabled: new.enabled,
            protocols: normalize_protocols(new.protocols),
            has_secret: true,
            source: "api".to_owned(),
            mqtt_publish: new.mqtt_publish,
            mqtt_subscribe: new.mqtt_subscribe,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            state: State::Offline,
            last_seen_ms: None,
        };
        check_device(&device)?;
        if self.inner.index_read().contains_key(&device.id) {
            return Err(RegistryError::AlreadyExists { id: device.id });
        }
        let secret = secrets::generate();
        let stored = self.hash_secret(&secret).await?;
        let id = device.id.clone();
        self.blocking(move |inner, conn| {
            if !store::insert_device(conn, &device, Some(&stored))? {
                return Err(RegistryError::AlreadyExists { id: device.id });
            }
            inner.install(device, Some(Secret::from_stored(stored)));
            Ok(())
        })
        .await?;
        tracing::info!(device = %id, "Device created");
        let device = self.get(&id).ok_or(RegistryError::NotFound { id })?;
        Ok((device, secret))
    }

    /// A new secret as stored: its argon2id hash and (it is generated here, so right) its
    /// digest.
    async fn hash_secret(&self, secret: &str) -> Result<store::StoredSecret, RegistryError> {
        let digest = secrets::hex(&secrets::sha256(secret.as_bytes()));
        let secret = secret.to_owned();
        let hash = tokio::task::spawn_blocking(move || secrets::hash(&secret))
            .await
            .map_err(|e| RegistryError::Task(e.to_string()))?
            .map_err(RegistryError::Hash)?;
        Ok(store::StoredSecret {
            hash,
            digest: Some(digest),
        })
    }

    /// Applies `changes` to a device.
    pub async fn update(&self, id: &str, changes: DeviceChanges) -> Result<Device, RegistryError> {
        let id = id.to_owned();
        let applied = self
            .blocking(move |inner, conn| {
                let entry = inner
                    .index_read()
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| RegistryError::NotFound { id: id.clone() })?;
                let mut d = entry.device;
                let DeviceChanges {
                    name,
                    model,
                    batch,
                    firmware,
                    location,
                    tags,
                    enabled,
                    protocols,
                    mqtt_publish,
                    mqtt_subscribe,
                } = changes;
                let set = |slot: &mut String, v: Option<String>| {
                    if let Some(v) = v {
                        *slot = v;
                    }
                };
                set(&mut d.name, name);
                set(&mut d.model, model);
                set(&mut d.batch, batch);
                set(&mut d.firmware, firmware);
                set(&mut d.location, location);
                if let Some(tags) = tags {
                    d.tags = normalize_tags(tags);
                }
                if let Some(enabled) = enabled {
                    d.enabled = enabled;
                }
                if let Some(p) = protocols {
                    d.protocols = normalize_protocols(p);
                }
                if let Some(acl) = mqtt_publish {
                    d.mqtt_publish = acl;
                }
                if let Some(acl) = mqtt_subscribe {
                    d.mqtt_subscribe = acl;
                }
                check_device(&d)?;
                d.updated_at_ms = now_unix_ms();
                if !store::update_device(conn, &d)? {
                    return Err(RegistryError::NotFound { id });
                }
                inner.install(d, entry.secret);
                Ok(id)
            })
            .await?;
        tracing::info!(device = %applied, "Device updated");
        self.get(&applied)
            .ok_or(RegistryError::NotFound { id: applied })
    }

    /// Enables or disables a device. A disabled device is refused by every ingress path.
    pub async fn set_enabled(&self, id: &str, enabled: bool) -> Result<Device, RegistryError> {
        self.update(
            id,
            DeviceChanges {
                enabled: Some(enabled),
                ..DeviceChanges::default()
            },
        )
        .await
    }

    /// Deletes a device, its monitoring and its commands.
    pub async fn delete(&self, id: &str) -> Result<(), RegistryError> {
        let id = id.to_owned();
        self.blocking(move |inner, conn| {
            if !store::delete_device(conn, &id)? {
                return Err(RegistryError::NotFound { id });
            }
            inner.remove(&id);
            tracing::info!(device = %id, "Device deleted");
            Ok(())
        })
        .await
    }

    /// Gives a device a fresh secret; the old one stops working at once. Returns the device and
    /// the new secret (shown this once).
    pub async fn rotate_secret(&self, id: &str) -> Result<(Device, String), RegistryError> {
        if !self.inner.index_read().contains_key(id) {
            return Err(RegistryError::NotFound { id: id.to_owned() });
        }
        let secret = secrets::generate();
        let stored = self.hash_secret(&secret).await?;
        let id = id.to_owned();
        let id2 = id.clone();
        self.blocking(move |inner, conn| {
            let now_ms = now_unix_ms();
            let Some(entry) = inner.index_read().get(&id).cloned() else {
                return Err(RegistryError::NotFound { id });
            };
            if !store::set_secret(conn, &id, &stored, now_ms)? {
                return Err(RegistryError::NotFound { id });
            }
            let mut d = entry.device;
            d.has_secret = true;
            d.updated_at_ms = now_ms;
            inner.install(d, Some(Secret::from_stored(stored)));
            Ok(())
        })
        .await?;
        tracing::info!(device = %id2, "Device secret rotated");
        let device = self.get(&id2).ok_or(RegistryError::NotFound { id: id2 })?;
        Ok((device, secret))
    }

    /// The monitoring fields of a device.
    pub fn status(&self, id: &str) -> Option<DeviceStatus> {
        let index = self.inner.index_read();
        let entry = index.get(id)?;
        let monitors = lock(&self.inner.monitors);
        let m = monitors.get(id).cloned().unwrap_or_default();
        Some(m.snapshot(
            id,
            entry.device.enabled,
            self.inner.offline_after,
            Instant::now(),
            now_unix_ms(),
        ))
    }

    // ---- commands -------------------------------------------------------------------------------

    /// Queues a command for a device. `ttl` defaults to [`commands::DEFAULT_TTL`].
    pub async fn queue_command(
        &self,
        device_id: &str,
        payload: &serde_json::Value,
        ttl: Option<Duration>,
    ) -> Result<Command, RegistryError> {
        let ttl = ttl.unwrap_or(commands::DEFAULT_TTL);
        if ttl.is_zero() || ttl > commands::MAX_TTL {
            return Err(invalid("ttl", "must be more than 0 and at most 30d"));
        }
        let text = payload.to_string();
        if text.len() > commands::MAX_PAYLOAD {
            return Err(invalid(
                "payload",
                format!("at most {} bytes of JSON", commands::MAX_PAYLOAD),
            ));
        }
        let id = device_id.to_owned();
        self.blocking(move |inner, conn| {
            if !inner.index_read().contains_key(&id) {
                return Err(RegistryError::NotFound { id });
            }
            match commands::queue(conn, &id, &text, ttl, now_unix_ms())? {
                commands::Queued::Ok(c) => {
                    tracing::info!(device = %id, command = c.id, "Command queued");
                    // No listener (MQTT off) is fine: the command waits for a poll.
                    let _ = inner.command_events.send((*c).clone());
                    Ok(*c)
                }
                commands::Queued::Full => Err(RegistryError::CommandQueueFull {
                    id,
                    limit: commands::MAX_QUEUED,
                }),
            }
        })
        .await
    }

    /// Commands as they are queued (for the MQTT delivery path).
    pub fn command_events(&self) -> broadcast::Receiver<Command> {
        self.inner.command_events.subscribe()
    }

    /// Every kept command of a device (queued, delivered, expired), oldest first.
    pub async fn commands(&self, device_id: &str) -> Result<Vec<Command>, RegistryError> {
        let id = device_id.to_owned();
        self.blocking(move |inner, conn| {
            if !inner.index_read().contains_key(&id) {
                return Err(RegistryError::NotFound { id });
            }
            Ok(commands::list(conn, &id, now_unix_ms())?)
        })
        .await
    }

    /// One command of a device, or `None`.
    pub async fn command(
        &self,
        device_id: &str,
        command_id: i64,
    ) -> Result<Option<Command>, RegistryError> {
        let id = device_id.to_owned();
        self.blocking(move |inner, conn| {
            if !inner.index_read().contains_key(&id) {
                return Err(RegistryError::NotFound { id });
            }
            Ok(commands::get(conn, &id, command_id, now_unix_ms())?)
        })
        .await
    }

    /// Queued commands of a device, oldest first, at most `max`, without marking them. Pair
    /// with [`Registry::mark_delivered`] when the delivery path knows they arrived.
    pub async fn pending_commands(
        &self,
        device_id: &str,
        max: usize,
    ) -> Result<Vec<Command>, RegistryError> {
        let id = device_id.to_owned();
        self.blocking(move |_, conn| Ok(commands::pending(conn, &id, max, now_unix_ms())?))
            .await
    }

    /// Marks commands of a device delivered; returns how many were still queued.
    pub async fn mark_delivered(
        &self,
        device_id: &str,
        command_ids: &[i64],
    ) -> Result<usize, RegistryError> {
        let id = device_id.to_owned();
        let ids = command_ids.to_vec();
        self.blocking(move |_, conn| Ok(commands::mark_delivered(conn, &id, &ids, now_unix_ms())?))
            .await
    }

    /// For polling devices: up to `max` queued commands, oldest first, marked delivered in the
    /// same transaction (at-most-once delivery).
    pub async fn take_pending_commands(
        &self,
        device_id: &str,
        max: usize,
    ) -> Result<Vec<Command>, RegistryError> {
        let id = device_id.to_owned();
        let taken = self
            .blocking(move |_, conn| Ok(commands::take_pending(conn, &id, max, now_unix_ms())?))
            .await?;
        if !taken.is_empty() {
            tracing::debug!(
                device = device_id,
                count = taken.len(),
                "Commands delivered"
            );
        }
        Ok(taken)
    }

    /// A device's acknowledgement of its command `command_id` with `result`.
    pub async fn ack_command(
        &self,
        device_id: &str,
        command_id: i64,
        result: serde_json::Value,
    ) -> Result<commands::Acked, RegistryError> {
        let id = device_id.to_owned();
        self.blocking(move |_, conn| {
            Ok(commands::ack(
                conn,
                &id,
                command_id,
                &result,
                now_unix_ms(),
            )?)
        })
        .await
    }

    // ---- commands from the cloud ---------------------------------------------------------------

    /// Reports cloud commands that expired undelivered; forgets old command ids when `prune`.
    pub async fn report_expired_commands(&self, prune: bool) -> Result<usize, RegistryError> {
        self.blocking(move |_, conn| {
            if prune {
                commands::forget_old_refs(conn)?;
            }
            Ok(commands::report_expired(conn, now_unix_ms())?)
        })
        .await
    }

    /// The oldest status events waiting for the outbox.
    pub async fn status_events(
        &self,
        max: usize,
    ) -> Result<Vec<commands::StatusEvent>, RegistryError> {
        self.blocking(move |_, conn| Ok(commands::status_events(conn, max)?))
            .await
    }

    /// The oldest command for the gateway itself, waiting to be carried out.
    pub async fn next_gateway_command(
        &self,
    ) -> Result<Option<commands::GatewayCommand>, RegistryError> {
        self.blocking(|_, conn| Ok(commands::next_gateway_command(conn)?))
            .await
    }

    /// Ends a command for the gateway with its final status event.
    pub async fn finish_gateway_command(
        &self,
        id: i64,
        outcome: commands::GatewayOutcome,
    ) -> Result<(), RegistryError> {
        self.blocking(move |_, conn| {
            Ok(commands::finish_gateway_command(
                conn,
                id,
                &outcome,
                now_unix_ms(),
            )?)
        })
        .await
    }

    /// Deletes status events up to `last_id`, which the outbox has.
    pub async fn delete_status_events(&self, last_id: i64) -> Result<usize, RegistryError> {
        self.blocking(move |_, conn| Ok(commands::delete_status_events(conn, last_id)?))
            .await
    }
}

/// What the commands consumer (`crate::cloud_commands::CloudStore`) calls, on its own thread:
/// blocking.
impl Registry {
    /// The stored next offset of a commands partition.
    /// The management API tokens created through the API. Blocking (read once at start).
    pub fn api_tokens(&self) -> Result<Vec<tokens::StoredToken>, RegistryError> {
        let conn = lock(&self.inner.conn);
        Ok(tokens::list(&conn)?)
    }

    /// Stores a new API token; false if one of that name exists.
    pub async fn add_api_token(&self, token: tokens::StoredToken) -> Result<bool, RegistryError> {
        self.blocking(move |_, conn| Ok(tokens::insert(conn, &token)?))
            .await
    }

    /// Deletes the API token `name`; false if there was none.
    pub async fn remove_api_token(&self, name: String) -> Result<bool, RegistryError> {
        self.blocking(move |_, conn| Ok(tokens::delete(conn, &name)?.is_some()))
            .await
    }

    pub fn cloud_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, String> {
        let conn = lock(&self.inner.conn);
        commands::next_offset(&conn, topic, partition).map_err(|e| e.to_string())
    }

    /// Stores what the commands consumer read (see [`commands::store_cloud`]) and announces the
    /// queued commands to the delivery paths.
    pub fn store_cloud_commands(
        &self,
        batch: &outpost_sync::forwarder::commands::Batch,
        gateway: bool,
    ) -> Result<(), String> {
        let queued = {
            let mut conn = lock(&self.inner.conn);
            commands::store_cloud(&mut conn, batch, gateway, now_unix_ms())
                .map_err(|e| e.to_string())?
        };
        for command in queued {
            tracing::info!(
                device = %command.device_id,
                command = command.id,
                command_id = command.command_id.as_deref().unwrap_or(""),
                "Command from the cloud queued"
            );
            // No listener (MQTT off) is fine: the command waits for a poll.
            let _ = self.inner.command_events.send(command);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

/// The forwarder's routing rules match on device tags.
impl outpost_sync::forwarder::DeviceTags for Registry {
    fn tags(&self, device_id: &str) -> Vec<String> {
        let index = self.inner.index_read();
        index
            .get(device_id)
            .map(|entry| entry.device.tags.clone())
            .unwrap_or_default()
    }
}

impl outpost_edge::Facts for Registry {
    fn facts(&self, device_id: &str) -> Option<outpost_edge::DeviceFacts> {
        let index = self.inner.index_read();
        let device = &index.get(device_id)?.device;
        let text = |s: &String| (!s.is_empty()).then(|| s.clone());
        Some(outpost_edge::DeviceFacts {
            name: text(&device.name),
            model: text(&device.model),
            location: text(&device.location),
            firmware: text(&device.firmware),
            tags: device.tags.clone(),
        })
    }
}
