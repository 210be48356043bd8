//! Semantic checks on a typed [`Config`]: ranges, names, uniqueness and cross-references.
//!
//! Every check runs; nothing stops at the first problem. Each problem names the key it is
//! about, so `routes[1].priority` points at the line to fix.
//!
//! Each section's checks live next to its model: `[kafka]` in `model/kafka.rs`, `[mqtt]` in
//! `model/mqtt.rs`, `[apps]` in `model/apps.rs`, `[[drivers]]` in `model/drivers.rs`, each an
//! `impl Checker` block. This file holds the [`Checker`] with its shared helpers (`problem`,
//! `range`, `duration_range`, `name`, `route_ref`), the order of the sections, and the checks
//! of the sections whose model is in `model.rs` (gateway, log, outbox, routes, api, ingress).

use std::collections::HashMap;
use std::time::Duration;

use crate::model::Config;
use crate::path::{Issue, KeyPath, suggest};
use crate::units::{ByteSize, duration};

/// Runs every semantic check. Paths use the indices of `config.routes` / `config.drivers`.
pub(crate) fn check(config: &Config) -> Vec<Issue> {
    let mut checker = Checker::default();
    checker.gateway(config);
    checker.admin(config);
    checker.http_ingest_listen(config);
    checker.log(config);
    checker.outbox(config);
    checker.routes(config);
    checker.drivers(config);
    checker.api(config);
    checker.ingress(config);
    checker.apps(config);
    checker.mqtt(config);
    checker.kafka(config);
    checker.edge(config);
    checker.issues
}

/// The size above which a record is refused by Kafka's defaults: librdkafka's and the brokers'
/// `message.max.bytes` (the brokers' is 1,048,588 including the batch overhead).
pub const KAFKA_DEFAULT_MAX_MESSAGE_BYTES: u64 = 1_000_000;

/// Valid settings that are probably mistakes (see [`Config::warnings`]).
pub(crate) fn warnings(config: &Config) -> Vec<Issue> {
    let mut issues = Vec::new();
    let max = config.outbox.max_record_bytes.bytes();
    if max > KAFKA_DEFAULT_MAX_MESSAGE_BYTES {
        issues.push(Issue::new(
            root("outbox").key("max_record_bytes"),
            format!(
                "{max} bytes is more than Kafka accepts by default ({KAFKA_DEFAULT_MAX_MESSAGE_BYTES} \
                 bytes: librdkafka's and the brokers' message.max.bytes); larger records are \
                 accepted from devices and then refused by Kafka, and end up as dead letters \
                 unless the brokers and topics are configured for them (and \
                 kafka.properties.\"message.max.bytes\" raised)"
            ),
        ));
    }
    issues
}

/// Collects the problems of every section's checks.
#[derive(Default)]
pub(crate) struct Checker {
    issues: Vec<Issue>,
}

pub(crate) fn root(key: &str) -> KeyPath {
    KeyPath::root().key(key)
}

impl Checker {
    pub(crate) fn problem(&mut self, path: KeyPath, message: impl Into<String>) {
        self.issues.push(Issue::new(path, message));
    }

    /// A name already used at `first`.
    pub(crate) fn duplicate(&mut self, path: KeyPath, message: String, first: KeyPath) {
        self.issues.push(Issue {
            see: Some(first),
            ..Issue::new(path, message)
        });
    }

    pub(crate) fn range<T: PartialOrd + std::fmt::Display>(
        &mut self,
        path: KeyPath,
        value: T,
        min: T,
        max: T,
    ) {
        if value < min || value > max {
            self.problem(
                path,
                format!("must be between {min} and {max}, found {value}"),
            );
        }
    }

    pub(crate) fn duration_range(
        &mut self,
        path: KeyPath,
        value: Duration,
        min: Duration,
        max: Duration,
    ) {
        if value < min || value > max {
            let f = duration::format;
            let message = format!(
                "must be between {} and {}, found {}",
                f(min),
                f(max),
                f(value)
            );
            self.problem(path, message);
        }
    }

    /// A required `[a-z0-9_-]{1,64}` name.
    pub(crate) fn name(&mut self, path: KeyPath, name: &str, what: &str) {
        if name.is_empty() {
            self.problem(
                path,
                format!(
                    "missing required key: every {what} needs a unique name of 1 to 64 \
                     characters a-z, 0-9, _ or -"
                ),
            );
        } else if name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        {
            self.problem(
                path,
                format!("invalid {what} name \"{name}\": use 1 to 64 characters a-z, 0-9, _ or -"),
            );
        }
    }

