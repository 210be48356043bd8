//! `[[drivers]]` of the kinds that talk to attached hardware: `serial`, `modbus`, `zigbee`,
//! and the pieces they share (`[drivers.serial]` port settings, `[drivers.reopen]` recovery).
//!
//! Like the rest of the model: every field has a default documented on it, ranges and
//! cross-field rules are checked by `validate.rs`.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::DEFAULT_ROUTE;
use super::{Config, DriverConfig, SimulatorConfig};
use crate::path::KeyPath;
use crate::path::suggest;
use crate::units::ByteSize;
use crate::units::duration;
use crate::validate::{Checker, root};
use crate::validate::{check_device_id, check_record_topic};

deserialize_from_str!(Parity { "none" => None, "even" => Even, "odd" => Odd });
deserialize_from_str!(FlowControl { "none" => None, "software" => Software, "hardware" => Hardware });
deserialize_from_str!(LineFormat { "json" => Json, "csv" => Csv, "kv" => Kv });
deserialize_from_str!(ModbusTransport { "tcp" => Tcp, "rtu" => Rtu });
deserialize_from_str!(RegisterKind {
    "coil" => Coil,
    "discrete_input" => DiscreteInput,
    "holding" => Holding,
    "input" => Input,
});
deserialize_from_str!(DataType {
    "bool" => Bool,
    "u16" => U16,
    "i16" => I16,
    "u32" => U32,
    "i32" => I32,
    "f32" => F32,
});
deserialize_from_str!(Order { "big" => Big, "little" => Little });

/// Parity bit of a serial line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    /// No parity bit (8N1 and friends).
    #[default]
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

/// Flow control of a serial line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowControl {
    /// None.
    #[default]
    None,
    /// XON/XOFF.
    Software,
    /// RTS/CTS.
    Hardware,
}

/// `[drivers.serial]`: a serial port and its line settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [drivers.serial] table")]
pub struct SerialPortConfig {
    /// Required: the device path. Prefer a stable name such as `/dev/serial/by-id/usb-…`:
    /// `/dev/ttyUSB0` can change after an unplug, the by-id link does not. The port is
    /// reopened by this path after an error.
    pub path: PathBuf,
    /// Bits per second. Default 9600; 50 to 4000000.
    pub baud: u32,
    /// Data bits per character. Default 8; 5 to 8.
    pub data_bits: u8,
    /// `"none"`, `"even"` or `"odd"`. Default `"none"`.
    pub parity: Parity,
    /// Stop bits. Default 1; 1 or 2.
    pub stop_bits: u8,
    /// `"none"`, `"software"` (XON/XOFF) or `"hardware"` (RTS/CTS). Default `"none"`.
    pub flow_control: FlowControl,
}

impl Default for SerialPortConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            baud: 9600,
            data_bits: 8,
            parity: Parity::None,
            stop_bits: 1,
            flow_control: FlowControl::None,
        }
    }
}

/// `[drivers.reopen]`: how a driver recovers its port or connection after an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [drivers.reopen] table")]
pub struct ReopenConfig {
    /// Wait before the first reopen attempt; doubled after each failed attempt.
    /// Default `"500ms"`; 10ms to 1m.
    #[serde(with = "crate::units::duration")]
    pub backoff_initial: Duration,
    /// Cap of the doubling wait. Default `"30s"`; `backoff_initial` to 1h.
    #[serde(with = "crate::units::duration")]
    pub backoff_max: Duration,
    /// After this many consecutive failures (open attempts, or polls for a Modbus slave) the
    /// driver's devices are reported offline. Default 5; 1 to 1000.
    pub offline_after_failures: u32,
}

impl Default for ReopenConfig {
    fn default() -> Self {
        Self {
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            offline_after_failures: 5,
        }
    }
}

/// How the lines of a serial sensor are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LineFormat {
    /// One JSON object per line: `{"id":"t1","temp":21.5}`.
    #[default]
    Json,
    /// Values separated by `separator`, named by `columns` in order: `t1,21.5,40`.
    Csv,
    /// `key=value` pairs separated by spaces (or commas/semicolons): `id=t1 temp=21.5`.
    Kv,
}

