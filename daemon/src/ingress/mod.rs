//! Ingress: everything that turns outside input into envelopes for the outbox.
//!
//! Device protocols (HTTP here, CoAP in [`coap`], MQTT later) authenticate the device, validate
//! and split the body ([`body`]), then hand the records to [`Ingest::submit`], which appends them
//! to the outbox and resolves only after the commit — the protocol acknowledges the device only
//! then. Every stored record carries the **authenticated** device id (contract point 5).
//!
//! Monitoring: a committed JSON object record with a numeric top-level `rssi` (dBm) reports the
//! device's signal quality, and numeric `lat` and `lon` its location (see [`reported`]).
//!
//! After the commit each record that did not come over MQTT is also offered to the local readings
//! stream (a bounded broadcast channel the local MQTT bus publishes from, see [`bus`]; the MQTT
//! server routes MQTT records itself). A slow local subscriber misses readings on that stream (it
//! lags); the outbox still has every one of them.

pub use outpost_codec::body;
pub mod budget;
pub mod bus;
pub mod coap;
pub mod drivers;
pub mod http;
pub mod mqtt;

use std::sync::Arc;

use bytes::Bytes;
use outpost_sync::forwarder::SharedRules;
use outpost_sync::forwarder::rules::RecordView;
use outpost_sync::{AppendError, Envelope, Outbox, Source};
use tokio::sync::broadcast;

use crate::edge::SharedEdge;
use crate::registry::{Registry, Traffic};

/// What the edge rules' stateful steps get once a batch is committed.
type Observed = Option<(Arc<outpost_edge::Engine>, Vec<outpost_edge::Observation>)>;

/// Readings kept for slow local subscribers before they start missing some.
pub const READINGS_STREAM_CAPACITY: usize = 4096;

/// One record of a device's request, before it becomes an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestRecord {
    pub topic: String,
    pub content_type: Option<String>,
    /// Shared with the request's buffer (see [`Envelope::payload`]).
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
}

/// Readings held for a slow watcher before it is told it lagged.
pub const WATCH_CAPACITY: usize = 1024;

/// A committed reading as published on the local readings stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReading {
    pub seq: u64,
    pub device_id: String,
    pub source: Source,
    pub topic: String,
    pub content_type: Option<String>,
    /// The stored record's payload, shared (not copied) with the outbox's envelope.
    pub payload: Bytes,
}

/// The shared path from a device protocol into the outbox. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Ingest {
    outbox: Outbox,
    registry: Registry,
    readings: broadcast::Sender<LocalReading>,
    /// Every committed reading, MQTT ones included, for watchers (a device's live view in the
    /// web console, `api::readings`); copies are made only while someone watches.
    watch: broadcast::Sender<LocalReading>,
    /// `[[kafka.rules]]`: a matching rule's `priority` is given to a record when it is stored.
    rules: Option<SharedRules>,
    /// The local bus, for the MQTT server (ACLs of app identities, command delivery).
    bus: bus::BusHandle,
    /// `gateway.max_ingress_bytes`, taken by each device protocol before it holds a payload.
    budget: budget::IngressBudget,
    /// `[[edge.rules]]`, run on every device and driver reading before it is stored.
    edge: Option<SharedEdge>,
    /// Where the edge rules' webhook calls are stored and made.
    webhooks: Option<crate::webhooks::Webhooks>,
}

impl Ingest {
    pub fn new(
        outbox: Outbox,
        registry: Registry,
        readings: broadcast::Sender<LocalReading>,
    ) -> Self {
        Self {
            outbox,
            registry,
            readings,
            watch: broadcast::channel(WATCH_CAPACITY).0,
            rules: None,
            edge: None,
            webhooks: None,
            bus: bus::BusHandle::default(),
            budget: budget::IngressBudget::new(
                usize::try_from(
                    outpost_config::GatewayConfig::default()
                        .max_ingress_bytes
                        .bytes(),
                )
                .unwrap_or(usize::MAX),
            ),
        }
    }

