//! `[mqtt]`: the MQTT server for devices and local apps.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Config, DEFAULT_ROUTE, WhenFull};
use crate::units::ByteSize;
use crate::validate::{Checker, root};

mod tls;
pub use tls::{ClientAuth, MqttTlsConfig};

/// `[mqtt]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [mqtt] table")]
pub struct MqttConfig {
    /// Run the MQTT server. Default `true`.
    pub enabled: bool,
    /// TCP address of the server as `IP:port`. Default `"0.0.0.0:1883"`; port 0 picks a free port.
    #[serde(with = "super::socket_addr")]
    pub listen: SocketAddr,
    /// Authenticated connections held at once; a CONNECT beyond it is refused (MQTT 5 0x9F,
    /// 3.1.1 0x03). Default 1000; 1 to 100000.
    pub max_connections: usize,
    /// Accept CONNECT without credentials. **Anyone** on the network can then publish as the
    /// client id they choose (the records carry no device identity). Default `false`; when `true`
    /// the daemon warns loudly at start.
    pub allow_anonymous: bool,
    /// Outbox route of the records. Default `"default"`; must name an effective route.
    pub route: String,
    /// Largest MQTT packet accepted from a device; a larger one closes the connection.
    /// Default `"256KiB"`; 1KiB to 16MiB.
    pub max_packet: ByteSize,
    /// PUBLISHes (any QoS) of one connection awaiting their outbox commit at once; the server
    /// reads no further packets from that connection until one completes. MQTT 5 clients are
    /// told this as their receive maximum. Bounds the server's memory per connection to about
    /// `max_inflight × max_packet`. Default 64; 1 to 65535.
    pub max_inflight: usize,
    /// How long a new connection may take to send its CONNECT (and finish its TLS handshake).
    /// Default `"5s"`; 1s to 60s.
    #[serde(with = "crate::units::duration")]
    pub connect_timeout: Duration,
    /// Connections still in their handshake (no CONNECT yet) held at once, apart from
    /// `max_connections`. When full, the oldest pending one is closed once it is 250 ms old
    /// (until then new sockets wait in the listen backlog): a device that sends its CONNECT at
    /// once never waits long behind sockets that send nothing. Default 256; 1 to 100000.
    pub max_pending_handshakes: usize,
    /// Pending handshakes from one IP address; beyond it the oldest one of that address is
    /// closed (once 250 ms old). Default 32; 1 to 100000.
    pub max_pending_per_address: usize,
    /// MQTT 5 topic aliases a client may define per connection (announced in CONNACK).
    /// Default 16; 0 (no aliases) to 65535.
    pub topic_alias_maximum: u16,
    /// Retained messages kept (one per topic); a retained publish to a new topic beyond this is
    /// refused (MQTT 5 0x97, 3.1.1 no ack). Default 10000; 0 to 1000000.
    pub max_retained: usize,
    /// `[mqtt.sessions]`: persistent sessions and their queues.
    pub sessions: MqttSessionsConfig,
    /// `[mqtt.acl]`: topic filters a device may publish to and subscribe to.
    pub acl: MqttAclConfig,
    /// `[mqtt.limits]`: per-device publish rate limits.
    pub limits: MqttLimitsConfig,
    /// `[mqtt.tls]`: the TLS listener (off by default).
    pub tls: MqttTlsConfig,
}

/// `[mqtt.sessions]`: sessions that outlive their connection (MQTT 3.1.1 clean session 0,
/// MQTT 5 Session Expiry Interval > 0). Their subscriptions, the QoS 1 and 2 messages queued for
/// them and their QoS 2 state are kept in `sessions.db` (and the outbox), committed before the
/// publisher's acknowledgement, so they survive a restart and `kill -9`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [mqtt.sessions] table")]
pub struct MqttSessionsConfig {
    /// The longest a session is kept after its connection ends: a longer MQTT 5 Session Expiry
    /// Interval is cut to this (and the client told in CONNACK); an MQTT 3.1.1 persistent
    /// session, which never expires by the specification, expires after this. Default `"7d"`;
    /// 0s (no persistent sessions) to 136y.
    #[serde(with = "crate::units::duration")]
    pub max_expiry: Duration,
    /// Persistent sessions kept at once; a CONNECT that would create one more is refused
    /// (MQTT 5 0x97, 3.1.1 0x03). Default 10000; 0 to 1000000.
    pub max_persistent: usize,
    /// Messages queued per session (waiting or unacknowledged). Default 1000; 1 to 1000000.
    pub max_queued_messages: usize,
    /// Bytes of queued messages of all persistent sessions together (on disk, not in memory).
    /// A publish that would pass it is refused (MQTT 5 0x97, 3.1.1 no ack). Default `"64MiB"`;
    /// 64KiB to 64GiB.
    pub max_queued_bytes: ByteSize,
    /// What a session's full queue does with one more message: `"drop_oldest"` (default: the
    /// oldest message not yet sent is dropped and counted) or `"reject"` (the publisher is
    /// refused: MQTT 5 0x97, 3.1.1 no ack; nothing is stored).
    pub when_full: WhenFull,
    /// Topic filters one session may hold; beyond it SUBACK says 0x97 (3.1.1 0x80).
    /// Default 100; 1 to 100000.
    pub max_subscriptions: usize,
    /// QoS 1 and 2 messages sent to one connection and not yet acknowledged; lower if the
    /// client's MQTT 5 Receive Maximum says so. Default 64; 1 to 65535.
    pub max_inflight_out: u16,
}

