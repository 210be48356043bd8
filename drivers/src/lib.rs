//! Sensor drivers behind one [`Driver`] trait.
//!
//! A driver reads attached sensors and sends [`Reading`]s into a bounded channel; the daemon turns
//! them into envelopes for the outbox. Drivers never depend on the storage crate: they only
//! produce readings. A full channel makes a driver wait (back-pressure reaches the sensor poll
//! loop), so no reading is dropped between a driver and the outbox.
//!
//! Each driver runs until its cancellation token fires and recovers from I/O errors by itself.
//! Today there is one built-in driver, the [`simulator`]; serial, Modbus and Zigbee follow.

#![forbid(unsafe_code)]

pub mod simulator;

use std::future::Future;
use std::pin::Pin;

use outpost_config::DriverConfig;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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

/// Builds the driver a config entry describes.
pub fn from_config(config: &DriverConfig) -> Box<dyn Driver> {
    match config {
        DriverConfig::Simulator(c) => Box::new(simulator::Simulator::new(c.clone())),
    }
}

/// Milliseconds since the Unix epoch by the wall clock (0 before 1970).
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
