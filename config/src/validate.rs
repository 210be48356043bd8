//! Semantic checks on a typed [`Config`]: ranges, names, uniqueness and cross-references.
//!
//! Every check runs; nothing stops at the first problem. Each problem names the key it is
//! about, so `routes[1].priority` points at the line to fix.

use std::collections::HashMap;
use std::time::Duration;

use crate::model::{
    Config, DEFAULT_ROUTE, DataType, DriverConfig, KafkaRule, KafkaSecurity, LineFormat,
    ModbusConfig, ModbusTransport, RULE_SOURCES, ReopenConfig, RuleAction, SaslMechanism,
    SecurityProtocol, SerialLineConfig, SerialPortConfig, SimulatorConfig, ZigbeeConfig,
    check_broker, check_kafka_topic, check_topic_filter, forwarder_property, machine_id,
};
use crate::path::{Issue, KeyPath, suggest};
use crate::units::{ByteSize, duration};

/// Runs every semantic check. Paths use the indices of `config.routes` / `config.drivers`.
pub(crate) fn check(config: &Config) -> Vec<Issue> {
    let mut checker = Checker::default();
    checker.gateway(config);
    checker.log(config);
    checker.outbox(config);
    checker.routes(config);
    checker.drivers(config);
    checker.api(config);
    checker.ingress(config);
    checker.apps(config);
    checker.mqtt(config);
    checker.kafka(config);
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

#[derive(Default)]
struct Checker {
    issues: Vec<Issue>,
}

fn root(key: &str) -> KeyPath {
    KeyPath::root().key(key)
}

impl Checker {
    fn problem(&mut self, path: KeyPath, message: impl Into<String>) {
        self.issues.push(Issue::new(path, message));
    }

    /// A name already used at `first`.
    fn duplicate(&mut self, path: KeyPath, message: String, first: KeyPath) {
        self.issues.push(Issue {
            see: Some(first),
            ..Issue::new(path, message)
        });
    }

    fn range<T: PartialOrd + std::fmt::Display>(
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

    fn duration_range(&mut self, path: KeyPath, value: Duration, min: Duration, max: Duration) {
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
    fn name(&mut self, path: KeyPath, name: &str, what: &str) {
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

    fn gateway(&mut self, config: &Config) {
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

    fn log(&mut self, config: &Config) {
        if config.log.level.trim().is_empty() {
            self.problem(
                root("log").key("level"),
                "must not be empty; use e.g. \"info\" or \"info,outpost_sync=debug\"",
            );
        }
    }

    fn outbox(&mut self, config: &Config) {
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

    fn api(&mut self, config: &Config) {
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

    fn ingress(&mut self, config: &Config) {
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

    fn mqtt(&mut self, config: &Config) {
        let mqtt = root("mqtt");
        let m = &config.mqtt;
        let routes: Vec<String> = config.routes().into_iter().map(|r| r.name).collect();
        let routes: Vec<&str> = routes.iter().map(String::as_str).collect();
        self.range(mqtt.key("max_connections"), m.max_connections, 1, 100_000);
        self.range(mqtt.key("max_inflight"), m.max_inflight, 1, 65_535);
        self.route_ref(mqtt.key("route"), &m.route, &routes);
        if m.max_packet < ByteSize::kib(1) || m.max_packet > ByteSize::mib(16) {
            self.problem(
                mqtt.key("max_packet"),
                format!("must be between 1KiB and 16MiB, found {}", m.max_packet),
            );
        }
        let acl = mqtt.key("acl");
        for (key, patterns) in [("publish", &m.acl.publish), ("subscribe", &m.acl.subscribe)] {
            for (i, pattern) in patterns.iter().enumerate() {
                if let Err(e) = crate::model::check_acl_pattern(pattern) {
                    self.problem(acl.key(key).index(i), e);
                }
            }
        }
        let burst = m.limits.burst;
        if burst < Duration::from_secs(1) || burst > Duration::from_secs(3600) {
            self.problem(
                mqtt.key("limits").key("burst"),
                format!(
                    "must be between 1s and 1h, found {}",
                    crate::units::duration::format(burst)
                ),
            );
        }
        for (key, message) in m.tls.problems(m.listen) {
            self.problem(mqtt.key("tls").key(key), message);
        }
        self.duration_range(
            mqtt.key("connect_timeout"),
            m.connect_timeout,
            Duration::from_secs(1),
            Duration::from_secs(60),
        );
        self.range(
            mqtt.key("max_pending_handshakes"),
            m.max_pending_handshakes,
            1,
            100_000,
        );
        self.range(
            mqtt.key("max_pending_per_address"),
            m.max_pending_per_address,
            1,
            100_000,
        );
        self.range(mqtt.key("max_retained"), m.max_retained, 0, 1_000_000);
        for (key, message) in m.sessions.problems() {
            self.problem(mqtt.key("sessions").key(key), message);
        }
    }

    /// `[kafka]`, checked whether or not forwarding is enabled, so that a file fails
    /// `outpost check-config` before the day it is switched on.
    fn kafka(&mut self, config: &Config) {
        let kafka = root("kafka");
        let k = &config.kafka;
        if k.brokers.is_empty() {
            self.problem(
                kafka.key("brokers"),
                "must list at least one broker as \"host:port\"",
            );
        }
        for (i, broker) in k.brokers.iter().enumerate() {
            if let Err(why) = check_broker(broker) {
                self.problem(kafka.key("brokers").index(i), why);
            }
        }
        for (key, topic) in [
            ("default_topic", &k.default_topic),
            ("heartbeat_topic", &k.heartbeat_topic),
            ("inventory_topic", &k.inventory_topic),
            ("checkpoint_topic", &k.checkpoint_topic),
        ] {
            self.kafka_topic(kafka.key(key), topic);
        }
        if let Some(why) = exactly_once_identity_problem(config, machine_id().is_some()) {
            self.problem(root("gateway").key("id"), why);
        }
        if k.heartbeat_topic == k.default_topic {
            self.problem(
                kafka.key("heartbeat_topic"),
                format!(
                    "must differ from kafka.default_topic (\"{}\"): heartbeats would reach every \
                     consumer of readings, and readings would be compacted away by gateway id",
                    k.default_topic
                ),
            );
        }
        if let Some(id) = &k.client_id {
            let printable = id.chars().all(|c| c == ' ' || c.is_ascii_graphic());
            if id.is_empty() || id.len() > 255 || !printable {
                self.problem(
                    kafka.key("client_id"),
                    format!(
                        "invalid client id \"{}\": use 1 to 255 printable ASCII characters \
                         (or leave it unset for \"outpost-<gateway id>\")",
                        id.escape_debug()
                    ),
                );
            }
        }
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        if k.linger > s(1) {
            self.problem(
                kafka.key("linger"),
                format!("must be at most 1s, found {}", duration::format(k.linger)),
            );
        }
        self.range(kafka.key("read_batch"), k.read_batch, 1, 100_000);
        self.range(kafka.key("max_in_flight"), k.max_in_flight, 1, 1_000_000);
        if let Some(cap) = k.max_in_flight_per_topic {
            self.range(
                kafka.key("max_in_flight_per_topic"),
                cap,
                1,
                k.max_in_flight.max(1),
            );
        }
        self.range(kafka.key("backlog_rate"), k.backlog_rate, 1, 10_000_000);
        let dead = kafka.key("dead_letter");
        if let Some(topic) = &k.dead_letter.topic {
            self.kafka_topic(dead.key("topic"), topic);
            if topic == &k.default_topic
                || k.rules
                    .iter()
                    .any(|r| r.kafka_topic.as_ref() == Some(topic))
            {
                self.problem(
                    dead.key("topic"),
                    format!(
                        "\"{topic}\" also receives forwarded records: poison records would be \
                         refused there again; use a topic of its own"
                    ),
                );
            }
        }
        self.range(
            dead.key("max_attempts"),
            k.dead_letter.max_attempts,
            1,
            1_000,
        );
        self.duration_range(
            dead.key("unknown_topic_timeout"),
            k.dead_letter.unknown_topic_timeout,
            s(1),
            s(3_600),
        );
        let (min, max) = (k.reconnect_backoff_min, k.reconnect_backoff_max);
        self.duration_range(kafka.key("reconnect_backoff_min"), min, ms(10), s(3_600));
        if max < min {
            self.problem(
                kafka.key("reconnect_backoff_max"),
                format!(
                    "must be at least kafka.reconnect_backoff_min ({}), found {}",
                    duration::format(min),
                    duration::format(max)
                ),
            );
        } else {
            self.duration_range(kafka.key("reconnect_backoff_max"), max, ms(10), s(3_600));
        }
        self.duration_range(
            kafka.key("offline_after"),
            k.offline_after,
            ms(100),
            s(3_600),
        );
        let heartbeat = k.heartbeat_interval;
        self.duration_range(kafka.key("heartbeat_interval"), heartbeat, s(1), s(3_600));
        self.kafka_security(&kafka.key("security"), &k.security);
        for (key, value) in &k.properties {
            let path = kafka.key("properties").key(key);
            if key.trim().is_empty() {
                self.problem(path, "a librdkafka property name must not be empty");
            } else if let Some(why) = forwarder_property(key) {
                self.problem(
                    path,
                    format!("\"{key}\" cannot be set in [kafka.properties]: {why}"),
                );
            } else if value.contains('\0') {
                self.problem(path, "must not contain NUL characters");
            }
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, rule) in k.rules.iter().enumerate() {
            let path = kafka.key("rules").index(i);
            self.kafka_rule(&path, rule);
            // Unnamed rules are called `rule-<n>` in logs and metrics: an explicit name must
            // not take one of those either.
            let effective = match rule.name.as_deref() {
                Some(name) => name.to_owned(),
                None => format!("rule-{}", i + 1),
            };
            if effective.is_empty() {
                continue;
            }
            if let Some(first) = names.get(&effective) {
                let first_path = kafka.key("rules").index(*first).key("name");
                let message = match (&rule.name, &k.rules[*first].name) {
                    (Some(_), Some(_)) => format!("duplicate rule name \"{effective}\""),
                    (Some(_), None) => format!(
                        "duplicate rule name \"{effective}\": unnamed rule number {} is called \
                         that by default",
                        first + 1
                    ),
                    (None, _) => format!(
                        "this unnamed rule is called \"{effective}\" by default, which is \
                         already a rule's name: name this rule"
                    ),
                };
                self.duplicate(path.key("name"), message, first_path);
            } else {
                names.insert(effective, i);
            }
        }
    }

    fn kafka_topic(&mut self, path: KeyPath, topic: &str) {
        if let Err(why) = check_kafka_topic(topic) {
            self.problem(path, format!("invalid Kafka topic: {why}"));
        }
    }

    fn kafka_security(&mut self, path: &KeyPath, sec: &KafkaSecurity) {
        let protocol = sec.protocol.as_str();
        match sec.sasl_mechanism {
            None if sec.protocol.uses_sasl() => self.problem(
                path.key("sasl_mechanism"),
                format!(
                    "required with protocol = \"{protocol}\": one of \"PLAIN\", \
                     \"SCRAM-SHA-256\", \"SCRAM-SHA-512\", \"OAUTHBEARER\""
                ),
            ),
            Some(mechanism) if !sec.protocol.uses_sasl() => self.problem(
                path.key("sasl_mechanism"),
                format!(
                    "\"{}\" is only used with protocol = \"sasl_plaintext\" or \"sasl_ssl\", \
                     found protocol = \"{protocol}\"",
                    mechanism.as_str()
                ),
            ),
            _ => {}
        }
        let with_password = match sec.sasl_mechanism {
            Some(
                m
                @ (SaslMechanism::Plain | SaslMechanism::ScramSha256 | SaslMechanism::ScramSha512),
            ) => Some(m),
            Some(SaslMechanism::OauthBearer) | None => None,
        };
        match with_password {
            Some(mechanism) => {
                let mechanism = mechanism.as_str();
                match sec.username.as_deref() {
                    None => self.problem(
                        path.key("username"),
                        format!("required with sasl_mechanism = \"{mechanism}\""),
                    ),
                    Some("") => self.problem(path.key("username"), "must not be empty"),
                    Some(_) => {}
                }
                match (&sec.password, &sec.password_file) {
                    (None, None) => self.problem(
                        path.key("password"),
                        format!(
                            "required with sasl_mechanism = \"{mechanism}\": set password_file \
                             (preferred) or password"
                        ),
                    ),
                    (Some(_), Some(_)) => self.problem(
                        path.key("password"),
                        "set only one of password and password_file",
                    ),
                    (Some(password), None) if password.is_empty() => {
                        self.problem(path.key("password"), "must not be empty");
                    }
                    _ => {}
                }
            }
            None => {
                let why = "only used with sasl_mechanism = \"PLAIN\", \"SCRAM-SHA-256\" or \
                           \"SCRAM-SHA-512\"";
                if sec.username.is_some() {
                    self.problem(path.key("username"), why);
                }
                if sec.password.is_some() {
                    self.problem(path.key("password"), why);
                }
                if sec.password_file.is_some() {
                    self.problem(path.key("password_file"), why);
                }
            }
        }
        let tls = matches!(
            sec.protocol,
            SecurityProtocol::Ssl | SecurityProtocol::SaslSsl
        );
        for (key, file) in [
            ("password_file", &sec.password_file),
            ("ca_file", &sec.ca_file),
            ("cert_file", &sec.cert_file),
            ("key_file", &sec.key_file),
        ] {
            let Some(file) = file else { continue };
            if file.as_os_str().is_empty() {
                self.problem(path.key(key), "must not be empty");
            } else if key != "password_file" && !tls {
                self.problem(
                    path.key(key),
                    format!(
                        "only used with protocol = \"ssl\" or \"sasl_ssl\", found protocol = \
                         \"{protocol}\""
                    ),
                );
            }
        }
        match (&sec.cert_file, &sec.key_file) {
            (Some(_), None) => self.problem(
                path.key("key_file"),
                "required with cert_file: the private key of the client certificate",
            ),
            (None, Some(_)) => self.problem(
                path.key("cert_file"),
                "required with key_file: the client certificate of the private key",
            ),
            _ => {}
        }
    }

    fn kafka_rule(&mut self, path: &KeyPath, rule: &KafkaRule) {
        match rule.name.as_deref() {
            Some("") => self.problem(
                path.key("name"),
                "must not be empty (leave it unset to use rule-<n>)",
            ),
            Some(name) => self.name(path.key("name"), name, "rule"),
            None => {}
        }
        if let Some(topic) = &rule.topic
            && let Err(why) = check_topic_filter(topic)
        {
            self.problem(path.key("topic"), format!("invalid topic filter: {why}"));
        }
        if let Some(source) = &rule.source
            && !RULE_SOURCES.contains(&source.as_str())
        {
            let hint = suggest(source, RULE_SOURCES)
                .map(|s| format!(", did you mean \"{s}\"?"))
                .unwrap_or_default();
            self.problem(
                path.key("source"),
                format!(
                    "unknown source \"{source}\"{hint} (expected one of \"mqtt\", \"coap\", \
                     \"http\", \"driver\")"
                ),
            );
        }
        if let Some(device) = &rule.device {
            let bad = device
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-' | '*')));
            if device.is_empty() {
                self.problem(
                    path.key("device"),
                    "must not be empty (leave it unset to match every device)",
                );
            } else if let Some(c) = bad {
                self.problem(
                    path.key("device"),
                    format!(
                        "invalid character {c:?} in \"{device}\": a device id pattern uses \
                         letters, digits, '.', '_', ':', '-' and '*' (any run of characters)"
                    ),
                );
            }
        }
        if rule.tag.as_deref() == Some("") {
            self.problem(
                path.key("tag"),
                "must not be empty (leave it unset to match every device)",
            );
        }
        if let Some(topic) = &rule.kafka_topic {
            self.kafka_topic(path.key("kafka_topic"), topic);
        }
        if rule.action == RuleAction::Sample {
            self.range(path.key("sample_every"), rule.sample_every, 2, 1_000_000);
        }
    }

    fn apps(&mut self, config: &Config) {
        let apps = root("apps");
        let a = &config.apps;
        self.range(
            apps.key("crash_loop_failures"),
            a.crash_loop_failures,
            1,
            100,
        );
        self.duration_range(
            apps.key("crash_loop_window"),
            a.crash_loop_window,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        );
        self.duration_range(
            apps.key("restart_backoff_max"),
            a.restart_backoff_max,
            Duration::from_secs(1),
            Duration::from_secs(600),
        );
        for (key, path) in [
            ("engine_socket", &a.engine_socket),
            ("allowed_mount_root", &a.allowed_mount_root),
        ] {
            if !path.is_absolute() {
                self.problem(
                    apps.key(key),
                    format!("must be an absolute path, found \"{}\"", path.display()),
                );
            }
        }
        for (i, pattern) in a.bus_subscribe.iter().enumerate() {
            if let Err(e) = crate::model::check_acl_pattern(pattern) {
                self.problem(apps.key("bus_subscribe").index(i), e);
            }
        }
        let mut seen: HashMap<&str, KeyPath> = HashMap::new();
        for (i, app) in a.app.iter().enumerate() {
            let path = apps.key("app").index(i);
            for (key, message) in app.problems(&a.allowed_mount_root) {
                let key_path = match key.split_once('[') {
                    Some((k, rest)) => path
                        .key(k)
                        .index(rest.trim_end_matches(']').parse().unwrap_or(0)),
                    None => path.key(&key),
                };
                self.problem(key_path, message);
            }
            if let Some(first) = seen.get(app.name.as_str()) {
                let message = format!("duplicate app name \"{}\"", app.name);
                self.duplicate(path.key("name"), message, first.clone());
            } else {
                seen.insert(&app.name, path.key("name"));
            }
        }
    }

    fn route_ref(&mut self, path: KeyPath, route: &str, routes: &[&str]) {
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

    fn routes(&mut self, config: &Config) {
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

    fn drivers(&mut self, config: &Config) {
        let mut routes: Vec<&str> = vec![DEFAULT_ROUTE];
        for route in &config.routes {
            if !route.name.is_empty() && !routes.contains(&route.name.as_str()) {
                routes.push(&route.name);
            }
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut ports: HashMap<&std::path::Path, usize> = HashMap::new();
        for (i, driver) in config.drivers.iter().enumerate() {
            let path = root("drivers").index(i);
            let name = driver.name();
            self.name(path.key("name"), name, "driver");
            if !name.is_empty() {
                if let Some(first) = seen.get(name) {
                    let first = root("drivers").index(*first).key("name");
                    let message = format!("duplicate driver name \"{name}\"");
                    self.duplicate(path.key("name"), message, first);
                } else {
                    seen.insert(name, i);
                }
            }
            match driver {
                DriverConfig::Simulator(sim) => self.simulator(&path, sim, config),
                DriverConfig::Serial(c) => self.serial_line(&path, c),
                DriverConfig::Modbus(c) => self.modbus(&path, c),
                DriverConfig::Zigbee(c) => self.zigbee(&path, c),
            }
            self.topic(path.key("topic"), driver_topic(driver));
            self.route(path.key("route"), driver.route(), &routes);
            if let Some(port) = driver_port(driver).filter(|p| !p.as_os_str().is_empty()) {
                if let Some(first) = ports.get(port) {
                    let first = root("drivers").index(*first).key("serial").key("path");
                    let message = format!(
                        "serial port {} is already used by another driver",
                        port.display()
                    );
                    self.duplicate(path.key("serial").key("path"), message, first);
                } else {
                    ports.insert(port, i);
                }
            }
        }
    }

    fn topic(&mut self, path: KeyPath, topic: &str) {
        if let Err(why) = check_topic(topic) {
            self.problem(path, format!("invalid topic \"{topic}\": {why}"));
        }
    }

    fn route(&mut self, path: KeyPath, route: &str, routes: &[&str]) {
        if !routes.contains(&route) {
            let known = routes.join(", ");
            let hint = suggest(route, routes)
                .map(|s| format!(", did you mean \"{s}\"?"))
                .unwrap_or_default();
            self.problem(
                path,
                format!("unknown route \"{route}\"{hint} (routes: {known})"),
            );
        }
    }

    fn device_id(&mut self, path: KeyPath, id: &str) {
        if let Err(why) = check_device_id(id) {
            self.problem(path, format!("invalid device id \"{id}\": {why}"));
        }
    }

    fn serial_port(&mut self, path: &KeyPath, port: &SerialPortConfig) {
        if port.path.as_os_str().is_empty() {
            self.problem(
                path.key("path"),
                "missing required key: the serial device, preferably /dev/serial/by-id/...",
            );
        }
        self.range(path.key("baud"), port.baud, 50, 4_000_000);
        self.range(path.key("data_bits"), port.data_bits, 5, 8);
        if !matches!(port.stop_bits, 1 | 2) {
            self.problem(
                path.key("stop_bits"),
                format!("must be 1 or 2, found {}", port.stop_bits),
            );
        }
    }

    fn reopen(&mut self, path: &KeyPath, reopen: &ReopenConfig) {
        let ms = Duration::from_millis;
        let initial = reopen.backoff_initial;
        self.duration_range(path.key("backoff_initial"), initial, ms(10), ms(60_000));
        let max = reopen.backoff_max;
        self.duration_range(
            path.key("backoff_max"),
            max,
            initial.max(ms(10)),
            ms(3_600_000),
        );
        self.range(
            path.key("offline_after_failures"),
            reopen.offline_after_failures,
            1,
            1000,
        );
    }

    fn serial_line(&mut self, path: &KeyPath, c: &SerialLineConfig) {
        self.serial_port(&path.key("serial"), &c.serial);
        self.reopen(&path.key("reopen"), &c.reopen);
        match (&c.device_field, &c.device_id) {
            (None, None) => self.problem(
                path.key("device_id"),
                "set either device_field (the field of each line naming the device) or \
                 device_id (one fixed id for the port)",
            ),
            (Some(_), Some(_)) => self.problem(
                path.key("device_id"),
                "set only one of device_field and device_id",
            ),
            (None, Some(id)) => self.device_id(path.key("device_id"), id),
            (Some(field), None) => {
                if field.is_empty() {
                    self.problem(path.key("device_field"), "must not be empty");
                }
            }
        }
        if c.timestamp_field.as_deref() == Some("") {
            self.problem(path.key("timestamp_field"), "must not be empty");
        }
        if c.format == LineFormat::Csv {
            if c.columns.is_empty() {
                self.problem(
                    path.key("columns"),
                    "required for format = \"csv\": the column names in order",
                );
            }
            let mut seen: HashMap<&str, usize> = HashMap::new();
            for (i, column) in c.columns.iter().enumerate() {
                if column.is_empty() {
                    self.problem(path.key("columns").index(i), "must not be empty");
                } else if let Some(first) = seen.insert(column, i) {
                    let first = path.key("columns").index(first);
                    let message = format!("duplicate column \"{column}\"");
                    self.duplicate(path.key("columns").index(i), message, first);
                }
            }
            if !c.columns.is_empty() {
                for (key, field) in [
                    ("device_field", &c.device_field),
                    ("timestamp_field", &c.timestamp_field),
                ] {
                    if let Some(field) = field.as_deref()
                        && !field.is_empty()
                        && !c.columns.iter().any(|col| col == field)
                    {
                        self.problem(
                            path.key(key),
                            format!("\"{field}\" is not one of the columns"),
                        );
                    }
                }
            }
            if c.separator.chars().count() != 1 {
                self.problem(
                    path.key("separator"),
                    format!("must be a single character, found \"{}\"", c.separator),
                );
            }
        } else if !c.columns.is_empty() {
            self.problem(path.key("columns"), "only used with format = \"csv\"");
        }
        for (field, unit) in &c.units {
            if unit.is_empty() {
                self.problem(path.key("units").key(field), "must not be empty");
            }
        }
        let bytes = c.max_line_bytes.bytes();
        if !(16..=1 << 20).contains(&bytes) {
            self.problem(
                path.key("max_line_bytes"),
                format!("must be between 16B and 1MiB, found {}", c.max_line_bytes),
            );
        }
    }

    fn modbus(&mut self, path: &KeyPath, c: &ModbusConfig) {
        self.reopen(&path.key("reopen"), &c.reopen);
        match c.transport {
            ModbusTransport::Tcp => {
                match c.address.as_deref() {
                    None if c.slaves.iter().any(|s| s.address.is_none()) => self.problem(
                        path.key("address"),
                        "required for transport = \"tcp\" (unless every slave sets its own): \
                         the slave as \"host:port\"",
                    ),
                    None => {}
                    Some(address) => self.host_port(path.key("address"), address),
                }
                for (s, slave) in c.slaves.iter().enumerate() {
                    if let Some(address) = &slave.address {
                        self.host_port(path.key("slaves").index(s).key("address"), address);
                    }
                }
                if c.serial.is_some() {
                    self.problem(path.key("serial"), "only used with transport = \"rtu\"");
                }
            }
            ModbusTransport::Rtu => {
                match &c.serial {
                    None => self.problem(
                        path.key("serial"),
                        "required for transport = \"rtu\": a [drivers.serial] table with the \
                         port's path",
                    ),
                    Some(port) => self.serial_port(&path.key("serial"), port),
                }
                if c.address.is_some() {
                    self.problem(path.key("address"), "only used with transport = \"tcp\"");
                }
                for (s, slave) in c.slaves.iter().enumerate() {
                    if slave.address.is_some() {
                        let at = path.key("slaves").index(s).key("address");
                        self.problem(at, "only used with transport = \"tcp\"");
                    }
                }
            }
        }
        let ms = Duration::from_millis;
        self.duration_range(path.key("timeout"), c.timeout, ms(10), ms(60_000));
        if c.slaves.is_empty() {
            self.problem(
                path.key("slaves"),
                "at least one [[drivers.slaves]] is required",
            );
        }
        let mut ids: HashMap<&str, usize> = HashMap::new();
        let mut units: HashMap<u8, usize> = HashMap::new();
        for (s, slave) in c.slaves.iter().enumerate() {
            let sp = path.key("slaves").index(s);
            self.device_id(sp.key("device_id"), &slave.device_id);
            if !slave.device_id.is_empty()
                && let Some(first) = ids.insert(&slave.device_id, s)
            {
                let first = path.key("slaves").index(first).key("device_id");
                let message = format!("duplicate device id \"{}\"", slave.device_id);
                self.duplicate(sp.key("device_id"), message, first);
            }
            if c.transport == ModbusTransport::Rtu {
                self.range(sp.key("unit"), slave.unit, 1, 247);
            }
            if slave.address.is_none()
                && let Some(first) = units.insert(slave.unit, s)
            {
                let first = path.key("slaves").index(first).key("unit");
                let message = format!("duplicate unit {}", slave.unit);
                self.duplicate(sp.key("unit"), message, first);
            }
            if slave.points.is_empty() {
                self.problem(
                    sp.key("points"),
                    "at least one [[drivers.slaves.points]] is required",
                );
            }
            let mut names: HashMap<&str, usize> = HashMap::new();
            for (p, point) in slave.points.iter().enumerate() {
                let pp = sp.key("points").index(p);
                if point.name.is_empty() {
                    self.problem(
                        pp.key("name"),
                        "missing required key: the value's field name",
                    );
                } else if let Some(first) = names.insert(&point.name, p) {
                    let first = sp.key("points").index(first).key("name");
                    let message = format!("duplicate point name \"{}\"", point.name);
                    self.duplicate(pp.key("name"), message, first);
                }
                let bits = point.function.is_bits();
                if bits != (point.data_type == DataType::Bool) {
                    let message = if bits {
                        "coils and discrete inputs are read as \"bool\""
                    } else {
                        "\"bool\" is only for coils and discrete inputs"
                    };
                    self.problem(pp.key("data_type"), message);
                }
                let end = u32::from(point.address) + u32::from(point.data_type.width());
                if end > 65_536 {
                    self.problem(
                        pp.key("address"),
                        format!("{} plus the value's width passes 65535", point.address),
                    );
                }
                if !point.scale.is_finite() || point.scale == 0.0 {
                    self.problem(
                        pp.key("scale"),
                        format!("must be finite and not 0, found {}", point.scale),
                    );
                }
                if !point.offset.is_finite() {
                    self.problem(
                        pp.key("offset"),
                        format!("must be finite, found {}", point.offset),
                    );
                }
                if point.unit.as_deref() == Some("") {
                    self.problem(pp.key("unit"), "must not be empty (leave it unset)");
                }
                self.duration_range(pp.key("interval"), point.interval, ms(10), ms(86_400_000));
            }
        }
    }

    fn host_port(&mut self, path: KeyPath, address: &str) {
        let valid = address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            self.problem(
                path,
                format!(
                    "invalid address \"{address}\": expected \"host:port\" like \
                     \"192.168.1.20:502\""
                ),
            );
        }
    }

    fn zigbee(&mut self, path: &KeyPath, c: &ZigbeeConfig) {
        self.serial_port(&path.key("serial"), &c.serial);
        self.reopen(&path.key("reopen"), &c.reopen);
        self.range(path.key("channel"), c.channel, 11, 26);
        if c.pan_id == 0 || c.pan_id == 0xffff {
            self.problem(
                path.key("pan_id"),
                format!("must be between 0x0001 and 0xfffe, found {:#06x}", c.pan_id),
            );
        }
        let s = Duration::from_secs;
        self.duration_range(path.key("permit_join_max"), c.permit_join_max, s(1), s(254));
    }

    fn simulator(&mut self, path: &KeyPath, sim: &SimulatorConfig, config: &Config) {
        self.range(path.key("devices"), sim.devices, 1, 10_000);
        if sim.interval < Duration::from_millis(1) {
            self.problem(
                path.key("interval"),
                format!(
                    "must be at least 1ms, found {}",
                    duration::format(sim.interval)
                ),
            );
        }
        let max_record = config.outbox.max_record_bytes.bytes();
        let payload = u64::try_from(sim.payload_bytes).unwrap_or(u64::MAX);
        if payload < 16 || payload > max_record {
            self.problem(
                path.key("payload_bytes"),
                format!(
                    "must be between 16 and outbox.max_record_bytes ({max_record} = {}), found {}",
                    config.outbox.max_record_bytes, sim.payload_bytes
                ),
            );
        }
    }
}

/// Exactly-once mode needs a gateway id no other gateway has: the transactional producer's id is
/// derived from it, and two gateways with one id fence each other's transactions endlessly. An id
/// set in `gateway.id` or derived from the machine id is taken as unique; the host name (the last
/// fallback, on a system without a machine id) is not: Raspberry Pis are all `raspberrypi`.
fn exactly_once_identity_problem(config: &Config, has_machine_id: bool) -> Option<String> {
    (config.kafka.exactly_once && config.gateway.id.is_none() && !has_machine_id).then(|| {
        "kafka.exactly_once needs a gateway id unique in the fleet, and this system has no \
         machine id (/etc/machine-id) to derive one from: set gateway.id"
            .to_owned()
    })
}

fn driver_topic(driver: &DriverConfig) -> &str {
    match driver {
        DriverConfig::Simulator(c) => &c.topic,
        DriverConfig::Serial(c) => &c.topic,
        DriverConfig::Modbus(c) => &c.topic,
        DriverConfig::Zigbee(c) => &c.topic,
    }
}

fn driver_port(driver: &DriverConfig) -> Option<&std::path::Path> {
    match driver {
        DriverConfig::Simulator(_) => None,
        DriverConfig::Serial(c) => Some(&c.serial.path),
        DriverConfig::Modbus(c) => c.serial.as_ref().map(|s| s.path.as_path()),
        DriverConfig::Zigbee(c) => Some(&c.serial.path),
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

/// A driver's topic template: a record topic once `{device}` is replaced, which is the only
/// placeholder.
fn check_topic(topic: &str) -> Result<(), String> {
    check_record_topic(topic)?;
    let without_placeholder = topic.replace("{device}", "");
    if without_placeholder.contains(['{', '}']) {
        return Err("the only placeholder is {device}".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RouteConfig;

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