impl Default for MqttSessionsConfig {
    fn default() -> Self {
        Self {
            max_expiry: Duration::from_secs(7 * 24 * 3600),
            max_persistent: 10_000,
            max_queued_messages: 1000,
            max_queued_bytes: ByteSize::mib(64),
            when_full: WhenFull::DropOldest,
            max_subscriptions: 100,
            max_inflight_out: 64,
        }
    }
}

impl MqttSessionsConfig {
    /// Problems of this section: (key under `mqtt.sessions`, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mut range = |key, value: u64, min: u64, max: u64| {
            if value < min || value > max {
                out.push((
                    key,
                    format!("must be between {min} and {max}, found {value}"),
                ));
            }
        };
        range("max_persistent", self.max_persistent as u64, 0, 1_000_000);
        range(
            "max_queued_messages",
            self.max_queued_messages as u64,
            1,
            1_000_000,
        );
        range(
            "max_subscriptions",
            self.max_subscriptions as u64,
            1,
            100_000,
        );
        range(
            "max_inflight_out",
            u64::from(self.max_inflight_out),
            1,
            65_535,
        );
        if self.max_queued_bytes < ByteSize::kib(64) || self.max_queued_bytes > ByteSize::gib(64) {
            out.push((
                "max_queued_bytes",
                format!(
                    "must be between 64KiB and 64GiB, found {}",
                    self.max_queued_bytes
                ),
            ));
        }
        if self.max_expiry.as_secs() > u64::from(u32::MAX) {
            out.push((
                "max_expiry",
                "must be at most 136y (MQTT's largest Session Expiry Interval)".to_owned(),
            ));
        }
        out
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            max_connections: 1000,
            allow_anonymous: false,
            route: DEFAULT_ROUTE.to_owned(),
            max_packet: ByteSize::kib(256),
            max_inflight: 64,
            connect_timeout: Duration::from_secs(5),
            max_pending_handshakes: 256,
            max_pending_per_address: 32,
            topic_alias_maximum: 16,
            max_retained: 10_000,
            sessions: MqttSessionsConfig::default(),
            acl: MqttAclConfig::default(),
            limits: MqttLimitsConfig::default(),
            tls: MqttTlsConfig::default(),
        }
    }
}

/// `[mqtt.limits]`: per-device rate limits on PUBLISH, token buckets shared by every connection
/// of a device (an anonymous identity counts as one device). A publish over either limit is
/// refused like one the full outbox refuses: MQTT 5 PUBACK/PUBREC 0x97, MQTT 3.1.1 no ack,
/// QoS 0 dropped; not stored, not routed, counted as `refused{reason="rate_limit"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [mqtt.limits] table")]
pub struct MqttLimitsConfig {
    /// PUBLISHes (any QoS) per second per device, sustained. Default 0: unlimited.
    pub messages_per_second: u32,
    /// Payload bytes per second per device, sustained. Default `"0"`: unlimited.
    pub bytes_per_second: ByteSize,
    /// How long a device may publish above its rates after being quiet: each bucket holds
    /// `rate × burst`. A payload larger than the byte bucket passes only when the bucket is
    /// full (the device then waits out the debt). Default `"10s"`; 1s to 1h.
    #[serde(with = "crate::units::duration")]
    pub burst: Duration,
}

impl Default for MqttLimitsConfig {
    fn default() -> Self {
        Self {
            messages_per_second: 0,
            bytes_per_second: ByteSize(0),
            burst: Duration::from_secs(10),
        }
    }
}

/// `[mqtt.acl]`: MQTT topic filters (`+` and `#` wildcards) in which `{id}` stands for the
/// authenticated device id. A PUBLISH is allowed when its topic matches one `publish` filter;
/// a SUBSCRIBE filter is allowed when every topic it can match is matched by one `subscribe`
/// filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [mqtt.acl] table")]
pub struct MqttAclConfig {
    /// Topics a device may publish to. Default `["devices/{id}/#"]`.
    pub publish: Vec<String>,
    /// Filters a device may subscribe to. Default `["devices/{id}/commands/#"]`.
    pub subscribe: Vec<String>,
}

