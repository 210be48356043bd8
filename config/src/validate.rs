//! Semantic checks on a typed [`Config`]: ranges, names, uniqueness and cross-references.
//!
//! Every check runs; nothing stops at the first problem. Each problem names the key it is
//! about, so `routes[1].priority` points at the line to fix.

use std::collections::HashMap;
use std::time::Duration;

use crate::model::{Config, DEFAULT_ROUTE, DriverConfig, SimulatorConfig};
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
    checker.issues
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
                         whitespace, '/', '#' or '+' (or leave it unset to use the host name)"
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
                DriverConfig::Simulator(sim) => self.simulator(&path, sim, config, &routes),
            }
        }
    }

    fn simulator(
        &mut self,
        path: &KeyPath,
        sim: &SimulatorConfig,
        config: &Config,
        routes: &[&str],
    ) {
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
        if let Err(why) = check_topic(&sim.topic) {
            self.problem(
                path.key("topic"),
                format!("invalid topic \"{}\": {why}", sim.topic),
            );
        }
        if !routes.contains(&sim.route.as_str()) {
            let known = routes.join(", ");
            let hint = suggest(&sim.route, routes)
                .map(|s| format!(", did you mean \"{s}\"?"))
                .unwrap_or_default();
            self.problem(
                path.key("route"),
                format!("unknown route \"{}\"{hint} (routes: {known})", sim.route),
            );
        }
    }
}

/// An MQTT topic name to publish to, with `{device}` as the only placeholder.
fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("must not be empty".into());
    }
    if topic.len() > 65_535 {
        return Err("longer than MQTT's 65535 bytes".into());
    }
    if topic.contains(['#', '+']) {
        return Err("wildcards '#' and '+' are not allowed in a topic to publish to".into());
    }
    if topic.chars().any(char::is_control) {
        return Err("control characters are not allowed".into());
    }
    if topic.starts_with('$') {
        return Err("topics starting with '$' are reserved for the broker".into());
    }
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
        assert!(
            found
                .iter()
                .any(|m| m.starts_with("drivers[0].topic: invalid topic \"sim/+/x\": wildcards"))
        );
        assert!(found.iter().any(|m| m.contains("did you mean \"default\"")));
        assert!(check_topic("sim/{device}/reading").is_ok());
        assert!(check_topic("$SYS/x").is_err());
    }
}
