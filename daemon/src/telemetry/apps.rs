//! `/metrics` for the local apps, read from the apps' statuses at scrape time:
//!
//! * `outpost_app_up{app}`: 1 while the app's container runs (ACTIVE);
//! * `outpost_app_failed{app}`: 1 once the app is FAILED (crash loop, retries used up);
//! * `outpost_app_restarts_total{app}`: restarts made by Outpost since the daemon started;
//! * `outpost_app_last_exit_code{app}`: exit code of the last exit (absent before one);
//! * `outpost_apps_engine_up`: 1 while the container engine answers.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::apps::{AppState, Apps};

/// Name, help, and how to read the value from a status (`None`: no sample).
type GaugeSpec = (
    &'static str,
    &'static str,
    fn(&crate::apps::AppStatus) -> Option<i64>,
);

#[derive(Debug)]
pub struct AppMetrics {
    apps: Apps,
}

impl AppMetrics {
    pub fn new(apps: Apps) -> Self {
        Self { apps }
    }
}

impl Collector for AppMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let statuses = self.apps.statuses();
        let engine_up = i64::from(self.apps.engine_problem().is_none());
        let metric = encoder.encode_descriptor(
            "outpost_apps_engine_up",
            "1 while the container engine answers",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(engine_up).encode(metric)?;
        let gauges: [GaugeSpec; 3] = [
            ("outpost_app_up", "1 while the app's container runs", |s| {
                Some(i64::from(s.state == AppState::Active))
            }),
            (
                "outpost_app_failed",
                "1 once the app is FAILED and no longer restarted",
                |s| Some(i64::from(s.state == AppState::Failed)),
            ),
            (
                "outpost_app_last_exit_code",
                "Exit code of the app's last exit",
                |s| s.last_exit_code,
            ),
        ];
        for (name, help, value) in gauges {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (app, s) in &statuses {
                if let Some(v) = value(s) {
                    ConstGauge::new(v).encode(metric.encode_family(&[("app", app.as_str())])?)?;
                }
            }
        }
        let mut metric = encoder.encode_descriptor(
            "outpost_app_restarts",
            "Restarts made by Outpost since the daemon started",
            None,
            MetricType::Counter,
        )?;
        for (app, s) in &statuses {
            ConstCounter::new(s.restart_count)
                .encode(metric.encode_family(&[("app", app.as_str())])?)?;
        }
        Ok(())
    }
}
