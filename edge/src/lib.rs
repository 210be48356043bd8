//! Edge rules (`[[edge.rules]]`): what the gateway does with a reading between the device and
//! the outbox — validate, transform, enrich, aggregate, alert (docs/EDGE.md).
//!
//! Two phases, so that only stored readings count:
//!
//! 1. [`Engine::prepare`], before the outbox commit, pure: decodes the payload once
//!    ([`value`]), runs each matching rule in file order — its schema (refusing the reading or
//!    marking it for the dead-letter topic), its transforms and enrichment (the next rule sees
//!    the result) — and evaluates what the stateful steps need (alert conditions, aggregated
//!    values). A reading no rule transforms keeps its raw bytes.
//! 2. [`Engine::observe`], after the commit: feeds those values to the windows and alert
//!    states and returns what to do — records to store (alerts, closed windows) and commands to
//!    queue. [`Engine::tick`] closes windows whose time is up.
//!
//! The engine does no I/O: the daemon stores the records and queues the commands. Windows and
//! alert states live in memory, bounded by `edge.max_window_keys` / `edge.max_alert_keys`.

pub mod expr;
mod fast;
pub mod value;
mod window;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use outpost_config::matching::{glob_matches, topic_matches};
use outpost_config::{Aggregation, DeviceFact, EdgeConfig, EdgeRule, EnrichInto, OnInvalid};
use serde_json::{Map, Value, json};

use expr::{Expr, Scope};
use value::Decoded;
use window::Windows;

/// Registry facts about a device, for conditions (`device.*`) and enrichment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFacts {
    pub name: Option<String>,
    pub model: Option<String>,
    pub location: Option<String>,
    pub firmware: Option<String>,
    pub tags: Vec<String>,
}

impl DeviceFacts {
    fn get(&self, fact: DeviceFact) -> Option<Value> {
        let text = |v: &Option<String>| v.as_ref().map(|s| Value::String(s.clone()));
        match fact {
            DeviceFact::Name => text(&self.name),
            DeviceFact::Model => text(&self.model),
            DeviceFact::Location => text(&self.location),
            DeviceFact::Firmware => text(&self.firmware),
            DeviceFact::Tags => Some(json!(self.tags)),
        }
    }
}

/// Where the engine looks devices up (the registry).
pub trait Facts: Send + Sync {
    fn facts(&self, device_id: &str) -> Option<DeviceFacts>;
}

/// One reading as it arrives.
#[derive(Debug, Clone, Copy)]
pub struct Reading<'a> {
    pub device_id: &'a str,
    /// `mqtt`, `coap`, `http` or `driver`.
    pub source: &'a str,
    pub topic: &'a str,
    pub content_type: Option<&'a str>,
    pub payload: &'a [u8],
    pub received_at_ms: u64,
}

/// A schema's verdict that keeps a reading out (or sends it to the dead-letter topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub rule: String,
    pub error: String,
}

/// What [`Engine::prepare`] decided.
#[derive(Debug)]
pub enum Verdict {
    /// Not stored: the device is told why (rule with `on_invalid = "refuse"`).
    Refuse(Invalid),
    /// Stored, as [`Prepared`] says.
    Store(Prepared),
}

/// A reading ready to be stored.
#[derive(Debug, Default)]
pub struct Prepared {
    /// The new payload when a rule transformed or enriched it into the payload.
    pub payload: Option<Vec<u8>>,
    /// Headers added (enrichment into headers).
    pub headers: Vec<(String, String)>,
    /// Set when a `dead_letter` rule found it invalid: stored for `edge.invalid_topic`.
    pub invalid: Option<Invalid>,
    /// What the stateful steps get once it is stored ([`Engine::observe`]).
    pub observation: Option<Observation>,
    /// Per matching rule, what it did (for the dry run).
    pub trace: Vec<Trace>,
}

/// What one rule did to one reading (the dry run shows these).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Trace {
    pub rule: String,
    /// `when` was false (or failed): the rule did nothing more.
    pub skipped: bool,
    /// Why an expression failed (a missing field, a type mismatch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid: Option<String>,
    pub transformed: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub enriched: Vec<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub aggregated: Vec<(String, f64)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertInput>,
}

/// The values a stored reading feeds the windows and alert states.
#[derive(Debug, Default)]
pub struct Observation {
    device_id: Arc<str>,
    topic: Arc<str>,
    at_ms: u64,
    /// The reading's fields, for the alerts it raises.
    reading: Arc<Value>,
    /// (rule index, field index, value), in rule order.
    aggregates: Vec<(usize, usize, f64)>,
    alerts: Vec<(usize, AlertInput)>,
}

/// An alert rule's conditions on one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct AlertInput {
    pub raise: bool,
    pub clear: bool,
}

