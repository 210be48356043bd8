//! The typed configuration: every section, every field, its default and its meaning.
//!
//! Every struct is `#[serde(default, deny_unknown_fields)]`: a missing key takes the default
//! documented on its field, an unknown key is an error. Ranges are checked by
//! [`Config::validate`]: the sections in `model/` carry their own checks (an `impl Checker`
//! block at the end of each file), the rest are in `validate.rs`. `config/examples/outpost.toml` mirrors this file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::ByteSize;

/// `Deserialize` for a unit-only enum written as a string. serde's derive works with
/// `toml::from_str`, but through `toml::Value` (used by the collect-all loader) a wrong type
/// loses both the expected values and what was found; this keeps them.
/// The names must match the `Serialize` derive's `rename_all` (checked by a test).
macro_rules! deserialize_from_str {
    ($ty:ident { $($text:literal => $variant:ident),+ $(,)? }) => {
        impl $ty {
            /// Every accepted spelling, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct NameVisitor;

                impl serde::de::Visitor<'_> for NameVisitor {
                    type Value = $ty;

                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("one of ")?;
                        for (i, name) in $ty::NAMES.iter().enumerate() {
                            if i > 0 {
                                f.write_str(", ")?;
                            }
                            write!(f, "\"{name}\"")?;
                        }
                        Ok(())
                    }

                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$ty, E> {
                        match v {
                            $($text => Ok($ty::$variant),)+
                            _ => Err(E::unknown_variant(v, $ty::NAMES)),
                        }
                    }
                }

                d.deserialize_str(NameVisitor)
            }
        }
    };
}

deserialize_from_str!(LogFormat { "auto" => Auto, "human" => Human, "json" => Json });
deserialize_from_str!(Synchronous { "full" => Full, "normal" => Normal });
deserialize_from_str!(WhenFull { "reject" => Reject, "drop_oldest" => DropOldest });
deserialize_from_str!(IntegrityCheck { "quick" => Quick, "full" => Full, "off" => Off });
deserialize_from_str!(Scope { "read" => Read, "write" => Write, "admin" => Admin });
deserialize_from_str!(Compression { "none" => None, "gzip" => Gzip, "snappy" => Snappy, "lz4" => Lz4, "zstd" => Zstd });
deserialize_from_str!(BacklogOrder { "per_device" => PerDevice, "live_first" => LiveFirst });
deserialize_from_str!(SecurityProtocol { "plaintext" => Plaintext, "ssl" => Ssl, "sasl_plaintext" => SaslPlaintext, "sasl_ssl" => SaslSsl });
deserialize_from_str!(SaslMechanism { "PLAIN" => Plain, "SCRAM-SHA-256" => ScramSha256, "SCRAM-SHA-512" => ScramSha512, "OAUTHBEARER" => OauthBearer });
deserialize_from_str!(RuleKey { "device" => Device, "topic" => Topic, "none" => None });
deserialize_from_str!(RuleAction { "forward" => Forward, "drop" => Drop, "sample" => Sample });
deserialize_from_str!(CloudEvents { "off" => Off, "binary" => Binary, "structured" => Structured });

mod apps;
pub(crate) mod drivers;
mod edge;
mod http_tls;
pub(crate) mod kafka;
mod mqtt;

pub use http_tls::HttpTlsConfig;
pub use kafka::{
    BacklogOrder, CloudEvents, CommandsConfig, Compression, DeadLetterConfig, KafkaConfig,
    KafkaRule, KafkaSecurity, RuleAction, RuleKey, SaslMechanism, SecurityProtocol,
    check_kafka_topic,
};
pub use mqtt::{ClientAuth as MqttClientAuth, MqttTlsConfig};
pub use mqtt::{
    MqttAclConfig, MqttConfig, MqttLimitsConfig, MqttSessionsConfig, check_acl_pattern,
};

pub use edge::{
    AggregateConfig, Aggregation, AlertCommand, AlertConfig, AlertWebhook, DeviceFact, EdgeConfig,
    EdgeRule, EnrichInto, OnInvalid,
};

