//! `[edge]` and `[[edge.rules]]`: processing readings at the gateway before they are stored —
//! validate, transform, enrich, aggregate, alert (docs/EDGE.md).
//!
//! Checked here: what the text alone can tell (names, topic filters, ranges, that a rule does
//! something). Whether the CEL expressions compile and the JSON Schemas are valid (and
//! `schema_file` can be read) is checked by the daemon when it loads the config (`outpost
//! check-config` and `outpost run` alike), with the same key paths, by the code that runs them
//! (`outpost-edge`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::path::KeyPath;
use crate::validate::{Checker, root};

deserialize_from_str!(OnInvalid { "refuse" => Refuse, "dead_letter" => DeadLetter });
deserialize_from_str!(EnrichInto { "headers" => Headers, "payload" => Payload });
deserialize_from_str!(Aggregation { "count" => Count, "min" => Min, "max" => Max, "mean" => Mean, "sum" => Sum, "last" => Last });
deserialize_from_str!(DeviceFact { "name" => Name, "model" => Model, "location" => Location, "tags" => Tags, "firmware" => Firmware });

/// `[edge]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [edge] table")]
pub struct EdgeConfig {
    /// Kafka topic of alert records (raised and cleared), sent through the outbox like
    /// readings. Default `"outpost.alerts"`.
    pub alerts_topic: String,
    /// Kafka topic of aggregate records, unless a rule names its own. Default
    /// `"outpost.aggregates"`.
    pub aggregates_topic: String,
    /// Kafka topic of records a rule with `on_invalid = "dead_letter"` found invalid (the
    /// original payload, the error in headers). Default `"outpost.invalid"`.
    pub invalid_topic: String,
    /// Aggregate windows (rule × device × topic) held at once. A reading that would open one
    /// more is not aggregated (counted: `outpost_edge_window_keys_refused_total`, an alarm).
    /// Default 10000; 1 to 1000000.
    pub max_window_keys: usize,
    /// Alert states (rule × device) held at once, same policy. Default 10000; 1 to 1000000.
    pub max_alert_keys: usize,
    /// `[[edge.rules]]`, applied in file order. Default: none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<EdgeRule>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            alerts_topic: "outpost.alerts".into(),
            aggregates_topic: "outpost.aggregates".into(),
            invalid_topic: "outpost.invalid".into(),
            max_window_keys: 10_000,
            max_alert_keys: 10_000,
            rules: Vec::new(),
        }
    }
}

/// `[[edge.rules]]`: which readings (`topic`, `device`, `source`, `when`) and what to do with
/// them. Every step that is set runs, in this order: validate, transform (`rename`, `drop`,
/// `set`), enrich, aggregate, alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [[edge.rules]] table")]
pub struct EdgeRule {
    /// Required, unique: 1 to 64 of `a-z`, `0-9`, `_`, `-`. In logs, metrics, alerts.
    pub name: String,
    /// MQTT-style filter on the reading's topic (`+` one level, `#` the rest). Default: any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Device id, `*` matching any run of characters. Default: any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Where the reading entered: `mqtt`, `coap`, `http` or `driver`. Default: any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// A CEL condition on the reading (its fields by name, `payload`, `device`, `topic`,
    /// `source`); the rule applies only where it is true. Default: always.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// A JSON Schema (as a TOML table) the payload must satisfy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<toml::Table>,
    /// A JSON Schema file (JSON) the payload must satisfy; instead of `schema`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema_file: Option<PathBuf>,
    /// What happens to a reading the schema refuses. Default `"refuse"`.
    pub on_invalid: OnInvalid,
    /// Fields renamed (`old = "new"`), top-level.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rename: BTreeMap<String, String>,
    /// Top-level fields removed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drop: Vec<String>,
    /// Fields set to a CEL expression's value (`field = "expression"`), in key order, each
    /// seeing the fields as they were before this rule's `set`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Registry facts added to the reading: `name`, `model`, `location`, `tags`, `firmware`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub enrich: Vec<DeviceFact>,
    /// Where `enrich` puts them: Kafka headers `outpost-device-<fact>`, or a `device` object
    /// in the JSON payload. Default `"headers"`.
    pub enrich_into: EnrichInto,
    /// `[edge.rules.aggregate]`: tumbling-window aggregates of numeric fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<AggregateConfig>,
    /// `[edge.rules.alert]`: an alert raised and cleared by conditions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertConfig>,
}

impl Default for EdgeRule {
    fn default() -> Self {
        Self {
            name: String::new(),
            topic: None,
            device: None,
            source: None,
            when: None,
            schema: None,
            schema_file: None,
            on_invalid: OnInvalid::Refuse,
            rename: BTreeMap::new(),
            drop: Vec::new(),
            set: BTreeMap::new(),
            enrich: Vec::new(),
            enrich_into: EnrichInto::Headers,
            aggregate: None,
            alert: None,
        }
    }
}

