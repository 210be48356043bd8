//! The MQTT front: devices' MQTT connections end here, not at the broker.
//!
//! ```text
//! device ──TCP──> front (this module) ──loopback TCP, front's credentials──> rumqttd (broker.rs)
//!                  │ auth, ACL, outbox commit before PUBACK/PUBREC
//!                  └──> Ingest::submit ──> outbox
//! ```
//!
//! One task per device connection (in this module's own `TaskTracker`, awaited on shutdown),
//! admitted by a semaphore of `mqtt.max_connections` permits taken *before* `accept`: excess
//! connections wait in the kernel's backlog. Each connection opens its own connection to the
//! broker, logging in with the front's per-boot secret; the broker client id is
//! `<device id>|<client id>`, so devices cannot take over each other's sessions.
//!
//! Contract with the device (MQTT 3.1.1):
//! - CONNECT: username = device id, password = device secret, checked against the registry.
//!   Unknown device or wrong secret → CONNACK 0x04; disabled device, MQTT not allowed for it, no
//!   credentials (unless `allow_anonymous`) or a will outside the publish ACL → CONNACK 0x05;
//!   with `allow_anonymous`, a CONNECT without credentials is the identity
//!   `anonymous/<client id>` (client id non-empty, without `/`, `+`, `#`), which is what its
//!   records carry and what `{id}` stands for in its ACL;
//!   broker unreachable → 0x03. The connection is then closed.
//! - PUBLISH: outside the publish ACL → **the connection is closed** (3.1.1 has no negative
//!   ack; a silent drop would make the device believe it was delivered), nothing stored or
//!   routed. Otherwise appended to the outbox (route `mqtt.route`, headers `mqtt_qos` and
//!   `mqtt_retain`), and only once committed: QoS 1 → PUBACK, QoS 2 → PUBREC; then forwarded
//!   to the broker for subscribers. A QoS 2 PUBLISH whose packet id awaits its PUBREL (a DUP
//!   retransmission) is answered with PUBREC again and not stored twice. QoS 0 is stored
//!   best-effort (a refusal is only counted). Outbox refusal (full, storage error, closing) →
//!   no ack and not routed: the device retransmits after reconnecting.
//!   A record the outbox can never take (too large) closes the connection.
//! - Publishes reach the broker with QoS ≤ 1 (a device's QoS 2 is forwarded as QoS 1: the
//!   exactly-once part is the outbox record, which is what the gateway guarantees).
//! - SUBSCRIBE: each filter outside the subscribe ACL gets SUBACK 0x80; the others are
//!   subscribed at the broker and their codes relayed. UNSUBSCRIBE, PINGREQ, DISCONNECT and the
//!   device's acks of deliveries pass through to the broker; deliveries come back unchanged.
//! - A device disabled while connected is disconnected within 0.5 s (checked on a timer).
//! - Malformed input (undecodable packet, a packet over `mqtt.max_packet`, anything but CONNECT
//!   first, a second CONNECT) closes the connection and counts `outpost_mqtt_malformed`.
//!
//! MQTT 5: CONNECT is decoded with the v5 codec and refused with the v5 codes (0x86 unknown
//! device / wrong secret, 0x87 not authorized). **An authenticated MQTT 5 session is not
//! implemented yet**: it gets CONNACK 0x84 (unsupported protocol version), so a v5 client can
//! fall back to 3.1.1. No MQTT 5 feature passes through today.

mod acl;
pub mod broker;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use outpost_config::MqttConfig;
use outpost_sync::{AppendError, Source};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as MetricsRegistry;
use rumqttc::mqttbytes::{self, QoS};
use rumqttc::{
    ConnAck, Connect, ConnectReturnCode, Login, Packet, PubAck, PubComp, PubRec, Publish, SubAck,
    Subscribe, SubscribeReasonCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use acl::Acl;
pub use broker::BrokerHandle;

use super::{Ingest, IngestRecord};
use crate::registry::{Protocol, Refusal, Traffic};

/// How long a new connection may take to send its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a connected device's registry entry is checked (disabled → disconnect).
const RECHECK_EVERY: Duration = Duration::from_millis(500);
/// Largest packet the front writes (to the device or the broker); larger ones are bugs.
const MAX_WRITE: usize = 64 * 1024 * 1024;

/// What the front needs from the configuration.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    pub route: String,
    pub max_connections: usize,
    pub max_packet: usize,
    pub allow_anonymous: bool,
    pub acl: outpost_config::MqttAclConfig,
}