pub use apps::{AppConfig, AppsConfig, Mount, Port, RestartPolicy};

pub use drivers::{
    DataType, FlowControl, LineFormat, ModbusConfig, ModbusPointConfig, ModbusSlaveConfig,
    ModbusTransport, Order, Parity, RegisterKind, ReopenConfig, SerialLineConfig, SerialPortConfig,
    ZigbeeConfig,
};

/// Name of the route that always exists and that drivers use unless told otherwise.
pub const DEFAULT_ROUTE: &str = "default";

/// The whole configuration file. (`PartialEq` only: Modbus scales are floats.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "a table of configuration sections"
)]
pub struct Config {
    /// `[gateway]`: identity, data directory and shutdown behaviour.
    pub gateway: GatewayConfig,
    /// `[log]`: log format and verbosity.
    pub log: LogConfig,
    /// `[admin]`: the HTTP admin endpoint (health, metrics).
    pub admin: AdminConfig,
    /// `[outbox]`: the durable store-and-forward queue.
    pub outbox: OutboxConfig,
    /// `[[routes]]`: named forwarding routes in addition to the built-in `default` route.
    /// Default: none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    /// `[[drivers]]`: device drivers producing readings. Default: none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drivers: Vec<DriverConfig>,
    /// `[api]`: the management REST API under `/api/v1` on the admin listener.
    pub api: ApiConfig,
    /// `[devices]`: the device registry.
    pub devices: DevicesConfig,
    /// `[http_ingest]`: devices posting readings over HTTP.
    pub http_ingest: HttpIngestConfig,
    /// `[coap]`: the CoAP endpoint for devices.
    pub coap: CoapConfig,
    /// `[apps]`: local app containers (and `[[apps.app]]`, the declared apps).
    pub apps: AppsConfig,
    /// `[mqtt]`: the MQTT server for devices.
    pub mqtt: MqttConfig,
    /// `[kafka]`: forwarding to a cloud Kafka (and `[[kafka.rules]]`).
    pub kafka: KafkaConfig,
    /// `[edge]`: validating, transforming, enriching, aggregating and alerting on readings at
    /// the gateway (and `[[edge.rules]]`).
    pub edge: EdgeConfig,
}

/// A permission of an API token. `admin` implies `write`, which implies `read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read inventory, status and commands.
    Read,
    /// Also create and update devices, enable/disable them, queue commands.
    Write,
    /// Also delete devices and rotate their secrets.
    Admin,
}

/// `[api]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [api] table")]
pub struct ApiConfig {
    /// `[[api.tokens]]`: bearer tokens accepted by the management API. Default: none, which
    /// leaves every management route answering 401. Create one with `outpost token new`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<ApiTokenConfig>,
}

/// `[[api.tokens]]`: one bearer token, stored as its SHA-256 digest (never in clear).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [[api.tokens]] table")]
pub struct ApiTokenConfig {
    /// Required, unique: 1 to 64 of `a-z`, `0-9`, `_`, `-`. Shown in logs, never the token.
    pub name: String,
    /// Required: the SHA-256 of the token as 64 lowercase hex digits.
    pub sha256: String,
    /// Required, at least one of `"read"`, `"write"`, `"admin"`.
    pub scopes: Vec<Scope>,
}

/// `[devices]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [devices] table")]
pub struct DevicesConfig {
    /// A device not heard from for this long is reported offline. Default `"5m"`; 1s to 7d.
    #[serde(with = "crate::units::duration")]
    pub offline_after: Duration,
    /// Devices the drivers may register by themselves (a reading from an unknown device id, a
    /// Zigbee join); devices named in the config or added through the API do not count. Beyond
    /// it an unknown device's readings are still stored but the device is not registered
    /// (counted, logged, an alarm): a noisy line or a hostile radio cannot grow the registry,
    /// its memory and its health checks without bound. Default 10000; 0 to 1000000.
    pub max_automatic: usize,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        Self {
            offline_after: Duration::from_secs(300),
            max_automatic: 10_000,
        }
    }
}

