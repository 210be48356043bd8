//! The reconcile loop (task `apps`): every [`TICK`], or at once when the desired set changes,
//! compares the desired apps with the engine's managed containers and acts:
//!
//! ```text
//!  no engine ──connect ok──> reconciling ──engine error──> no engine (apps INACTIVE, retry 1s…10s)
//!  per app:  missing ─create+start─> running ─exits─> backing off ─start─> running
//!                                              └─ N fast failures / retries used / policy ─> stopped (FAILED or INACTIVE)
//! ```
//!
//! A fast failure is an exit within `apps.crash_loop_window` of the start; the pause before a
//! restart doubles from 250ms per consecutive fast failure up to `apps.restart_backoff_max`.
//! FAILED is remembered in `apps.db` with the digest of the spec that failed: after a daemon
//! restart the app is adopted as FAILED (its container is neither restarted nor recreated)
//! until it is restarted through the API or its spec changes.
//! Errors of one app (image missing, create refused) are shown on that app and retried with
//! the same backoff; they never stop the loop.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use outpost_config::{AppConfig, RestartPolicy};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::engine::{Engine, EngineError, Observed};
use super::store::Failure;
use super::{AppState, AppStatus, Apps};
use crate::registry::{ListQuery, NewDevice, Protocol, Registry};
use crate::status::StatusBoard;

/// How often the engine is looked at when nothing wakes the loop. Bounds how long a killed
/// container stays down before it is noticed.
pub const TICK: Duration = Duration::from_millis(250);
/// First pause before a restart; doubles per consecutive fast failure.
const BACKOFF_START: Duration = Duration::from_millis(250);
/// Reconnect pauses while the engine is unreachable.
const RECONNECT_MIN: Duration = Duration::from_secs(1);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// The loop's memory of one app (what the engine cannot tell it).
#[derive(Debug, Default)]
struct Runtime {
    /// Instant the loop last started the container (or first saw it running).
    started: Option<Instant>,
    /// `finished_at` of the last exit already handled.
    handled_exit: Option<String>,
    consecutive_fast: u32,
    retries: u32,
    restarts: u64,
    last_exit: Option<i64>,
    /// Set once the app is given up on: FAILED or stopped by its policy.
    stopped: Option<(AppState, String)>,
    next_attempt: Option<Instant>,
    /// Attempts to create that failed in a row (image missing, create refused).
    create_failures: u32,
    last_error: Option<String>,
    epoch: u64,
}

impl Runtime {
    /// Given up on as FAILED (remembered in `apps.db`).
    fn failed(&self) -> bool {
        matches!(self.stopped, Some((AppState::Failed, _)))
    }
}

pub async fn run(apps: Apps, registry: Registry, board: StatusBoard, stop: CancellationToken) {
    let mut runtimes = adopt_failures(&apps).await;
    let mut reconnect = outpost_pacing::Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
    let socket = apps.settings().engine_socket.clone();
    let mut engine: Option<Engine> = None;
    // The desired names the bus identities were last swept against.
    let mut swept: Option<BTreeSet<String>> = None;
    loop {
        let names: BTreeSet<String> = apps.desired().into_keys().collect();
        if swept.as_ref() != Some(&names) {
            remove_stale_identities(&registry, &names).await;
            swept = Some(names);
        }
        let current = match &engine {
            Some(e) => e.clone(),
            None => match tokio::select! {
                () = stop.cancelled() => return,
                connected = Engine::connect(&socket) => connected,
            } {
                Ok(e) => {
                    tracing::info!(socket = %socket.display(), "Container engine reachable");
                    reconnect.reset();
                    apps.set_engine_problem(None);
                    board.active("apps", false);
                    engine = Some(e.clone());
                    e
                }
                Err(e) => {
                    engine_down(&apps, &board, &e, &mut runtimes);
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(reconnect.failed()) => {}
                    }
                    continue;
                }
            },
        };
        let mut pass = Pass {
            apps: &apps,
            registry: &registry,
            engine: &current,
            runtimes: &mut runtimes,
        };
        // An engine call can take up to its timeout: shutdown does not wait for it.
        let result = tokio::select! {
            () = stop.cancelled() => return,
            result = pass.run() => result,
        };
        if let Err(e) = result {
            engine_down(&apps, &board, &e, &mut runtimes);
            engine = None;
            continue;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = apps.woken() => {}
            () = tokio::time::sleep(TICK) => {}
        }
    }
}