    /// Uses `budget` as the ingress byte budget (default: `gateway.max_ingress_bytes`'s
    /// default).
    pub fn with_budget(mut self, budget: budget::IngressBudget) -> Self {
        self.budget = budget;
        self
    }

    pub fn budget(&self) -> &budget::IngressBudget {
        &self.budget
    }

    /// Connects the MQTT server to the local bus.
    pub fn with_bus(mut self, bus: bus::BusHandle) -> Self {
        self.bus = bus;
        self
    }

    pub fn bus(&self) -> &bus::BusHandle {
        &self.bus
    }

    /// Gives stored records the priority of the first matching Kafka rule that sets one.
    pub fn with_rules(mut self, rules: SharedRules) -> Self {
        self.rules = Some(rules);
        self
    }

    /// Runs `[[edge.rules]]` on every reading before it is stored.
    pub fn with_edge(mut self, edge: SharedEdge) -> Self {
        self.edge = Some(edge);
        self
    }

    /// Stores and makes the edge rules' webhook calls through `webhooks`.
    pub fn with_webhooks(mut self, webhooks: crate::webhooks::Webhooks) -> Self {
        self.webhooks = Some(webhooks);
        self
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The stream of every committed reading, for live views (subscribe to it).
    pub fn watch(&self) -> broadcast::Sender<LocalReading> {
        self.watch.clone()
    }

    /// Appends the records of one authenticated device atomically; resolves after the commit.
    /// Records the traffic in the registry and publishes the committed records locally.
    pub async fn submit(
        &self,
        device_id: &str,
        source: Source,
        route: &str,
        records: Vec<IngestRecord>,
    ) -> Result<Vec<u64>, AppendError> {
        let bytes: u64 = records.iter().map(|r| r.payload.len() as u64).sum();
        let envelopes = envelopes(device_id, source, route, records);
        let reports: Vec<Traffic> = envelopes.iter().flat_map(reported).collect();
        let result = self.append(envelopes).await;
        self.account(device_id, bytes, reports, result.is_ok());
        result
    }

    /// Like [`Ingest::submit`] for one record stored under an idempotency key (an MQTT
    /// persistent session's QoS 2 packet): not stored again while the key is held (see
    /// `Outbox::append_once`). Not published on the local stream (MQTT records never are).
    pub async fn submit_once(
        &self,
        device_id: &str,
        route: &str,
        record: IngestRecord,
        key: String,
    ) -> Result<u64, AppendError> {
        let bytes = record.payload.len() as u64;
        let mut envelopes = envelopes(device_id, Source::Mqtt, route, vec![record]);
        let observed = match self.edge_prepare(&mut envelopes) {
            Ok(observed) => observed,
            Err(e) => {
                self.account(device_id, bytes, Vec::new(), false);
                return Err(e);
            }
        };
        self.prioritise(&mut envelopes);
        let reports: Vec<Traffic> = envelopes.iter().flat_map(reported).collect();
        let Some(envelope) = envelopes.pop() else {
            return Err(AppendError::Closed);
        };
        let result = self.outbox.append_once(envelope, key).await;
        self.account(device_id, bytes, reports, result.is_ok());
        if result.is_ok() {
            self.edge_observe(observed).await;
        }
        result
    }

    /// The outbox, for the MQTT server's idempotency keys.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    fn account(&self, device_id: &str, bytes: u64, reports: Vec<Traffic>, stored: bool) {
        if stored {
            self.registry
                .observe(device_id, Traffic::Accepted { bytes });
            for report in reports {
                self.registry.observe(device_id, report);
            }
        } else {
            self.registry.observe(device_id, Traffic::Dropped);
        }
    }

    /// Gives records the priority of the first matching Kafka rule that sets one.
    fn prioritise(&self, envelopes: &mut [Envelope]) {
        let Some(rules) = self.rules.as_ref().map(SharedRules::load) else {
            return;
        };
        if rules.sets_priorities() {
            for e in envelopes {
                let view = RecordView {
                    device_id: &e.device_id,
                    source: e.source,
                    topic: &e.topic,
                    seq: 0,
                };
                e.priority = e.priority.or(rules.priority(&view, &self.registry));
            }
        }
    }