/// `[http_ingest]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [http_ingest] table")]
pub struct HttpIngestConfig {
    /// Accept `POST /api/v1/ingest/{topic}` from devices. Default `true`.
    pub enabled: bool,
    /// Largest request body; larger ones get 413. Default `"1MiB"`; 1KiB to 64MiB.
    pub max_body: ByteSize,
    /// Most records in one batch body; more get 413. Default 1000; 1 to 100000.
    pub max_batch: usize,
    /// Outbox route of the records. Default `"default"`; must name an effective route.
    pub route: String,
    /// A listener of its own for device ingestion and command polling, as `IP:port`, so the
    /// admin listener (management API, metrics) can stay on loopback or a management network
    /// while devices post from the field network. Default `""`: served on the admin listener.
    pub listen: String,
    /// `[http_ingest.tls]`: HTTPS on that listener (needs `listen`; on the admin listener,
    /// ingestion follows `[admin.tls]`). Off by default.
    pub tls: HttpTlsConfig,
}

impl Default for HttpIngestConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_body: ByteSize::mib(1),
            max_batch: 1000,
            route: DEFAULT_ROUTE.to_owned(),
            listen: String::new(),
            tls: HttpTlsConfig::default(),
        }
    }
}

impl HttpIngestConfig {
    /// The ingestion listener's own address; `None`: on the admin listener (or invalid, which
    /// validation reports).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }
}

/// `[coap]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [coap] table")]
pub struct CoapConfig {
    /// Run the CoAP endpoint. Default `true`.
    pub enabled: bool,
    /// UDP address as `IP:port`. Default `"0.0.0.0:5683"`; port 0 picks a free port.
    #[serde(with = "socket_addr")]
    pub listen: SocketAddr,
    /// Networks (CIDR, e.g. `"192.168.10.0/24"`) whose devices may use plain, **unauthenticated**
    /// CoAP, naming themselves with `?d=<device id>`. Default: loopback only.
    pub plain_networks: Vec<String>,
    /// Outbox route of the records. Default `"default"`; must name an effective route.
    pub route: String,
    /// Largest request body (Block1 transfers included); larger ones get 4.13.
    /// Default `"64KiB"`; 1KiB to 16MiB.
    pub max_body: ByteSize,
    /// Remembered exchanges for de-duplicating retransmissions (RFC 7252 4.5), oldest evicted
    /// first. Default 4096; 16 to 1000000.
    pub max_exchanges: usize,
}

impl Default for CoapConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 5683)),
            plain_networks: vec!["127.0.0.0/8".to_owned(), "::1/128".to_owned()],
            route: DEFAULT_ROUTE.to_owned(),
            max_body: ByteSize::kib(64),
            max_exchanges: 4096,
        }
    }
}

