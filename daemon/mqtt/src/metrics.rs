//! `outpost_mqtt_*` metrics, and the same figures for the status API.
//!
//! Per-device series exist only for registered devices (anonymous clients are counted in the
//! totals only), so the label set is bounded by the registry. A connection resolves its
//! device's counters once at CONNECT; the data path then only increments atomics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry as MetricsRegistry, Unit};
use serde::Serialize;

/// Why a PUBLISH or SUBSCRIBE was refused.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum RefusedReason {
    /// Outside the ACL (publish topic or subscribe filter).
    Acl,
    /// The outbox is full (`reject` policy).
    OutboxFull,
    /// The outbox could not take it (storage error, closing, record too large).
    OutboxError,
    /// Over the device's `[mqtt.limits]` rate.
    RateLimit,
    /// The topic breaks the record topic rule every ingress applies.
    InvalidTopic,
    /// A persistent session's queue (`reject` policy) or the sessions' byte budget is full, or
    /// the retained-message cap is reached.
    QueueFull,
    /// The payload is not UTF-8 although its Payload Format Indicator says so (MQTT 5 0x99).
    PayloadFormat,
    /// The device was disabled, deleted or its secret rotated since it connected.
    Revoked,
    /// A SUBSCRIBE filter that is not valid, or a shared subscription.
    InvalidFilter,
    /// An edge rule's schema refused the payload (MQTT 5 0x99).
    Invalid,
}

impl RefusedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Acl => "acl",
            Self::OutboxFull => "outbox_full",
            Self::OutboxError => "outbox_error",
            Self::RateLimit => "rate_limit",
            Self::InvalidTopic => "invalid_topic",
            Self::QueueFull => "queue_full",
            Self::PayloadFormat => "payload_format",
            Self::Revoked => "revoked",
            Self::InvalidFilter => "invalid_filter",
            Self::Invalid => "invalid_payload",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `acl`, `outbox_full`, `outbox_error`, `rate_limit`, `invalid_topic`, `queue_full`,
    /// `payload_format`, `revoked`, `invalid_filter`, `invalid_payload`.
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabel {
    pub device: String,
}

/// `outpost_mqtt_*` metrics. Clones share the counters.
#[derive(Debug, Clone)]
pub struct MqttMetrics {
    pub connections: Gauge,
    pub connects_refused: Counter,
    /// PUBLISHes committed to the outbox (in).
    pub publishes: Counter,
    /// PUBLISHes delivered to devices (out).
    pub deliveries: Counter,
    /// PUBLISHes stored but not routed: no subscription at the broker matches, not retained.
    pub unrouted: Counter,
    pub acl_denied: Counter,
    pub outbox_refused: Counter,
    pub refused: Family<ReasonLabel, Counter>,
    pub malformed: Counter,
    /// PUBLISH received → its PUBACK/PUBREC written (QoS 1 and 2).
    pub ack_latency: Histogram,
    pub device_publishes: Family<DeviceLabel, Counter>,
    pub device_deliveries: Family<DeviceLabel, Counter>,
    /// Sessions held (connected or not) and persistent ones among them.
    pub sessions: Gauge,
    pub persistent_sessions: Gauge,
    /// Messages queued for persistent sessions (on disk).
    pub queued: Gauge,
    /// Messages a session did not get: `queue_full` (oldest dropped), `expired` (message
    /// expiry), `too_large` (over the client's Maximum Packet Size).
    pub dropped: Family<ReasonLabel, Counter>,
    pub retained: Gauge,
    /// Wills published.
    pub wills: Counter,
    /// Sessions removed because their expiry interval passed.
    pub sessions_expired: Counter,
    /// Pending handshakes closed to make room for newer ones (or over the per-address limit).
    pub handshakes_evicted: Counter,
    /// PUBLISHes that waited for the ingress byte budget (the connection stopped reading).
    pub budget_waits: Counter,
    /// SUBACKs written: SUBSCRIBEs answered, their filters in effect (granted or refused).
    pub subacks: Counter,
}

impl Default for MqttMetrics {
    fn default() -> Self {
        Self {
            connections: Gauge::default(),
            connects_refused: Counter::default(),
            publishes: Counter::default(),
            deliveries: Counter::default(),
            unrouted: Counter::default(),
            acl_denied: Counter::default(),
            outbox_refused: Counter::default(),
            refused: Family::default(),
            malformed: Counter::default(),
            ack_latency: Histogram::new([
                0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
            ]),
            device_publishes: Family::default(),
            device_deliveries: Family::default(),
            sessions: Gauge::default(),
            persistent_sessions: Gauge::default(),
            queued: Gauge::default(),
            dropped: Family::default(),
            retained: Gauge::default(),
            wills: Counter::default(),
            sessions_expired: Counter::default(),
            handshakes_evicted: Counter::default(),
            budget_waits: Counter::default(),
            subacks: Counter::default(),
        }
    }
}

/// One device's counters, resolved at CONNECT (`None` for anonymous clients).
#[derive(Debug, Clone, Default)]
pub struct DeviceCounters {
    pub publishes: Option<Counter>,
    pub deliveries: Option<Counter>,
}

/// The MQTT figures in the status API.
#[derive(Debug, Clone, Serialize)]
pub struct MqttStatus {
    pub connections: i64,
    pub connects_refused: u64,
    pub publishes_in: u64,
    pub publishes_out: u64,
    pub refused_acl: u64,
    pub refused_outbox_full: u64,
    pub refused_outbox_error: u64,
    pub refused_rate_limit: u64,
    pub refused_invalid_topic: u64,
    pub refused_queue_full: u64,
    pub malformed: u64,
    pub sessions: i64,
    pub persistent_sessions: i64,
    pub queued_messages: i64,
    pub retained_messages: i64,
}

