//! The local bus: what the gateway publishes on its MQTT server by itself.
//!
//! ```text
//!  Ingest (CoAP, HTTP, drivers) ──committed──> readings stream (broadcast, lossy) ──┐
//!  Registry::queue_command (API) ──> command events (broadcast, lossy) ─────────────┤
//!  MQTT server: BusHandle (subscribed, delivered; bounded, lossy) ───────────────────┤
//!                                                                                   v
//!                                  task `mqtt-bus` ──Broker::publish_local──> subscribers
//!                                                  └──> registry (queued commands, delivered)
//! ```
//!
//! **Readings.** Every reading committed from CoAP, HTTP or a driver is published (after its
//! commit) on [`reading_topic`]: its own topic when that is already under `devices/<its device
//! id>/…`, else `devices/<device id>/<source>/<topic>` (`source` = `coap`, `http`, `driver`).
//! MQTT readings are not published here: the server routes them itself, under the topic the
//! device used. Payloads are the stored bytes, unchanged; the record's content type goes with
//! them (MQTT 5 Content Type).
//!
//! **Commands.** A command queued through the API (`POST /api/v1/devices/{id}/commands`) for a
//! device that may use MQTT is published on `devices/<id>/commands/<command id>` with the
//! command's JSON `payload` as the message. A command from the cloud (Kafka) is published on
//! `devices/<id>/commands/<command id>/<name>`, its payload as JSON text or as its bytes, with
//! MQTT 5 properties: response topic `devices/<id>/acks/<command id>` (where the device
//! acknowledges, [`ack_topic`]), correlation data the backend's command id, user properties
//! `command-id` and `command-name`, and a message expiry interval of what is left of its
//! expiry. The command stays `queued` (devices may still poll
//! it) until the server writes it to one of the device's connections ([`BusHandle::relayed`]:
//! `delivered`); when a device's SUBSCRIBE is granted ([`BusHandle::subscribed`]) its
//! still-queued commands are published again, so a device that was away gets what was queued
//! meanwhile.
//!
//! Both are published with QoS 1 and delivered at the lower of that and the subscription's QoS
//! (MQTT-3.8.4-6); a persistent session subscribed with QoS 1 or 2 gets them queued on disk
//! while it is offline (bounded by `[mqtt.sessions]`).
//!
//! **Never slows ingestion.** The readings stream is a bounded broadcast: when this task falls
//! behind (for instance while persistent sessions' copies are committed), it misses readings
//! (`outpost_mqtt_bus_lagged`), the publishers never wait. The outbox always has every reading:
//! the bus is a live view, not a delivery guarantee.

use std::sync::Arc;

use outpost_mqtt::broker::{Broker, Message};
use outpost_mqtt::codec::QoS;
use outpost_mqtt::codec::props::PublishProps;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::LocalReading;
use crate::registry::{Command, Protocol, Registry};
use outpost_sync::Source;

/// Server events (subscribed, delivered) waiting for the bus; beyond this they are dropped.
const FRONT_EVENTS: usize = 1024;
/// Queued commands sent per granted SUBSCRIBE (the registry's per-device queue bound).
const MAX_QUEUED_COMMANDS: usize = crate::registry::commands::MAX_QUEUED;

/// `outpost_mqtt_bus_*` metrics. Clones share the counters.
#[derive(Debug, Clone, Default)]
pub struct BusMetrics {
    pub published: Counter,
    pub lagged: Counter,
    pub dropped: Counter,
    pub commands_published: Counter,
}

impl BusMetrics {
    pub fn register(&self, registry: &mut MetricsRegistry) {
        let r = registry.sub_registry_with_prefix("outpost_mqtt_bus");
        r.register(
            "published",
            "Readings from CoAP, HTTP and drivers published on the local bus",
            self.published.clone(),
        );
        r.register(
            "lagged",
            "Readings the local bus missed because it fell behind (the outbox has them)",
            self.lagged.clone(),
        );
        r.register(
            "dropped",
            "Commands the bus missed (announcements lagged; still queued) and messages sessions.db could not take",
            self.dropped.clone(),
        );
        r.register(
            "commands_published",
            "API commands published on their device's command topic",
            self.commands_published.clone(),
        );
    }
}