/// `[gateway]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [gateway] table")]
pub struct GatewayConfig {
    /// Identity of this gateway towards the upstream. Default: the host name (see
    /// [`Config::gateway_id`]). If set: 1 to 128 characters, no whitespace, `/`, `#` or `+`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Directory for the outbox and other state. Default: `$STATE_DIRECTORY` (set by systemd's
    /// `StateDirectory=`), else `./outpost-data` (see [`Config::data_dir`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// How long shutdown may take: ingress stops and drains into the outbox, then the outbox
    /// writer commits what is queued. Past it the daemon exits non-zero. Default `"10s"`;
    /// 100ms to 1h.
    #[serde(with = "crate::units::duration")]
    pub shutdown_grace: Duration,
    /// The ingress byte budget: payload bytes received from devices and not yet committed to
    /// the outbox, all protocols together (MQTT in-flight windows, HTTP bodies, CoAP requests,
    /// the outbox queue). Beyond it MQTT connections are not read, HTTP requests wait before
    /// their body is read, CoAP requests get 5.03. Default `"64MiB"`; 1MiB to 16GiB, and at
    /// least the largest single message (`mqtt.max_packet`, `http_ingest.max_body`,
    /// `coap.max_body`).
    pub max_ingress_bytes: ByteSize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            id: None,
            data_dir: None,
            shutdown_grace: Duration::from_secs(10),
            max_ingress_bytes: ByteSize::mib(64),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable; timestamps are left out when stderr goes to journald
    /// (`JOURNAL_STREAM` is set), which stamps every line itself.
    #[default]
    Auto,
    /// Human-readable with timestamps.
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [log] table")]
pub struct LogConfig {
    /// Log line format. Default `"auto"`.
    pub format: LogFormat,
    /// Verbosity as a `tracing` filter directive, e.g. `"info"` or `"info,outpost_sync=debug"`.
    /// The `RUST_LOG` environment variable overrides it. Default `"info"`; must not be empty.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            level: "info".to_owned(),
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [admin] table")]
pub struct AdminConfig {
    /// Address of the admin HTTP endpoint (`/healthz`, `/metrics`), as `IP:port`.
    /// Default `"0.0.0.0:8080"`; port 0 picks a free port (used by tests).
    #[serde(with = "socket_addr")]
    pub listen: SocketAddr,
    /// The local admin socket (a Unix socket serving the same API, no token needed: whoever may
    /// open it is trusted with the `admin` scope; mode 0660, so root, the service's user and
    /// its group). Default `"/run/outpost/admin.sock"`; created only when its directory
    /// exists (the systemd unit's `RuntimeDirectory=`); `""` turns it off. The CLI uses it
    /// when no `--url` is given.
    pub socket: PathBuf,
    /// Whether `/metrics` and `/api/v1/status` answer anyone. Default `false`: requests from
    /// loopback and the local socket, others only with a `read` token (`/healthz` and
    /// `/readyz` answer everyone either way).
    pub public_monitoring: bool,
    /// `[admin.tls]`: HTTPS on the admin listener (the API, metrics, the status, and device
    /// ingestion when it shares the listener). Off by default.
    pub tls: HttpTlsConfig,
}

/// The local admin socket's default path (`admin.socket`).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/outpost/admin.sock";

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            socket: PathBuf::from(DEFAULT_ADMIN_SOCKET),
            public_monitoring: false,
            tls: HttpTlsConfig::default(),
        }
    }
}

/// How hard the outbox pushes each commit to stable storage (SQLite `synchronous`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Every commit is on disk before it is acknowledged: survives power loss.
    #[default]
    Full,
    /// Survives a crash of the process but not of the power: in WAL mode the last commits may
    /// roll back after power loss. Faster on slow flash.
    Normal,
}

/// What a full outbox does with a new record for a route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Refuse the new record; the producer sees the refusal (and counts it).
    #[default]
    Reject,
    /// Evict the oldest records of this route to make room.
    DropOldest,
}

/// Integrity check of the outbox file at startup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IntegrityCheck {
    /// SQLite `quick_check`: catches most corruption, proportional to the file size.
    #[default]
    Quick,
    /// SQLite `integrity_check`: thorough, slower on large outboxes.
    Full,
    /// No check.
    Off,
}

