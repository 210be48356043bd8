//! Edge rules in the daemon: the engine in force ([`SharedEdge`], replaced by a reload), the
//! registry's facts for it, the task that closes aggregate windows, and carrying out what the
//! engine asks (storing alert and aggregate records, queueing commands).
//!
//! The rules themselves, and what each step does, are in `outpost-edge` (docs/EDGE.md).
//! [`crate::ingress::Ingest`] runs them on every reading of a device protocol or a driver.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use outpost_edge::{Effects, Engine};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use tokio_util::sync::CancellationToken;

use crate::ingress::Ingest;
use crate::registry::Registry;

/// How often windows whose time is up are closed.
const TICK: Duration = Duration::from_secs(1);

/// The `[edge]` rules in force, shared by ingestion, the window task, the API and the
/// metrics; a reload replaces the engine as a whole.
#[derive(Debug, Clone)]
pub struct SharedEdge(Arc<RwLock<Arc<Engine>>>);

impl SharedEdge {
    pub fn new(engine: Engine) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(engine))))
    }

    /// The engine in force now.
    pub fn load(&self) -> Arc<Engine> {
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts `engine` in force and returns the one it replaces; raised alerts of unchanged
    /// rules carry over. The caller stores the old engine's flushed windows.
    pub fn replace(&self, engine: Engine) -> Arc<Engine> {
        let mut slot = self.0.write().unwrap_or_else(PoisonError::into_inner);
        engine.adopt(&slot);
        std::mem::replace(&mut *slot, Arc::new(engine))
    }
}

/// Closes aggregate windows as their time is up, until `stop`; then closes the rest (marked
/// incomplete) and stores them, so a clean stop loses no aggregate.
pub async fn run(ingest: Ingest, edge: SharedEdge, stop: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let engine = edge.load();
        let effects = engine.tick(u64::try_from(outpost_sync::outbox::now_unix_ms()).unwrap_or(0));
        ingest.carry_out(effects).await;
    }
    let effects = edge.load().flush();
    let windows = effects.records.len();
    ingest.carry_out(effects).await;
    if windows > 0 {
        tracing::info!(
            windows,
            "Stored the open aggregate windows (incomplete) at shutdown"
        );
    }
}

/// What a carried-out effect needs from the registry: commands.
pub async fn queue_commands(registry: &Registry, effects: &Effects) {
    for c in &effects.commands {
        match registry.queue_command(&c.device_id, &c.payload, None).await {
            Ok(command) => tracing::info!(
                rule = %c.rule,
                device = %c.device_id,
                command = command.id,
                "Edge rule queued a command"
            ),
            Err(e) => tracing::warn!(
                rule = %c.rule,
                device = %c.device_id,
                error = %e,
                "Edge rule could not queue its command"
            ),
        }
    }
}

/// `outpost_edge_*` metrics, read from the engine in force at each scrape.
#[derive(Debug)]
pub struct EdgeMetrics(pub SharedEdge);

impl Collector for EdgeMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        use std::sync::atomic::Ordering::Relaxed;
        let engine = self.0.load();
        type Read = fn(&outpost_edge::RuleStats) -> u64;
        let per_rule: [(&str, &str, Read); 8] = [
            (
                "outpost_edge_matched",
                "Readings a rule applied to (its when true)",
                |s| s.matched.load(Relaxed),
            ),
            (
                "outpost_edge_refused",
                "Readings refused by a rule's schema",
                |s| s.refused.load(Relaxed),
            ),
            (
                "outpost_edge_dead_lettered",
                "Readings a rule's schema sent to edge.invalid_topic",
                |s| s.dead_lettered.load(Relaxed),
            ),
            (
                "outpost_edge_transformed",
                "Readings a rule's rename, drop or set changed",
                |s| s.transformed.load(Relaxed),
            ),
            (
                "outpost_edge_errors",
                "Expression failures (a missing field, a type mismatch)",
                |s| s.errors.load(Relaxed),
            ),
            ("outpost_edge_alerts_raised", "Alerts raised", |s| {
                s.raised.load(Relaxed)
            }),
            ("outpost_edge_alerts_cleared", "Alerts cleared", |s| {
                s.cleared.load(Relaxed)
            }),
            (
                "outpost_edge_aggregates",
                "Aggregate records emitted",
                |s| s.aggregates.load(Relaxed),
            ),
        ];
        for (name, help, read) in per_rule {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (rule, stats) in engine.rule_stats() {
                let labels = [("rule", rule)];
                ConstCounter::new(read(stats)).encode(family.encode_family(&labels)?)?;
            }
        }
        let stats = engine.stats();
        for (name, help, value) in [
            (
                "outpost_edge_window_keys_refused",
                "Readings not aggregated: edge.max_window_keys windows were open",
                stats.window_keys_refused.load(Relaxed),
            ),
            (
                "outpost_edge_alert_keys_refused",
                "Readings not tracked for an alert: edge.max_alert_keys states were held",
                stats.alert_keys_refused.load(Relaxed),
            ),
        ] {
            ConstCounter::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        let gauges = [
            (
                "outpost_edge_windows_open",
                "Aggregate windows open now",
                engine.open_windows() as i64,
            ),
            (
                "outpost_edge_alerts_active",
                "Alerts raised now",
                engine.active_alerts().len() as i64,
            ),
        ];
        for (name, help, value) in gauges {
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}