/// The bus topic of a reading, or `None` for readings that reach the broker another way (MQTT)
/// or whose topic cannot be published (wildcards, which ingress already refuses).
pub fn reading_topic(reading: &LocalReading) -> Option<String> {
    if reading.source == Source::Mqtt || reading.topic.contains(['+', '#', '\0']) {
        return None;
    }
    let mut levels = reading.topic.splitn(3, '/');
    if levels.next() == Some("devices") && levels.next() == Some(reading.device_id.as_str()) {
        return Some(reading.topic.clone());
    }
    let topic = reading.topic.trim_start_matches('/');
    Some(if topic.is_empty() {
        format!("devices/{}/{}", reading.device_id, reading.source)
    } else {
        format!("devices/{}/{}/{topic}", reading.device_id, reading.source)
    })
}

/// The topic a command is published on: `devices/<id>/commands/<command id>`, and its name as a
/// last level for a command from the cloud.
pub fn command_topic(command: &Command) -> String {
    let (device, id) = (&command.device_id, command.id);
    match &command.name {
        Some(name) => format!("devices/{device}/commands/{id}/{name}"),
        None => format!("devices/{device}/commands/{id}"),
    }
}

/// The topic a device acknowledges command `id` on (and the MQTT 5 response topic).
pub fn ack_topic(device_id: &str, id: i64) -> String {
    format!("devices/{device_id}/acks/{id}")
}

/// The command a PUBLISH on `topic` carries to `device_id`, if it is one of the bus's command
/// messages for that device: `devices/<device_id>/commands/<command id>[/<name>]`.
pub fn command_id(device_id: &str, topic: &str) -> Option<i64> {
    let rest = topic.strip_prefix("devices/")?.strip_prefix(device_id)?;
    let rest = rest.strip_prefix("/commands/")?;
    rest.split_once('/').map_or(rest, |(id, _)| id).parse().ok()
}

/// The command a device acknowledges with a PUBLISH on `topic`: `devices/<device_id>/acks/<id>`.
pub fn acked_command_id(device_id: &str, topic: &str) -> Option<i64> {
    let rest = topic.strip_prefix("devices/")?.strip_prefix(device_id)?;
    rest.strip_prefix("/acks/")?.parse().ok()
}

/// What the MQTT server tells the bus about its connections.
#[derive(Debug)]
enum FrontEvent {
    /// A SUBSCRIBE of the device was granted (at least one filter): send its queued commands.
    Subscribed(String),
    /// The server relayed a PUBLISH on a command topic to the device: mark it delivered.
    Delivered(String, i64),
}

/// The server's side of the bus: cheap to clone, never blocks. Reached as
/// [`super::Ingest::bus`]. A handle whose bus does not run (MQTT off, or the handle of a test)
/// drops what it is told.
#[derive(Debug, Clone)]
pub struct BusHandle {
    events: mpsc::Sender<FrontEvent>,
}

impl Default for BusHandle {
    fn default() -> Self {
        Self {
            events: mpsc::channel(1).0,
        }
    }
}

impl BusHandle {
    /// The server granted a SUBSCRIBE of `device_id`: its queued commands go out (again).
    pub fn subscribed(&self, device_id: &str) {
        self.tell(FrontEvent::Subscribed(device_id.to_owned()));
    }

    /// The server relayed a PUBLISH on `topic` to `device_id`'s connection; if it is one of the
    /// bus's command messages for that device, the command becomes `delivered` (the broker
    /// retransmits a QoS 1 delivery the device does not acknowledge). Cheap for other topics.
    pub fn relayed(&self, device_id: &str, topic: &str) {
        if let Some(id) = command_id(device_id, topic) {
            self.tell(FrontEvent::Delivered(device_id.to_owned(), id));
        }
    }

    fn tell(&self, event: FrontEvent) {
        // Full or not running: the command stays queued (sent at the next subscribe, or polled).
        if let Err(e) = self.events.try_send(event) {
            tracing::debug!(error = %e, "Local bus did not take a front event");
        }
    }
}

/// Creates the bus's front handle and the receiver [`run`] takes.
pub fn handle() -> (BusHandle, FrontEvents) {
    let (events, rx) = mpsc::channel(FRONT_EVENTS);
    let handle = BusHandle { events };
    (handle, FrontEvents(rx))
}

/// The receiving end of [`BusHandle`] events.
#[derive(Debug)]
pub struct FrontEvents(mpsc::Receiver<FrontEvent>);