/// `[outbox]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [outbox] table")]
pub struct OutboxConfig {
    /// Durability of each commit. Default `"full"`.
    pub synchronous: Synchronous,
    /// Cap on the outbox's size; when reached, each route's `when_full` applies.
    /// Default `"1GiB"`; at least 1MiB.
    pub max_bytes: ByteSize,
    /// Free-space floor on the data directory's filesystem: the outbox counts as full when
    /// less than this is free. Default `"128MiB"`; any value (0 disables the floor).
    pub min_free_disk: ByteSize,
    /// Space kept in reserve beside the outbox (the file `outbox.reserve`) so that delivered
    /// records can still be deleted when the filesystem is full, whoever filled it: it is
    /// released when the disk is found full, and appends are refused until there is room for it
    /// again. Default `"4MiB"`; 0 (no reserve) to 1GiB.
    pub disk_reserve: ByteSize,
    /// Largest accepted record. Default `"256KiB"`; at least 1KiB and at most `max_bytes / 4`.
    pub max_record_bytes: ByteSize,
    /// Group commit: at most this many records per transaction. Default 8192; 1 to 100000.
    pub batch_max_records: usize,
    /// How long the writer lingers collecting more appends before committing; 0 commits as
    /// soon as the queue is drained. Default `"0ms"`; at most 1s.
    #[serde(with = "crate::units::duration")]
    pub batch_max_delay: Duration,
    /// Pending append requests; when the queue is full, appenders wait (back-pressure).
    /// Default 16384; 1 to 1000000.
    pub queue_capacity: usize,
    /// `when_full` of the built-in `default` route and of routes that do not set their own.
    /// Default `"reject"`.
    pub when_full: WhenFull,
    /// Check run on the outbox file at startup. Default `"quick"`.
    pub integrity_check: IntegrityCheck,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::Full,
            max_bytes: ByteSize::gib(1),
            min_free_disk: ByteSize::mib(128),
            disk_reserve: ByteSize::mib(4),
            max_record_bytes: ByteSize::kib(256),
            batch_max_records: 8192,
            batch_max_delay: Duration::ZERO,
            queue_capacity: 16_384,
            when_full: WhenFull::Reject,
            integrity_check: IntegrityCheck::Quick,
        }
    }
}

/// `[[routes]]`: a named class of records with its own priority and overflow policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [[routes]] table")]
pub struct RouteConfig {
    /// Required, unique: 1 to 64 of `a-z`, `0-9`, `_`, `-`. Naming a route `default`
    /// overrides the built-in default route.
    pub name: String,
    /// Forwarding priority, 0 to 9; higher is forwarded first. Default 0.
    pub priority: u8,
    /// Overflow policy for this route. Default: `outbox.when_full`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub when_full: Option<WhenFull>,
}

/// An effective route, with defaults resolved (see [`Config::routes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Unique route name.
    pub name: String,
    /// 0 to 9; higher is forwarded first.
    pub priority: u8,
    /// What a full outbox does with new records of this route.
    pub when_full: WhenFull,
}

impl Default for Route {
    fn default() -> Self {
        Self {
            name: DEFAULT_ROUTE.to_owned(),
            priority: 0,
            when_full: WhenFull::Reject,
        }
    }
}

/// `[[drivers]]`: one device driver; `kind` selects which.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DriverConfig {
    /// `kind = "simulator"`: a built-in virtual sensor.
    Simulator(SimulatorConfig),
    /// `kind = "serial"`: a line-oriented sensor on a serial port.
    Serial(SerialLineConfig),
    /// `kind = "modbus"`: Modbus TCP or RTU slaves polled by register map.
    Modbus(ModbusConfig),
    /// `kind = "zigbee"`: a TI Z-Stack coordinator stick.
    Zigbee(ZigbeeConfig),
}

impl DriverConfig {
    /// Every valid `kind`. Adding a kind means adding it here and to the loader's dispatch.
    pub const KINDS: &'static [&'static str] = &["simulator", "serial", "modbus", "zigbee"];

    /// The `kind` of this driver.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Simulator(_) => "simulator",
            Self::Serial(_) => "serial",
            Self::Modbus(_) => "modbus",
            Self::Zigbee(_) => "zigbee",
        }
    }

    /// The device ids this driver's configuration names (Modbus slaves, a serial port's fixed
    /// `device_id`, the simulator's devices); empty where devices are discovered (Zigbee, a
    /// serial port with `device_field`).
    pub fn configured_devices(&self) -> Vec<String> {
        match self {
            Self::Simulator(s) => (0..s.devices).map(|n| s.device_id(n)).collect(),
            Self::Serial(s) => s.device_id.iter().cloned().collect(),
            Self::Modbus(m) => m.slaves.iter().map(|s| s.device_id.clone()).collect(),
            Self::Zigbee(_) => Vec::new(),
        }
    }

    /// The driver's unique name.
    pub fn name(&self) -> &str {
        match self {
            Self::Simulator(s) => &s.name,
            Self::Serial(s) => &s.name,
            Self::Modbus(s) => &s.name,
            Self::Zigbee(s) => &s.name,
        }
    }

    /// The route of the driver's readings.
    pub fn route(&self) -> &str {
        match self {
            Self::Simulator(s) => &s.route,
            Self::Serial(s) => &s.route,
            Self::Modbus(s) => &s.route,
            Self::Zigbee(s) => &s.route,
        }
    }
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self::Simulator(SimulatorConfig::default())
    }
}

