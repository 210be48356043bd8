//! Sensor drivers behind one [`Driver`] trait.
//!
//! A driver reads attached sensors and sends [`Reading`]s into a bounded channel; the daemon turns
//! them into envelopes for the outbox. Drivers never depend on the storage crate: they only
//! produce readings. A full channel makes a driver wait (back-pressure reaches the sensor poll
//! loop), so no reading is dropped between a driver and the outbox.
//!
//! Each driver runs until its cancellation token fires and recovers from I/O errors by itself:
//! a failed port or connection is reopened by its configured path with capped exponential
//! backoff ([`port::Backoff`] (`outpost-pacing`)); after `reopen.offline_after_failures` consecutive failures the
//! driver reports its devices offline through [`DeviceHealth`]. Every driver counts what it does
//! in its [`DriverStats`], which the daemon shows in `/metrics` and `/api/v1/status`.
//!
//! **Readings** are JSON objects (`content_type` `application/json`): the values by field name,
//! numbers where the source gives numbers, plus `"units": {"<field>": "<unit>"}` when units are
//! known and `"time_ms"` (Unix milliseconds: the source's own timestamp when it sends one, else
//! the time the driver read it; every driver sets it). The device
//! id and the driver name travel beside the payload (the envelope's device id and `driver`
//! header), so a stored reading always carries device id, driver and unit.
//!
//! Built-in drivers: [`simulator`], [`line`] (serial line sensors), [`modbus`] (TCP and RTU),
//! [`zigbee`] (TI Z-Stack coordinator).

#![forbid(unsafe_code)]

pub mod line;
pub mod modbus;
pub mod port;
pub mod simulator;
pub mod stats;
pub mod zigbee;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use outpost_config::DriverConfig;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use stats::{DriverStats, ErrorKind, StatsSnapshot};

/// Content type of the JSON readings the hardware drivers produce.
pub const JSON: &str = "application/json";

/// One value (or set of values) read from a sensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// The driver that read it (its configured name).
    pub driver: String,
    /// The device the reading belongs to, as identified by the driver.
    pub device_id: String,
    pub topic: String,
    /// The outbox route the reading goes to.
    pub route: String,
    pub content_type: Option<String>,
    pub payload: Vec<u8>,
    /// Wall clock at the time of reading (informational).
    pub received_at_ms: i64,
}

/// Where a driver sends its readings.
pub type ReadingSink = mpsc::Sender<Reading>;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The daemon stopped accepting readings (shutdown): stop quietly.
    #[error("reading sink closed")]
    SinkClosed,
    /// The driver cannot run with this configuration; its supervisor should not retry.
    #[error("driver `{driver}`: {message}")]
    Fatal { driver: String, message: String },
}

pub type DriverFuture = Pin<Box<dyn Future<Output = Result<(), DriverError>> + Send>>;

/// A sensor driver.
pub trait Driver: Send + std::fmt::Debug {
    /// The configured name, used in logs, metrics and the status.
    fn name(&self) -> &str;

    /// Reads until `shutdown` fires. Recovers from I/O errors by itself; returns an error only
    /// when it cannot go on.
    fn run(self: Box<Self>, sink: ReadingSink, shutdown: CancellationToken) -> DriverFuture;
}

/// How a driver tells the daemon about the health of its devices. The daemon implements it on
/// top of the device registry; drivers call it from their tasks, so implementations must not
/// block (no I/O; an in-memory update).
pub trait DeviceHealth: Send + Sync + std::fmt::Debug {
    /// `device_id` stopped answering (or its port is gone) after the configured number of
    /// consecutive failures: report it offline until it is heard from again.
    fn offline(&self, driver: &str, device_id: &str, reason: &str);
}

/// A [`DeviceHealth`] that ignores everything (unit tests, tools).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHealth;

impl DeviceHealth for NoHealth {
    fn offline(&self, _driver: &str, _device_id: &str, _reason: &str) {}
}

/// What the daemon hands every driver besides its config.
#[derive(Debug, Clone)]
pub struct DriverContext {
    /// The driver's counters; the daemon keeps another `Arc` to report them.
    pub stats: Arc<DriverStats>,
    /// Where offline devices are reported.
    pub health: Arc<dyn DeviceHealth>,
    /// The daemon's handle to the Zigbee driver (permit join); the first Zigbee driver built
    /// with this context attaches to it.
    pub zigbee: zigbee::ZigbeeControl,
}

impl DriverContext {
    /// Fresh counters for `config` and a health hook.
    pub fn new(config: &DriverConfig, health: Arc<dyn DeviceHealth>) -> Self {
        Self {
            stats: Arc::new(DriverStats::new(config.name(), config.kind())),
            health,
            zigbee: zigbee::ZigbeeControl::default(),
        }
    }

    /// Fresh counters and no health reporting (tests, benchmarks, tools).
    pub fn detached(name: &str, kind: &'static str) -> Self {
        Self {
            stats: Arc::new(DriverStats::new(name, kind)),
            health: Arc::new(NoHealth),
            zigbee: zigbee::ZigbeeControl::default(),
        }
    }
}

/// Builds the driver a config entry describes.
pub fn from_config(config: &DriverConfig, ctx: DriverContext) -> Box<dyn Driver> {
    match config {
        DriverConfig::Simulator(c) => {
            ctx.stats.set_up();
            Box::new(simulator::Simulator::new(c.clone()))
        }
        DriverConfig::Serial(c) => Box::new(line::SerialLineDriver::new(c.clone(), ctx)),
        DriverConfig::Modbus(c) => Box::new(modbus::ModbusDriver::new(c.clone(), ctx)),
        DriverConfig::Zigbee(c) => Box::new(ctx.zigbee.clone().driver(c.clone(), ctx)),
    }
}

/// Milliseconds since the Unix epoch by the wall clock (0 before 1970).
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