    /// Runs the edge rules on device and driver records (the gateway's own are left alone):
    /// a refusal refuses the whole batch (nothing is stored), transformed payloads and added
    /// headers replace the received ones, and a record a `dead_letter` rule found invalid is
    /// re-addressed to `edge.invalid_topic` with the error in its headers. Returns what the
    /// stateful steps get once the batch is committed ([`Ingest::edge_observe`]).
    fn edge_prepare(&self, envelopes: &mut [Envelope]) -> Result<Observed, AppendError> {
        let Some(engine) = self.edge.as_ref().map(SharedEdge::load) else {
            return Ok(None);
        };
        if engine.is_empty() {
            return Ok(None);
        }
        let batch = envelopes.len();
        let mut observations = Vec::new();
        for (i, e) in envelopes.iter_mut().enumerate() {
            if e.source == Source::Gateway {
                continue;
            }
            let reading = outpost_edge::Reading {
                device_id: &e.device_id,
                source: e.source.as_str(),
                topic: &e.topic,
                content_type: e.content_type.as_deref(),
                payload: &e.payload,
                received_at_ms: u64::try_from(e.received_at_ms).unwrap_or(0),
            };
            let prepared = match engine.prepare(&reading, &self.registry) {
                outpost_edge::Verdict::Refuse(invalid) => {
                    let error = if batch > 1 {
                        format!("record {i}: {}", invalid.error)
                    } else {
                        invalid.error
                    };
                    return Err(AppendError::Invalid {
                        rule: invalid.rule,
                        error,
                    });
                }
                outpost_edge::Verdict::Store(prepared) => prepared,
            };
            if let Some(payload) = prepared.payload {
                e.payload = Bytes::from(payload);
            }
            e.headers.extend(prepared.headers);
            if let Some(invalid) = prepared.invalid {
                let original_topic =
                    std::mem::replace(&mut e.topic, engine.invalid_topic().to_owned());
                e.headers.extend([
                    ("outpost-invalid-rule".to_owned(), invalid.rule),
                    ("outpost-invalid-error".to_owned(), invalid.error),
                    ("outpost-original-topic".to_owned(), original_topic),
                    (
                        "outpost-original-source".to_owned(),
                        e.source.as_str().to_owned(),
                    ),
                ]);
                // The gateway's own record from here on: forwarded to its topic as is, never
                // routed by `[[kafka.rules]]`.
                e.source = Source::Gateway;
            }
            observations.extend(prepared.observation);
        }
        Ok((!observations.is_empty()).then_some((engine, observations)))
    }

    /// Feeds committed readings to the windows and alert states, and carries out what that
    /// asks for.
    async fn edge_observe(&self, observed: Observed) {
        let Some((engine, observations)) = observed else {
            return;
        };
        let mut effects = outpost_edge::Effects::default();
        for o in observations {
            let e = engine.observe(o);
            effects.records.extend(e.records);
            effects.commands.extend(e.commands);
            effects.webhooks.extend(e.webhooks);
        }
        if !effects.is_empty() {
            self.carry_out(effects).await;
        }
    }