/// `kind = "simulator"`: a built-in virtual sensor for demos, installation checks and load
/// tests. Simulates `devices` devices with ids `{name}-0`, `{name}-1`, …, each producing a
/// reading of `payload_bytes` bytes every `interval`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [[drivers]] table")]
pub struct SimulatorConfig {
    /// Required, unique among drivers: 1 to 64 of `a-z`, `0-9`, `_`, `-`.
    pub name: String,
    /// Number of simulated devices. Default 1; 1 to 10000.
    pub devices: u32,
    /// Time between two readings of one device. Default `"1s"`; at least 1ms.
    #[serde(with = "crate::units::duration")]
    pub interval: Duration,
    /// Size of each reading's payload. Default 64; 16 to `outbox.max_record_bytes`.
    pub payload_bytes: usize,
    /// MQTT topic of the readings; `{device}` is replaced by the device id. No wildcards
    /// (`#`, `+`). Default `"sim/{device}/reading"`.
    pub topic: String,
    /// Route of the readings; must be `default` or a `[[routes]]` name. Default `"default"`.
    pub route: String,
    /// Stop after this many readings per device. Default: never stop.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_readings: Option<u64>,
}

impl SimulatorConfig {
    /// The id of simulated device `n` (counting from 0): `{name}-{n}`.
    pub fn device_id(&self, n: u32) -> String {
        format!("{}-{n}", self.name)
    }

    /// The topic for a device id, with `{device}` substituted.
    pub fn topic_for(&self, device_id: &str) -> String {
        self.topic.replace("{device}", device_id)
    }
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            devices: 1,
            interval: Duration::from_secs(1),
            payload_bytes: 64,
            topic: "sim/{device}/reading".to_owned(),
            route: DEFAULT_ROUTE.to_owned(),
            max_readings: None,
        }
    }
}

/// Where the daemon's state lives when nothing is configured and systemd sets no
/// `$STATE_DIRECTORY`.
const FALLBACK_DATA_DIR: &str = "./outpost-data";
/// Gateway id when none is configured and neither a machine id nor the host name is available.
const FALLBACK_GATEWAY_ID: &str = "outpost";

/// The files systemd (and D-Bus before it) keep the machine id in: 32 hex digits, given once
/// when the system is installed (machine-id(5)).
const MACHINE_ID_FILES: [&str; 2] = ["/etc/machine-id", "/var/lib/dbus/machine-id"];

/// This installation's machine id, when the system has one.
pub fn machine_id() -> Option<String> {
    MACHINE_ID_FILES.iter().find_map(|path| {
        let id = std::fs::read_to_string(path)
            .ok()?
            .trim()
            .to_ascii_lowercase();
        (id.len() == 32
            && id.bytes().all(|b| b.is_ascii_hexdigit())
            && id.bytes().any(|b| b != b'0'))
        .then_some(id)
    })
}