/// What a schema refusal does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnInvalid {
    /// Not stored; the device is told (MQTT 5 PUBACK 0x99, HTTP 422, CoAP 4.00).
    Refuse,
    /// Stored and acknowledged, then forwarded to `edge.invalid_topic` with the error.
    DeadLetter,
}

/// Where enrichment goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EnrichInto {
    Headers,
    Payload,
}

/// A registry fact about a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceFact {
    Name,
    Model,
    Location,
    Tags,
    Firmware,
}

impl DeviceFact {
    pub fn as_str(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// A window function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregation {
    Count,
    Min,
    Max,
    Mean,
    Sum,
    Last,
}

impl Aggregation {
    pub fn as_str(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// `[edge.rules.aggregate]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "an [edge.rules.aggregate] table"
)]
pub struct AggregateConfig {
    /// Window length; windows are aligned to the epoch (a 1m window starts on the minute).
    /// Default `"1m"`; 1s to 1d.
    #[serde(with = "crate::units::duration")]
    pub window: Duration,
    /// Numeric top-level fields aggregated. Required, at least one.
    pub fields: Vec<String>,
    /// Default `["count", "min", "max", "mean"]`.
    pub functions: Vec<Aggregation>,
    /// Kafka topic of the aggregate records. Default: `edge.aggregates_topic`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_topic: Option<String>,
}

impl Default for AggregateConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            fields: Vec::new(),
            functions: vec![
                Aggregation::Count,
                Aggregation::Min,
                Aggregation::Max,
                Aggregation::Mean,
            ],
            kafka_topic: None,
        }
    }
}

/// `[edge.rules.alert]`: per device, `raise` true for `for_readings` readings in a row and for
/// at least `for` raises the alert; `clear` (default: `raise` false) for as long clears it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "an [edge.rules.alert] table"
)]
pub struct AlertConfig {
    /// CEL condition raising the alert. Required.
    pub raise: String,
    /// CEL condition clearing it (hysteresis). Default: `!(raise)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clear: Option<String>,
    /// Readings in a row the condition must hold. Default 1; 1 to 10000.
    pub for_readings: u32,
    /// And for at least this long (first to last of those readings). Default `"0s"`; up to 1d.
    #[serde(rename = "for", with = "crate::units::duration")]
    pub for_duration: Duration,
    /// In the alert record and the API. Default `"warning"`.
    pub severity: String,
    /// A command queued for a device when the alert is raised (and `clear_payload`, if set,
    /// when it clears): delivered over MQTT or CoAP like an API command, with Kafka down too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<AlertCommand>,
    /// An HTTP POST of the alert record when the alert is raised and when it clears, retried
    /// with backoff and kept across restarts until delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<AlertWebhook>,
}

/// `[edge.rules.alert.webhook]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "an [edge.rules.alert.webhook] table"
)]
pub struct AlertWebhook {
    /// `http://` or `https://` (checked against the system's CA bundle). Required.
    pub url: String,
    /// Per attempt. Default `"10s"`; 1s to 5m.
    #[serde(with = "crate::units::duration")]
    pub timeout: Duration,
    /// A call not delivered within this long after the alert changed is dropped (counted).
    /// Default `"24h"`; 1m to 30d.
    #[serde(with = "crate::units::duration")]
    pub max_age: Duration,
}

impl Default for AlertWebhook {
    fn default() -> Self {
        Self {
            url: String::new(),
            timeout: Duration::from_secs(10),
            max_age: Duration::from_secs(86_400),
        }
    }
}

impl Default for AlertConfig {
    fn default() -> Self {
        Self {
            raise: String::new(),
            clear: None,
            for_readings: 1,
            for_duration: Duration::ZERO,
            severity: "warning".into(),
            command: None,
            webhook: None,
        }
    }
}

/// `[edge.rules.alert.command]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "an [edge.rules.alert.command] table"
)]
pub struct AlertCommand {
    /// The device the command goes to. Default: the device whose reading raised the alert.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The command's JSON payload when the alert is raised (a TOML table). Required.
    pub payload: toml::Table,
    /// The command's payload when the alert clears. Default: no command on clear.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clear_payload: Option<toml::Table>,
}

impl Default for AlertCommand {
    fn default() -> Self {
        Self {
            device: None,
            payload: toml::Table::new(),
            clear_payload: None,
        }
    }
}

const SOURCES: &[&str] = &["mqtt", "coap", "http", "driver"];

