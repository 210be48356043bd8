//! Local app containers: the desired set (declared in `[[apps.app]]` or created through the
//! API), their observed state, and the reconcile loop ([`reconcile`]) that makes the engine's
//! containers match.
//!
//! Invariants:
//! - Outpost only ever touches containers labelled [`LABEL_MANAGED`]`=true`; each carries
//!   [`LABEL_APP`]`=<name>` and [`LABEL_SPEC`]`=<digest of the app's spec>`. A container whose
//!   spec digest differs from the desired one is replaced.
//! - The desired set is changed only through [`Apps`]; every change wakes the loop.
//! - Engine restart policies are never used: the loop restarts containers itself, so it can
//!   count restarts, back off and detect crash loops.

pub mod engine;
pub mod reconcile;
pub mod store;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use outpost_config::{AppConfig, AppsConfig};
use serde::Serialize;
use tokio::sync::Notify;

use self::store::AppStore;

/// Tag of the registry devices that are apps' bus identities (`app-<name>`).
pub const DEVICE_TAG: &str = "outpost-app";
/// Marks a container as Outpost's.
pub const LABEL_MANAGED: &str = "io.outpost.managed";
/// The app a container runs.
pub const LABEL_APP: &str = "io.outpost.app";
/// Digest of the spec the container was created from.
pub const LABEL_SPEC: &str = "io.outpost.spec";

/// Where an app's declaration comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `[[apps.app]]`: read-only through the API.
    Config,
    /// Created through the API; persisted in `apps.db`.
    Api,
}

/// State of one app as the status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AppState {
    Active,
    Inactive,
    Failed,
}

/// What the status, `/metrics` and `GET /api/v1/apps` show of an app.
#[derive(Debug, Clone, Serialize)]
pub struct AppStatus {
    pub state: AppState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// Restarts made by Outpost since the daemon started.
    pub restart_count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_exit_code: Option<i64>,
    /// The container's health check: `starting`, `healthy`, `unhealthy`; absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
}

impl AppState {
    pub fn as_str(self) -> &'static str {
        match self {
            AppState::Active => "ACTIVE",
            AppState::Inactive => "INACTIVE",
            AppState::Failed => "FAILED",
        }
    }
}

impl AppStatus {
    fn pending() -> AppStatus {
        AppStatus {
            state: AppState::Inactive,
            reason: Some("not reconciled yet".into()),
            container_id: None,
            started_at: None,
            restart_count: 0,
            last_exit_code: None,
            health: None,
        }
    }
}

/// One desired app.
#[derive(Debug, Clone, Serialize)]
pub struct Desired {
    pub spec: AppConfig,
    pub source: Source,
    /// Bumped by an explicit restart request: the loop restarts the container and clears a
    /// FAILED state.
    #[serde(skip)]
    pub restart_epoch: u64,
}

/// Why a change to the desired set was refused.
#[derive(Debug, thiserror::Error)]
pub enum AppsError {
    /// Answer 404.
    #[error("no app \"{0}\"")]
    NotFound(String),
    /// Answer 409.
    #[error("app \"{0}\" already exists")]
    Exists(String),
    /// Answer 409: declared in the configuration file.
    #[error("app \"{0}\" is declared in the configuration file; change it there")]
    FromConfig(String),
    /// Answer 422 with the problems.
    #[error("invalid app: {}", .0.iter().map(|(k, m)| format!("{k}: {m}")).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<(String, String)>),
    /// Answer 500; the change was not made.
    #[error("saving apps.db: {0}")]
    Store(#[from] store::StoreError),
}

/// The apps subsystem's shared state. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Apps {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: AppsConfig,
    desired: Mutex<BTreeMap<String, Desired>>,
    status: Mutex<BTreeMap<String, AppStatus>>,
    engine: Mutex<Option<String>>,
    store: Option<AppStore>,
    wake: Notify,
    /// `OUTPOST_MQTT_URL` for the apps; `None` without an MQTT server.
    bus_url: Option<String>,
    /// Orders status-change records written by concurrent background tasks.
    event_order: AtomicU64,
    /// FAILED apps read from `apps.db` at start, taken by the reconcile loop
    /// ([`Apps::take_stored_failures`]).
    stored_failures: Mutex<BTreeMap<String, store::Failure>>,
}

