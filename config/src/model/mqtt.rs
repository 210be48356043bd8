//! `[mqtt]`: the MQTT front for devices (and the embedded broker behind it).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::DEFAULT_ROUTE;
use crate::units::ByteSize;

mod tls;
pub use tls::{ClientAuth, MqttTlsConfig};

/// `[mqtt]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [mqtt] table")]
pub struct MqttConfig {
    /// Run the MQTT front (and the embedded broker behind it). Default `true`.
    pub enabled: bool,
    /// TCP address of the front as `IP:port`. Default `"0.0.0.0:1883"`; port 0 picks a free port.
    #[serde(with = "super::socket_addr")]
    pub listen: SocketAddr,
    /// Device connections held at once; further ones wait for a free slot. Default 1000;
    /// 1 to 100000.
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
    /// PUBLISHes (any QoS) of one connection awaiting their outbox commit at once; the front
    /// reads no further packets from that connection until one completes. MQTT 5 clients are
    /// told this as their receive maximum. Bounds the front's memory per connection to about
    /// `max_inflight × max_packet`. Default 64; 1 to 65535.
    pub max_inflight: usize,
    /// `[mqtt.acl]`: topic filters a device may publish to and subscribe to.
    pub acl: MqttAclConfig,
    /// `[mqtt.limits]`: per-device publish rate limits.
    pub limits: MqttLimitsConfig,
    /// `[mqtt.tls]`: the TLS listener (off by default).
    pub tls: MqttTlsConfig,
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