impl MqttSettings {
    pub fn from_config(config: &MqttConfig) -> Self {
        Self {
            route: config.route.clone(),
            max_connections: config.max_connections,
            max_packet: usize::try_from(config.max_packet.bytes()).unwrap_or(usize::MAX),
            allow_anonymous: config.allow_anonymous,
            acl: config.acl.clone(),
        }
    }
}

/// `outpost_mqtt_*` metrics. Clones share the counters.
#[derive(Debug, Clone, Default)]
pub struct MqttMetrics {
    pub connections: Gauge,
    pub connects_refused: Counter,
    pub publishes: Counter,
    pub acl_denied: Counter,
    pub outbox_refused: Counter,
    pub malformed: Counter,
}

impl MqttMetrics {
    /// Registers every metric under the `outpost_mqtt_` prefix.
    pub fn register(&self, registry: &mut MetricsRegistry) {
        let r = registry.sub_registry_with_prefix("outpost_mqtt");
        r.register(
            "connections",
            "Device connections open",
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
            "acl_denied",
            "PUBLISH topics and SUBSCRIBE filters refused by the ACL",
            self.acl_denied.clone(),
        );
        r.register(
            "outbox_refused",
            "PUBLISHes the outbox refused (not acknowledged)",
            self.outbox_refused.clone(),
        );
        r.register(
            "malformed",
            "Connections closed for malformed or out-of-order packets",
            self.malformed.clone(),
        );
    }
}

/// Why a connection ended early. Each variant: close the connection (already counted).
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Undecodable or out-of-order input. Close; counted as malformed.
    #[error("malformed input: {0}")]
    Malformed(String),
    /// The device's socket failed. Close.
    #[error("device socket: {0}")]
    Io(#[from] std::io::Error),
    /// The broker connection failed or closed. Close the device too.
    #[error("broker connection: {0}")]
    Broker(String),
    /// Refused by policy (ACL, disabled, outbox). Close.
    #[error("{0}")]
    Refused(String),
}

struct Front {
    ingest: Ingest,
    settings: MqttSettings,
    broker: BrokerHandle,
    metrics: MqttMetrics,
}

/// Accepts device connections until `shutdown`, then waits for them to end.
pub async fn run(
    listener: TcpListener,
    ingest: Ingest,
    settings: MqttSettings,
    broker: BrokerHandle,
    metrics: MqttMetrics,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let front = Arc::new(Front {
        ingest,
        settings,
        broker,
        metrics,
    });
    let connections = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let front = Arc::clone(&front);
        let stop = shutdown.clone();
        connections.spawn(async move {
            front.metrics.connections.inc();
            let span = tracing::debug_span!("mqtt", peer = %peer);
            let result = tracing::Instrument::instrument(serve(stream, &front, stop), span).await;
            front.metrics.connections.dec();
            match result {
                Ok(()) => {}
                Err(ConnError::Malformed(reason)) => {
                    front.metrics.malformed.inc();
                    tracing::warn!(peer = %peer, reason = %reason, "Closed MQTT connection: malformed input");
                }
                Err(e) => tracing::debug!(peer = %peer, error = %e, "MQTT connection closed"),
            }
            drop(permit);
        });
    }
    connections.close();
    connections.wait().await;
}

/// Reads one complete packet's bytes into `buf`: returns false on EOF.
async fn fill(
    stream: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut BytesMut,
) -> std::io::Result<bool> {
    Ok(stream.read_buf(buf).await? > 0)
}

fn encode(packet: &Packet) -> BytesMut {
    let mut out = BytesMut::new();
    // Packets the front builds are small; relayed ones were decoded under `max_packet`.
    let _ = packet.write(&mut out, MAX_WRITE);
    out
}