/// `kind = "serial"`: a line-oriented sensor on a serial port. Each line becomes one reading,
/// a JSON object of the line's fields (numbers where they parse as numbers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [[drivers]] table")]
pub struct SerialLineConfig {
    /// Required, unique among drivers: 1 to 64 of `a-z`, `0-9`, `_`, `-`.
    pub name: String,
    /// `[drivers.serial]`: the port. `path` is required.
    pub serial: SerialPortConfig,
    /// `"json"`, `"csv"` or `"kv"`. Default `"json"`.
    pub format: LineFormat,
    /// The field of each line holding the device id. Exactly one of `device_field` and
    /// `device_id` must be set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_field: Option<String>,
    /// A fixed device id for every line of this port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// The field holding the reading's time: a number is Unix seconds (below 1e11) or
    /// milliseconds (from 1e11), fractions allowed; a string is RFC 3339. Default: none, the
    /// receive time is used. A line whose timestamp cannot be read uses the receive time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp_field: Option<String>,
    /// CSV only, required there: the column names in order. Extra values are ignored, missing
    /// ones make the line bad.
    pub columns: Vec<String>,
    /// CSV only: the single-character separator. Default `","`.
    pub separator: String,
    /// `[drivers.units]`: field → unit (e.g. `temperature = "Cel"`), added to each reading
    /// as `"units": {...}`. Default: none.
    pub units: BTreeMap<String, String>,
    /// MQTT topic of the readings; `{device}` is replaced by the device id. No wildcards.
    /// Default `"serial/{device}"`.
    pub topic: String,
    /// Route of the readings; `default` or a `[[routes]]` name. Default `"default"`.
    pub route: String,
    /// Longest accepted line (without the line end); longer lines are dropped and counted.
    /// Default `"4KiB"`; 16B to 1MiB.
    pub max_line_bytes: ByteSize,
    /// `[drivers.reopen]`: recovery after the port fails or disappears.
    pub reopen: ReopenConfig,
}

impl Default for SerialLineConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            serial: SerialPortConfig::default(),
            format: LineFormat::Json,
            device_field: None,
            device_id: None,
            timestamp_field: None,
            columns: Vec::new(),
            separator: ",".to_owned(),
            units: BTreeMap::new(),
            topic: "serial/{device}".to_owned(),
            route: DEFAULT_ROUTE.to_owned(),
            max_line_bytes: ByteSize::kib(4),
            reopen: ReopenConfig::default(),
        }
    }
}

impl SerialLineConfig {
    /// The topic for a device id, with `{device}` substituted.
    pub fn topic_for(&self, device_id: &str) -> String {
        self.topic.replace("{device}", device_id)
    }
}

/// How a Modbus driver reaches its slaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModbusTransport {
    /// Modbus TCP to `address`.
    #[default]
    Tcp,
    /// Modbus RTU on the serial line `[drivers.serial]`.
    Rtu,
}

/// Which Modbus table a point is read from (and so which function code reads it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterKind {
    /// Coils (function 1), one bit each, read/write.
    Coil,
    /// Discrete inputs (function 2), one bit each, read-only.
    DiscreteInput,
    /// Holding registers (function 3), 16 bits each.
    #[default]
    Holding,
    /// Input registers (function 4), 16 bits each.
    Input,
}

impl RegisterKind {
    /// Coils and discrete inputs hold bits; the others hold 16-bit registers.
    pub fn is_bits(self) -> bool {
        matches!(self, Self::Coil | Self::DiscreteInput)
    }
}

/// How a point's register(s) are interpreted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    /// One bit (coils, discrete inputs only).
    Bool,
    /// One register, unsigned.
    #[default]
    U16,
    /// One register, two's complement.
    I16,
    /// Two registers, unsigned.
    U32,
    /// Two registers, two's complement.
    I32,
    /// Two registers, IEEE 754 single precision.
    F32,
}

impl DataType {
    /// Registers (or bits, for `bool`) the type occupies.
    pub fn width(self) -> u16 {
        match self {
            Self::Bool | Self::U16 | Self::I16 => 1,
            Self::U32 | Self::I32 | Self::F32 => 2,
        }
    }
}

/// Byte or word order of a multi-byte value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Most significant first (the Modbus standard for bytes; the usual word order).
    #[default]
    Big,
    /// Least significant first.
    Little,
}

