//! Edge rules in the daemon: the engine in force ([`SharedEdge`], replaced by a reload), the
//! registry's facts for it, the task that closes aggregate windows, and carrying out what the
//! engine asks (storing alert and aggregate records, queueing commands).
//!
//! The rules themselves, and what each step does, are in `outpost-edge` (docs/EDGE.md).
//! [`crate::ingress::Ingest`] runs them on every reading of a device protocol or a driver.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use outpost_config::{EdgeConfig, EdgeRule};
use outpost_edge::{Effects, Engine};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use tokio_util::sync::CancellationToken;

use crate::ingress::Ingest;
use crate::registry::Registry;

/// How often windows whose time is up are closed.
const TICK: Duration = Duration::from_secs(1);

/// The `[edge]` rules in force, shared by ingestion, the window task, the API and the
/// metrics; a reload replaces the engine as a whole.
#[derive(Debug, Clone)]
pub struct SharedEdge(Arc<RwLock<Arc<Engine>>>);

impl SharedEdge {
    pub fn new(engine: Engine) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(engine))))
    }

    /// The engine in force now.
    pub fn load(&self) -> Arc<Engine> {
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts `engine` in force and returns the one it replaces; raised alerts of unchanged
    /// rules carry over. The caller stores the old engine's flushed windows.
    pub fn replace(&self, engine: Engine) -> Arc<Engine> {
        let mut slot = self.0.write().unwrap_or_else(PoisonError::into_inner);
        engine.adopt(&slot);
        std::mem::replace(&mut *slot, Arc::new(engine))
    }
}

/// What the API needs to read and change the rules.
#[derive(Debug, Clone)]
pub struct EdgeControl {
    pub rules: EdgeRules,
    /// Stores the open windows of an engine a change replaces.
    pub ingest: Ingest,
}

/// The file in the data directory holding the rules created through the API.
pub const API_RULES_FILE: &str = "edge-rules.json";

/// Where a rule comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleSource {
    /// `[[edge.rules]]` in the configuration file: changed by editing it and reloading.
    Config,
    /// Created through `PUT /api/v1/edge/rules/{name}`; kept in [`API_RULES_FILE`].
    Api,
}

/// Why a rule change through the API was refused.
#[derive(Debug)]
pub enum RuleChangeError {
    /// The rule is invalid: (key under the rule, message), every problem.
    Invalid(Vec<(String, String)>),
    /// The name belongs to a rule of the configuration file.
    InConfig(String),
    NotFound(String),
    /// The rules file could not be written; nothing changed.
    Storage(String),
}

/// The rules in force: the configuration's `[[edge.rules]]`, then those created through the API
/// (in creation order, a replaced one keeping its place). Every change — an API call or a reload
/// — compiles the whole list into a new engine and puts it in force ([`SharedEdge::replace`]);
/// the API rules are written to [`API_RULES_FILE`] (a temporary file renamed over it) before.
#[derive(Debug, Clone)]
pub struct EdgeRules {
    shared: SharedEdge,
    file: PathBuf,
    state: Arc<Mutex<Managed>>,
}

#[derive(Debug)]
struct Managed {
    config: EdgeConfig,
    api: Vec<EdgeRule>,
}

impl Managed {
    /// The configuration's section with the API rules appended.
    fn effective(&self) -> EdgeConfig {
        let mut edge = self.config.clone();
        edge.rules.extend(self.api.iter().cloned());
        edge
    }
}

