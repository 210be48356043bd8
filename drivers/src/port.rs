//! Shared plumbing of the drivers that own a port: opening a serial port from its config,
//! capped exponential backoff between reopen attempts, and rate-limited logging.
//!
//! Ports are always (re)opened by the configured path, so a stable `/dev/serial/by-id/…` link
//! finds the adapter again after it was unplugged and came back under another `/dev/ttyUSB*`.

use std::time::Duration;

use outpost_config::{FlowControl, Parity, ReopenConfig, SerialPortConfig};
use tokio::time::Instant;
use tokio_serial::{SerialPortBuilderExt, SerialStream};

pub use outpost_pacing::Backoff;

/// Opens the serial port `config` describes, non-blocking, for use with tokio.
///
/// Must be called inside a tokio runtime. Errors name the path.
pub fn open_serial(config: &SerialPortConfig) -> Result<SerialStream, OpenError> {
    let data_bits = match config.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    let parity = match config.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    };
    let stop_bits = if config.stop_bits == 2 {
        tokio_serial::StopBits::Two
    } else {
        tokio_serial::StopBits::One
    };
    let flow_control = match config.flow_control {
        FlowControl::None => tokio_serial::FlowControl::None,
        FlowControl::Software => tokio_serial::FlowControl::Software,
        FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
    };
    let path = config.path.to_string_lossy().into_owned();
    tokio_serial::new(path.clone(), config.baud)
        .data_bits(data_bits)
        .parity(parity)
        .stop_bits(stop_bits)
        .flow_control(flow_control)
        .open_native_async()
        .map_err(|e| OpenError {
            path,
            message: e.to_string(),
        })
}

/// A port could not be opened. Retry later (with [`Backoff`]): the device may come back.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot open {path}: {message}")]
pub struct OpenError {
    /// The configured path.
    pub path: String,
    /// What the OS said.
    pub message: String,
}

/// The reopen loop's backoff: from `reopen.backoff_initial`, doubling up to `reopen.backoff_max`.
pub fn reopen_backoff(reopen: &ReopenConfig) -> Backoff {
    Backoff::new(reopen.backoff_initial, reopen.backoff_max)
}

/// Logs at most once per period, carrying how many events happened since the last line.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    period: Duration,
    last: Option<Instant>,
    pending: u64,
}

impl LogLimiter {
    /// One line per `period` at most.
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            last: None,
            pending: 0,
        }
    }

    /// Counts one event; returns `Some(n)` when a line should be written now, `n` being the
    /// events since the previous line (this one included).
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.pending += 1;
        match self.last {
            Some(last) if now.duration_since(last) < self.period => None,
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.pending))
            }
        }
    }
}

/// Sleeps `wait` unless `shutdown` fires first; returns false on shutdown.
pub async fn sleep_or_stop(wait: Duration, shutdown: &tokio_util::sync::CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        () = shutdown.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limiter_counts_suppressed_events() {
        let mut l = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.hit(t0), Some(1));
        assert_eq!(l.hit(t0 + Duration::from_secs(1)), None);
        assert_eq!(l.hit(t0 + Duration::from_secs(2)), None);
        assert_eq!(l.hit(t0 + Duration::from_secs(11)), Some(3));
    }

    #[tokio::test]
    async fn opening_a_missing_port_names_the_path() {
        let config = SerialPortConfig {
            path: "/nonexistent/tty-outpost".into(),
            ..SerialPortConfig::default()
        };
        let err = open_serial(&config).expect_err("no such port");
        assert!(
            err.to_string().contains("/nonexistent/tty-outpost"),
            "{err}"
        );
    }
}
