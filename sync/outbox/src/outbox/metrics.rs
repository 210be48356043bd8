//! The outbox's Prometheus metrics.
//!
//! Every counter here is incremented at the same place as the log line that reports the same
//! event, so `/metrics` and the logs never disagree.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

/// Labels of the drop and rejection counters. Routes come from the config, so the set is bounded.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteReason {
    pub route: String,
    pub reason: &'static str,
}

/// Latency buckets from 0.25 ms to 5 s: group commit lives in the low milliseconds.
fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ]
    .into_iter()
}

#[derive(Debug)]
pub struct OutboxMetrics {
    pub records: Gauge,
    pub bytes: Gauge,
    pub oldest_age_seconds: Gauge<f64, AtomicU64>,
    pub commits: Counter,
    pub commit_errors: Counter,
    pub commit_duration: Histogram,
    pub append_latency: Histogram,
    pub appended_records: Counter,
    pub acked_records: Counter,
    pub dropped_records: Family<RouteReason, Counter>,
    pub rejected_records: Family<RouteReason, Counter>,
    pub corruption_alarm: Gauge,
    /// Records in the dead-letter table (refused by Kafka for good; an alarm when not 0).
    pub dead_letters: Gauge,
    /// 1 while the filesystem is full and appends are refused.
    pub disk_full: Gauge,
}

impl Default for OutboxMetrics {
    fn default() -> Self {
        Self {
            records: Gauge::default(),
            bytes: Gauge::default(),
            oldest_age_seconds: Gauge::default(),
            commits: Counter::default(),
            commit_errors: Counter::default(),
            commit_duration: Histogram::new(latency_buckets()),
            append_latency: Histogram::new(latency_buckets()),
            appended_records: Counter::default(),
            acked_records: Counter::default(),
            dropped_records: Family::default(),
            rejected_records: Family::default(),
            corruption_alarm: Gauge::default(),
            dead_letters: Gauge::default(),
            disk_full: Gauge::default(),
        }
    }
}

impl OutboxMetrics {
    /// Registers every metric under the `outpost_outbox_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("outpost_outbox");
        r.register(
            "records",
            "Records currently held in the outbox",
            self.records.clone(),
        );
        r.register_with_unit(
            "size",
            "Bytes of records currently held (as counted against the byte cap)",
            Unit::Bytes,
            self.bytes.clone(),
        );
        r.register_with_unit(
            "oldest_record_age",
            "Age of the oldest held record by the wall clock at receipt (0 when empty)",
            Unit::Seconds,
            self.oldest_age_seconds.clone(),
        );
        r.register("commits", "Group commits", self.commits.clone());
        r.register(
            "commit_errors",
            "Group commits that failed and rolled back (disk full, I/O error)",
            self.commit_errors.clone(),
        );
        r.register_with_unit(
            "commit_duration",
            "Time to write and fsync one group commit",
            Unit::Seconds,
            self.commit_duration.clone(),
        );
        r.register_with_unit(
            "append_latency",
            "Time from an append being queued to its commit completing",
            Unit::Seconds,
            self.append_latency.clone(),
        );
        r.register(
            "appended_records",
            "Records committed",
            self.appended_records.clone(),
        );
        r.register(
            "acked_records",
            "Records deleted after delivery",
            self.acked_records.clone(),
        );
        r.register(
            "dropped_records",
            "Records evicted by a drop_oldest policy, by route and reason",
            self.dropped_records.clone(),
        );
        r.register(
            "rejected_records",
            "Appends refused, by route and reason",
            self.rejected_records.clone(),
        );
        r.register(
            "corruption_alarm",
            "1 when a corrupt outbox file was quarantined at startup",
            self.corruption_alarm.clone(),
        );
        r.register(
            "dead_letters",
            "Records Kafka refused for good, held in the local dead-letter table (an alarm when \
             not 0: list them with `outpost dead-letters list`)",
            self.dead_letters.clone(),
        );
        r.register(
            "disk_full",
            "1 while the data directory's filesystem is full: appends are refused, delivered \
             records are still deleted (the disk reserve is released)",
            self.disk_full.clone(),
        );
    }

    pub(crate) fn rejected(&self, route: &str, reason: &'static str, records: u64) {
        self.rejected_records
            .get_or_create(&RouteReason {
                route: route.to_owned(),
                reason,
            })
            .inc_by(records);
    }

    pub(crate) fn dropped(&self, route: &str, reason: &'static str, records: u64) {
        self.dropped_records
            .get_or_create(&RouteReason {
                route: route.to_owned(),
                reason,
            })
            .inc_by(records);
    }
}