impl Apps {
    /// The desired set: the configuration's apps, then the persisted API apps (an API app
    /// named like a config app is ignored, with a warning).
    pub fn new(settings: &AppsConfig, store: Option<AppStore>, saved: Vec<AppConfig>) -> Apps {
        let mut desired = BTreeMap::new();
        for spec in &settings.app {
            desired.insert(
                spec.name.clone(),
                Desired {
                    spec: spec.clone(),
                    source: Source::Config,
                    restart_epoch: 0,
                },
            );
        }
        for spec in saved {
            if desired.contains_key(&spec.name) {
                tracing::warn!(app = %spec.name, "Ignoring the saved API app: the configuration declares one of that name");
                continue;
            }
            desired.insert(
                spec.name.clone(),
                Desired {
                    spec,
                    source: Source::Api,
                    restart_epoch: 0,
                },
            );
        }
        let status = desired
            .keys()
            .map(|name| (name.clone(), AppStatus::pending()))
            .collect();
        let mut settings = settings.clone();
        settings.app.clear();
        Apps {
            inner: Arc::new(Inner {
                settings,
                desired: Mutex::new(desired),
                status: Mutex::new(status),
                engine: Mutex::new(Some("not contacted yet".into())),
                store,
                wake: Notify::new(),
                bus_url: None,
                event_order: AtomicU64::new(0),
                stored_failures: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// The FAILED apps `apps.db` remembers (call before sharing the handle).
    pub fn with_failures(self, failed: Vec<(String, store::Failure)>) -> Apps {
        *self
            .inner
            .stored_failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = failed.into_iter().collect();
        self
    }

    /// The FAILED apps remembered from before this start (once; later calls get nothing).
    pub(crate) fn take_stored_failures(&self) -> BTreeMap<String, store::Failure> {
        std::mem::take(
            &mut self
                .inner
                .stored_failures
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Remembers in `apps.db` that `name` FAILED, so a daemon restart keeps it FAILED. A failed
    /// write is logged: the app is FAILED for this run anyway.
    pub(crate) async fn remember_failure(&self, name: &str, failure: store::Failure) {
        if let Some(store) = &self.inner.store
            && let Err(e) = store.save_failure(name.to_owned(), failure).await
        {
            tracing::warn!(app = name, error = %e, "Could not record the FAILED state in apps.db; a daemon restart will start the app again");
        }
    }

    /// Forgets a remembered FAILED state of `name` (restarted, changed, deleted, running).
    pub(crate) async fn forget_failure(&self, name: &str) {
        if let Some(store) = &self.inner.store
            && let Err(e) = store.clear_failure(name.to_owned()).await
        {
            tracing::warn!(app = name, error = %e, "Could not clear the FAILED state in apps.db");
        }
    }

    /// Sets `OUTPOST_MQTT_URL` (call before sharing the handle).
    pub fn with_bus_url(mut self, url: Option<String>) -> Apps {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.bus_url = url;
        }
        self
    }

    pub fn bus_url(&self) -> Option<&str> {
        self.inner.bus_url.as_deref()
    }

    pub fn settings(&self) -> &AppsConfig {
        &self.inner.settings
    }

    fn desired_map<R>(&self, f: impl FnOnce(&mut BTreeMap<String, Desired>) -> R) -> R {
        f(&mut self
            .inner
            .desired
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
    }

    fn status_map<R>(&self, f: impl FnOnce(&mut BTreeMap<String, AppStatus>) -> R) -> R {
        f(&mut self
            .inner
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
    }

    /// A snapshot of the desired set.
    pub fn desired(&self) -> BTreeMap<String, Desired> {
        self.desired_map(|d| d.clone())
    }

    pub fn get(&self, name: &str) -> Option<(Desired, AppStatus)> {
        let desired = self.desired_map(|d| d.get(name).cloned())?;
        let status = self
            .status_map(|s| s.get(name).cloned())
            .unwrap_or_else(AppStatus::pending);
        Some((desired, status))
    }

    /// Every app with its status, by name.
    pub fn list(&self) -> Vec<(Desired, AppStatus)> {
        let desired = self.desired();
        desired
            .into_values()
            .map(|d| {
                let status = self
                    .status_map(|s| s.get(&d.spec.name).cloned())
                    .unwrap_or_else(AppStatus::pending);
                (d, status)
            })
            .collect()
    }

    /// Statuses only (for `/metrics` and the status document).
    pub fn statuses(&self) -> BTreeMap<String, AppStatus> {
        self.status_map(|s| s.clone())
    }

    /// Sets an app's status; a change of state, reason, exit code or restart count is also
    /// recorded in `apps.db` (`GET /api/v1/apps/{name}/events`), in the background.
    pub(crate) fn set_status(&self, name: &str, status: AppStatus) {
        let changed = self.status_map(|s| {
            let before = s.insert(name.to_owned(), status.clone());
            before.is_none_or(|b| {
                b.state != status.state
                    || b.reason != status.reason
                    || b.last_exit_code != status.last_exit_code
                    || b.restart_count != status.restart_count
            })
        });
        if let (true, Some(store)) = (changed, self.inner.store.clone()) {
            let event = store::AppEvent {
                at_ms: outpost_sync::outbox::now_unix_ms(),
                state: status.state.as_str().to_owned(),
                reason: status.reason,
                exit_code: status.last_exit_code,
                restarts: status.restart_count,
            };
            let name = name.to_owned();
            let order = self.inner.event_order.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                if let Err(e) = store.record(name, event, order).await {
                    tracing::warn!(error = %e, "Recording an app status change failed");
                }
            });
        }
    }

    /// The recorded status changes of `name`, newest first (empty without `apps.db`).
    pub async fn events(&self, name: &str) -> Result<Vec<store::AppEvent>, AppsError> {
        if !self.desired_map(|d| d.contains_key(name)) {
            return Err(AppsError::NotFound(name.to_owned()));
        }
        match &self.inner.store {
            Some(store) => Ok(store.events(name.to_owned()).await?),
            None => Ok(Vec::new()),
        }
    }

    pub(crate) fn forget_status(&self, name: &str) {
        self.status_map(|s| s.remove(name));
    }

    /// `None` while the engine answers, else why it does not.
    pub fn engine_problem(&self) -> Option<String> {
        self.inner
            .engine
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_engine_problem(&self, problem: Option<String>) {
        *self
            .inner
            .engine
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = problem;
    }

    fn check(&self, spec: &AppConfig) -> Result<(), AppsError> {
        let problems = spec.problems(&self.inner.settings.allowed_mount_root);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(AppsError::Invalid(problems))
        }
    }

    /// Adds an API app (persisted before it becomes desired).
    pub async fn create(&self, spec: AppConfig) -> Result<(), AppsError> {
        self.check(&spec)?;
        if self.desired_map(|d| d.contains_key(&spec.name)) {
            return Err(AppsError::Exists(spec.name));
        }
        if let Some(store) = &self.inner.store {
            store.save(spec.clone()).await?;
        }
        let name = spec.name.clone();
        self.desired_map(|d| {
            d.insert(
                name.clone(),
                Desired {
                    spec,
                    source: Source::Api,
                    restart_epoch: 0,
                },
            )
        });
        self.status_map(|s| s.insert(name, AppStatus::pending()));
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Replaces an API app's spec; its container is recreated.
    pub async fn replace(&self, spec: AppConfig) -> Result<(), AppsError> {
        self.check(&spec)?;
        match self.desired_map(|d| d.get(&spec.name).map(|d| d.source)) {
            None => return Err(AppsError::NotFound(spec.name)),
            Some(Source::Config) => return Err(AppsError::FromConfig(spec.name)),
            Some(Source::Api) => {}
        }
        if let Some(store) = &self.inner.store {
            store.save(spec.clone()).await?;
        }
        self.desired_map(|d| {
            if let Some(entry) = d.get_mut(&spec.name) {
                entry.spec = spec;
                entry.restart_epoch += 1;
            }
        });
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Removes an API app; its container is removed by the loop.
    pub async fn delete(&self, name: &str) -> Result<(), AppsError> {
        match self.desired_map(|d| d.get(name).map(|d| d.source)) {
            None => return Err(AppsError::NotFound(name.to_owned())),
            Some(Source::Config) => return Err(AppsError::FromConfig(name.to_owned())),
            Some(Source::Api) => {}
        }
        if let Some(store) = &self.inner.store {
            store.delete(name.to_owned()).await?;
        }
        self.desired_map(|d| d.remove(name));
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Restarts an app's container now, clearing a FAILED state.
    pub fn restart(&self, name: &str) -> Result<(), AppsError> {
        self.desired_map(|d| match d.get_mut(name) {
            Some(entry) => {
                entry.restart_epoch += 1;
                Ok(())
            }
            None => Err(AppsError::NotFound(name.to_owned())),
        })?;
        self.inner.wake.notify_one();
        Ok(())
    }

    pub(crate) async fn woken(&self) {
        self.inner.wake.notified().await;
    }
}
