//! `[[drivers]]` of the kinds that talk to attached hardware: `serial`, `modbus`, `zigbee`,
//! and the pieces they share (`[drivers.serial]` port settings, `[drivers.reopen]` recovery).
//!
//! Like the rest of the model: every field has a default documented on it, ranges and
//! cross-field rules are checked by `validate.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::DEFAULT_ROUTE;
use crate::units::ByteSize;

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