/// What the bus keeps across a restart by the supervisor: the receivers whose senders other
/// tasks hold. A run borrows it through a `tokio::sync::Mutex`, which a panicking run releases
/// without poisoning.
#[derive(Debug)]
pub struct Bus {
    broker: Arc<Broker>,
    readings: broadcast::Receiver<LocalReading>,
    front: FrontEvents,
}

impl Bus {
    pub fn new(
        broker: Arc<Broker>,
        readings: broadcast::Receiver<LocalReading>,
        front: FrontEvents,
    ) -> Self {
        Self {
            broker,
            readings,
            front,
        }
    }
}

/// Publishes readings and commands on the MQTT server, and keeps commands' delivery state,
/// until `stop`. Restartable: commands created while no run was listening stay queued in the
/// registry (sent at the device's next subscribe, or polled).
pub async fn run(
    bus: Arc<tokio::sync::Mutex<Bus>>,
    registry: Registry,
    metrics: BusMetrics,
    stop: CancellationToken,
) {
    let mut bus = bus.lock().await;
    let Bus {
        broker,
        readings,
        front: FrontEvents(front),
    } = &mut *bus;
    let mut commands = registry.command_events();
    let mut commands_open = true;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            r = readings.recv() => match r {
                Ok(reading) => {
                    if let Some(topic) = reading_topic(&reading)
                        && publish(broker, gateway_message(topic, reading.payload.clone(), reading.content_type), &metrics).await
                    {
                        metrics.published.inc();
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    metrics.lagged.inc_by(n);
                    tracing::warn!(missed = n, "Local bus fell behind; readings not published (they are in the outbox)");
                }
                Err(RecvError::Closed) => return,
            },
            c = commands.recv(), if commands_open => match c {
                Ok(command) => send_command(broker, &registry, &command, &metrics).await,
                Err(RecvError::Lagged(n)) => {
                    metrics.dropped.inc_by(n);
                    tracing::warn!(missed = n, "Commands not published on MQTT (still queued: sent at the next subscribe, or polled)");
                }
                Err(RecvError::Closed) => commands_open = false,
            },
            Some(event) = front.recv() => match event {
                FrontEvent::Subscribed(device) => {
                    match registry.pending_commands(&device, MAX_QUEUED_COMMANDS).await {
                        Ok(pending) => {
                            for command in &pending {
                                send_command(broker, &registry, command, &metrics).await;
                            }
                        }
                        Err(e) => tracing::warn!(device = %device, error = %e, "Could not read queued commands"),
                    }
                }
                FrontEvent::Delivered(device, id) => {
                    match registry.mark_delivered(&device, &[id]).await {
                        Ok(1) => tracing::debug!(device = %device, command = id, "Command delivered over MQTT"),
                        Ok(_) => {} // already delivered (a retransmission) or expired
                        Err(e) => tracing::warn!(device = %device, command = id, error = %e, "Could not mark a command delivered"),
                    }
                }
            },
        }
    }
}

async fn send_command(
    broker: &Broker,
    registry: &Registry,
    command: &Command,
    metrics: &BusMetrics,
) {
    let may_mqtt = registry
        .get(&command.device_id)
        .is_some_and(|d| d.protocols.contains(&Protocol::Mqtt));
    if !may_mqtt {
        return;
    }
    let payload = bytes::Bytes::from(command.payload_bytes());
    let content_type = if command.payload_base64.is_some() {
        "application/octet-stream"
    } else {
        "application/json"
    };
    let mut props = PublishProps {
        content_type: Some(content_type.into()),
        ..PublishProps::default()
    };
    let mut expires_at = None;
    if let Some(backend_id) = &command.command_id {
        props.response_topic = Some(ack_topic(&command.device_id, command.id).into());
        props.correlation_data = Some(bytes::Bytes::from(backend_id.clone().into_bytes()));
        props
            .user
            .push(("command-id".into(), backend_id.as_str().into()));
        if let Some(name) = &command.name {
            props
                .user
                .push(("command-name".into(), name.as_str().into()));
        }
        let left_ms = command.expires_at_ms - outpost_sync::outbox::now_unix_ms();
        let left_s = u32::try_from(left_ms.max(1000) / 1000).unwrap_or(u32::MAX);
        props.message_expiry = Some(left_s);
        expires_at = Some(broker.now() + u64::from(left_s));
    }
    let message = Message {
        topic: Arc::from(command_topic(command)),
        payload,
        qos: QoS::AtLeastOnce,
        retain: false,
        props,
        expires_at,
        origin: None,
    };
    if publish(broker, message, metrics).await {
        metrics.commands_published.inc();
        tracing::debug!(device = %command.device_id, command = command.id, "Command published on MQTT");
    }
}