impl EdgeRules {
    /// Loads the API rules of `data_dir` and compiles them with `config`'s. An API rule whose
    /// name the configuration now uses, or that no longer compiles, is left out with an error
    /// in the log (and stays in the file until deleted or replaced through the API).
    pub fn open(config: &EdgeConfig, data_dir: &Path) -> anyhow::Result<Self> {
        let file = data_dir.join(API_RULES_FILE);
        let mut api: Vec<EdgeRule> = match std::fs::read(&file) {
            Ok(bytes) => {
                let stored: StoredRules = serde_json::from_slice(&bytes).map_err(|e| {
                    anyhow::anyhow!("{} is not a valid rules file: {e}", file.display())
                })?;
                stored.rules
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", file.display())),
        };
        api.retain(|rule| {
            let clash = config.rules.iter().any(|c| c.name == rule.name);
            if clash {
                tracing::error!(rule = %rule.name, "An API edge rule has the name of a rule in the config file; the config file's is used");
            }
            !clash
        });
        let mut managed = Managed {
            config: config.clone(),
            api,
        };
        let engine = loop {
            match Engine::compile(&managed.effective()) {
                Ok(engine) => break engine,
                Err(problems) => {
                    // Only API rules can fail here (the config was checked when loaded): drop
                    // the first one named in a problem and try again.
                    let first = config.rules.len();
                    let bad = problems
                        .iter()
                        .find_map(|(path, _)| rule_index(path))
                        .filter(|i| *i >= first);
                    match bad {
                        Some(i) => {
                            let rule = managed.api.remove(i - first);
                            tracing::error!(rule = %rule.name, ?problems, "An API edge rule no longer compiles and is left out");
                        }
                        None => anyhow::bail!("[edge] rules: {problems:?}"),
                    }
                }
            }
        };
        Ok(Self {
            shared: SharedEdge::new(engine),
            file,
            state: Arc::new(Mutex::new(managed)),
        })
    }

    /// The engine in force, shared.
    pub fn shared(&self) -> &SharedEdge {
        &self.shared
    }

    /// Every rule in force, in order, with where it comes from.
    pub fn list(&self) -> Vec<(EdgeRule, RuleSource)> {
        let state = self.lock();
        state
            .config
            .rules
            .iter()
            .map(|r| (r.clone(), RuleSource::Config))
            .chain(state.api.iter().map(|r| (r.clone(), RuleSource::Api)))
            .collect()
    }

    /// Creates or replaces the API rule `rule.name`; `Ok(true)` when created. In force for the
    /// next reading; the replaced engine's open windows are stored (incomplete) by `ingest`.
    pub async fn put(
        &self,
        rule: EdgeRule,
        ingest: &crate::ingress::Ingest,
    ) -> Result<bool, RuleChangeError> {
        let (old, created) = {
            let mut state = self.lock();
            if state.config.rules.iter().any(|r| r.name == rule.name) {
                return Err(RuleChangeError::InConfig(rule.name));
            }
            let mut api = state.api.clone();
            let created = match api.iter_mut().find(|r| r.name == rule.name) {
                Some(slot) => {
                    *slot = rule;
                    false
                }
                None => {
                    api.push(rule);
                    true
                }
            };
            (self.apply(&mut state, api)?, created)
        };
        ingest.carry_out(old.flush()).await;
        Ok(created)
    }

    /// Deletes the API rule `name`.
    pub async fn delete(
        &self,
        name: &str,
        ingest: &crate::ingress::Ingest,
    ) -> Result<(), RuleChangeError> {
        let old = {
            let mut state = self.lock();
            if state.config.rules.iter().any(|r| r.name == name) {
                return Err(RuleChangeError::InConfig(name.to_owned()));
            }
            if !state.api.iter().any(|r| r.name == name) {
                return Err(RuleChangeError::NotFound(name.to_owned()));
            }
            let api: Vec<EdgeRule> = state
                .api
                .iter()
                .filter(|r| r.name != name)
                .cloned()
                .collect();
            self.apply(&mut state, api)?
        };
        ingest.carry_out(old.flush()).await;
        Ok(())
    }

    /// Puts a reloaded configuration's `[edge]` in force with the API rules; `Ok(false)` when
    /// it did not change. An API rule whose name the file now uses makes the reload fail.
    pub async fn reload(
        &self,
        config: &EdgeConfig,
        ingest: &crate::ingress::Ingest,
    ) -> Result<bool, Vec<(String, String)>> {
        let old = {
            let mut state = self.lock();
            if state.config == *config {
                return Ok(false);
            }
            if let Some(clash) = state
                .api
                .iter()
                .find(|a| config.rules.iter().any(|c| c.name == a.name))
            {
                return Err(vec![(
                    "edge.rules".to_owned(),
                    format!(
                        "\"{}\" is also the name of a rule created through the API: delete that one first (DELETE /api/v1/edge/rules/{})",
                        clash.name, clash.name
                    ),
                )]);
            }
            let candidate = Managed {
                config: config.clone(),
                api: state.api.clone(),
            };
            let engine = Engine::compile(&candidate.effective())?;
            state.config = config.clone();
            self.shared.replace(engine)
        };
        ingest.carry_out(old.flush()).await;
        Ok(true)
    }

    /// Checks and compiles the rules with `api` as the API rules, writes them, and puts the
    /// engine in force; returns the replaced engine.
    fn apply(
        &self,
        state: &mut Managed,
        api: Vec<EdgeRule>,
    ) -> Result<Arc<Engine>, RuleChangeError> {
        let candidate = Managed {
            config: state.config.clone(),
            api,
        };
        let edge = candidate.effective();
        let first_api = state.config.rules.len();
        // The structural checks of the config crate, on a config holding only this section.
        let config = outpost_config::Config {
            edge: edge.clone(),
            ..outpost_config::Config::default()
        };
        let structural: Vec<(String, String)> = config
            .validate()
            .into_iter()
            .map(|p| (p.path, p.message))
            .collect();
        let compiled = if structural.is_empty() {
            Engine::compile(&edge)
        } else {
            Err(structural)
        };
        let engine = compiled.map_err(|problems| {
            // Only the API rules changed: report their problems under the rule's own keys.
            let relative = problems
                .into_iter()
                .map(|(path, message)| match rule_index(&path) {
                    Some(i) if i >= first_api => {
                        let key = path.split_once("].").map_or("", |(_, k)| k).to_owned();
                        (key, message)
                    }
                    _ => (path, message),
                })
                .collect();
            RuleChangeError::Invalid(relative)
        })?;
        write_rules(&self.file, &candidate.api)
            .map_err(|e| RuleChangeError::Storage(e.to_string()))?;
        state.api = candidate.api;
        Ok(self.shared.replace(engine))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Managed> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct StoredRules {
    rules: Vec<EdgeRule>,
}

/// `N` of a key path `edge.rules[N]…`.
fn rule_index(path: &str) -> Option<usize> {
    let rest = path.strip_prefix("edge.rules[")?;
    rest.split_once(']')?.0.parse().ok()
}

/// Writes the API rules: a temporary file, synced, renamed over the old one.
fn write_rules(file: &Path, rules: &[EdgeRule]) -> std::io::Result<()> {
    use std::io::Write as _;
    let text = serde_json::to_vec_pretty(&StoredRules {
        rules: rules.to_vec(),
    })
    .map_err(std::io::Error::other)?;
    let tmp = file.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&text)?;
    f.sync_all()?;
    std::fs::rename(&tmp, file)?;
    if let Some(dir) = file.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Closes aggregate windows as their time is up, until `stop`; then closes the rest (marked
/// incomplete) and stores them, so a clean stop loses no aggregate.
pub async fn run(ingest: Ingest, edge: SharedEdge, stop: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let engine = edge.load();
        let effects = engine.tick(u64::try_from(outpost_sync::outbox::now_unix_ms()).unwrap_or(0));
        ingest.carry_out(effects).await;
    }
    let effects = edge.load().flush();
    let windows = effects.records.len();
    ingest.carry_out(effects).await;
    if windows > 0 {
        tracing::info!(
            windows,
            "Stored the open aggregate windows (incomplete) at shutdown"
        );
    }
}

/// What a carried-out effect needs from the registry: commands.
pub async fn queue_commands(registry: &Registry, effects: &Effects) {
    for c in &effects.commands {
        match registry.queue_command(&c.device_id, &c.payload, None).await {
            Ok(command) => tracing::info!(
                rule = %c.rule,
                device = %c.device_id,
                command = command.id,
                "Edge rule queued a command"
            ),
            Err(e) => tracing::warn!(
                rule = %c.rule,
                device = %c.device_id,
                error = %e,
                "Edge rule could not queue its command"
            ),
        }
    }
}

/// `outpost_edge_*` metrics, read from the engine in force at each scrape.
#[derive(Debug)]
pub struct EdgeMetrics(pub SharedEdge);

impl Collector for EdgeMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        use std::sync::atomic::Ordering::Relaxed;
        let engine = self.0.load();
        type Read = fn(&outpost_edge::RuleStats) -> u64;
        let per_rule: [(&str, &str, Read); 8] = [
            (
                "outpost_edge_matched",
                "Readings a rule applied to (its when true)",
                |s| s.matched,
            ),
            (
                "outpost_edge_refused",
                "Readings refused by a rule's schema",
                |s| s.refused,
            ),
            (
                "outpost_edge_dead_lettered",
                "Readings a rule's schema sent to edge.invalid_topic",
                |s| s.dead_lettered,
            ),
            (
                "outpost_edge_transformed",
                "Readings a rule's rename, drop or set changed",
                |s| s.transformed,
            ),
            (
                "outpost_edge_errors",
                "Expression failures (a missing field, a type mismatch)",
                |s| s.errors,
            ),
            ("outpost_edge_alerts_raised", "Alerts raised", |s| s.raised),
            ("outpost_edge_alerts_cleared", "Alerts cleared", |s| {
                s.cleared
            }),
            (
                "outpost_edge_aggregates",
                "Aggregate records emitted",
                |s| s.aggregates,
            ),
        ];
        for (name, help, read) in per_rule {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (rule, stats) in engine.rule_stats() {
                let labels = [("rule", rule)];
                ConstCounter::new(read(&stats)).encode(family.encode_family(&labels)?)?;
            }
        }
        let stats = engine.stats();
        for (name, help, value) in [
            (
                "outpost_edge_window_keys_refused",
                "Readings not aggregated: edge.max_window_keys windows were open",
                stats.window_keys_refused.load(Relaxed),
            ),
            (
                "outpost_edge_alert_keys_refused",
                "Readings not tracked for an alert: edge.max_alert_keys states were held",
                stats.alert_keys_refused.load(Relaxed),
            ),
        ] {
            ConstCounter::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        let gauges = [
            (
                "outpost_edge_windows_open",
                "Aggregate windows open now",
                engine.open_windows() as i64,
            ),
            (
                "outpost_edge_alerts_active",
                "Alerts raised now",
                engine.active_alerts().len() as i64,
            ),
        ];
        for (name, help, value) in gauges {
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}