/// The apps that were FAILED when the daemon last ran stay FAILED: their runtime starts as
/// given up on, with the exit that failed them already handled, so the loop neither restarts
/// the exited container nor creates a new one. A remembered failure whose spec changed since
/// (a config edit) or whose app is gone is forgotten instead.
async fn adopt_failures(apps: &Apps) -> HashMap<String, Runtime> {
    let desired = apps.desired();
    let mut runtimes = HashMap::new();
    for (name, failure) in apps.take_stored_failures() {
        match desired.get(&name) {
            Some(d) if spec_digest(&d.spec) == failure.spec_digest => {
                tracing::warn!(app = %name, reason = %failure.reason, "App FAILED before the daemon restarted; not starting it until it is restarted through the API or its spec changes");
                runtimes.insert(
                    name,
                    Runtime {
                        handled_exit: failure.finished_at,
                        restarts: failure.restarts,
                        last_exit: failure.exit_code,
                        stopped: Some((AppState::Failed, failure.reason)),
                        epoch: d.restart_epoch,
                        ..Runtime::default()
                    },
                );
            }
            _ => apps.forget_failure(&name).await,
        }
    }
    runtimes
}

fn engine_down(
    apps: &Apps,
    board: &StatusBoard,
    e: &EngineError,
    runtimes: &mut HashMap<String, Runtime>,
) {
    let reason = format!("no container engine: {e}");
    if apps.engine_problem().as_deref() != Some(reason.as_str()) {
        tracing::warn!(error = %e, "Container engine unreachable; apps are INACTIVE until it answers");
    }
    apps.set_engine_problem(Some(reason.clone()));
    board.inactive("apps", reason.clone(), false);
    for (name, desired) in apps.desired() {
        let rt = runtimes.entry(name.clone()).or_default();
        // The containers' fate is unknown: start over once the engine is back.
        rt.started = None;
        rt.epoch = desired.restart_epoch;
        apps.set_status(
            &name,
            status_of(rt, AppState::Inactive, Some(reason.clone()), None),
        );
    }
}

fn status_of(
    rt: &Runtime,
    state: AppState,
    reason: Option<String>,
    observed: Option<&Observed>,
) -> AppStatus {
    AppStatus {
        state,
        reason,
        container_id: observed.map(|o| o.id.clone()),
        started_at: observed.and_then(|o| o.started_at.clone()),
        restart_count: rt.restarts,
        last_exit_code: rt.last_exit,
        health: observed.and_then(|o| o.health.clone()),
    }
}