/// The protocol level of a CONNECT at the start of `buf`, once enough bytes are there.
fn connect_level(buf: &[u8]) -> Result<Option<u8>, ConnError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first >> 4 != 1 {
        return Err(ConnError::Malformed(format!(
            "first packet is type {}, not CONNECT",
            first >> 4
        )));
    }
    // Remaining length: up to 4 bytes of 7 bits.
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err(ConnError::Malformed("bad remaining length".into()));
        }
    }
    // Protocol name (length-prefixed "MQTT" or "MQIsdp"), then the level byte.
    let (Some(&hi), Some(&lo)) = (buf.get(i), buf.get(i + 1)) else {
        return Ok(None);
    };
    let name_len = usize::from(u16::from_be_bytes([hi, lo]));
    if name_len > 6 {
        return Err(ConnError::Malformed("bad protocol name".into()));
    }
    Ok(buf.get(i + 2 + name_len).copied())
}

fn v5_connack(code: u8) -> [u8; 5] {
    // CONNACK, remaining length 3: flags 0, reason code, properties length 0.
    [0x20, 3, 0, code, 0]
}

fn v4_refusal(refusal: Refusal) -> ConnectReturnCode {
    match refusal {
        Refusal::UnknownDevice | Refusal::BadSecret => ConnectReturnCode::BadUserNamePassword,
        Refusal::Disabled | Refusal::ProtocolNotAllowed => ConnectReturnCode::NotAuthorized,
    }
}