    /// Stores the records the edge rules made (alerts, aggregates: the gateway's own records,
    /// forwarded to their Kafka topic) and queues their commands. A record the outbox refuses
    /// is logged and lost (the readings it came from are stored).
    pub async fn carry_out(&self, effects: outpost_edge::Effects) {
        if !effects.records.is_empty() {
            let route: Arc<str> = Arc::from(outpost_config::DEFAULT_ROUTE);
            let received_at_ms = outpost_sync::outbox::now_unix_ms();
            let count = effects.records.len();
            let derived: Vec<Envelope> = effects
                .records
                .iter()
                .map(|r| Envelope {
                    route: Arc::clone(&route),
                    device_id: r.device_id.clone(),
                    source: Source::Gateway,
                    topic: r.kafka_topic.clone(),
                    received_at_ms,
                    content_type: Some(body::Format::Json.mime().to_owned()),
                    headers: r.headers.clone(),
                    payload: Bytes::from(r.payload.clone()),
                    priority: None,
                })
                .collect();
            if let Err(e) = self.store(derived).await {
                tracing::warn!(records = count, error = %e, "Edge rule records (alerts, aggregates) not stored");
            }
        }
        crate::edge::queue_commands(&self.registry, &effects).await;
        match &self.webhooks {
            Some(webhooks) => webhooks.enqueue(effects.webhooks).await,
            None if !effects.webhooks.is_empty() => {
                tracing::warn!(
                    calls = effects.webhooks.len(),
                    "Webhook calls dropped: no webhook store"
                );
            }
            None => {}
        }
    }

    /// Appends envelopes atomically (any devices; the caller has checked them) after the edge
    /// rules, and, once they are committed, publishes them on the local readings stream and
    /// feeds the edge rules' windows and alerts. No registry accounting: the caller does that
    /// ([`Ingest::submit`] for device protocols, the driver-ingest task for drivers).
    pub async fn append(&self, mut envelopes: Vec<Envelope>) -> Result<Vec<u64>, AppendError> {
        let observed = self.edge_prepare(&mut envelopes)?;
        let seqs = self.store(envelopes).await?;
        self.edge_observe(observed).await;
        Ok(seqs)
    }

    /// [`Ingest::append`] without the edge rules.
    async fn store(&self, mut envelopes: Vec<Envelope>) -> Result<Vec<u64>, AppendError> {
        self.prioritise(&mut envelopes);
        // Copies for the local stream only when someone listens, and never of MQTT records:
        // the MQTT server has routed those itself, and the stream exists for the bus. Watchers
        // (live views) get every record, but only while there are any.
        let bus = self.readings.receiver_count() > 0;
        let watched = self.watch.receiver_count() > 0;
        let local: Option<Vec<(usize, Envelope)>> = (bus || watched).then(|| {
            envelopes
                .iter()
                .enumerate()
                .filter(|(_, e)| watched || e.source != Source::Mqtt)
                .map(|(i, e)| (i, e.clone()))
                .collect()
        });
        let seqs = self.outbox.append_all(envelopes).await?;
        if let Some(local) = local {
            for (i, e) in local {
                let Some(seq) = seqs.get(i) else {
                    continue;
                };
                let reading = LocalReading {
                    seq: *seq,
                    device_id: e.device_id,
                    source: e.source,
                    topic: e.topic,
                    content_type: e.content_type,
                    payload: e.payload,
                };
                // No receiver left is fine: the outbox has the record.
                if watched {
                    let _ = self.watch.send(reading.clone());
                }
                if bus && reading.source != Source::Mqtt {
                    let _ = self.readings.send(reading);
                }
            }
        }
        Ok(seqs)
    }
}

/// The envelopes of one device's records, received now.
fn envelopes(
    device_id: &str,
    source: Source,
    route: &str,
    records: Vec<IngestRecord>,
) -> Vec<Envelope> {
    let route: Arc<str> = Arc::from(route);
    let received_at_ms = outpost_sync::outbox::now_unix_ms();
    records
        .into_iter()
        .map(|r| Envelope {
            route: Arc::clone(&route),
            device_id: device_id.to_owned(),
            source,
            topic: r.topic,
            received_at_ms,
            content_type: r.content_type,
            headers: r.headers,
            payload: r.payload,
            priority: None,
        })
        .collect()
}