/// Digest of an app's spec, stored as a label: a different digest means "recreate".
pub fn spec_digest(spec: &AppConfig) -> String {
    let text = serde_json::to_string(spec).unwrap_or_default();
    let digest = Sha256::digest(text.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Pause before attempt `failures` (1-based): 250ms doubling, at most `max`.
fn backoff(max: Duration, failures: u32) -> Duration {
    outpost_pacing::Backoff::nth(BACKOFF_START, max, failures)
}

struct Pass<'a> {
    apps: &'a Apps,
    registry: &'a Registry,
    engine: &'a Engine,
    runtimes: &'a mut HashMap<String, Runtime>,
}

impl Pass<'_> {
    /// One comparison of desired and actual. Only an unreachable engine is an error.
    async fn run(&mut self) -> Result<(), EngineError> {
        let desired = self.apps.desired();
        let observed = self.engine.managed().await?;
        let mut by_app: BTreeMap<String, Observed> = BTreeMap::new();
        for obs in observed {
            let keep = desired
                .get(&obs.app)
                .is_some_and(|d| spec_digest(&d.spec) == obs.spec)
                && !by_app.contains_key(&obs.app);
            if keep {
                by_app.insert(obs.app.clone(), obs);
            } else {
                tracing::info!(app = %obs.app, container = %obs.id, "Removing a container that is no longer declared (or out of date)");
                self.remove(&obs.app, &obs.id).await?;
                if !desired.contains_key(&obs.app) {
                    self.runtimes.remove(&obs.app);
                    self.apps.forget_status(&obs.app);
                }
            }
        }
        // Apps removed while nothing ran for them.
        let gone: Vec<String> = self
            .runtimes
            .keys()
            .filter(|name| !desired.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(rt) = self.runtimes.remove(&name)
                && rt.failed()
            {
                self.apps.forget_failure(&name).await;
            }
        }
        for name in self.apps.statuses().into_keys() {
            if !desired.contains_key(&name) {
                self.apps.forget_status(&name);
            }
        }
        for (name, d) in desired {
            let mut obs = by_app.remove(&name);
            let rt = self.runtimes.entry(name.clone()).or_default();
            if rt.epoch != d.restart_epoch {
                // An explicit restart (or a replaced spec): start afresh.
                rt.epoch = d.restart_epoch;
                if rt.failed() {
                    self.apps.forget_failure(&name).await;
                }
                let rt = self.runtimes.entry(name.clone()).or_default();
                rt.stopped = None;
                rt.consecutive_fast = 0;
                rt.retries = 0;
                rt.next_attempt = None;
                if let Some(o) = obs.take() {
                    self.remove(&name, &o.id).await?;
                    let rt = self.runtimes.entry(name.clone()).or_default();
                    rt.restarts += 1;
                }
            }
            self.app(&d.spec, obs).await?;
        }
        Ok(())
    }

    async fn remove(&self, app: &str, id: &str) -> Result<(), EngineError> {
        match self.engine.remove(app, id).await {
            Err(e @ EngineError::Unreachable { .. }) => Err(e),
            Err(e) => {
                tracing::warn!(app, error = %e, "Could not remove a container; retrying next pass");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    async fn app(&mut self, spec: &AppConfig, obs: Option<Observed>) -> Result<(), EngineError> {
        let now = Instant::now();
        let window = self.apps.settings().crash_loop_window;
        let limit = self.apps.settings().crash_loop_failures;
        let name = spec.name.as_str();
        let Some(obs) = obs else {
            return self.create(spec, now).await;
        };
        let rt = self.runtimes.entry(name.to_owned()).or_default();
        if obs.running {
            if rt.failed() {
                // Started by someone else (e.g. `docker start`): it is not FAILED any more.
                self.apps.forget_failure(name).await;
            }
            let rt = self.runtimes.entry(name.to_owned()).or_default();
            let started = *rt.started.get_or_insert(now);
            if now.duration_since(started) >= window {
                rt.consecutive_fast = 0;
            }
            rt.stopped = None;
            let status = status_of(rt, AppState::Active, None, Some(&obs));
            self.apps.set_status(name, status);
            return Ok(());
        }
        // Exited. Handle each exit once.
        if rt.handled_exit != obs.finished_at {
            rt.handled_exit = obs.finished_at.clone();
            rt.last_exit = obs.exit_code;
            let code = obs.exit_code.unwrap_or(-1);
            let fast = rt.started.is_none_or(|s| now.duration_since(s) < window);
            rt.consecutive_fast = if fast { rt.consecutive_fast + 1 } else { 0 };
            rt.started = None;
            let verdict = match spec.restart {
                RestartPolicy::Never => Some((
                    AppState::Inactive,
                    format!("exited with code {code}; restart = \"never\""),
                )),
                RestartPolicy::OnFailure if code == 0 => Some((
                    AppState::Inactive,
                    "exited with code 0; restart = \"on-failure\"".to_owned(),
                )),
                RestartPolicy::OnFailure if rt.retries >= spec.max_retries => Some((
                    AppState::Failed,
                    format!(
                        "exited with code {code} after {} retries (max_retries = {})",
                        rt.retries, spec.max_retries
                    ),
                )),
                _ if rt.consecutive_fast >= limit => Some((
                    AppState::Failed,
                    format!(
                        "crash loop: {} fast failures in a row (each within {window:?} of its start), last exit code {code}",
                        rt.consecutive_fast
                    ),
                )),
                _ => None,
            };
            match verdict {
                Some((state, reason)) => {
                    rt.stopped = Some((state, reason.clone()));
                    rt.next_attempt = None;
                    if state == AppState::Failed {
                        tracing::error!(app = name, exit_code = code, reason = %reason, "App FAILED; not restarting it");
                        let failure = Failure {
                            spec_digest: spec_digest(spec),
                            reason,
                            exit_code: obs.exit_code,
                            finished_at: obs.finished_at.clone(),
                            restarts: rt.restarts,
                        };
                        self.apps.remember_failure(name, failure).await;
                    } else {
                        tracing::info!(app = name, exit_code = code, "App stopped");
                    }
                }
                None => {
                    let pause = backoff(
                        self.apps.settings().restart_backoff_max,
                        rt.consecutive_fast.max(1),
                    );
                    let rt = self.runtimes.entry(name.to_owned()).or_default();
                    tracing::warn!(
                        app = name,
                        exit_code = code,
                        pause_ms = pause.as_millis() as u64,
                        "App exited; restarting it"
                    );
                    rt.next_attempt = Some(now + pause);
                }
            }
        }
        let rt = self.runtimes.entry(name.to_owned()).or_default();
        if let Some((state, reason)) = rt.stopped.clone() {
            let status = status_of(rt, state, Some(reason), Some(&obs));
            self.apps.set_status(name, status);
            return Ok(());
        }
        let code = obs.exit_code.unwrap_or(-1);
        if rt.next_attempt.is_some_and(|at| now >= at) {
            match self.engine.start(name, &obs.id).await {
                Ok(()) => {
                    rt.restarts += 1;
                    rt.retries += 1;
                    rt.started = Some(now);
                    rt.next_attempt = None;
                    let status = status_of(rt, AppState::Active, None, Some(&obs));
                    self.apps.set_status(name, status);
                }
                Err(e @ EngineError::Unreachable { .. }) => return Err(e),
                Err(e) => {
                    rt.next_attempt = Some(
                        now + backoff(
                            self.apps.settings().restart_backoff_max,
                            rt.consecutive_fast.max(1),
                        ),
                    );
                    let status = status_of(rt, AppState::Inactive, Some(e.to_string()), Some(&obs));
                    self.apps.set_status(name, status);
                }
            }
        } else {
            let status = status_of(
                rt,
                AppState::Inactive,
                Some(format!("exited with code {code}; restarting")),
                Some(&obs),
            );
            self.apps.set_status(name, status);
        }
        Ok(())
    }

    /// No container: create one (unless given up on or backing off).
    async fn create(&mut self, spec: &AppConfig, now: Instant) -> Result<(), EngineError> {
        let name = spec.name.as_str();
        let rt = self.runtimes.entry(name.to_owned()).or_default();
        if let Some((state, reason)) = rt.stopped.clone() {
            self.apps
                .set_status(name, status_of(rt, state, Some(reason), None));
            return Ok(());
        }
        if rt.next_attempt.is_some_and(|at| now < at) {
            let reason = rt.last_error.clone();
            self.apps
                .set_status(name, status_of(rt, AppState::Inactive, reason, None));
            return Ok(());
        }
        let result = async {
            self.engine
                .ensure_image(spec, self.apps.settings().pull)
                .await?;
            let env = match credentials(self.registry, name).await {
                Ok(mut env) => {
                    if let Some(url) = self.apps.bus_url() {
                        env.push(format!("OUTPOST_MQTT_URL={url}"));
                    }
                    env
                }
                Err(reason) => return Ok(Err(reason)),
            };
            self.engine
                .create_and_start(spec, &spec_digest(spec), env)
                .await
                .map(Ok)
        }
        .await;
        let rt = self.runtimes.entry(name.to_owned()).or_default();
        let failure = match result {
            Ok(Ok(id)) => {
                tracing::info!(app = name, container = %id, image = %spec.image, "App container started");
                rt.started = Some(now);
                rt.create_failures = 0;
                rt.last_error = None;
                rt.next_attempt = None;
                let status = AppStatus {
                    container_id: Some(id),
                    ..status_of(rt, AppState::Active, None, None)
                };
                self.apps.set_status(name, status);
                return Ok(());
            }
            Ok(Err(reason)) => reason,
            Err(e @ EngineError::Unreachable { .. }) => return Err(e),
            Err(e) => e.to_string(),
        };
        rt.create_failures += 1;
        let pause = backoff(self.apps.settings().restart_backoff_max, rt.create_failures);
        let rt = self.runtimes.entry(name.to_owned()).or_default();
        if rt.last_error.as_deref() != Some(failure.as_str()) {
            tracing::warn!(app = name, error = %failure, retry_ms = pause.as_millis() as u64, "Could not start the app");
        }
        rt.next_attempt = Some(now + pause);
        rt.last_error = Some(failure.clone());
        self.apps
            .set_status(name, status_of(rt, AppState::Inactive, Some(failure), None));
        Ok(())
    }
}

/// Deletes the bus identities (`app-<name>` devices tagged [`super::DEVICE_TAG`]) of apps that
/// are no longer desired, so a deleted app's credentials stop working (its open MQTT
/// connection is closed by the server's registry re-check). Failures are logged and retried at
/// the next change.
async fn remove_stale_identities(registry: &Registry, desired: &BTreeSet<String>) {
    let mut query = ListQuery {
        tag: Some(super::DEVICE_TAG.to_owned()),
        limit: crate::registry::MAX_PAGE,
        ..ListQuery::default()
    };
    let mut stale = Vec::new();
    loop {
        let page = match registry.list(&query) {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(error = %e, "Could not list app bus identities");
                return;
            }
        };
        stale.extend(page.devices.into_iter().map(|d| d.id).filter(|id| {
            id.strip_prefix("app-")
                .is_some_and(|n| !desired.contains(n))
        }));
        match page.next_cursor {
            Some(next) => query.cursor = Some(next),
            None => break,
        }
    }
    for id in stale {
        match registry.delete(&id).await {
            Ok(()) => tracing::info!(device = %id, "Removed the bus identity of a deleted app"),
            Err(e) => {
                tracing::warn!(device = %id, error = %e, "Could not remove an app's bus identity")
            }
        }
    }
}

/// The app's bus identity: registry device `app-<name>` (created with protocol mqtt if
/// missing), with a fresh secret each time a container is created. Returns the environment.
async fn credentials(registry: &Registry, app: &str) -> Result<Vec<String>, String> {
    let id = format!("app-{app}");
    let result = if registry.get(&id).is_some() {
        registry.rotate_secret(&id).await
    } else {
        registry
            .create(NewDevice {
                id: id.clone(),
                name: format!("app {app}"),
                model: String::new(),
                batch: String::new(),
                firmware: String::new(),
                location: String::new(),
                tags: vec![super::DEVICE_TAG.into()],
                enabled: true,
                protocols: vec![Protocol::Mqtt],
                mqtt_publish: None,
                mqtt_subscribe: None,
            })
            .await
    };
    let (_, secret) = result.map_err(|e| format!("creating bus credentials ({id}): {e}"))?;
    Ok(vec![
        format!("OUTPOST_APP={app}"),
        format!("OUTPOST_DEVICE_ID={id}"),
        format!("OUTPOST_DEVICE_SECRET={secret}"),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let max = Duration::from_secs(2);
        let pauses: Vec<u128> = (1..=6).map(|n| backoff(max, n).as_millis()).collect();
        assert_eq!(pauses, [250, 500, 1000, 2000, 2000, 2000]);
        assert_eq!(backoff(max, u32::MAX), max);
    }

    #[test]
    fn spec_digest_follows_the_spec() {
        let a = AppConfig {
            name: "a".into(),
            image: "i:1".into(),
            ..AppConfig::default()
        };
        let mut b = a.clone();
        assert_eq!(spec_digest(&a), spec_digest(&b));
        b.env.push("X=1".into());
        assert_ne!(spec_digest(&a), spec_digest(&b));
        assert_eq!(spec_digest(&a).len(), 16);
    }

    #[test]
    fn container_body_has_labels_limits_mounts_ports() {
        let app = AppConfig {
            name: "f".into(),
            image: "i:1".into(),
            env: vec!["A=1".into()],
            mounts: vec!["/srv/f:/data:ro".into()],
            ports: vec!["8081:80/udp".into()],
            memory: Some(outpost_config::ByteSize::mib(64)),
            cpus: Some(0.5),
            ..AppConfig::default()
        };
        let body = super::super::engine::container_body(&app, "d1", vec!["OUTPOST_APP=f".into()]);
        let labels = body.labels.unwrap();
        assert_eq!(labels[super::super::LABEL_MANAGED], "true");
        assert_eq!(labels[super::super::LABEL_APP], "f");
        assert_eq!(labels[super::super::LABEL_SPEC], "d1");
        assert_eq!(body.env.unwrap(), ["A=1", "OUTPOST_APP=f"]);
        let host = body.host_config.unwrap();
        assert_eq!(host.memory, Some(64 * 1024 * 1024));
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.binds.unwrap(), ["/srv/f:/data:ro"]);
        let ports = host.port_bindings.unwrap();
        assert_eq!(
            ports["80/udp"].as_ref().unwrap()[0].host_port.as_deref(),
            Some("8081")
        );
        // The engine never restarts by itself.
        assert!(host.restart_policy.is_none());
    }
}