/// A message the gateway publishes itself at QoS 1, with an optional content type.
fn gateway_message(topic: String, payload: bytes::Bytes, content_type: Option<String>) -> Message {
    Message {
        topic: Arc::from(topic),
        payload,
        qos: QoS::AtLeastOnce,
        retain: false,
        props: PublishProps {
            content_type: content_type.map(Into::into),
            ..PublishProps::default()
        },
        expires_at: None,
        origin: None,
    }
}

/// Publishes one message; false (and counted) if it could not be.
async fn publish(broker: &Broker, message: Message, metrics: &BusMetrics) -> bool {
    match broker.publish_local(message).await {
        Ok(_) => true,
        Err(e) => {
            metrics.dropped.inc();
            tracing::warn!(error = %e, "Local bus publish failed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn reading(source: Source, device: &str, topic: &str) -> LocalReading {
        LocalReading {
            seq: 1,
            device_id: device.into(),
            source,
            topic: topic.into(),
            content_type: None,
            payload: bytes::Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn reading_topics_follow_the_documented_scheme() {
        let t = |s, d, topic| reading_topic(&reading(s, d, topic));
        assert_eq!(
            t(Source::Http, "d1", "devices/d1/temp").as_deref(),
            Some("devices/d1/temp")
        );
        assert_eq!(
            t(Source::Http, "d1", "temp").as_deref(),
            Some("devices/d1/http/temp")
        );
        assert_eq!(
            t(Source::Coap, "d1", "a/b").as_deref(),
            Some("devices/d1/coap/a/b")
        );
        // Another device's prefix is not taken over.
        assert_eq!(
            t(Source::Driver, "d1", "devices/d2/x").as_deref(),
            Some("devices/d1/driver/devices/d2/x")
        );
        assert_eq!(
            t(Source::Driver, "m-1", "modbus/meter-1").as_deref(),
            Some("devices/m-1/driver/modbus/meter-1")
        );
        assert_eq!(
            t(Source::Http, "d1", "").as_deref(),
            Some("devices/d1/http")
        );
        assert_eq!(t(Source::Mqtt, "d1", "devices/d1/temp"), None);
        assert_eq!(t(Source::Http, "d1", "a/+"), None);
    }

    #[tokio::test]
    async fn a_slow_bus_misses_readings_counts_them_and_never_blocks_the_sender() {
        let broker = outpost_mqtt::broker::Broker::new(
            outpost_mqtt::settings::Settings::default(),
            std::sync::Arc::new(outpost_mqtt::backend::fake::FakeBackend::default()),
            None,
            outpost_mqtt::metrics::MqttMetrics::default(),
        );
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path(), Duration::from_secs(60)).unwrap();
        let (tx, rx) = broadcast::channel(4);
        // Ten readings before the bus reads any: the sender never waits.
        for _ in 0..10 {
            tx.send(reading(Source::Http, "d1", "t")).unwrap();
        }
        let metrics = BusMetrics::default();
        let stop = CancellationToken::new();
        let (_front, events) = handle();
        let bus = std::sync::Arc::new(tokio::sync::Mutex::new(Bus::new(broker, rx, events)));
        let task = tokio::spawn(run(bus, registry, metrics.clone(), stop.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while metrics.published.get() < 4 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!((metrics.lagged.get(), metrics.published.get()), (6, 4));
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn command_ids_come_only_from_the_device_s_own_command_topic() {
        assert_eq!(command_id("d1", "devices/d1/commands/42"), Some(42));
        assert_eq!(command_id("d1", "devices/d11/commands/42"), None);
        assert_eq!(command_id("d1", "devices/d2/commands/42"), None);
        assert_eq!(command_id("d1", "devices/d1/commands/reboot"), None);
        assert_eq!(command_id("d1", "devices/d1/commands/42/open"), Some(42));
        assert_eq!(acked_command_id("d1", "devices/d1/acks/42"), Some(42));
        assert_eq!(acked_command_id("d1", "devices/d2/acks/42"), None);
        assert_eq!(acked_command_id("d1", "devices/d1/acks/42/x"), None);
        assert_eq!(command_id("d1", "devices/d1/temp"), None);
    }
}