    pub(crate) fn http_ingest_listen(&mut self, config: &Config) {
        let listen = &config.http_ingest.listen;
        if listen.is_empty() {
            return;
        }
        let key = root("http_ingest").key("listen");
        match listen.parse::<std::net::SocketAddr>() {
            Err(_) => self.problem(
                key,
                format!(
                    "invalid address \"{listen}\": expected IP:port like \"0.0.0.0:8081\" \
                     (host names are not resolved), or \"\" to serve on the admin listener"
                ),
            ),
            Ok(addr) if addr == config.admin.listen && addr.port() != 0 => self.problem(
                key,
                format!("must differ from admin.listen ({addr}), or be \"\" to share it"),
            ),
            Ok(_) => {}
        }
    }

    pub(crate) fn admin(&mut self, config: &Config) {
        for (key, message) in config.admin.tls.problems() {
            self.problem(root("admin").key("tls").key(key), message);
        }
        let ingest_tls = &config.http_ingest.tls;
        for (key, message) in ingest_tls.problems() {
            self.problem(root("http_ingest").key("tls").key(key), message);
        }
        if ingest_tls.enabled && config.http_ingest.listen.is_empty() {
            self.problem(
                root("http_ingest").key("tls").key("enabled"),
                "needs http_ingest.listen (a listener of its own); on the admin listener, \
                 ingestion is served with [admin.tls]",
            );
        }
        let socket = &config.admin.socket;
        if socket.as_os_str().is_empty() {
            return;
        }
        // sun_path holds 108 bytes with the terminating NUL.
        if !socket.is_absolute() || socket.as_os_str().len() > 107 || socket.file_name().is_none() {
            self.problem(
                root("admin").key("socket"),
                format!(
                    "must be an absolute path of at most 107 bytes naming a file, or \"\" for no \
                     local socket; found \"{}\"",
                    socket.display()
                ),
            );
        }
    }