/// `kind = "modbus"`: polls register maps of Modbus slaves over TCP or RTU. Each slave is one
/// device; each poll of a group of points gives one reading, a JSON object of point values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [[drivers]] table")]
pub struct ModbusConfig {
    /// Required, unique among drivers: 1 to 64 of `a-z`, `0-9`, `_`, `-`.
    pub name: String,
    /// `"tcp"` or `"rtu"`. Default `"tcp"`.
    pub transport: ModbusTransport,
    /// TCP only: the slave (or gateway) as `"host:port"` (port usually 502). Required unless
    /// every slave sets its own `address`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// `[drivers.serial]`, RTU only, required there: the serial line shared by the slaves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialPortConfig>,
    /// Time to wait for one response (and for a TCP connection). Default `"500ms"`; 10ms to 60s.
    #[serde(with = "crate::units::duration")]
    pub timeout: Duration,
    /// MQTT topic of the readings; `{device}` is replaced by the slave's device id.
    /// Default `"modbus/{device}"`.
    pub topic: String,
    /// Route of the readings; `default` or a `[[routes]]` name. Default `"default"`.
    pub route: String,
    /// `[drivers.reopen]`: reconnect backoff; `offline_after_failures` consecutive failed
    /// polls of a slave report its device offline.
    pub reopen: ReopenConfig,
    /// `[[drivers.slaves]]`: the slaves to poll. At least one.
    pub slaves: Vec<ModbusSlaveConfig>,
}

impl Default for ModbusConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            transport: ModbusTransport::Tcp,
            address: None,
            serial: None,
            timeout: Duration::from_millis(500),
            topic: "modbus/{device}".to_owned(),
            route: DEFAULT_ROUTE.to_owned(),
            reopen: ReopenConfig::default(),
            slaves: Vec::new(),
        }
    }
}

impl ModbusConfig {
    /// The topic for a device id, with `{device}` substituted.
    pub fn topic_for(&self, device_id: &str) -> String {
        self.topic.replace("{device}", device_id)
    }
}

/// `[[drivers.slaves]]`: one Modbus slave, one device.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [[drivers.slaves]] table")]
pub struct ModbusSlaveConfig {
    /// Required, unique within the driver: the device id of this slave's readings.
    pub device_id: String,
    /// The slave (unit) address: 1 to 247 on RTU; 0 to 255 on TCP (gateways route by it).
    /// Default 0 (the usual value for a plain TCP device); set it for RTU.
    pub unit: u8,
    /// TCP only: this slave's own `"host:port"`, overriding the driver's `address` (one driver
    /// for many TCP devices). Default: the driver's `address`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// `[[drivers.slaves.points]]`: the values to read. At least one.
    pub points: Vec<ModbusPointConfig>,
}

/// `[[drivers.slaves.points]]`: one value of a slave's register map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "a [[drivers.slaves.points]] table"
)]
pub struct ModbusPointConfig {
    /// Required, unique within the slave: the field name in the reading.
    pub name: String,
    /// `"coil"`, `"discrete_input"`, `"holding"` or `"input"`. Default `"holding"`.
    pub function: RegisterKind,
    /// Address of the first register (or bit), 0-based as on the wire. Required.
    pub address: u16,
    /// `"bool"` (coils and discrete inputs, which need it), `"u16"`, `"i16"` (one register),
    /// `"u32"`, `"i32"`, `"f32"` (two registers). The register count follows from it.
    /// Default `"u16"`.
    pub data_type: DataType,
    /// Two-register types: `"big"` = first register holds the high word. Default `"big"`.
    pub word_order: Order,
    /// Byte order within each register: `"big"` as Modbus specifies. Default `"big"`.
    pub byte_order: Order,
    /// The value stored is `raw * scale + offset`. Default 1.0; finite and not 0.
    pub scale: f64,
    /// See `scale`. Default 0.0; finite.
    pub offset: f64,
    /// Unit of the value (e.g. `"Cel"`, `"kW"`), added to the reading's `units`. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Poll interval; points of a slave with the same function and interval are read together
    /// in as few requests as their addresses allow. Default `"1s"`; 10ms to 1d.
    #[serde(with = "crate::units::duration")]
    pub interval: Duration,
}

impl Default for ModbusPointConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            function: RegisterKind::Holding,
            address: 0,
            data_type: DataType::U16,
            word_order: Order::Big,
            byte_order: Order::Big,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            interval: Duration::from_secs(1),
        }
    }
}