/// The default gateway id on a machine with a machine id: `outpost-` and 12 hex digits of a
/// SHA-256 of an Outpost-specific label and the machine id. Unique per installation (a fleet of
/// Pis all called `raspberrypi` gets distinct ids, so no two share a Kafka `transactional.id`),
/// stable across renames and reboots, and it does not disclose the machine id itself, which
/// machine-id(5) asks applications to keep confidential. 48 bits: among 10,000 gateways the
/// chance that two share an id is below one in a million.
pub fn derived_gateway_id(machine_id: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(b"outpost gateway id\0")
        .chain_update(machine_id.as_bytes())
        .finalize();
    let mut id = String::from("outpost-");
    for byte in &digest[..6] {
        id.push_str(&format!("{byte:02x}"));
    }
    id
}

impl Config {
    /// `gateway.data_dir`, else the first entry of `$STATE_DIRECTORY` (colon-separated, set by
    /// systemd), else `./outpost-data`.
    pub fn data_dir(&self) -> PathBuf {
        if let Some(dir) = &self.gateway.data_dir {
            return dir.clone();
        }
        std::env::var_os("STATE_DIRECTORY")
            .and_then(|dirs| {
                dirs.to_string_lossy()
                    .split(':')
                    .find(|d| !d.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from(FALLBACK_DATA_DIR))
    }

    /// `gateway.id`, else one derived from the machine id ([`derived_gateway_id`]), else the host
    /// name from `/proc/sys/kernel/hostname`, else `outpost`.
    pub fn gateway_id(&self) -> String {
        if let Some(id) = &self.gateway.id {
            return id.clone();
        }
        if let Some(machine) = machine_id() {
            return derived_gateway_id(&machine);
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| FALLBACK_GATEWAY_ID.to_owned())
    }

    /// The effective routes: the built-in `default` route (priority 0, `outbox.when_full`)
    /// first unless `[[routes]]` declares `default` itself, then the declared routes in file
    /// order, each with `when_full` resolved. Names are unique once the config is valid.
    pub fn routes(&self) -> Vec<Route> {
        let resolve = |r: &RouteConfig| Route {
            name: r.name.clone(),
            priority: r.priority,
            when_full: r.when_full.unwrap_or(self.outbox.when_full),
        };
        let mut out = Vec::with_capacity(self.routes.len() + 1);
        if !self.routes.iter().any(|r| r.name == DEFAULT_ROUTE) {
            out.push(Route {
                name: DEFAULT_ROUTE.to_owned(),
                priority: 0,
                when_full: self.outbox.when_full,
            });
        }
        out.extend(self.routes.iter().map(resolve));
        out
    }
}

/// Parses `"10.0.0.0/8"` or `"::1/128"` (a bare address means a single host) into the network
/// address and prefix length.
pub fn parse_cidr(text: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (addr, prefix) = text.split_once('/').unwrap_or((text, ""));
    let ip: std::net::IpAddr = addr.parse().map_err(|_| {
        format!("\"{text}\" is not a network like \"192.168.1.0/24\" or \"::1/128\"")
    })?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = if prefix.is_empty() {
        max
    } else {
        prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("\"{text}\": prefix length must be 0 to {max}"))?
    };
    Ok((ip, prefix))
}

/// `IP:port` as a string, with an error message that shows the expected form.
mod socket_addr {
    use std::fmt;
    use std::net::SocketAddr;

    use serde::Serializer;
    use serde::de::{self, Deserializer, Visitor};

    pub(super) fn serialize<S: Serializer>(addr: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(addr)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        d.deserialize_str(AddrVisitor)
    }

    struct AddrVisitor;