    pub(crate) fn gateway(&mut self, config: &Config) {
        let gateway = root("gateway");
        if let Some(id) = &config.gateway.id {
            let bad = |c: char| c.is_whitespace() || c.is_control() || matches!(c, '/' | '#' | '+');
            if id.is_empty() || id.chars().count() > 128 || id.chars().any(bad) {
                self.problem(
                    gateway.key("id"),
                    format!(
                        "invalid gateway id \"{id}\": use 1 to 128 characters without \
                         whitespace, '/', '#' or '+' (or leave it unset for one derived from the machine id)"
                    ),
                );
            }
        }
        if config
            .gateway
            .data_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            self.problem(
                gateway.key("data_dir"),
                "must not be empty (leave it unset to use $STATE_DIRECTORY or ./outpost-data)",
            );
        }
        self.duration_range(
            gateway.key("shutdown_grace"),
            config.gateway.shutdown_grace,
            Duration::from_millis(100),
            Duration::from_secs(3_600),
        );
        let budget = config.gateway.max_ingress_bytes;
        if budget < ByteSize::mib(1) || budget > ByteSize::gib(16) {
            self.problem(
                gateway.key("max_ingress_bytes"),
                format!("must be between 1MiB and 16GiB, found {budget}"),
            );
        } else {
            let largest = [
                ("mqtt.max_packet", config.mqtt.max_packet),
                ("http_ingest.max_body", config.http_ingest.max_body),
                ("coap.max_body", config.coap.max_body),
            ]
            .into_iter()
            .filter(|(_, size)| *size > budget)
            .max_by_key(|(_, size)| *size);
            if let Some((key, size)) = largest {
                self.problem(
                    gateway.key("max_ingress_bytes"),
                    format!(
                        "must be at least the largest single message, {key} = {size}; found {budget}"
                    ),
                );
            }
        }
    }

    pub(crate) fn log(&mut self, config: &Config) {
        if config.log.level.trim().is_empty() {
            self.problem(
                root("log").key("level"),
                "must not be empty; use e.g. \"info\" or \"info,outpost_sync=debug\"",
            );
        }
    }

    pub(crate) fn outbox(&mut self, config: &Config) {
        let outbox = root("outbox");
        let o = &config.outbox;
        if o.max_bytes < ByteSize::mib(1) {
            self.problem(
                outbox.key("max_bytes"),
                format!("must be at least 1MiB, found {}", o.max_bytes),
            );
        }
        if o.disk_reserve > ByteSize::gib(1) {
            self.problem(
                outbox.key("disk_reserve"),
                format!("must be at most 1GiB, found {}", o.disk_reserve),
            );
        }
        let quarter = ByteSize(o.max_bytes.bytes() / 4);
        if o.max_record_bytes < ByteSize::kib(1) {
            self.problem(
                outbox.key("max_record_bytes"),
                format!("must be at least 1KiB, found {}", o.max_record_bytes),
            );
        } else if o.max_record_bytes > quarter {
            self.problem(
                outbox.key("max_record_bytes"),
                format!(
                    "must be at most a quarter of outbox.max_bytes ({quarter}), found {}",
                    o.max_record_bytes
                ),
            );
        }
        self.range(
            outbox.key("batch_max_records"),
            o.batch_max_records,
            1,
            100_000,
        );
        if o.batch_max_delay > Duration::from_secs(1) {
            self.problem(
                outbox.key("batch_max_delay"),
                format!(
                    "must be at most 1s, found {}",
                    duration::format(o.batch_max_delay)
                ),
            );
        }
        self.range(outbox.key("queue_capacity"), o.queue_capacity, 1, 1_000_000);
    }

    pub(crate) fn api(&mut self, config: &Config) {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, token) in config.api.tokens.iter().enumerate() {
            let path = root("api").key("tokens").index(i);
            self.name(path.key("name"), &token.name, "API token");
            if !token.name.is_empty() {
                if let Some(first) = seen.get(token.name.as_str()) {
                    let first = root("api").key("tokens").index(*first).key("name");
                    let message = format!("duplicate token name \"{}\"", token.name);
                    self.duplicate(path.key("name"), message, first);
                } else {
                    seen.insert(&token.name, i);
                }
            }
            let hex = token.sha256.len() == 64
                && token
                    .sha256
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
            if !hex {
                self.problem(
                    path.key("sha256"),
                    "must be the SHA-256 of the token as 64 lowercase hex digits \
                     (`outpost token new` prints one)",
                );
            }
            if token.scopes.is_empty() {
                self.problem(
                    path.key("scopes"),
                    "must list at least one of \"read\", \"write\", \"admin\"",
                );
            }
        }
    }

    pub(crate) fn ingress(&mut self, config: &Config) {
        let routes: Vec<String> = config.routes().into_iter().map(|r| r.name).collect();
        let routes: Vec<&str> = routes.iter().map(String::as_str).collect();
        self.duration_range(
            root("devices").key("offline_after"),
            config.devices.offline_after,
            Duration::from_secs(1),
            Duration::from_secs(7 * 86_400),
        );
        self.range(
            root("devices").key("max_automatic"),
            config.devices.max_automatic,
            0,
            1_000_000,
        );
        let http = root("http_ingest");
        let h = &config.http_ingest;
        if h.max_body < ByteSize::kib(1) || h.max_body > ByteSize::mib(64) {
            self.problem(
                http.key("max_body"),
                format!("must be between 1KiB and 64MiB, found {}", h.max_body),
            );
        }
        self.range(http.key("max_batch"), h.max_batch, 1, 100_000);
        self.route_ref(http.key("route"), &h.route, &routes);
        let coap = root("coap");
        let c = &config.coap;
        if c.max_body < ByteSize::kib(1) || c.max_body > ByteSize::mib(16) {
            self.problem(
                coap.key("max_body"),
                format!("must be between 1KiB and 16MiB, found {}", c.max_body),
            );
        }
        self.range(coap.key("max_exchanges"), c.max_exchanges, 16, 1_000_000);
        self.route_ref(coap.key("route"), &c.route, &routes);
        for (i, net) in c.plain_networks.iter().enumerate() {
            if let Err(e) = crate::model::parse_cidr(net) {
                self.problem(coap.key("plain_networks").index(i), e);
            }
        }
    }

    pub(crate) fn route_ref(&mut self, path: KeyPath, route: &str, routes: &[&str]) {
        if !routes.contains(&route) {
            let hint = suggest(route, routes)
                .map(|s| format!(", did you mean \"{s}\"?"))
                .unwrap_or_default();
            self.problem(
                path,
                format!(
                    "unknown route \"{route}\"{hint} (routes: {})",
                    routes.join(", ")
                ),
            );
        }
    }

    pub(crate) fn routes(&mut self, config: &Config) {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, route) in config.routes.iter().enumerate() {
            let path = root("routes").index(i);
            self.name(path.key("name"), &route.name, "route");
            if !route.name.is_empty() {
                if let Some(first) = seen.get(route.name.as_str()) {
                    let first = root("routes").index(*first).key("name");
                    let message = format!("duplicate route name \"{}\"", route.name);
                    self.duplicate(path.key("name"), message, first);
                } else {
                    seen.insert(&route.name, i);
                }
            }
            if route.priority > 9 {
                self.problem(
                    path.key("priority"),
                    format!(
                        "must be between 0 and 9 (higher is forwarded first), found {}",
                        route.priority
                    ),
                );
            }
        }
    }
}