/// `kind = "zigbee"`: a TI Z-Stack coordinator stick (CC2652/CC1352) on a serial port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [[drivers]] table")]
pub struct ZigbeeConfig {
    /// Required, unique among drivers: 1 to 64 of `a-z`, `0-9`, `_`, `-`.
    pub name: String,
    /// `[drivers.serial]`: the stick. `path` is required; Z-Stack firmware usually runs at
    /// `baud = 115200`, which must be set (the port default is 9600).
    pub serial: SerialPortConfig,
    /// IEEE 802.15.4 channel used when forming a network. Default 11; 11 to 26.
    pub channel: u8,
    /// PAN id used when forming a network. Default 0x1a62; 0x0001 to 0xfffe.
    pub pan_id: u16,
    /// MQTT topic of the readings; `{device}` is replaced by the device id (the IEEE address).
    /// Default `"zigbee/{device}"`.
    pub topic: String,
    /// Route of the readings; `default` or a `[[routes]]` name. Default `"default"`.
    pub route: String,
    /// `[drivers.reopen]`: recovery after the stick fails or is unplugged.
    pub reopen: ReopenConfig,
    /// Longest permit-join a request may ask for. Default `"254s"`; 1s to 254s.
    #[serde(with = "crate::units::duration")]
    pub permit_join_max: Duration,
}

impl Default for ZigbeeConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            serial: SerialPortConfig::default(),
            channel: 11,
            pan_id: 0x1a62,
            topic: "zigbee/{device}".to_owned(),
            route: DEFAULT_ROUTE.to_owned(),
            reopen: ReopenConfig::default(),
            permit_join_max: Duration::from_secs(254),
        }
    }
}

impl ZigbeeConfig {
    /// The topic for a device id, with `{device}` substituted.
    pub fn topic_for(&self, device_id: &str) -> String {
        self.topic.replace("{device}", device_id)
    }
}

// Validation of this section: called by `crate::validate::check`, which holds the shared
// helpers (`problem`, `range`, `name`, ...).

impl Checker {
    pub(crate) fn drivers(&mut self, config: &Config) {
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

    pub(crate) fn topic(&mut self, path: KeyPath, topic: &str) {
        if let Err(why) = check_topic(topic) {
            self.problem(path, format!("invalid topic \"{topic}\": {why}"));
        }
    }

    pub(crate) fn route(&mut self, path: KeyPath, route: &str, routes: &[&str]) {
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

    pub(crate) fn device_id(&mut self, path: KeyPath, id: &str) {
        if let Err(why) = check_device_id(id) {
            self.problem(path, format!("invalid device id \"{id}\": {why}"));
        }
    }

    pub(crate) fn serial_port(&mut self, path: &KeyPath, port: &SerialPortConfig) {
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

    pub(crate) fn reopen(&mut self, path: &KeyPath, reopen: &ReopenConfig) {
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

    pub(crate) fn serial_line(&mut self, path: &KeyPath, c: &SerialLineConfig) {
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

    pub(crate) fn modbus(&mut self, path: &KeyPath, c: &ModbusConfig) {
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

    pub(crate) fn host_port(&mut self, path: KeyPath, address: &str) {
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

    pub(crate) fn zigbee(&mut self, path: &KeyPath, c: &ZigbeeConfig) {
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

    pub(crate) fn simulator(&mut self, path: &KeyPath, sim: &SimulatorConfig, config: &Config) {
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

pub(crate) fn driver_topic(driver: &DriverConfig) -> &str {
    match driver {
        DriverConfig::Simulator(c) => &c.topic,
        DriverConfig::Serial(c) => &c.topic,
        DriverConfig::Modbus(c) => &c.topic,
        DriverConfig::Zigbee(c) => &c.topic,
    }
}

pub(crate) fn driver_port(driver: &DriverConfig) -> Option<&std::path::Path> {
    match driver {
        DriverConfig::Simulator(_) => None,
        DriverConfig::Serial(c) => Some(&c.serial.path),
        DriverConfig::Modbus(c) => c.serial.as_ref().map(|s| s.path.as_path()),
        DriverConfig::Zigbee(c) => Some(&c.serial.path),
    }
}

/// A driver's topic template: a record topic once `{device}` is replaced, which is the only
/// placeholder.
pub(crate) fn check_topic(topic: &str) -> Result<(), String> {
    check_record_topic(topic)?;
    let without_placeholder = topic.replace("{device}", "");
    if without_placeholder.contains(['{', '}']) {
        return Err("the only placeholder is {device}".into());
    }
    Ok(())
}