async fn serve(stream: TcpStream, front: &Front, stop: CancellationToken) -> Result<(), ConnError> {
    let max = front.settings.max_packet;
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(4096);
    // The CONNECT: which protocol level, then the whole packet.
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let level = loop {
        if let Some(level) = connect_level(&buf)? {
            break level;
        }
        let read = tokio::time::timeout_at(deadline, fill(&mut rd, &mut buf)).await;
        match read {
            Err(_) => return Err(ConnError::Refused("no CONNECT in time".into())),
            Ok(r) => {
                if !r? {
                    return Ok(());
                }
            }
        }
    };
    if level == 5 {
        return serve_v5_connect(&mut rd, &mut wr, buf, front, deadline).await;
    }
    let connect = loop {
        match Packet::read(&mut buf, max) {
            Ok(Packet::Connect(c)) => break c,
            Ok(other) => {
                return Err(ConnError::Malformed(format!(
                    "expected CONNECT, got {other:?}"
                )));
            }
            Err(mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(ConnError::Malformed(e.to_string())),
        }
        match tokio::time::timeout_at(deadline, fill(&mut rd, &mut buf)).await {
            Err(_) => return Err(ConnError::Refused("no CONNECT in time".into())),
            Ok(r) => {
                if !r? {
                    return Ok(());
                }
            }
        }
    };
    let refuse = |code: ConnectReturnCode| encode(&Packet::ConnAck(ConnAck::new(code, false)));
    let device_id = match &connect.login {
        Some(Login { username, password }) => {
            match front
                .ingest
                .registry()
                .authenticate(username, password, Protocol::Mqtt)
                .await
            {
                Ok(()) => username.clone(),
                Err(refusal) => {
                    front.metrics.connects_refused.inc();
                    front.ingest.registry().observe(username, Traffic::Refused);
                    tracing::warn!(device = %username, reason = %refusal, "Refused MQTT CONNECT");
                    wr.write_all(&refuse(v4_refusal(refusal))).await?;
                    return Ok(());
                }
            }
        }
        // Anonymous clients are `anonymous/<client id>`: never a registered device id (no `/`
        // there), so they cannot write records as a device; their ACL prefix follows from it.
        None if front.settings.allow_anonymous
            && !connect.client_id.is_empty()
            && !connect.client_id.contains(['/', '+', '#']) =>
        {
            format!("anonymous/{}", connect.client_id)
        }
        None => {
            front.metrics.connects_refused.inc();
            tracing::warn!(client_id = %connect.client_id, "Refused MQTT CONNECT without credentials");
            wr.write_all(&refuse(ConnectReturnCode::NotAuthorized))
                .await?;
            return Ok(());
        }
    };
    let authenticated = connect.login.is_some();
    let acl = Acl::for_device(&front.settings.acl, &device_id);
    if let Some(will) = &connect.last_will
        && !acl.may_publish(&will.topic)
    {
        front.metrics.connects_refused.inc();
        front.metrics.acl_denied.inc();
        tracing::warn!(device = %device_id, topic = %will.topic, "Refused MQTT CONNECT: will outside ACL");
        wr.write_all(&refuse(ConnectReturnCode::NotAuthorized))
            .await?;
        return Ok(());
    }
    let (mut brd, mut bwr, session_present) =
        match connect_broker(front, &device_id, &connect).await {
            Ok(connected) => connected,
            Err(e) => {
                front.metrics.connects_refused.inc();
                tracing::error!(device = %device_id, error = %e, "MQTT broker unavailable");
                wr.write_all(&refuse(ConnectReturnCode::ServiceUnavailable))
                    .await?;
                return Ok(());
            }
        };
    wr.write_all(&encode(&Packet::ConnAck(ConnAck::new(
        ConnectReturnCode::Success,
        session_present,
    ))))
    .await?;
    let mut session = Session {
        front,
        device_id,
        acl,
        awaiting_rel: HashSet::new(),
        pending_subs: HashMap::new(),
        next_pkid: 0,
    };
    let mut bbuf = BytesMut::with_capacity(4096);
    let mut recheck = tokio::time::interval(RECHECK_EVERY);
    loop {
        // Handle every complete packet already buffered from the device.
        loop {
            match Packet::read(&mut buf, max) {
                Ok(p) => {
                    if !session.on_device_packet(p, &mut wr, &mut bwr).await? {
                        return Ok(());
                    }
                }
                Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => return Err(ConnError::Malformed(e.to_string())),
            }
        }
        loop {
            match Packet::read(&mut bbuf, MAX_WRITE) {
                Ok(p) => session.on_broker_packet(p, &mut wr).await?,
                Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => return Err(ConnError::Broker(e.to_string())),
            }
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            r = fill(&mut rd, &mut buf) => if !r? { return Ok(()) },
            r = fill(&mut brd, &mut bbuf) => match r {
                Ok(true) => {}
                Ok(false) => return Err(ConnError::Broker("closed by the broker".into())),
                Err(e) => return Err(ConnError::Broker(e.to_string())),
            },
            _ = recheck.tick() => {
                if let Err(refusal) = front.ingest.registry().identify(&session.device_id, Protocol::Mqtt)
                    && authenticated
                {
                    tracing::warn!(device = %session.device_id, reason = %refusal, "Disconnecting MQTT device");
                    return Err(ConnError::Refused(refusal.to_string()));
                }
            }
        }
    }
}

/// MQTT 5 CONNECT: authenticated and refused with v5 codes; sessions are not implemented yet.
async fn serve_v5_connect(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    mut buf: BytesMut,
    front: &Front,
    deadline: tokio::time::Instant,
) -> Result<(), ConnError> {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    let max = u32::try_from(front.settings.max_packet).unwrap_or(u32::MAX);
    let login = loop {
        match P5::read(&mut buf, Some(max)) {
            Ok(P5::Connect(_, _, login)) => break login,
            Ok(_) => return Err(ConnError::Malformed("expected CONNECT".into())),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(ConnError::Malformed(e.to_string())),
        }
        match tokio::time::timeout_at(deadline, fill(rd, &mut buf)).await {
            Err(_) => return Err(ConnError::Refused("no CONNECT in time".into())),
            Ok(r) => {
                if !r? {
                    return Ok(());
                }
            }
        }
    };
    front.metrics.connects_refused.inc();
    let code = match login {
        Some(login) => match front
            .ingest
            .registry()
            .authenticate(&login.username, &login.password, Protocol::Mqtt)
            .await
        {
            Ok(()) => {
                tracing::warn!(device = %login.username, "Refused MQTT 5 session: not supported yet, use MQTT 3.1.1");
                0x84
            }
            Err(Refusal::UnknownDevice | Refusal::BadSecret) => 0x86,
            Err(Refusal::Disabled | Refusal::ProtocolNotAllowed) => 0x87,
        },
        None => 0x87,
    };
    wr.write_all(&v5_connack(code)).await?;
    Ok(())
}

async fn connect_broker(
    front: &Front,
    device_id: &str,
    device: &Connect,
) -> Result<
    (
        tokio::net::tcp::OwnedReadHalf,
        tokio::net::tcp::OwnedWriteHalf,
        bool,
    ),
    String,
> {
    let stream = TcpStream::connect(front.broker.addr)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let client_id = if device.client_id.is_empty() {
        format!("{device_id}|{}", crate::registry::secrets::generate())
    } else {
        format!("{device_id}|{}", device.client_id)
    };
    let connect = Connect {
        protocol: mqttbytes::Protocol::V4,
        // rumqttd refuses keep-alive 0 ("none"); the longest one stands in for it.
        keep_alive: if device.keep_alive == 0 {
            u16::MAX
        } else {
            device.keep_alive
        },
        client_id,
        clean_session: device.clean_session,
        last_will: device.last_will.clone(),
        login: Some(Login::new(broker::FRONT_USER, front.broker.secret.clone())),
    };
    wr.write_all(&encode(&Packet::Connect(connect)))
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = BytesMut::new();
    let ack = tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            match Packet::read(&mut buf, MAX_WRITE) {
                Ok(Packet::ConnAck(ack)) => return Ok(ack),
                Ok(other) => return Err(format!("expected CONNACK, got {other:?}")),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) => return Err("closed before CONNACK".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "no CONNACK in time".to_owned())??;
    if ack.code != ConnectReturnCode::Success {
        return Err(format!("broker refused the front: {:?}", ack.code));
    }
    Ok((rd, wr, ack.session_present))
}

/// One authenticated device connection.
struct Session<'a> {
    front: &'a Front,
    device_id: String,
    acl: Acl,
    /// QoS 2 packet ids stored and PUBREC'd, awaiting the device's PUBREL.
    awaiting_rel: HashSet<u16>,
    /// SUBSCRIBE packet id → per filter: `None` if denied, else its index at the broker.
    pending_subs: HashMap<u16, Vec<bool>>,
    /// Packet ids of the front's publishes to the broker.
    next_pkid: u16,
}

