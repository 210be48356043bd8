//! Outpost's typed configuration.
//!
//! A configuration goes **parse → default → validate → typed value**:
//!
//! 1. *Parse*: the text must be TOML; otherwise [`ConfigError::Syntax`] with line and column,
//!    and nothing else is checked.
//! 2. *Default*: every key is optional except route and driver names; a missing key takes the
//!    default documented on its field in [`Config`] and in `config/examples/outpost.toml`.
//!    Unknown keys are errors (`deny_unknown_fields` everywhere).
//! 3. *Validate*: ranges, names, uniqueness and references are checked by
//!    [`Config::validate`].
//! 4. The result is a [`Config`], or [`ConfigError::Invalid`] listing **every** problem found
//!    in steps 2 and 3, not just the first.
//!
//! # Key-path contract
//!
//! Every [`Problem`] names the key it is about as a dotted path with zero-based array indices
//! in file order: `outbox.max_bytes`, `routes[1].when_full`, `drivers[0].interval`. For an
//! unknown key the path ends with that key (`outbox.max_byts`) and the message suggests the
//! closest valid key. Problems are sorted by path and deduplicated. `outpost check-config`
//! prints them as they are.
//!
//! Durations and sizes are written for humans (`"30s"`, `"1h30m"`, `"512MiB"`); see
//! [`units`].

#![forbid(unsafe_code)]

mod error;
mod load;
mod model;
mod path;
pub mod units;
mod validate;

/// Every problem `text` has, as `key.path: message` lines (empty when it is valid). For the unit
/// tests of the sections.
#[cfg(test)]
pub(crate) fn problems(text: &str) -> Vec<String> {
    match from_toml_str(text) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems().iter().map(ToString::to_string).collect(),
    }
}

/// The key paths of `text`'s problems, in order. For the unit tests of the sections.
#[cfg(test)]
pub(crate) fn problem_keys(text: &str) -> Vec<String> {
    problems(text)
        .iter()
        .map(|p| p.split(": ").next().unwrap_or("").to_owned())
        .collect()
}

use std::path::Path;

pub mod matching;

pub use error::{ConfigError, Problem};
pub use model::{
    AdminConfig, ApiConfig, ApiTokenConfig, AppConfig, AppsConfig, CoapConfig, CommandsConfig,
    Config, DEFAULT_ROUTE, DataType, DeadLetterConfig, DevicesConfig, DriverConfig, FlowControl,
    GatewayConfig, HttpIngestConfig, IntegrityCheck, KafkaConfig, KafkaRule, KafkaSecurity,
    LineFormat, LogConfig, LogFormat, ModbusConfig, ModbusPointConfig, ModbusSlaveConfig,
    ModbusTransport, Mount, MqttAclConfig, MqttConfig, MqttLimitsConfig, MqttSessionsConfig, Order,
    OutboxConfig, Parity, Port, RegisterKind, ReopenConfig, RestartPolicy, Route, RouteConfig,
    Scope, SerialLineConfig, SerialPortConfig, SimulatorConfig, Synchronous, WhenFull,
    ZigbeeConfig, parse_cidr,
};
pub use model::{
    AggregateConfig, Aggregation, AlertCommand, AlertConfig, AlertWebhook, DeviceFact, EdgeConfig,
    EdgeRule, EnrichInto, OnInvalid,
};
pub use model::{
    BacklogOrder, CloudEvents, Compression, RuleAction, RuleKey, SaslMechanism, SecurityProtocol,
};
pub use model::{HttpTlsConfig, MqttClientAuth, MqttTlsConfig};
pub use model::{check_acl_pattern, check_kafka_topic, derived_gateway_id, machine_id};
pub use units::ByteSize;
pub use validate::{
    KAFKA_DEFAULT_MAX_MESSAGE_BYTES, MAX_TOPIC_BYTES, check_device_id, check_record_topic,
};

/// The debug-build fault hook's switch, for tests: whether `OUTPOST_DEBUG_FAIL` (a comma-separated
/// list) names `name`. Always false in release builds. Each user documents what its name does
/// (the supervisor's subsystems, the forwarder's `kafka-commit-crash`).
pub fn debug_fault_requested(name: &str) -> bool {
    cfg!(debug_assertions)
        && std::env::var("OUTPOST_DEBUG_FAIL").is_ok_and(|v| v.split(',').any(|n| n.trim() == name))
}

/// Parses, defaults and validates a configuration. An empty string gives [`Config::default`].
pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
    load::load(text)
}

/// Reads `path` and runs [`from_toml_str`] on it; errors carry the path.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    from_toml_str(&text).map_err(|e| e.in_file(path))
}

impl Config {
    /// Semantic checks (ranges, names, uniqueness, route references). Returns every problem,
    /// sorted by key path; empty when the configuration is valid. [`from_toml_str`] runs this.
    pub fn validate(&self) -> Vec<Problem> {
        path::into_problems(validate::check(self))
    }

    /// Settings that are valid but probably not what the operator wants (`outpost check-config`
    /// prints them as warnings, `outpost run` logs them); each names its key.
    pub fn warnings(&self) -> Vec<Problem> {
        path::into_problems(validate::warnings(self))
    }
}