/// A record the engine wants stored (and forwarded to `kafka_topic`).
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub device_id: String,
    pub kafka_topic: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

/// A command the engine wants queued for a device.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandAction {
    pub rule: String,
    pub device_id: String,
    pub payload: Value,
}

/// An HTTP POST the engine wants made (an alert's webhook).
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookCall {
    pub rule: String,
    pub url: String,
    /// The alert record (JSON).
    pub body: Vec<u8>,
    pub timeout: Duration,
    pub max_age: Duration,
}

/// What [`Engine::observe`] and [`Engine::tick`] ask of the daemon.
#[derive(Debug, Default, PartialEq)]
pub struct Effects {
    pub records: Vec<Output>,
    pub commands: Vec<CommandAction>,
    pub webhooks: Vec<WebhookCall>,
}

/// An alert that is raised now.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ActiveAlert {
    pub rule: String,
    pub device: String,
    pub severity: String,
    pub topic: String,
    pub raised_at_ms: u64,
    /// The fields of the reading that raised it.
    pub reading: Value,
}

/// Counters for metrics, per rule.
#[derive(Debug, Default)]
pub struct RuleStats {
    pub matched: AtomicU64,
    pub refused: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub transformed: AtomicU64,
    pub errors: AtomicU64,
    pub raised: AtomicU64,
    pub cleared: AtomicU64,
    pub aggregates: AtomicU64,
}

/// Counters for the whole engine.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// A reading would have opened a window beyond `edge.max_window_keys`.
    pub window_keys_refused: AtomicU64,
    /// A reading would have started an alert state beyond `edge.max_alert_keys`.
    pub alert_keys_refused: AtomicU64,
}

struct Rule {
    name: String,
    topic: Option<Vec<String>>,
    device: Option<String>,
    source: Option<String>,
    when: Option<Expr>,
    schema: Option<jsonschema::Validator>,
    on_invalid: OnInvalid,
    rename: Vec<(String, String)>,
    drop: Vec<String>,
    set: Vec<(String, Expr)>,
    enrich: Vec<DeviceFact>,
    enrich_into: EnrichInto,
    aggregate: Option<Aggregate>,
    alert: Option<Alert>,
    stats: RuleStats,
}

struct Aggregate {
    window_ms: u64,
    fields: Vec<String>,
    /// Each field's lookup slot ([`fast::Slots`]).
    slots: Vec<usize>,
    functions: Vec<Aggregation>,
    kafka_topic: String,
}

struct Alert {
    raise: Expr,
    clear: Option<Expr>,
    for_readings: u32,
    for_ms: u64,
    severity: String,
    command_device: Option<String>,
    command: Option<Value>,
    clear_command: Option<Value>,
    webhook: Option<outpost_config::AlertWebhook>,
    /// The config it came from: an alert state survives a reload only if this is unchanged.
    config: outpost_config::AlertConfig,
}

/// The compiled `[edge]` section and the state of its windows and alerts.
pub struct Engine {
    env: Arc<cel::Env>,
    rules: Vec<Rule>,
    alerts_topic: String,
    invalid_topic: String,
    max_alert_keys: usize,
    /// Some expression mentions `device`: the device's object is built per reading.
    device_needed: bool,
    /// The registry is asked per reading (`device` mentioned, or enrichment).
    facts_needed: bool,
    /// How many lookups the rules' expressions and aggregates make ([`fast::Slots`]).
    slots: usize,
    /// Fields all aggregate rules aggregate, and alert rules: an observation's most.
    aggregated_fields: usize,
    alert_rules: usize,
    state: Mutex<State>,
    stats: EngineStats,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("rules", &self.rules.len())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    windows: Windows,
    /// Per (rule index, device).
    alerts: hashbrown::HashMap<(usize, Arc<str>), AlertState>,
}

/// An alert state's key by reference (hashes like the tuple): looked up without cloning.
#[derive(Hash)]
struct AlertKey<'a>(usize, &'a str);

impl hashbrown::Equivalent<(usize, Arc<str>)> for AlertKey<'_> {
    fn equivalent(&self, key: &(usize, Arc<str>)) -> bool {
        self.0 == key.0 && self.1 == &*key.1
    }
}

/// Readings in a row that met a condition, the first at `since_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Streak {
    count: u32,
    since_ms: u64,
}

impl Streak {
    const NONE: Streak = Streak {
        count: 0,
        since_ms: 0,
    };

    /// The streak after a reading at `now` that `met` the condition or not.
    fn next(self, met: bool, now: u64) -> Streak {
        match (met, self.count) {
            (false, _) => Streak::NONE,
            (true, 0) => Streak {
                count: 1,
                since_ms: now,
            },
            (true, n) => Streak {
                count: n + 1,
                since_ms: self.since_ms,
            },
        }
    }

