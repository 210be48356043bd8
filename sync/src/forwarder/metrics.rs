//! The forwarder's Prometheus metrics (`outpost_kafka_*`).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Label of per-rule counters. Rules come from the config, so the set is bounded.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    pub rule: String,
}

/// Label of the state gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

/// Label of the poison-record counter: why, and where it went (`topic`: the dead-letter Kafka
/// topic; `local`: the outbox's dead-letter table). Both sets are fixed.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoisonLabel {
    pub reason: &'static str,
    pub to: &'static str,
}

#[derive(Debug)]
pub struct ForwarderMetrics {
    pub poison: Family<PoisonLabel, Counter>,
    pub produced: Counter,
    pub delivered: Counter,
    pub failed: Counter,
    pub dropped: Family<RuleLabel, Counter>,
    pub producer_restarts: Counter,
    pub transactions: Counter,
    pub transaction_aborts: Counter,
    pub in_flight: Gauge,
    pub backlog_records: Gauge,
    pub offline_since: Gauge<f64, AtomicU64>,
    pub state: Family<StateLabel, Gauge>,
    pub delivery_latency: Histogram,
}

impl Default for ForwarderMetrics {
    fn default() -> Self {
        Self {
            produced: Counter::default(),
            delivered: Counter::default(),
            failed: Counter::default(),
            dropped: Family::default(),
            poison: Family::default(),
            producer_restarts: Counter::default(),
            transactions: Counter::default(),
            transaction_aborts: Counter::default(),
            in_flight: Gauge::default(),
            backlog_records: Gauge::default(),
            offline_since: Gauge::default(),
            state: Family::default(),
            // Receipt to Kafka acknowledgement: milliseconds when live, hours after an outage.
            delivery_latency: Histogram::new([
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 600.0,
                3600.0, 86400.0,
            ]),
        }
    }
}

impl ForwarderMetrics {
    /// Registers every metric under the `outpost_kafka_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("outpost_kafka");
        r.register(
            "produced_records",
            "Records handed to the Kafka producer (re-sends after a failure count again)",
            self.produced.clone(),
        );
        r.register(
            "delivered_records",
            "Records acknowledged by Kafka (acks=all) and then deleted from the outbox",
            self.delivered.clone(),
        );
        r.register(
            "failed_records",
            "Delivery reports with an error; the record stays in the outbox and is sent again",
            self.failed.clone(),
        );
        r.register(
            "dropped_records",
            "Records deleted without forwarding by a drop or sample rule, by rule",
            self.dropped.clone(),
        );
        r.register(
            "poison_records",
            "Records Kafka refused for good, moved aside by reason and destination (topic: the \
             dead-letter topic; local: the outbox's dead-letter table)",
            self.poison.clone(),
        );
        r.register(
            "producer_restarts",
            "Producers recreated after a fatal error",
            self.producer_restarts.clone(),
        );
        r.register(
            "transactions",
            "Committed transactions (exactly-once mode)",
            self.transactions.clone(),
        );
        r.register(
            "transaction_aborts",
            "Aborted transactions (exactly-once mode); their records are sent again",
            self.transaction_aborts.clone(),
        );
        r.register(
            "in_flight_records",
            "Records produced and not yet acknowledged",
            self.in_flight.clone(),
        );
        r.register(
            "backlog_records",
            "Records in the outbox waiting for Kafka",
            self.backlog_records.clone(),
        );
        r.register(
            "offline_since_timestamp_seconds",
            "Unix time since when Kafka is unreachable (0 when it is reachable)",
            self.offline_since.clone(),
        );
        r.register(
            "state",
            "1 for the forwarder's current state (live, backfill, offline, draining, stopped)",
            self.state.clone(),
        );
        r.register_with_unit(
            "delivery_latency",
            "Time from a record's receipt to its acknowledgement by Kafka",
            Unit::Seconds,
            self.delivery_latency.clone(),
        );
    }
}