impl Session<'_> {
    /// Handles one packet from the device; false ends the connection normally.
    async fn on_device_packet(
        &mut self,
        packet: Packet,
        device: &mut tokio::net::tcp::OwnedWriteHalf,
        broker: &mut tokio::net::tcp::OwnedWriteHalf,
    ) -> Result<bool, ConnError> {
        match packet {
            Packet::Publish(p) => self.publish(p, device, broker).await?,
            Packet::PubRel(rel) => {
                self.awaiting_rel.remove(&rel.pkid);
                device
                    .write_all(&encode(&Packet::PubComp(PubComp::new(rel.pkid))))
                    .await?;
            }
            Packet::Subscribe(sub) => self.subscribe(sub, device, broker).await?,
            p @ (Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubComp(_)
            | Packet::Unsubscribe(_)
            | Packet::PingReq) => write_broker(broker, &p).await?,
            Packet::Disconnect => {
                // Forwarded so the broker drops the will.
                let _ = write_broker(broker, &Packet::Disconnect).await;
                return Ok(false);
            }
            other => {
                return Err(ConnError::Malformed(format!(
                    "unexpected {} from a client",
                    packet_name(&other)
                )));
            }
        }
        Ok(true)
    }

    async fn publish(
        &mut self,
        p: Publish,
        device: &mut tokio::net::tcp::OwnedWriteHalf,
        broker: &mut tokio::net::tcp::OwnedWriteHalf,
    ) -> Result<(), ConnError> {
        let metrics = &self.front.metrics;
        if !self.acl.may_publish(&p.topic) {
            metrics.acl_denied.inc();
            tracing::warn!(device = %self.device_id, topic = %p.topic, "Refused publish outside ACL; disconnecting");
            return Err(ConnError::Refused(format!(
                "publish to {} outside ACL",
                p.topic
            )));
        }
        if p.qos == QoS::ExactlyOnce && self.awaiting_rel.contains(&p.pkid) {
            device
                .write_all(&encode(&Packet::PubRec(PubRec::new(p.pkid))))
                .await?;
            return Ok(());
        }
        let mut headers = vec![("mqtt_qos".to_owned(), (p.qos as u8).to_string())];
        if p.retain {
            headers.push(("mqtt_retain".to_owned(), "true".to_owned()));
        }
        let record = IngestRecord {
            topic: p.topic.clone(),
            content_type: None,
            payload: p.payload.to_vec(),
            headers,
        };
        let committed = self
            .front
            .ingest
            .submit(
                &self.device_id,
                Source::Mqtt,
                &self.front.settings.route,
                vec![record],
            )
            .await;
        match committed {
            Ok(_) => {
                metrics.publishes.inc();
            }
            Err(e @ AppendError::TooLarge { .. }) => {
                metrics.outbox_refused.inc();
                tracing::warn!(device = %self.device_id, error = %e, "Refused MQTT publish; disconnecting");
                return Err(ConnError::Refused(e.to_string()));
            }
            Err(e) => {
                metrics.outbox_refused.inc();
                tracing::warn!(device = %self.device_id, error = %e, "Outbox refused MQTT publish; not acknowledged");
                return Ok(());
            }
        }
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                device
                    .write_all(&encode(&Packet::PubAck(PubAck::new(p.pkid))))
                    .await?;
            }
            QoS::ExactlyOnce => {
                self.awaiting_rel.insert(p.pkid);
                device
                    .write_all(&encode(&Packet::PubRec(PubRec::new(p.pkid))))
                    .await?;
            }
        }
        let mut forward = p;
        forward.dup = false;
        if forward.qos == QoS::AtMostOnce {
            forward.pkid = 0;
        } else {
            forward.qos = QoS::AtLeastOnce;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            forward.pkid = self.next_pkid;
        }
        write_broker(broker, &Packet::Publish(forward)).await
    }

    async fn subscribe(
        &mut self,
        sub: Subscribe,
        device: &mut tokio::net::tcp::OwnedWriteHalf,
        broker: &mut tokio::net::tcp::OwnedWriteHalf,
    ) -> Result<(), ConnError> {
        let allowed: Vec<bool> = sub
            .filters
            .iter()
            .map(|f| self.acl.may_subscribe(&f.path))
            .collect();
        for (f, ok) in sub.filters.iter().zip(&allowed) {
            if !ok {
                self.front.metrics.acl_denied.inc();
                tracing::warn!(device = %self.device_id, filter = %f.path, "Refused subscribe outside ACL");
            }
        }
        let filters: Vec<_> = sub
            .filters
            .into_iter()
            .zip(&allowed)
            .filter_map(|(f, ok)| ok.then_some(f))
            .collect();
        if filters.is_empty() {
            let codes = vec![SubscribeReasonCode::Failure; allowed.len()];
            device
                .write_all(&encode(&Packet::SubAck(SubAck::new(sub.pkid, codes))))
                .await?;
            return Ok(());
        }
        self.pending_subs.insert(sub.pkid, allowed);
        write_broker(
            broker,
            &Packet::Subscribe(Subscribe {
                pkid: sub.pkid,
                filters,
            }),
        )
        .await
    }

    /// Handles one packet from the broker.
    async fn on_broker_packet(
        &mut self,
        packet: Packet,
        device: &mut tokio::net::tcp::OwnedWriteHalf,
    ) -> Result<(), ConnError> {
        match packet {
            // Acks of the front's own forwarded publishes.
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => Ok(()),
            Packet::SubAck(ack) => {
                let Some(allowed) = self.pending_subs.remove(&ack.pkid) else {
                    return Ok(());
                };
                let mut granted = ack.return_codes.into_iter();
                let codes = allowed
                    .into_iter()
                    .map(|ok| {
                        if ok {
                            granted.next().unwrap_or(SubscribeReasonCode::Failure)
                        } else {
                            SubscribeReasonCode::Failure
                        }
                    })
                    .collect();
                device
                    .write_all(&encode(&Packet::SubAck(SubAck::new(ack.pkid, codes))))
                    .await?;
                Ok(())
            }
            Packet::Disconnect => Err(ConnError::Broker("disconnected by the broker".into())),
            p => {
                device.write_all(&encode(&p)).await?;
                Ok(())
            }
        }
    }
}

async fn write_broker(
    broker: &mut tokio::net::tcp::OwnedWriteHalf,
    packet: &Packet,
) -> Result<(), ConnError> {
    broker
        .write_all(&encode(packet))
        .await
        .map_err(|e| ConnError::Broker(e.to_string()))
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::SubAck(_) => "SUBACK",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingResp => "PINGRESP",
        _ => "packet",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_level_reads_the_protocol_level() {
        // CONNECT, remaining 12, "MQTT", level 4.
        let v4 = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60];
        assert_eq!(connect_level(&v4).unwrap(), Some(4));
        assert_eq!(connect_level(&v4[..5]).unwrap(), None);
        assert!(connect_level(&[0x30, 0]).is_err());
        assert!(connect_level(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
    }
}