    /// Long enough for `alert`'s debounce: `for_readings` readings spanning `for`.
    fn holds(self, alert: &Alert, now: u64) -> bool {
        self.count >= alert.for_readings && now.saturating_sub(self.since_ms) >= alert.for_ms
    }
}

#[derive(Debug, Clone)]
enum AlertState {
    /// Not raised; `raising` readings in a row met `raise`.
    Normal(Streak),
    /// Raised; `clearing` readings in a row met `clear`.
    Active {
        raised_at_ms: u64,
        topic: Arc<str>,
        reading: Arc<Value>,
        clearing: Streak,
    },
}

/// An alert's change, for [`Engine::announce`].
struct Change<'a> {
    state: &'static str,
    raised_at_ms: u64,
    command: Option<&'a Value>,
}

/// A problem in the `[edge]` section, as (key path, message).
pub type Problem = (String, String);

impl Engine {
    /// Compiles `[edge]` (already checked by `outpost_config`): the CEL expressions and the
    /// JSON Schemas (`schema_file` relative paths are taken as they are). Every problem found
    /// is returned, with the key path it is about.
    pub fn compile(config: &EdgeConfig) -> Result<Self, Vec<Problem>> {
        let env = expr::environment();
        let mut problems = Vec::new();
        let mut rules = Vec::new();
        let mut slots = fast::Slots::default();
        for (i, r) in config.rules.iter().enumerate() {
            let path = format!("edge.rules[{i}]");
            if let Some(rule) = compile_rule(&env, config, r, &path, &mut problems, &mut slots) {
                rules.push(rule);
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let device_needed = rules.iter().any(Rule::mentions_device);
        let facts_needed = device_needed || rules.iter().any(|r| !r.enrich.is_empty());
        Ok(Self {
            env,
            device_needed,
            facts_needed,
            slots: slots.len(),
            aggregated_fields: rules
                .iter()
                .filter_map(|r| r.aggregate.as_ref())
                .map(|a| a.fields.len())
                .sum(),
            alert_rules: rules.iter().filter(|r| r.alert.is_some()).count(),
            rules,
            alerts_topic: config.alerts_topic.clone(),
            invalid_topic: config.invalid_topic.clone(),
            max_alert_keys: config.max_alert_keys,
            state: Mutex::new(State {
                windows: Windows::new(config.max_window_keys),
                alerts: hashbrown::HashMap::new(),
            }),
            stats: EngineStats::default(),
        })
    }

    /// True when there are no rules (the daemon then skips the engine entirely).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Where dead-lettered readings go.
    pub fn invalid_topic(&self) -> &str {
        &self.invalid_topic
    }

    /// Runs the stateless steps on a reading (see the crate docs).
    pub fn prepare(&self, reading: &Reading<'_>, facts: &dyn Facts) -> Verdict {
        self.run(reading, facts, true)
    }

    /// What [`Engine::prepare`] would decide, without counting it in the rules' metrics (the
    /// dry run: `POST /api/v1/edge/test`). Nothing is stateful before [`Engine::observe`].
    pub fn dry_run(&self, reading: &Reading<'_>, facts: &dyn Facts) -> Verdict {
        self.run(reading, facts, false)
    }

    /// The stateless steps; `live` counts them in the rules' metrics, and a dry run (not
    /// `live`) records what each rule did instead.
    fn run(&self, reading: &Reading<'_>, facts: &dyn Facts, live: bool) -> Verdict {
        let bump = |counter: &AtomicU64| {
            if live {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        };
        let mut prepared = Prepared::default();
        if !self.rules.iter().any(|r| r.matches(reading)) {
            return Verdict::Store(prepared);
        }
        // Decoded and looked up once, for every matching rule; the registry only when a rule
        // needs it.
        let mut decoded = value::decode(reading.content_type, reading.payload);
        let device_facts = if self.facts_needed {
            facts.facts(reading.device_id).unwrap_or_default()
        } else {
            DeviceFacts::default()
        };
        let device = if self.device_needed {
            json!({
                "id": reading.device_id,
                "name": device_facts.name, "model": device_facts.model,
                "location": device_facts.location, "firmware": device_facts.firmware,
                "tags": device_facts.tags,
            })
        } else {
            Value::Null
        };
        let empty = Map::new();
        // Each field is looked up once per reading, however many rules mention it, until a
        // rule changes the reading. On the stack for the usual few lookups.
        let on_stack = [const { std::cell::Cell::new(None) }; 16];
        let on_heap;
        let cache: &fast::Cache = if self.slots <= on_stack.len() {
            &on_stack[..self.slots]
        } else {
            on_heap = fast::cache(self.slots);
            &on_heap
        };
        let mut changed = false;
        let mut aggregates = Vec::with_capacity(self.aggregated_fields);
        let mut alerts = Vec::with_capacity(self.alert_rules);
        for (index, rule) in self.rules.iter().enumerate() {
            if !rule.matches(reading) {
                continue;
            }
            let mut trace = Trace::default();
            let scope = reading_scope(decoded.as_ref(), &empty, &device, reading, cache);
            if let Some(when) = &rule.when {
                let error = match when.test(&self.env, &scope) {
                    Ok(true) => None,
                    Ok(false) => Some(None),
                    Err(e) => {
                        bump(&rule.stats.errors);
                        Some(Some(format!("when: {e}")))
                    }
                };
                if let Some(error) = error {
                    if !live {
                        trace.skipped = true;
                        trace.error = error;
                        prepared.trace.push(Trace {
                            rule: rule.name.clone(),
                            ..trace
                        });
                    }
                    continue;
                }
            }
            bump(&rule.stats.matched);
            if let Some(schema) = &rule.schema {
                let error = match &decoded {
                    None => Some(not_structured(reading.content_type)),
                    Some(d) => schema.iter_errors(&d.value).next().map(|e| {
                        let at = e.instance_path().to_string();
                        if at.is_empty() {
                            e.to_string()
                        } else {
                            format!("{at}: {e}")
                        }
                    }),
                };
                if let Some(error) = error {
                    let invalid = Invalid {
                        rule: rule.name.clone(),
                        error,
                    };
                    if rule.on_invalid == OnInvalid::Refuse {
                        bump(&rule.stats.refused);
                        return Verdict::Refuse(invalid);
                    }
                    // Dead-lettered: stored as received, no further rule runs on it.
                    bump(&rule.stats.dead_lettered);
                    if !live {
                        prepared.trace.push(Trace {
                            rule: rule.name.clone(),
                            invalid: Some(invalid.error.clone()),
                            ..trace
                        });
                    }
                    return Verdict::Store(Prepared {
                        invalid: Some(invalid),
                        trace: prepared.trace,
                        ..Prepared::default()
                    });
                }
            }
            // Transforms and enrichment into the payload: JSON and CBOR objects only.
            if let Some(d) = decoded.as_mut() {
                match rule.transform(&self.env, d, &device, reading, cache) {
                    Ok(true) => {
                        trace.transformed = true;
                        changed = true;
                        clear(cache);
                        bump(&rule.stats.transformed);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        bump(&rule.stats.errors);
                        trace.error = Some(e);
                    }
                }
            }
            if !rule.enrich.is_empty() {
                let found: Vec<(DeviceFact, Value)> = rule
                    .enrich
                    .iter()
                    .filter_map(|f| device_facts.get(*f).map(|v| (*f, v)))
                    .collect();
                let writable = decoded.as_mut().filter(|d| d.is_writable());
                match (rule.enrich_into, writable) {
                    (EnrichInto::Payload, Some(d)) => {
                        trace.enriched = found.iter().map(|(f, _)| f.as_str()).collect();
                        let object: Map<String, Value> = found
                            .into_iter()
                            .map(|(f, v)| (f.as_str().to_owned(), v))
                            .collect();
                        d.insert("device".into(), Value::Object(object));
                        changed = true;
                        clear(cache);
                    }
                    (EnrichInto::Payload, None) => {}
                    (EnrichInto::Headers, _) => {
                        trace.enriched = found.iter().map(|(f, _)| f.as_str()).collect();
                        for (fact, v) in found {
                            let text = match v {
                                Value::String(s) => s,
                                Value::Array(tags) => tags
                                    .iter()
                                    .filter_map(Value::as_str)
                                    .collect::<Vec<_>>()
                                    .join(","),
                                other => other.to_string(),
                            };
                            prepared
                                .headers
                                .push((format!("outpost-device-{}", fact.as_str()), text));
                        }
                    }
                }
            }
            // What the transforms and enrichment above made of the reading.
            let scope = reading_scope(decoded.as_ref(), &empty, &device, reading, cache);
            if let Some(agg) = &rule.aggregate {
                let values =
                    agg.fields
                        .iter()
                        .zip(&agg.slots)
                        .enumerate()
                        .filter_map(|(i, (f, &slot))| {
                            fast::number(scope.fields, f, slot, cache).map(|v| (i, v))
                        });
                let before = aggregates.len();
                aggregates.extend(values.map(|(i, v)| (index, i, v)));
                if !live {
                    trace.aggregated = aggregates[before..]
                        .iter()
                        .map(|&(_, i, v)| (agg.fields[i].clone(), v))
                        .collect();
                }
            }
            if let Some(alert) = &rule.alert {
                match alert.evaluate(&self.env, &scope) {
                    Ok(input) => {
                        trace.alert = Some(input);
                        alerts.push((index, input));
                    }
                    Err(e) => {
                        bump(&rule.stats.errors);
                        trace.error = Some(e);
                    }
                }
            }
            if !live {
                prepared.trace.push(Trace {
                    rule: rule.name.clone(),
                    ..trace
                });
            }
        }
        if changed && let Some(d) = &decoded {
            prepared.payload = value::encode(d, reading.payload);
        }
        if !aggregates.is_empty() || !alerts.is_empty() {
            // The fields, for the alert a reading may raise: the decoded object itself (no
            // copy), or SenML's resolved names.
            let fields = match decoded {
                Some(d) if !alerts.is_empty() => d.into_fields(),
                _ => Value::Null,
            };
            prepared.observation = Some(Observation {
                device_id: Arc::from(reading.device_id),
                topic: Arc::from(reading.topic),
                at_ms: reading.received_at_ms,
                reading: Arc::new(fields),
                aggregates,
                alerts,
            });
        }
        Verdict::Store(prepared)
    }

    /// Feeds a stored reading's values to the windows and alert states.
    pub fn observe(&self, mut observation: Observation) -> Effects {
        let mut effects = Effects::default();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let aggregates = std::mem::take(&mut observation.aggregates);
        for values in aggregates.chunk_by(|a, b| a.0 == b.0) {
            let index = values[0].0;
            let rule = &self.rules[index];
            let Some(agg) = &rule.aggregate else { continue };
            let key = (index, &observation.device_id, &observation.topic);
            let values = values.iter().map(|&(_, field, v)| (field, v));
            match state
                .windows
                .add(key, agg.window_ms, observation.at_ms, values)
            {
                Ok(Some(closed)) => effects.records.push(self.window_record(&closed, true)),
                Ok(None) => {}
                Err(window::Full) => {
                    self.stats
                        .window_keys_refused
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let alerts = std::mem::take(&mut observation.alerts);
        for (index, input) in alerts {
            let key = AlertKey(index, &observation.device_id);
            // Most readings of most devices leave an alert as it was: one lookup, no change.
            if let Some(slot) = state.alerts.get_mut(&key) {
                let current = std::mem::replace(slot, AlertState::Normal(Streak::NONE));
                let next = self.step_alert(index, current, input, &observation, &mut effects);
                if next_is_kept(&next) {
                    *slot = next;
                } else {
                    state.alerts.remove(&key);
                }
                continue;
            }
            if !input.raise {
                continue;
            }
            if state.alerts.len() >= self.max_alert_keys {
                self.stats
                    .alert_keys_refused
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let current = AlertState::Normal(Streak::NONE);
            let next = self.step_alert(index, current, input, &observation, &mut effects);
            if next_is_kept(&next) {
                let owned = (index, Arc::clone(&observation.device_id));
                state.alerts.insert(owned, next);
            }
        }
        effects
    }

    fn step_alert(
        &self,
        index: usize,
        current: AlertState,
        input: AlertInput,
        obs: &Observation,
        effects: &mut Effects,
    ) -> AlertState {
        let rule = &self.rules[index];
        let Some(alert) = &rule.alert else {
            return current;
        };
        let now = obs.at_ms;
        match current {
            AlertState::Normal(raising) => {
                let raising = raising.next(input.raise, now);
                if !raising.holds(alert, now) {
                    return AlertState::Normal(raising);
                }
                rule.stats.raised.fetch_add(1, Ordering::Relaxed);
                let change = Change {
                    state: "raised",
                    raised_at_ms: now,
                    command: alert.command.as_ref(),
                };
                self.announce(effects, rule, alert, obs, &change);
                AlertState::Active {
                    raised_at_ms: now,
                    topic: Arc::clone(&obs.topic),
                    reading: Arc::clone(&obs.reading),
                    clearing: Streak::NONE,
                }
            }
            AlertState::Active {
                raised_at_ms,
                topic,
                reading: raised_by,
                clearing,
            } => {
                let clearing = clearing.next(input.clear, now);
                if !clearing.holds(alert, now) {
                    return AlertState::Active {
                        raised_at_ms,
                        topic,
                        reading: raised_by,
                        clearing,
                    };
                }
                rule.stats.cleared.fetch_add(1, Ordering::Relaxed);
                let change = Change {
                    state: "cleared",
                    raised_at_ms,
                    command: alert.clear_command.as_ref(),
                };
                self.announce(effects, rule, alert, obs, &change);
                AlertState::Normal(Streak::NONE)
            }
        }
    }

    /// What an alert's change asks for: its record stored (and POSTed with a webhook), its
    /// command queued.
    fn announce(
        &self,
        effects: &mut Effects,
        rule: &Rule,
        alert: &Alert,
        obs: &Observation,
        change: &Change<'_>,
    ) {
        let record = self.alert_record(
            rule,
            alert,
            &obs.device_id,
            &obs.topic,
            change.state,
            change.raised_at_ms,
            obs.at_ms,
            &obs.reading,
        );
        if let Some(hook) = &alert.webhook {
            effects.webhooks.push(WebhookCall {
                rule: rule.name.clone(),
                url: hook.url.clone(),
                body: record.payload.clone(),
                timeout: hook.timeout,
                max_age: hook.max_age,
            });
        }
        effects.records.push(record);
        if let Some(payload) = change.command {
            effects.commands.push(CommandAction {
                rule: rule.name.clone(),
                device_id: alert
                    .command_device
                    .clone()
                    .unwrap_or_else(|| obs.device_id.to_string()),
                payload: payload.clone(),
            });
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn alert_record(
        &self,
        rule: &Rule,
        alert: &Alert,
        device: &str,
        topic: &str,
        state: &str,
        raised_at_ms: u64,
        at_ms: u64,
        reading: &Value,
    ) -> Output {
        let payload = json!({
            "alert": rule.name,
            "state": state,
            "device": device,
            "severity": alert.severity,
            "topic": topic,
            "raised_at_ms": raised_at_ms,
            "at_ms": at_ms,
            "reading": reading,
        });
        Output {
            device_id: device.to_owned(),
            kafka_topic: self.alerts_topic.clone(),
            payload: payload.to_string().into_bytes(),
            headers: vec![
                ("outpost-alert".into(), rule.name.clone()),
                ("outpost-alert-state".into(), state.into()),
            ],
        }
    }

    fn window_record(&self, closed: &window::Closed, complete: bool) -> Output {
        let (index, device, topic) = &closed.key;
        let rule = &self.rules[*index];
        let agg = rule
            .aggregate
            .as_ref()
            .expect("windows only for aggregate rules");
        rule.stats.aggregates.fetch_add(1, Ordering::Relaxed);
        let mut fields = Map::new();
        for (i, stats) in closed.fields.iter().enumerate() {
            let Some(stats) = stats else { continue };
            let mut out = Map::new();
            for f in &agg.functions {
                let v = match f {
                    Aggregation::Count => json!(stats.count),
                    Aggregation::Min => json!(stats.min),
                    Aggregation::Max => json!(stats.max),
                    Aggregation::Mean => json!(stats.sum / stats.count as f64),
                    Aggregation::Sum => json!(stats.sum),
                    Aggregation::Last => json!(stats.last),
                };
                out.insert(f.as_str().into(), v);
            }
            fields.insert(agg.fields[i].clone(), Value::Object(out));
        }
        let payload = json!({
            "aggregate": rule.name,
            "device": &**device,
            "topic": &**topic,
            "window_start_ms": closed.start_ms,
            "window_end_ms": closed.start_ms + agg.window_ms,
            "complete": complete,
            "fields": fields,
        });
        Output {
            device_id: device.to_string(),
            kafka_topic: agg.kafka_topic.clone(),
            payload: payload.to_string().into_bytes(),
            headers: vec![("outpost-aggregate".into(), rule.name.clone())],
        }
    }

    /// Closes the windows whose end is at or before `now_ms`.
    pub fn tick(&self, now_ms: u64) -> Effects {
        let closed = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.windows.close_until(now_ms, |key| {
                self.rules[key.0]
                    .aggregate
                    .as_ref()
                    .map_or(0, |a| a.window_ms)
            })
        };
        Effects {
            records: closed.iter().map(|c| self.window_record(c, true)).collect(),
            ..Effects::default()
        }
    }

    /// Closes every window now, marked `"complete": false` (a clean stop, or a reload that
    /// replaces the rules).
    pub fn flush(&self) -> Effects {
        let closed = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.windows.close_all()
        };
        Effects {
            records: closed
                .iter()
                .map(|c| self.window_record(c, false))
                .collect(),
            ..Effects::default()
        }
    }

    /// Takes over the alert states of `old` for rules of the same name whose alert settings
    /// did not change (a raised alert stays raised across a reload). Windows are not taken
    /// over: flush `old` first.
    pub fn adopt(&self, old: &Engine) {
        let mut from = old.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut to = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        for ((index, device), state) in from.alerts.drain() {
            let old_rule = &old.rules[index];
            let same = self.rules.iter().position(|r| {
                r.name == old_rule.name
                    && r.alert.as_ref().map(|a| &a.config)
                        == old_rule.alert.as_ref().map(|a| &a.config)
            });
            if let Some(new_index) = same {
                to.alerts.insert((new_index, device), state);
            }
        }
    }

    /// The alerts raised now, by rule then device.
    pub fn active_alerts(&self) -> Vec<ActiveAlert> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut alerts: Vec<ActiveAlert> = state
            .alerts
            .iter()
            .filter_map(|((index, device), s)| match s {
                AlertState::Active {
                    raised_at_ms,
                    topic,
                    reading,
                    ..
                } => {
                    let rule = &self.rules[*index];
                    Some(ActiveAlert {
                        rule: rule.name.clone(),
                        device: device.to_string(),
                        severity: rule
                            .alert
                            .as_ref()
                            .map(|a| a.severity.clone())
                            .unwrap_or_default(),
                        topic: topic.to_string(),
                        raised_at_ms: *raised_at_ms,
                        reading: Value::clone(reading),
                    })
                }
                AlertState::Normal(_) => None,
            })
            .collect();
        alerts.sort_by(|a, b| (&a.rule, &a.device).cmp(&(&b.rule, &b.device)));
        alerts
    }

    /// Windows open now.
    pub fn open_windows(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .windows
            .len()
    }

    /// Each rule's name and counters.
    pub fn rule_stats(&self) -> impl Iterator<Item = (&str, &RuleStats)> {
        self.rules.iter().map(|r| (r.name.as_str(), &r.stats))
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }
}

/// What an expression sees of `reading` as decoded (`empty` fields when it is not structured).
fn reading_scope<'a>(
    decoded: Option<&'a Decoded>,
    empty: &'a Map<String, Value>,
    device: &'a Value,
    reading: &Reading<'a>,
    cache: &'a fast::Cache,
) -> Scope<'a> {
    let (fields, payload) = match decoded {
        Some(d) => (d.fields(), &d.value),
        None => (empty, &Value::Null),
    };
    Scope {
        fields,
        payload,
        device,
        topic: reading.topic,
        source: reading.source,
        cache,
    }
}

/// Forgets a reading's lookups (a rule changed it).
fn clear(cache: &fast::Cache) {
    for slot in cache {
        slot.set(None);
    }
}

/// A normal state with no streak is the default: not kept, so quiet devices cost nothing.
fn next_is_kept(state: &AlertState) -> bool {
    !matches!(state, AlertState::Normal(streak) if *streak == Streak::NONE)
}

fn not_structured(content_type: Option<&str>) -> String {
    format!(
        "the payload is not a JSON or CBOR document (content type {})",
        content_type.unwrap_or("none")
    )
}

impl Rule {
    fn mentions_device(&self) -> bool {
        let alert = self
            .alert
            .iter()
            .flat_map(|a| std::iter::once(&a.raise).chain(a.clear.as_ref()));
        self.when
            .iter()
            .chain(self.set.iter().map(|(_, e)| e))
            .chain(alert)
            .any(|e| e.mentions("device"))
    }

    fn matches(&self, reading: &Reading<'_>) -> bool {
        self.source.as_deref().is_none_or(|s| s == reading.source)
            && self
                .device
                .as_deref()
                .is_none_or(|p| glob_matches(p, reading.device_id))
            && self
                .topic
                .as_deref()
                .is_none_or(|f| topic_matches(f, reading.topic))
    }

    /// Applies rename, drop and set to `d`; `Ok(true)` when something changed.
    fn transform(
        &self,
        env: &Arc<cel::Env>,
        d: &mut Decoded,
        device: &Value,
        reading: &Reading<'_>,
        cache: &fast::Cache,
    ) -> Result<bool, String> {
        // JSON and CBOR objects only: SenML and other payloads are forwarded as received.
        let nothing_to_do = self.rename.is_empty() && self.drop.is_empty() && self.set.is_empty();
        if nothing_to_do || !d.is_writable() {
            return Ok(false);
        }
        // `set` sees the fields as they were before this rule.
        let compute = |d: &Decoded, (field, e): &(String, Expr)| {
            let scope = Scope {
                fields: d.fields(),
                payload: &d.value,
                device,
                topic: reading.topic,
                source: reading.source,
                cache,
            };
            e.eval(env, &scope)
                .map(|value| (field.clone(), value))
                .map_err(|e| format!("set.{field}: {e}"))
        };
        // One computed field (the common case) needs no list.
        let (one, more) = match self.set.as_slice() {
            [single] if self.rename.is_empty() && self.drop.is_empty() => {
                (Some(compute(d, single)?), Vec::new())
            }
            set => (
                None,
                set.iter()
                    .map(|s| compute(d, s))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let mut changed = false;
        for (from, to) in &self.rename {
            if let Some(v) = d.remove(from) {
                d.insert(to.clone(), v);
                changed = true;
            }
        }
        for field in &self.drop {
            changed |= d.remove(field).is_some();
        }
        for (field, v) in one.into_iter().chain(more) {
            changed |= d.insert(field, v);
        }
        Ok(changed)
    }
}

impl Alert {
    fn evaluate(&self, env: &Arc<cel::Env>, scope: &Scope<'_>) -> Result<AlertInput, String> {
        let raise = self
            .raise
            .test(env, scope)
            .map_err(|e| format!("raise: {e}"))?;
        let clear = match &self.clear {
            Some(c) => c.test(env, scope).map_err(|e| format!("clear: {e}"))?,
            None => !raise,
        };
        Ok(AlertInput { raise, clear })
    }
}

fn compile_rule(
    env: &cel::Env,
    config: &EdgeConfig,
    r: &EdgeRule,
    path: &str,
    problems: &mut Vec<Problem>,
    slots: &mut fast::Slots,
) -> Option<Rule> {
    let aggregate_slots: Vec<usize> = r
        .aggregate
        .iter()
        .flat_map(|a| &a.fields)
        .map(|f| slots.slot(fast::Lookup::Field, f))
        .collect();
    let mut expr = |key: String, source: &str| match Expr::compile_with(env, source, slots) {
        Ok(e) => Some(e),
        Err(e) => {
            problems.push((key, e));
            None
        }
    };
    let when = r.when.as_ref().map(|w| expr(format!("{path}.when"), w));
    let set: Vec<(String, Option<Expr>)> = r
        .set
        .iter()
        .map(|(k, v)| (k.clone(), expr(format!("{path}.set.{k}"), v)))
        .collect();
    let alert = r.alert.as_ref().map(|a| {
        let raise = expr(format!("{path}.alert.raise"), &a.raise);
        let clear = a
            .clear
            .as_ref()
            .map(|c| expr(format!("{path}.alert.clear"), c));
        (a, raise, clear)
    });
    let schema = match (&r.schema, &r.schema_file) {
        (Some(table), _) => Some((format!("{path}.schema"), toml_to_json(table))),
        (None, Some(file)) => {
            let key = format!("{path}.schema_file");
            match std::fs::read(file) {
                Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                    Ok(v) => Some((key, v)),
                    Err(e) => {
                        problems.push((key, format!("{} is not JSON: {e}", file.display())));
                        None
                    }
                },
                Err(e) => {
                    problems.push((key, format!("cannot read {}: {e}", file.display())));
                    None
                }
            }
        }
        (None, None) => None,
    };
    let schema = match schema {
        Some((key, value)) => match jsonschema::validator_for(&value) {
            Ok(v) => Some(v),
            Err(e) => {
                problems.push((key, format!("not a valid JSON Schema: {e}")));
                None
            }
        },
        None => None,
    };
    let when = match when {
        Some(Some(e)) => Some(e),
        Some(None) => return None,
        None => None,
    };
    let mut compiled_set = Vec::new();
    for (k, e) in set {
        compiled_set.push((k, e?));
    }
    let alert = match alert {
        None => None,
        Some((a, raise, clear)) => {
            let clear = match clear {
                Some(Some(c)) => Some(c),
                Some(None) => return None,
                None => None,
            };
            let command = a.command.as_ref();
            Some(Alert {
                raise: raise?,
                clear,
                for_readings: a.for_readings.max(1),
                for_ms: duration_ms(a.for_duration),
                severity: a.severity.clone(),
                command_device: command.and_then(|c| c.device.clone()),
                command: command.map(|c| toml_to_json(&c.payload)),
                clear_command: command.and_then(|c| c.clear_payload.as_ref().map(toml_to_json)),
                webhook: a.webhook.clone(),
                config: a.clone(),
            })
        }
    };
    if (r.schema.is_some() || r.schema_file.is_some()) && schema.is_none() {
        return None;
    }
    Some(Rule {
        name: r.name.clone(),
        topic: r
            .topic
            .as_ref()
            .map(|t| t.split('/').map(str::to_owned).collect()),
        device: r.device.clone(),
        source: r.source.clone(),
        when,
        schema,
        on_invalid: r.on_invalid,
        rename: r
            .rename
            .iter()
            .map(|(a, b)| (a.clone(), b.clone()))
            .collect(),
        drop: r.drop.clone(),
        set: compiled_set,
        enrich: r.enrich.clone(),
        enrich_into: r.enrich_into,
        aggregate: r.aggregate.as_ref().map(|a| Aggregate {
            window_ms: duration_ms(a.window),
            fields: a.fields.clone(),
            slots: aggregate_slots,
            functions: a.functions.clone(),
            kafka_topic: a
                .kafka_topic
                .clone()
                .unwrap_or_else(|| config.aggregates_topic.clone()),
        }),
        alert,
        stats: RuleStats::default(),
    })
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A TOML table as JSON (TOML dates become their text).
fn toml_to_json(table: &toml::Table) -> Value {
    serde_json::to_value(table).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests;