/// Signal quality and location a JSON reading reports about its device: a numeric top-level
/// `rssi`, and numeric `lat` and `lon` (WGS84 degrees, checked for range). Payloads that do not
/// mention these keys are not parsed at all.
pub fn reported(envelope: &Envelope) -> Vec<Traffic> {
    let is_json = envelope.content_type.as_deref() == Some(body::Format::Json.mime());
    if !is_json || !mentions_report_keys(&envelope.payload) {
        return Vec::new();
    }
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(&envelope.payload) else {
        return Vec::new();
    };
    let number = |key: &str| fields.get(key).and_then(serde_json::Value::as_f64);
    let mut out = Vec::new();
    if let Some(rssi) = number("rssi") {
        out.push(Traffic::Signal { rssi });
    }
    if let (Some(lat), Some(lon)) = (number("lat"), number("lon"))
        && (-90.0..=90.0).contains(&lat)
        && (-180.0..=180.0).contains(&lon)
    {
        out.push(Traffic::Location { lat, lon });
    }
    out
}

/// Whether a payload mentions the key `"rssi"` or `"lat"`: one pass over its quote characters
/// (this runs for every JSON reading, most of which mention neither).
fn mentions_report_keys(payload: &[u8]) -> bool {
    memchr::memchr_iter(b'"', payload).any(|i| {
        let rest = &payload[i + 1..];
        rest.starts_with(b"rssi\"") || rest.starts_with(b"lat\"")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_sync::OutboxOptions;
    use tokio_util::sync::CancellationToken;

    fn record(topic: &str, payload: &[u8]) -> IngestRecord {
        IngestRecord {
            topic: topic.into(),
            content_type: Some("application/json".into()),
            payload: Bytes::copy_from_slice(payload),
            headers: vec![],
        }
    }

    #[tokio::test]
    async fn committed_records_reach_the_local_stream_and_the_monitoring() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, writer) =
            outpost_sync::outbox::open(OutboxOptions::with_path(dir.path().join("outbox.db")))
                .unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(writer.run(stop.clone()));
        let registry = Registry::open(dir.path(), std::time::Duration::from_secs(60)).unwrap();
        let (tx, mut rx) = broadcast::channel(16);
        let ingest = Ingest::new(outbox, registry, tx);
        let seqs = ingest
            .submit(
                "dev-1",
                Source::Coap,
                "default",
                vec![record("a", br#"{"rssi":-70}"#), record("b", b"{}")],
            )
            .await
            .unwrap();
        assert_eq!(seqs.len(), 2);
        let first = rx.recv().await.unwrap();
        assert_eq!(
            (first.seq, first.device_id.as_str(), first.topic.as_str()),
            (seqs[0], "dev-1", "a")
        );
        assert_eq!(first.source, Source::Coap);
        assert_eq!(&*rx.recv().await.unwrap().payload, b"{}");
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    #[test]
    fn signal_and_location_only_from_json_objects_in_range() {
        let env = |ct: &str, payload: &[u8]| Envelope {
            route: Arc::from("default"),
            device_id: "d".into(),
            source: Source::Http,
            topic: "t".into(),
            received_at_ms: 0,
            content_type: Some(ct.into()),
            headers: vec![],
            payload: Bytes::copy_from_slice(payload),
            priority: None,
        };
        let got = reported(&env(
            "application/json",
            br#"{"rssi":-60.5,"lat":1.5,"lon":2.5}"#,
        ));
        assert_eq!(
            got,
            vec![
                Traffic::Signal { rssi: -60.5 },
                Traffic::Location { lat: 1.5, lon: 2.5 }
            ]
        );
        assert!(reported(&env("application/json", br#"{"lat":91,"lon":0}"#)).is_empty());
        assert!(reported(&env("application/cbor", br#"{"rssi":-60}"#)).is_empty());
        assert!(reported(&env("application/json", br#"{"rssi":"weak"}"#)).is_empty());
        // Only the quoted keys count; a key found after other quoted text still counts.
        assert_eq!(
            reported(&env("application/json", br#"{"a":"x","lat":1,"lon":2}"#)),
            vec![Traffic::Location { lat: 1.0, lon: 2.0 }]
        );
        assert!(!mentions_report_keys(br#"{"latency":1,"xrssi":2}"#));
        assert!(!mentions_report_keys(b"rssi lat"));
        assert!(mentions_report_keys(br#"{"rssi":1}"#));
    }
}
