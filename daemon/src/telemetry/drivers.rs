//! `/metrics` for the drivers: read from each driver's [`DriverStats`] at scrape time (atomics;
//! a scrape never waits for a driver).
//!
//! * `outpost_driver_frames_ok_total{driver,kind}`: frames (lines, responses, messages) turned
//!   into readings;
//! * `outpost_driver_frames_bad_total{driver,kind}`: frames that could not be decoded;
//! * `outpost_driver_frames_dropped_total{driver,kind}`: frames dropped undecoded (too long,
//!   partial at a reopen);
//! * `outpost_driver_reopens_total{driver,kind}`: reopens of a port or connection after a
//!   failure;
//! * `outpost_driver_up{driver,kind}`: 1 while the port/connection works;
//! * `outpost_driver_device_errors_total{driver,device,kind}`: per-device errors (`timeout`,
//!   `exception`, `transport`).

use std::sync::{Arc, PoisonError, RwLock};

use outpost_drivers::{DriverStats, StatsSnapshot};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// The stats of the drivers that run now: a reload adds and removes entries.
pub type DriverStatsList = Arc<RwLock<Vec<Arc<DriverStats>>>>;

/// The collector over every configured driver's stats.
#[derive(Debug, Default)]
pub struct DriverMetrics {
    drivers: DriverStatsList,
}

impl DriverMetrics {
    pub fn new(drivers: DriverStatsList) -> Self {
        Self { drivers }
    }
}

type Labels = [(&'static str, String); 2];
/// Name, help, and how to read the value from a snapshot.
type CounterSpec = (&'static str, &'static str, fn(&StatsSnapshot) -> u64);

impl Collector for DriverMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snapshots: Vec<_> = self
            .drivers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|d| d.snapshot())
            .collect();
        if snapshots.is_empty() {
            return Ok(());
        }
        let labels = |s: &StatsSnapshot| -> Labels {
            [("driver", s.name.clone()), ("kind", s.kind.to_owned())]
        };
        let counters: [CounterSpec; 4] = [
            (
                "outpost_driver_frames_ok",
                "Frames turned into readings",
                |s| s.frames_ok,
            ),
            (
                "outpost_driver_frames_bad",
                "Frames that could not be decoded",
                |s| s.frames_bad,
            ),
            (
                "outpost_driver_frames_dropped",
                "Frames dropped undecoded (too long, partial at a reopen)",
                |s| s.frames_dropped,
            ),
            (
                "outpost_driver_reopens",
                "Reopens of a port or connection after a failure",
                |s| s.reopens,
            ),
        ];
        for (name, help, value) in counters {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &snapshots {
                ConstCounter::new(value(s)).encode(metric.encode_family(&labels(s))?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "outpost_driver_up",
            "1 while the driver's port or connection works",
            None,
            MetricType::Gauge,
        )?;
        for s in &snapshots {
            ConstGauge::new(i64::from(s.up)).encode(metric.encode_family(&labels(s))?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "outpost_driver_device_errors",
            "Errors per device: timeout, exception, transport",
            None,
            MetricType::Counter,
        )?;
        for s in &snapshots {
            for (device, kind, n) in &s.device_errors {
                let labels = [
                    ("driver", s.name.clone()),
                    ("device", device.clone()),
                    ("kind", kind.as_str().to_owned()),
                ];
                ConstCounter::new(*n).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_driver() {
        let stats = Arc::new(DriverStats::new("line", "serial"));
        stats.frame_ok();
        stats.reopened();
        stats.set_up();
        stats.device_error("m1", outpost_drivers::ErrorKind::Timeout);
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(DriverMetrics::new(Arc::new(RwLock::new(vec![
            stats,
        ])))));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        for line in [
            "outpost_driver_frames_ok_total{driver=\"line\",kind=\"serial\"} 1",
            "outpost_driver_reopens_total{driver=\"line\",kind=\"serial\"} 1",
            "outpost_driver_up{driver=\"line\",kind=\"serial\"} 1",
            "outpost_driver_device_errors_total{driver=\"line\",device=\"m1\",kind=\"timeout\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