impl Default for MqttAclConfig {
    fn default() -> Self {
        Self {
            publish: vec!["devices/{id}/#".to_owned()],
            subscribe: vec!["devices/{id}/commands/#".to_owned()],
        }
    }
}

/// Checks one ACL pattern: a valid MQTT topic filter once `{id}` is substituted, `{id}` only as
/// a whole level.
pub fn check_acl_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("must not be empty".to_owned());
    }
    let levels: Vec<&str> = pattern.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains("{id}") && *level != "{id}" {
            return Err(format!("\"{pattern}\": {{id}} must be a whole topic level"));
        }
        if level.contains(['{', '}']) && *level != "{id}" {
            return Err(format!("\"{pattern}\": the only placeholder is {{id}}"));
        }
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(format!("\"{pattern}\": # must be the whole last level"));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("\"{pattern}\": + must be a whole level"));
        }
    }
    Ok(())
}

// Validation of this section: called by `crate::validate::check`, which holds the shared
// helpers (`problem`, `range`, `name`, ...).

impl Checker {
    pub(crate) fn mqtt(&mut self, config: &Config) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::problems;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = MqttConfig::default();
        assert_eq!(c.listen.to_string(), "0.0.0.0:1883");
        assert_eq!((c.max_connections, c.allow_anonymous), (1000, false));
        assert_eq!(c.max_packet, ByteSize::kib(256));
        assert_eq!(c.max_inflight, 64);
        assert_eq!(c.acl.publish, ["devices/{id}/#"]);
        assert_eq!(c.acl.subscribe, ["devices/{id}/commands/#"]);
        assert_eq!(
            (c.limits.messages_per_second, c.limits.bytes_per_second),
            (0, ByteSize(0)),
            "unlimited"
        );
        assert_eq!(c.limits.burst, Duration::from_secs(10));
    }

    #[test]
    fn limits_parse_human_units_and_burst_is_bounded() {
        let c = crate::from_toml_str(
            "[mqtt.limits]\nmessages_per_second = 50\nbytes_per_second = \"64KiB\"\nburst = \"2s\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.mqtt.limits.messages_per_second, 50);
        assert_eq!(c.mqtt.limits.bytes_per_second, ByteSize::kib(64));
        assert_eq!(c.mqtt.limits.burst, Duration::from_secs(2));
        assert_eq!(
            problems("[mqtt.limits]\nburst = \"0s\"\n")
                .iter()
                .map(|p| p.split(':').next().unwrap_or(""))
                .collect::<Vec<_>>(),
            ["mqtt.limits.burst"]
        );
    }

    #[test]
    fn sessions_and_handshake_keys_are_checked_with_their_paths() {
        let c = crate::from_toml_str(
            "[mqtt]\nconnect_timeout = \"2s\"\n[mqtt.sessions]\nmax_expiry = \"1h\"\nwhen_full = \"reject\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.mqtt.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.mqtt.sessions.max_expiry, Duration::from_secs(3600));
        assert_eq!(c.mqtt.sessions.when_full, WhenFull::Reject);
        let found = problems(
            "[mqtt]\nconnect_timeout = \"0s\"\nmax_pending_handshakes = 0\n\
             [mqtt.sessions]\nmax_queued_messages = 0\nmax_queued_bytes = \"1KiB\"\nmax_inflight_out = 0\n",
        );
        let keys: Vec<&str> = found
            .iter()
            .map(|p| p.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            keys,
            [
                "mqtt.connect_timeout",
                "mqtt.max_pending_handshakes",
                "mqtt.sessions.max_inflight_out",
                "mqtt.sessions.max_queued_bytes",
                "mqtt.sessions.max_queued_messages",
            ],
            "{found:?}"
        );
    }

    #[test]
    fn acl_patterns_are_checked() {
        assert!(check_acl_pattern("devices/{id}/#").is_ok());
        assert!(check_acl_pattern("devices/+/telemetry").is_ok());
        assert!(check_acl_pattern("").is_err());
        assert!(check_acl_pattern("devices/x{id}/#").is_err());
        assert!(check_acl_pattern("devices/{name}/#").is_err());
        assert!(check_acl_pattern("devices/#/x").is_err());
        assert!(check_acl_pattern("devices/a+").is_err());
    }

    #[test]
    fn every_problem_names_its_key() {
        let found = problems(
            "[mqtt]\nmax_connections = 0\nroute = \"nowhere\"\nmax_packet = \"100B\"\n\
             [mqtt.acl]\npublish = [\"ok/{id}\", \"a/#/b\"]\nsubscribe = [\"\"]\n",
        );
        let keys: Vec<&str> = found
            .iter()
            .map(|p| p.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            keys,
            [
                "mqtt.acl.publish[1]",
                "mqtt.acl.subscribe[0]",
                "mqtt.max_connections",
                "mqtt.max_packet",
                "mqtt.route",
            ],
            "{found:?}"
        );
    }
}