/// A device id as the registry accepts it: `[A-Za-z0-9._:-]{1,128}`. The one definition of the
/// rule: the registry calls it too (re-exported as `outpost_config::check_device_id`).
pub fn check_device_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err(format!("must be 1 to 128 characters, found {}", id.len()));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(format!(
            "invalid character {c:?}: use letters, digits, '.', '_', ':' and '-'"
        ));
    }
    Ok(())
}

/// The longest topic a record may have, in bytes (MQTT allows 65,535; a gateway topic that
/// long is a mistake or an attack, and every ingress refuses it alike).
pub const MAX_TOPIC_BYTES: usize = 256;

/// The topic rule of every record, whatever its ingress (MQTT PUBLISH, HTTP, CoAP, drivers'
/// topic templates): 1 to [`MAX_TOPIC_BYTES`] bytes, no wildcards (`+`, `#`), not starting
/// with `$` (reserved for the broker), no control characters (U+0000 included). The one
/// definition: every ingress calls it (re-exported as `outpost_config::check_record_topic`)
/// and answers a refusal in its own protocol's terms.
pub fn check_record_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("topic must not be empty".into());
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(format!(
            "topic of {} bytes is longer than {MAX_TOPIC_BYTES}",
            topic.len()
        ));
    }
    if topic.contains(['#', '+']) {
        return Err("topic must not contain the wildcards + or #".into());
    }
    if topic.starts_with('$') {
        return Err("topics starting with $ are reserved for the broker".into());
    }
    if topic.chars().any(char::is_control) {
        return Err("topic must not contain control characters".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RouteConfig;
    use crate::model::drivers::check_topic;
    use crate::model::kafka::exactly_once_identity_problem;
    use crate::model::{DriverConfig, SimulatorConfig};

    fn messages(config: &Config) -> Vec<String> {
        check(config)
            .into_iter()
            .map(|i| format!("{}: {}", i.path, i.message))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        assert!(check(&Config::default()).is_empty());
    }

    #[test]
    fn outbox_ranges() {
        let mut config = Config::default();
        config.outbox.max_bytes = ByteSize::kib(512);
        config.outbox.batch_max_records = 0;
        config.outbox.batch_max_delay = Duration::from_secs(2);
        config.outbox.queue_capacity = 2_000_000;
        let found = messages(&config);
        assert_eq!(found.len(), 5, "{found:#?}");
        assert!(
            found
                .iter()
                .any(|m| m.starts_with("outbox.max_bytes: must be at least 1MiB"))
        );
        assert!(
            found
                .iter()
                .any(|m| m.starts_with("outbox.max_record_bytes: must be at most a quarter"))
        );
        assert!(
            found
                .iter()
                .any(|m| m.starts_with("outbox.batch_max_records: must be between 1"))
        );
        assert!(
            found
                .iter()
                .any(|m| m.starts_with("outbox.batch_max_delay: must be at most 1s"))
        );
        assert!(
            found
                .iter()
                .any(|m| m.starts_with("outbox.queue_capacity:"))
        );
    }

    #[test]
    fn gateway_checks() {
        let mut config = Config::default();
        config.gateway.id = Some("bad id".into());
        config.gateway.data_dir = Some("".into());
        config.gateway.shutdown_grace = Duration::from_millis(50);
        config.log.level = " ".into();
        let found = messages(&config);
        assert_eq!(found.len(), 4, "{found:#?}");
        assert!(found.contains(
            &"gateway.shutdown_grace: must be between 100ms and 1h, found 50ms".to_owned()
        ));
    }

    #[test]
    fn the_ingress_budget_holds_the_largest_message() {
        let mut config = Config::default();
        config.gateway.max_ingress_bytes = ByteSize::kib(512);
        assert_eq!(
            messages(&config),
            ["gateway.max_ingress_bytes: must be between 1MiB and 16GiB, found 512KiB"]
        );
        config.gateway.max_ingress_bytes = ByteSize::mib(2);
        config.http_ingest.max_body = ByteSize::mib(4);
        assert_eq!(
            messages(&config),
            [
                "gateway.max_ingress_bytes: must be at least the largest single message, \
                 http_ingest.max_body = 4MiB; found 2MiB"
            ]
        );
    }

    #[test]
    fn the_record_topic_rule() {
        assert!(check_record_topic("devices/a/telemetry").is_ok());
        assert!(check_record_topic(&"x".repeat(MAX_TOPIC_BYTES)).is_ok());
        for bad in ["", "a/+/b", "a/#", "$SYS/x", "a\u{0}b", "a\nb"] {
            assert!(check_record_topic(bad).is_err(), "{bad:?}");
        }
        assert!(check_record_topic(&"x".repeat(MAX_TOPIC_BYTES + 1)).is_err());
    }

    #[test]
    fn names_and_topics() {
        let mut config = Config::default();
        config.routes.push(RouteConfig {
            name: "Bad Name".into(),
            ..RouteConfig::default()
        });
        let mut sim = SimulatorConfig {
            name: "s".into(),
            topic: "sim/+/x".into(),
            ..SimulatorConfig::default()
        };
        config.drivers.push(DriverConfig::Simulator(sim.clone()));
        sim.topic = "sim/{id}".into();
        sim.name = "t".into();
        sim.route = "defualt".into();
        config.drivers.push(DriverConfig::Simulator(sim));
        let found = messages(&config);
        assert_eq!(found.len(), 4, "{found:#?}");
        assert!(found.iter().any(|m| m.starts_with(
            "drivers[0].topic: invalid topic \"sim/+/x\": topic must not contain the wildcards"
        )));
        assert!(found.iter().any(|m| m.contains("did you mean \"default\"")));
        assert!(check_topic("sim/{device}/reading").is_ok());
        assert!(check_topic("$SYS/x").is_err());
    }

    #[test]
    fn dead_letter_and_per_topic_settings_are_checked() {
        let config = crate::from_toml_str(
            "[kafka]\nmax_in_flight = 10\nmax_in_flight_per_topic = 11\n\
             [kafka.dead_letter]\ntopic = \"outpost.readings\"\nmax_attempts = 0\n\
             unknown_topic_timeout = \"2h\"\n",
        );
        let err = config.expect_err("invalid").to_string();
        for want in [
            "kafka.max_in_flight_per_topic: must be between 1 and 10, found 11",
            "kafka.dead_letter.topic: \"outpost.readings\" also receives forwarded records",
            "kafka.dead_letter.max_attempts: must be between 1 and 1000, found 0",
            "kafka.dead_letter.unknown_topic_timeout: must be between 1s and 1h",
        ] {
            assert!(err.contains(want), "{want} in {err}");
        }
        let ok = crate::from_toml_str(
            "[kafka]\nmax_in_flight_per_topic = 7\n[kafka.dead_letter]\ntopic = \"dead\"\n",
        )
        .expect("valid");
        assert_eq!(ok.kafka.topic_in_flight_cap(), 7);
    }

    #[test]
    fn a_record_limit_above_kafkas_default_is_a_warning_not_an_error() {
        let config = crate::from_toml_str("[outbox]\nmax_record_bytes = \"2MiB\"\n")
            .expect("valid: a broker may be configured for large records");
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].path, "outbox.max_record_bytes");
        assert!(warnings[0].message.contains("1000000"), "{warnings:?}");
        assert!(Config::default().warnings().is_empty());
    }

    #[test]
    fn exactly_once_refuses_a_gateway_id_that_may_be_shared() {
        let mut config = Config::default();
        config.kafka.exactly_once = true;
        let why = exactly_once_identity_problem(&config, false).expect("refused");
        assert!(why.contains("set gateway.id"), "{why}");
        assert_eq!(
            exactly_once_identity_problem(&config, true),
            None,
            "machine id"
        );
        config.gateway.id = Some("gw-7".into());
        assert_eq!(
            exactly_once_identity_problem(&config, false),
            None,
            "explicit id"
        );
        config.gateway.id = None;
        config.kafka.exactly_once = false;
        assert_eq!(
            exactly_once_identity_problem(&config, false),
            None,
            "at-least-once"
        );
    }

    #[test]
    fn heartbeats_may_not_share_the_readings_topic() {
        let mut config = Config::default();
        config.kafka.heartbeat_topic = config.kafka.default_topic.clone();
        let found = messages(&config);
        assert!(
            found
                .iter()
                .any(|m| m
                    .starts_with("kafka.heartbeat_topic: must differ from kafka.default_topic")),
            "{found:#?}"
        );
    }
}
