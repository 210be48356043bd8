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

use std::cell::OnceCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use outpost_config::matching::{glob_matches, topic_matches};
use outpost_config::{Aggregation, DeviceFact, EdgeConfig, EdgeRule, EnrichInto, OnInvalid};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use smallvec::SmallVec;

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
// Returned once per reading and unpacked at once: a box would be an allocation per reading.
#[allow(clippy::large_enum_variant)]
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
    at_ms: u64,
    /// The device id, then the topic, then (when an alert rule looks at a JSON reading) the
    /// stored payload's text: one allocation per reading, owned names made only when a
    /// window or an alert state starts.
    names: Vec<u8>,
    device_end: usize,
    topic_end: usize,
    /// A CBOR or SenML reading's fields, when an alert rule looks at it.
    fields: Option<Value>,
    /// The fields' JSON text, made when an alert record needs it (most readings change no
    /// alert): the stored payload's text when it is a JSON object (the record then shows what
    /// was forwarded, byte for byte), `fields` written out otherwise.
    text: OnceCell<Box<RawValue>>,
    aggregates: Aggregated,
    alerts: AlertInputs,
}

/// Aggregated values: (rule index, field index, value), in rule order.
type Aggregated = SmallVec<[(usize, usize, f64); 10]>;

/// Alert conditions: (rule index, what they gave), in rule order.
type AlertInputs = SmallVec<[(usize, AlertInput); 6]>;

impl Observation {
    fn device_id(&self) -> &str {
        std::str::from_utf8(&self.names[..self.device_end]).unwrap_or_default()
    }

    fn topic(&self) -> &str {
        std::str::from_utf8(&self.names[self.device_end..self.topic_end]).unwrap_or_default()
    }

    fn reading(&self) -> &RawValue {
        self.text.get_or_init(|| {
            let json = std::str::from_utf8(&self.names[self.topic_end..])
                .ok()
                .map(str::trim)
                .filter(|j| !j.is_empty())
                .and_then(|j| RawValue::from_string(j.to_owned()).ok());
            json.or_else(|| serde_json::value::to_raw_value(self.fields.as_ref()?).ok())
                .unwrap_or_else(|| RawValue::NULL.to_owned())
        })
    }
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

impl Effects {
    /// Nothing to do (most readings close no window and change no alert).
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.commands.is_empty() && self.webhooks.is_empty()
    }
}

/// An alert that is raised now.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActiveAlert {
    pub rule: String,
    pub device: String,
    pub severity: String,
    pub topic: String,
    pub raised_at_ms: u64,
    /// The fields of the reading that raised it.
    pub reading: Box<RawValue>,
}

/// A rule's counters for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RuleStats {
    pub matched: u64,
    pub refused: u64,
    pub dead_lettered: u64,
    pub transformed: u64,
    pub errors: u64,
    pub raised: u64,
    pub cleared: u64,
    pub aggregates: u64,
}

/// One rule's counters in one shard of [`Counters`].
#[derive(Debug, Default)]
#[repr(align(64))]
struct RuleCounters {
    matched: AtomicU64,
    refused: AtomicU64,
    dead_lettered: AtomicU64,
    transformed: AtomicU64,
    errors: AtomicU64,
    raised: AtomicU64,
    cleared: AtomicU64,
    aggregates: AtomicU64,
}

/// Every rule's counters, in shards: one per [`counting_slot`] (made when a thread holding it
/// first counts), and a shared one for threads beyond them. A reading bumps about one counter
/// per rule; an atomic read-modify-write per bump cost more than a fifth of the rules' own
/// time (docs/BENCHMARKS.md, "Edge rules"), so a thread with a slot of its own counts with
/// plain loads and stores. Read summed.
#[derive(Debug)]
struct Counters {
    /// Indexed by slot, then by rule.
    owned: Box<[std::sync::OnceLock<Box<[RuleCounters]>>]>,
    shared: Box<[RuleCounters]>,
}

/// The counters a thread bumps.
struct Shard<'a> {
    counters: &'a [RuleCounters],
    /// The calling thread holds the shard's slot: no other thread writes it.
    owned: bool,
}