impl MqttMetrics {
    /// Counts a refused PUBLISH/SUBSCRIBE (the caller logs it in the same place).
    pub fn refuse(&self, reason: RefusedReason) {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
        match reason {
            RefusedReason::Acl => {
                self.acl_denied.inc();
            }
            RefusedReason::OutboxFull | RefusedReason::OutboxError => {
                self.outbox_refused.inc();
            }
            RefusedReason::RateLimit
            | RefusedReason::InvalidTopic
            | RefusedReason::QueueFull
            | RefusedReason::PayloadFormat
            | RefusedReason::Revoked
            | RefusedReason::InvalidFilter
            | RefusedReason::Invalid => {}
        }
    }

    /// The per-device counters of a registered device.
    pub fn device(&self, device_id: &str) -> DeviceCounters {
        let label = DeviceLabel {
            device: device_id.to_owned(),
        };
        DeviceCounters {
            publishes: Some(self.device_publishes.get_or_create(&label).clone()),
            deliveries: Some(self.device_deliveries.get_or_create(&label).clone()),
        }
    }

    pub fn status(&self) -> MqttStatus {
        let refused = |r: RefusedReason| {
            self.refused
                .get_or_create(&ReasonLabel { reason: r.as_str() })
                .get()
        };
        MqttStatus {
            connections: self.connections.get(),
            connects_refused: self.connects_refused.get(),
            publishes_in: self.publishes.get(),
            publishes_out: self.deliveries.get(),
            refused_acl: refused(RefusedReason::Acl),
            refused_outbox_full: refused(RefusedReason::OutboxFull),
            refused_outbox_error: refused(RefusedReason::OutboxError),
            refused_rate_limit: refused(RefusedReason::RateLimit),
            refused_invalid_topic: refused(RefusedReason::InvalidTopic),
            refused_queue_full: refused(RefusedReason::QueueFull),
            malformed: self.malformed.get(),
            sessions: self.sessions.get(),
            persistent_sessions: self.persistent_sessions.get(),
            queued_messages: self.queued.get(),
            retained_messages: self.retained.get(),
        }
    }

    /// Registers every metric under the `outpost_mqtt_` prefix.
    pub fn register(&self, registry: &mut MetricsRegistry) {
        let r = registry.sub_registry_with_prefix("outpost_mqtt");
        r.register(
            "connections",
            "Client connections open (after CONNECT)",
            self.connections.clone(),
        );
        r.register(
            "connects_refused",
            "CONNECTs refused (credentials, disabled, broker unavailable)",
            self.connects_refused.clone(),
        );
        r.register(
            "publishes",
            "PUBLISHes committed to the outbox",
            self.publishes.clone(),
        );
        r.register(
            "deliveries",
            "PUBLISHes written to subscribers",
            self.deliveries.clone(),
        );
        r.register(
            "unrouted",
            "PUBLISHes stored that no subscription matched and that were not retained",
            self.unrouted.clone(),
        );
        r.register(
            "acl_denied",
            "PUBLISH topics and SUBSCRIBE filters refused by the ACL",
            self.acl_denied.clone(),
        );
        r.register(
            "outbox_refused",
            "PUBLISHes the outbox refused (not acknowledged, or MQTT 5 0x97/0x80)",
            self.outbox_refused.clone(),
        );
        r.register(
            "refused",
            "PUBLISHes and SUBSCRIBE filters refused, by reason",
            self.refused.clone(),
        );
        r.register(
            "malformed",
            "Connections closed for malformed or out-of-order packets",
            self.malformed.clone(),
        );
        r.register_with_unit(
            "ack_latency",
            "Time from receiving a QoS 1/2 PUBLISH to writing its PUBACK/PUBREC (after the commit)",
            Unit::Seconds,
            self.ack_latency.clone(),
        );
        r.register(
            "device_publishes",
            "PUBLISHes committed, per registered device",
            self.device_publishes.clone(),
        );
        r.register(
            "device_deliveries",
            "PUBLISHes delivered, per registered device",
            self.device_deliveries.clone(),
        );
        r.register(
            "sessions",
            "Sessions held, connected or not",
            self.sessions.clone(),
        );
        r.register(
            "persistent_sessions",
            "Sessions that outlive their connection (kept in sessions.db)",
            self.persistent_sessions.clone(),
        );
        r.register(
            "queued",
            "Messages queued for persistent sessions (on disk)",
            self.queued.clone(),
        );
        r.register(
            "dropped",
            "Messages a session did not get, by reason (queue_full, expired, too_large)",
            self.dropped.clone(),
        );
        r.register("retained", "Retained messages held", self.retained.clone());
        r.register("wills", "Wills published", self.wills.clone());
        r.register(
            "sessions_expired",
            "Sessions removed because their expiry interval passed",
            self.sessions_expired.clone(),
        );
        r.register(
            "handshakes_evicted",
            "Connections closed before their CONNECT to make room for newer ones",
            self.handshakes_evicted.clone(),
        );
        r.register(
            "budget_waits",
            "PUBLISHes that waited for the ingress byte budget (gateway.max_ingress_bytes); \
             their connection was not read meanwhile",
            self.budget_waits.clone(),
        );
        r.register(
            "subacks",
            "SUBACKs written: SUBSCRIBEs answered, their granted filters already in effect",
            self.subacks.clone(),
        );
    }

    /// Counts a message a session did not get.
    pub fn drop_message(&self, reason: &'static str) {
        self.dropped.get_or_create(&ReasonLabel { reason }).inc();
    }
}