    impl Visitor<'_> for AddrVisitor {
        type Value = SocketAddr;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an address like \"0.0.0.0:8080\" or \"[::1]:8080\"")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<SocketAddr, E> {
            v.parse().map_err(|_| {
                E::custom(format!(
                    "invalid address \"{v}\": expected IP:port like \"0.0.0.0:8080\" or \
                     \"[::1]:8080\" (host names are not resolved)"
                ))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_is_implicit_and_overridable() {
        let mut config = Config::default();
        config.outbox.when_full = WhenFull::DropOldest;
        config.routes.push(RouteConfig {
            name: "alerts".into(),
            priority: 9,
            when_full: Some(WhenFull::Reject),
        });
        config.routes.push(RouteConfig {
            name: "bulk".into(),
            priority: 1,
            when_full: None,
        });
        let routes = config.routes();
        let names: Vec<_> = routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["default", "alerts", "bulk"]);
        assert_eq!(routes[0].when_full, WhenFull::DropOldest);
        assert_eq!(routes[1].when_full, WhenFull::Reject);
        assert_eq!(routes[2].when_full, WhenFull::DropOldest);

        config.routes.push(RouteConfig {
            name: "default".into(),
            priority: 3,
            when_full: Some(WhenFull::Reject),
        });
        let routes = config.routes();
        assert_eq!(routes.len(), 3);
        let default = routes
            .iter()
            .find(|r| r.name == "default")
            .expect("default route");
        assert_eq!((default.priority, default.when_full), (3, WhenFull::Reject));
    }

    #[test]
    fn explicit_identity_and_data_dir_win() {
        let mut config = Config::default();
        config.gateway.id = Some("gw-7".into());
        config.gateway.data_dir = Some("/var/lib/outpost".into());
        assert_eq!(config.gateway_id(), "gw-7");
        assert_eq!(config.data_dir(), PathBuf::from("/var/lib/outpost"));
        assert!(!Config::default().gateway_id().is_empty());
    }

    #[test]
    fn the_default_gateway_id_comes_from_the_machine_id() {
        let a = derived_gateway_id("3d1219c7c4c5404aaa1f6d2a48adfda4");
        let b = derived_gateway_id("3d1219c7c4c5404aaa1f6d2a48adfda5");
        assert!(
            a.starts_with("outpost-") && a.len() == "outpost-".len() + 12,
            "{a}"
        );
        assert_ne!(a, b, "two machines, two ids");
        assert_eq!(
            a,
            derived_gateway_id("3d1219c7c4c5404aaa1f6d2a48adfda4"),
            "stable"
        );
        assert!(
            !a.contains("3d1219c7"),
            "the machine id itself is not disclosed"
        );
        if let Some(machine) = machine_id() {
            assert_eq!(Config::default().gateway_id(), derived_gateway_id(&machine));
        }
    }

    #[test]
    fn simulator_ids_and_topics() {
        let sim = SimulatorConfig {
            name: "demo".into(),
            ..SimulatorConfig::default()
        };
        assert_eq!(sim.device_id(3), "demo-3");
        assert_eq!(sim.topic_for(&sim.device_id(0)), "sim/demo-0/reading");
    }

    #[test]
    fn enum_names_match_serialize() {
        fn check<T>(values: &[T], names: &[&str])
        where
            T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
        {
            assert_eq!(values.len(), names.len());
            for (value, name) in values.iter().zip(names) {
                let written = toml::Value::try_from(value).expect("serializes");
                assert_eq!(written.as_str(), Some(*name));
                assert_eq!(&written.try_into::<T>().expect("deserializes"), value);
            }
        }
        use LogFormat as L;
        check(&[L::Auto, L::Human, L::Json], LogFormat::NAMES);
        check(
            &[Synchronous::Full, Synchronous::Normal],
            Synchronous::NAMES,
        );
        check(&[WhenFull::Reject, WhenFull::DropOldest], WhenFull::NAMES);
        use IntegrityCheck as I;
        check(&[I::Quick, I::Full, I::Off], IntegrityCheck::NAMES);
    }

    #[test]
    fn plain_serde_reads_drivers_too() {
        let config: Config =
            toml::from_str("[[drivers]]\nkind = \"simulator\"\nname = \"s\"\ninterval = \"5ms\"\n")
                .expect("valid");
        assert_eq!(config.drivers[0].kind(), "simulator");
        assert_eq!(config.drivers[0].name(), "s");
        let text = toml::to_string(&config).expect("serializes");
        assert_eq!(toml::from_str::<Config>(&text).expect("round trip"), config);
    }
}