impl Shard<'_> {
    fn bump(&self, rule: usize, counter: fn(&RuleCounters) -> &AtomicU64) {
        let c = counter(&self.counters[rule]);
        if self.owned {
            c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        } else {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Counters {
    fn new(rules: usize) -> Self {
        let shard = || (0..rules).map(|_| RuleCounters::default()).collect();
        Self {
            owned: (0..COUNTING_SLOTS)
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            shared: shard(),
        }
    }

    /// The calling thread's shard.
    fn shard(&self) -> Shard<'_> {
        match counting_slot() {
            Some(slot) => Shard {
                counters: self.owned[slot].get_or_init(|| {
                    (0..self.shared.len())
                        .map(|_| RuleCounters::default())
                        .collect()
                }),
                owned: true,
            },
            None => Shard {
                counters: &self.shared,
                owned: false,
            },
        }
    }

    fn sum(&self, rule: usize) -> RuleStats {
        let mut sum = RuleStats::default();
        let owned = self.owned.iter().filter_map(|s| s.get());
        for shard in owned.chain([&self.shared]) {
            let c = &shard[rule];
            let read = |a: &AtomicU64| a.load(Ordering::Relaxed);
            sum.matched += read(&c.matched);
            sum.refused += read(&c.refused);
            sum.dead_lettered += read(&c.dead_lettered);
            sum.transformed += read(&c.transformed);
            sum.errors += read(&c.errors);
            sum.raised += read(&c.raised);
            sum.cleared += read(&c.cleared);
            sum.aggregates += read(&c.aggregates);
        }
        sum
    }
}

/// Threads that can count in a shard of their own at once (the runtime's workers and a few
/// more); others share one.
const COUNTING_SLOTS: usize = 16;

/// The calling thread's counting slot, held until it exits: a slot has one writer at a time,
/// and the next holder sees what the last one wrote (released on exit, acquired on claim).
fn counting_slot() -> Option<usize> {
    use std::sync::atomic::AtomicBool;
    static HELD: [AtomicBool; COUNTING_SLOTS] = [const { AtomicBool::new(false) }; COUNTING_SLOTS];
    struct Claim(Option<usize>);
    impl Drop for Claim {
        fn drop(&mut self) {
            if let Some(slot) = self.0 {
                HELD[slot].store(false, Ordering::Release);
            }
        }
    }
    thread_local! {
        static CLAIM: Claim = Claim((0..COUNTING_SLOTS).find(|&slot| {
            HELD[slot]
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        }));
    }
    CLAIM.try_with(|c| c.0).ok().flatten()
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
    /// The lookup slots of the fields this rule writes: forgotten when it changes a reading.
    changes: Vec<usize>,
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
    state: Mutex<State>,
    counters: Counters,
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
    /// Per device, its alert states by rule index (a device with none has no entry).
    alerts: hashbrown::HashMap<Arc<str>, Vec<(usize, AlertState)>>,
    /// Alert states held, across devices (bounded by `edge.max_alert_keys`).
    alerts_held: usize,
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
        reading: Box<RawValue>,
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
        for rule in &mut rules {
            let written = rule.written();
            rule.changes = slots.of(|name| written.contains(&name));
        }
        let counters = Counters::new(rules.len());
        let device_needed = rules.iter().any(Rule::mentions_device);
        let facts_needed = device_needed || rules.iter().any(|r| !r.enrich.is_empty());
        Ok(Self {
            env,
            device_needed,
            facts_needed,
            slots: slots.len(),
            rules,
            alerts_topic: config.alerts_topic.clone(),
            invalid_topic: config.invalid_topic.clone(),
            max_alert_keys: config.max_alert_keys,
            state: Mutex::new(State {
                windows: Windows::new(config.max_window_keys),
                alerts: hashbrown::HashMap::new(),
                alerts_held: 0,
            }),
            counters,
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
        let counters = self.counters.shard();
        let bump = |rule: usize, counter: fn(&RuleCounters) -> &AtomicU64| {
            if live {
                counters.bump(rule, counter);
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
        let mut aggregates = Aggregated::new();
        let mut alerts = AlertInputs::new();
        for (index, rule) in self.rules.iter().enumerate() {
            if !rule.matches(reading) {
                continue;
            }
            // What the rule did, for a dry run only (not built for a live reading).
            let mut trace = (!live).then(|| Trace {
                rule: rule.name.clone(),
                ..Trace::default()
            });
            let scope = reading_scope(decoded.as_ref(), &device, reading, cache);
            if let Some(when) = &rule.when {
                let error = match when.test(&self.env, &scope) {
                    Ok(true) => None,
                    Ok(false) => Some(None),
                    Err(e) => {
                        bump(index, |c| &c.errors);
                        Some(Some(format!("when: {e}")))
                    }
                };
                if let Some(error) = error {
                    if let Some(mut trace) = trace {
                        trace.skipped = true;
                        trace.error = error;
                        prepared.trace.push(trace);
                    }
                    continue;
                }
            }
            bump(index, |c| &c.matched);
            if let Some(schema) = &rule.schema {
                let error = match &decoded {
                    None => Some(not_structured(reading.content_type)),
                    Some(d) => schema.iter_errors(d.value()).next().map(|e| {
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
                        bump(index, |c| &c.refused);
                        return Verdict::Refuse(invalid);
                    }
                    // Dead-lettered: stored as received, no further rule runs on it.
                    bump(index, |c| &c.dead_lettered);
                    if let Some(mut trace) = trace {
                        trace.invalid = Some(invalid.error.clone());
                        prepared.trace.push(trace);
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
                        if let Some(t) = &mut trace {
                            t.transformed = true;
                        }
                        changed = true;
                        forget(cache, &rule.changes);
                        bump(index, |c| &c.transformed);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        bump(index, |c| &c.errors);
                        if let Some(t) = &mut trace {
                            t.error = Some(e);
                        }
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
                        if let Some(t) = &mut trace {
                            t.enriched = found.iter().map(|(f, _)| f.as_str()).collect();
                        }
                        let object: Map<String, Value> = found
                            .into_iter()
                            .map(|(f, v)| (f.as_str().to_owned(), v))
                            .collect();
                        d.insert("device", Value::Object(object));
                        changed = true;
                        forget(cache, &rule.changes);
                    }
                    (EnrichInto::Payload, None) => {}
                    (EnrichInto::Headers, _) => {
                        if let Some(t) = &mut trace {
                            t.enriched = found.iter().map(|(f, _)| f.as_str()).collect();
                        }
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
            let scope = reading_scope(decoded.as_ref(), &device, reading, cache);
            if let Some(agg) = &rule.aggregate {
                let before = aggregates.len();
                for (i, (f, &slot)) in agg.fields.iter().zip(&agg.slots).enumerate() {
                    if let Some(v) = fast::number(scope.decoded, f, slot, cache) {
                        aggregates.push((index, i, v));
                    }
                }
                if let Some(t) = &mut trace {
                    t.aggregated = aggregates[before..]
                        .iter()
                        .map(|&(_, i, v)| (agg.fields[i].clone(), v))
                        .collect();
                }
            }
            if let Some(alert) = &rule.alert {
                match alert.evaluate(&self.env, &scope) {
                    Ok(input) => {
                        if let Some(t) = &mut trace {
                            t.alert = Some(input);
                        }
                        alerts.push((index, input));
                    }
                    Err(e) => {
                        bump(index, |c| &c.errors);
                        if let Some(t) = &mut trace {
                            t.error = Some(e);
                        }
                    }
                }
            }
            prepared.trace.extend(trace);
        }
        if changed && let Some(d) = &decoded {
            prepared.payload = value::encode(d, reading.payload);
        }
        if !aggregates.is_empty() || !alerts.is_empty() {
            // The fields, for the alert a reading may raise or clear: the stored JSON object's
            // text, or the decoded fields (CBOR, SenML's resolved names).
            let (json, fields) = match decoded {
                Some(d) if !alerts.is_empty() => match d.encoding {
                    value::Encoding::Json if d.is_writable() => {
                        (prepared.payload.as_deref().unwrap_or(reading.payload), None)
                    }
                    _ => (&[][..], Some(d.into_fields())),
                },
                _ => (&[][..], None),
            };
            let mut names =
                Vec::with_capacity(reading.device_id.len() + reading.topic.len() + json.len());
            names.extend_from_slice(reading.device_id.as_bytes());
            names.extend_from_slice(reading.topic.as_bytes());
            names.extend_from_slice(json);
            prepared.observation = Some(Observation {
                at_ms: reading.received_at_ms,
                names,
                device_end: reading.device_id.len(),
                topic_end: reading.device_id.len() + reading.topic.len(),
                fields,
                text: OnceCell::new(),
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
        let State {
            windows,
            alerts: held,
            alerts_held,
        } = &mut *state;
        let aggregates = std::mem::take(&mut observation.aggregates);
        let mut group = (!aggregates.is_empty())
            .then(|| windows.of(observation.device_id(), observation.topic()));
        for values in aggregates.chunk_by(|a, b| a.0 == b.0) {
            let index = values[0].0;
            let rule = &self.rules[index];
            let (Some(agg), Some(group)) = (&rule.aggregate, group.as_mut()) else {
                continue;
            };
            let values = values.iter().map(|&(_, field, v)| (field, v));
            match group.add(index, agg.window_ms, observation.at_ms, values) {
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
        if alerts.is_empty() {
            return effects;
        }
        // Most readings of most devices leave every alert as it was: one lookup, no change.
        let device = observation.device_id();
        let mut list = held.get_mut(device);
        let mut started = Vec::new();
        for (index, input) in alerts {
            if let Some(states) = list.as_deref_mut()
                && let Some(at) = states.iter().position(|(i, _)| *i == index)
            {
                let slot = &mut states[at].1;
                let current = std::mem::replace(slot, AlertState::Normal(Streak::NONE));
                let next = self.step_alert(index, current, input, &observation, &mut effects);
                if next_is_kept(&next) {
                    *slot = next;
                } else {
                    states.swap_remove(at);
                    *alerts_held -= 1;
                }
                continue;
            }
            if !input.raise {
                continue;
            }
            if *alerts_held >= self.max_alert_keys {
                self.stats
                    .alert_keys_refused
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let current = AlertState::Normal(Streak::NONE);
            let next = self.step_alert(index, current, input, &observation, &mut effects);
            if next_is_kept(&next) {
                *alerts_held += 1;
                match list.as_deref_mut() {
                    Some(states) => states.push((index, next)),
                    None => started.push((index, next)),
                }
            }
        }
        if list.is_some_and(|states| states.is_empty()) {
            held.remove(device);
        }
        if !started.is_empty() {
            held.insert(Arc::from(device), started);
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
                self.counters.shard().bump(index, |c| &c.raised);
                let change = Change {
                    state: "raised",
                    raised_at_ms: now,
                    command: alert.command.as_ref(),
                };
                self.announce(effects, rule, alert, obs, &change);
                AlertState::Active {
                    raised_at_ms: now,
                    topic: Arc::from(obs.topic()),
                    reading: obs.reading().to_owned(),
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
                self.counters.shard().bump(index, |c| &c.cleared);
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
            obs.device_id(),
            obs.topic(),
            change.state,
            change.raised_at_ms,
            obs.at_ms,
            obs.reading(),
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
                    .unwrap_or_else(|| obs.device_id().to_owned()),
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
        reading: &RawValue,
    ) -> Output {
        /// The record's members, `reading` as its text (what was forwarded, for JSON).
        #[derive(serde::Serialize)]
        struct Record<'a> {
            alert: &'a str,
            at_ms: u64,
            device: &'a str,
            raised_at_ms: u64,
            reading: &'a RawValue,
            severity: &'a str,
            state: &'a str,
            topic: &'a str,
        }
        let record = Record {
            alert: &rule.name,
            at_ms,
            device,
            raised_at_ms,
            reading,
            severity: &alert.severity,
            state,
            topic,
        };
        Output {
            device_id: device.to_owned(),
            kafka_topic: self.alerts_topic.clone(),
            payload: serde_json::to_vec(&record).unwrap_or_default(),
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
        self.counters.shard().bump(*index, |c| &c.aggregates);
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
            state.windows.close_until(now_ms, |rule| {
                self.rules[rule]
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
        let from = &mut *from;
        from.alerts_held = 0;
        for (device, states) in from.alerts.drain() {
            let kept: Vec<(usize, AlertState)> = states
                .into_iter()
                .filter_map(|(index, state)| {
                    let old_rule = &old.rules[index];
                    let same = self.rules.iter().position(|r| {
                        r.name == old_rule.name
                            && r.alert.as_ref().map(|a| &a.config)
                                == old_rule.alert.as_ref().map(|a| &a.config)
                    });
                    same.map(|new_index| (new_index, state))
                })
                .collect();
            if !kept.is_empty() {
                to.alerts_held += kept.len();
                to.alerts.entry(device).or_default().extend(kept);
            }
        }
    }

    /// The alerts raised now, by rule then device.
    pub fn active_alerts(&self) -> Vec<ActiveAlert> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut alerts: Vec<ActiveAlert> = state
            .alerts
            .iter()
            .flat_map(|(device, states)| states.iter().map(move |(index, s)| (index, device, s)))
            .filter_map(|(index, device, s)| match s {
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
                        reading: reading.clone(),
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
    pub fn rule_stats(&self) -> impl Iterator<Item = (&str, RuleStats)> {
        self.rules
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), self.counters.sum(i)))
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }
}

/// What an expression sees of `reading` as decoded (`None`: not structured).
fn reading_scope<'a>(
    decoded: Option<&'a Decoded<'a>>,
    device: &'a Value,
    reading: &Reading<'a>,
    cache: &'a fast::Cache,
) -> Scope<'a> {
    Scope {
        decoded,
        device,
        topic: reading.topic,
        source: reading.source,
        cache,
    }
}

/// Forgets a reading's lookups of the fields a rule changed (`slots`).
fn forget(cache: &fast::Cache, slots: &[usize]) {
    for &slot in slots {
        if let Some(cell) = cache.get(slot) {
            cell.set(None);
        }
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
    /// The fields this rule may add, change or remove.
    fn written(&self) -> Vec<&str> {
        let enriched = (self.enrich_into == EnrichInto::Payload && !self.enrich.is_empty())
            .then_some("device");
        self.rename
            .iter()
            .flat_map(|(from, to)| [from.as_str(), to.as_str()])
            .chain(self.drop.iter().map(String::as_str))
            .chain(self.set.iter().map(|(name, _)| name.as_str()))
            .chain(enriched)
            .collect()
    }

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
    fn transform<'a>(
        &'a self,
        env: &Arc<cel::Env>,
        d: &mut Decoded<'a>,
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
        let compute = |d: &Decoded<'_>, (field, e): &'a (String, Expr)| {
            let scope = Scope {
                decoded: Some(d),
                device,
                topic: reading.topic,
                source: reading.source,
                cache,
            };
            e.eval(env, &scope)
                .map(|value| (field.as_str(), value))
                .map_err(|e| format!("set.{field}: {e}"))
        };
        // One computed field (the common case): nothing else to see it first.
        if let [single] = self.set.as_slice()
            && self.rename.is_empty()
            && self.drop.is_empty()
        {
            let (field, value) = compute(d, single)?;
            return Ok(d.insert(field, value));
        }
        let computed = self
            .set
            .iter()
            .map(|s| compute(d, s))
            .collect::<Result<Vec<_>, _>>()?;
        let mut changed = false;
        for (from, to) in &self.rename {
            if let Some(v) = d.remove(from) {
                d.insert(to.as_str(), v);
                changed = true;
            }
        }
        for field in &self.drop {
            changed |= d.remove(field).is_some();
        }
        for (field, v) in computed {
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
        changes: Vec::new(),
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