impl Checker {
    pub(crate) fn edge(&mut self, config: &crate::Config) {
        let e = &config.edge;
        let edge = root("edge");
        for (key, topic) in [
            ("alerts_topic", &e.alerts_topic),
            ("aggregates_topic", &e.aggregates_topic),
            ("invalid_topic", &e.invalid_topic),
        ] {
            self.kafka_topic(edge.key(key), topic);
        }
        self.range(edge.key("max_window_keys"), e.max_window_keys, 1, 1_000_000);
        self.range(edge.key("max_alert_keys"), e.max_alert_keys, 1, 1_000_000);
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, rule) in e.rules.iter().enumerate() {
            let path = edge.key("rules").index(i);
            self.edge_rule(&path, rule);
            if rule.name.is_empty() {
                continue;
            }
            if let Some(first) = names.get(rule.name.as_str()) {
                let first_path = edge.key("rules").index(*first).key("name");
                self.duplicate(
                    path.key("name"),
                    format!("duplicate rule name \"{}\"", rule.name),
                    first_path,
                );
            } else {
                names.insert(&rule.name, i);
            }
        }
    }

    fn edge_rule(&mut self, path: &KeyPath, rule: &EdgeRule) {
        self.name(path.key("name"), &rule.name, "edge rule");
        if let Some(topic) = &rule.topic
            && let Err(why) = super::kafka::check_topic_filter(topic)
        {
            self.problem(path.key("topic"), format!("invalid topic filter: {why}"));
        }
        if let Some(device) = &rule.device
            && device.is_empty()
        {
            self.problem(
                path.key("device"),
                "must not be empty (leave it unset for any)",
            );
        }
        if let Some(source) = &rule.source
            && !SOURCES.contains(&source.as_str())
        {
            self.problem(
                path.key("source"),
                format!(
                    "unknown source \"{source}\" (expected one of \"mqtt\", \"coap\", \"http\", \
                     \"driver\")"
                ),
            );
        }
        if rule.schema.is_some() && rule.schema_file.is_some() {
            self.problem(
                path.key("schema_file"),
                "set either schema or schema_file, not both",
            );
        }
        for (from, to) in &rule.rename {
            if to.is_empty() || from.is_empty() {
                self.problem(
                    path.key("rename").key(from),
                    "field names must not be empty",
                );
            }
        }
        let does_something = rule.schema.is_some()
            || rule.schema_file.is_some()
            || !rule.rename.is_empty()
            || !rule.drop.is_empty()
            || !rule.set.is_empty()
            || !rule.enrich.is_empty()
            || rule.aggregate.is_some()
            || rule.alert.is_some();
        if !does_something {
            self.problem(
                path.clone(),
                "the rule does nothing: set at least one of schema, schema_file, rename, drop, \
                 set, enrich, aggregate, alert",
            );
        }
        if let Some(agg) = &rule.aggregate {
            let agg_path = path.key("aggregate");
            let (s, day) = (Duration::from_secs(1), Duration::from_secs(86_400));
            self.duration_range(agg_path.key("window"), agg.window, s, day);
            if agg.window.subsec_nanos() != 0 {
                self.problem(agg_path.key("window"), "must be a whole number of seconds");
            }
            if agg.fields.is_empty() || agg.fields.iter().any(String::is_empty) {
                self.problem(
                    agg_path.key("fields"),
                    "name at least one numeric field to aggregate (no empty names)",
                );
            }
            if agg.functions.is_empty() {
                self.problem(
                    agg_path.key("functions"),
                    "name at least one of \"count\", \"min\", \"max\", \"mean\", \"sum\", \"last\"",
                );
            }
            if let Some(topic) = &agg.kafka_topic {
                self.kafka_topic(agg_path.key("kafka_topic"), topic);
            }
        }
        if let Some(alert) = &rule.alert {
            let alert_path = path.key("alert");
            if alert.raise.trim().is_empty() {
                self.problem(
                    alert_path.key("raise"),
                    "missing required key: the CEL condition that raises the alert",
                );
            }
            self.range(
                alert_path.key("for_readings"),
                alert.for_readings,
                1,
                10_000,
            );
            self.duration_range(
                alert_path.key("for"),
                alert.for_duration,
                Duration::ZERO,
                Duration::from_secs(86_400),
            );
            if alert.severity.is_empty() || alert.severity.len() > 32 {
                self.problem(alert_path.key("severity"), "use 1 to 32 characters");
            }
            if let Some(command) = &alert.command
                && let Some(device) = &command.device
                && let Err(why) = crate::validate::check_device_id(device)
            {
                self.problem(alert_path.key("command").key("device"), why);
            }
            if let Some(hook) = &alert.webhook {
                let hook_path = alert_path.key("webhook");
                let scheme_ok = hook.url.starts_with("http://") || hook.url.starts_with("https://");
                let host = hook.url.split_once("://").map_or("", |(_, rest)| rest);
                if !scheme_ok || host.is_empty() || hook.url.chars().any(char::is_whitespace) {
                    self.problem(
                        hook_path.key("url"),
                        format!(
                            "\"{}\" is not an http:// or https:// URL with a host",
                            hook.url.escape_debug()
                        ),
                    );
                }
                let s = Duration::from_secs;
                self.duration_range(hook_path.key("timeout"), hook.timeout, s(1), s(300));
                self.duration_range(
                    hook_path.key("max_age"),
                    hook.max_age,
                    s(60),
                    s(30 * 86_400),
                );
            }
        }
    }
}
