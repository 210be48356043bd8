//! The MQTT front: devices' MQTT connections end here, not at the broker.
//!
//! ```text
//! device ──TCP──> front (this module) ──loopback TCP, front's credentials──> rumqttd (broker.rs)
//!  3.1.1 or 5      │ auth, ACL, outbox commit before PUBACK/PUBREC           MQTT 3.1.1
//!                  └──> Ingest::submit ──> outbox
//! ```
//!
//! One task per device connection (in this module's own `TaskTracker`, awaited on shutdown),
//! admitted by a semaphore of `mqtt.max_connections` permits taken *before* `accept`: excess
//! connections wait in the kernel's backlog. A device that needs a broker session (a will, a
//! persistent session, or from its first SUBSCRIBE/UNSUBSCRIBE on) gets its own connection to
//! the broker, logging in with the front's per-boot secret; the broker client id is
//! `<device id>|<client id>` (escaped, [`broker_client_id`]), so devices cannot take over each
//! other's sessions. The publishes of the others are routed through one shared broker
//! connection ([`forward`]), and the front answers their PINGREQs and enforces their keep-alive:
//! a broker connection costs ~16 KiB even in the patched rumqttd (`vendor/rumqttd`), an idle
//! publishing device then costs only its front task (~4 KiB). A stored publish goes on to the
//! broker only if a subscription there can receive it or it is retained ([`interest`]).
//!
//! Devices speak MQTT 3.1.1 or MQTT 5; the broker hop is always 3.1.1 (`codec.rs` translates,
//! `docs/MQTT.md` lists what passes through). Contract with the device:
//! - CONNECT: username = device id, password = device secret, checked against the registry.
//!   Unknown device or wrong secret → CONNACK 0x04 (v5: 0x86); disabled device, MQTT not
//!   allowed for it, no credentials (unless `allow_anonymous`) or a will outside the publish ACL
//!   → 0x05 (v5: 0x87); with `allow_anonymous`, a CONNECT without credentials is the identity
//!   `anonymous/<client id>` (client id non-empty, without `/`, `+`, `#`), which is what its
//!   records carry and what `{id}` stands for in its ACL; broker unreachable → 0x03 (v5: 0x88).
//!   The connection is then closed.
//! - PUBLISH outside the publish ACL: nothing stored or routed. 3.1.1 → **the connection is
//!   closed** once the acks of earlier publishes are out (3.1.1 has no negative ack; a silent
//!   drop would make the device believe it was delivered). v5 → PUBACK/PUBREC 0x87, the
//!   connection stays.
//! - PUBLISH to a topic that breaks the record topic rule of every ingress
//!   (`outpost_config::check_record_topic`: empty, wildcards, leading `$`, over 256 bytes,
//!   control characters): refused like one outside the ACL, v5 with 0x90 (Topic Name invalid),
//!   counted as `invalid_topic`.
//! - PUBLISH inside the ACL: appended to the outbox (route `mqtt.route`, headers `mqtt_qos`,
//!   `mqtt_retain`, then a v5 publish's user properties in order; its content type as the
//!   record's content type), and only once committed: QoS 1 → PUBACK, QoS 2 → PUBREC; then
//!   forwarded to the broker for subscribers. A QoS 2 PUBLISH whose packet id awaits its PUBREL
//!   (a DUP retransmission) is answered with PUBREC again and not stored twice. QoS 0 is stored
//!   best-effort (a refusal is only counted). Outbox full (`reject`) → v5 0x97, storage error or
//!   shutdown → v5 0x80; 3.1.1 → no ack (the device retransmits after reconnecting); never
//!   routed. A record the outbox can never take (too large) closes the connection.
//! - The ACL is resolved once at CONNECT: the device's own `mqtt_publish`/`mqtt_subscribe`
//!   from the registry where set, else `[mqtt.acl]` ([`super::bus::acl_for`]).
//! - Rate limits (`[mqtt.limits]`, `limits.rs`): a PUBLISH inside the ACL but over its device's
//!   message or byte rate is refused like an outbox refusal (v5 0x97, 3.1.1 no ack, QoS 0
//!   dropped), never stored or routed, counted as `rate_limit`.
//! - **Pipelining**: up to `mqtt.max_inflight` publishes of a connection await their commit at
//!   once (the outbox commits them in groups); acks are written strictly in the order the
//!   publishes arrived (a queue of futures completed in order). With the window full the front
//!   reads nothing more from that device: TCP back-pressure. v5 clients get the window as
//!   their receive maximum.
//! - Publishes reach the broker with QoS ≤ 1 (a device's QoS 2 is forwarded as QoS 1: the
//!   exactly-once part is the outbox record, which is what the gateway guarantees).
//! - SUBSCRIBE: each filter outside the subscribe ACL gets SUBACK 0x80 (v5: 0x87); the others
//!   are subscribed at the broker and their codes relayed. UNSUBSCRIBE, PINGREQ, DISCONNECT and
//!   the device's acks of deliveries pass through to the broker; deliveries come back.
//! - A device disabled while connected is disconnected within 0.5 s (checked on a timer).
//! - Malformed input (undecodable packet, a packet over `mqtt.max_packet`, anything but CONNECT
//!   first, a second CONNECT, a v5 topic alias or AUTH) closes the connection and counts
//!   `outpost_mqtt_malformed`.

mod acl;
pub mod broker;
mod codec;
mod interest;
mod limits;
mod metrics;
pub mod tls;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use outpost_config::MqttConfig;
use outpost_sync::{AppendError, Source};
use rumqttc::mqttbytes::{self, QoS};
use rumqttc::{Connect, ConnectReturnCode, Login, Packet, Publish, Subscribe};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use acl::Acl;
pub use broker::BrokerHandle;
pub use metrics::{MqttMetrics, MqttStatus};

use self::codec::{
    AckReason, ConnRefusal, DeviceCodec, DeviceConnect, Inbound, MAX_WRITE, PublishMeta, SubCode,
    Version,
};
use self::limits::{LimiterHandle, Limiters};
use self::metrics::{DeviceCounters, RefusedReason};
use super::{Ingest, IngestRecord};
use crate::registry::{Protocol, Refusal, Traffic};

/// How long a new connection may take to send its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a connected device's registry entry is checked (disabled → disconnect).
const RECHECK_EVERY: Duration = Duration::from_millis(500);

/// What the front needs from the configuration.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    pub route: String,
    pub max_connections: usize,
    pub max_packet: usize,
    pub max_inflight: usize,
    pub allow_anonymous: bool,
    pub acl: outpost_config::MqttAclConfig,
    pub limits: outpost_config::MqttLimitsConfig,
}

impl MqttSettings {
    pub fn from_config(config: &MqttConfig) -> Self {
        Self {
            route: config.route.clone(),
            max_connections: config.max_connections,
            max_packet: usize::try_from(config.max_packet.bytes()).unwrap_or(usize::MAX),
            max_inflight: config.max_inflight.clamp(1, usize::from(u16::MAX)),
            allow_anonymous: config.allow_anonymous,
            acl: config.acl.clone(),
            limits: config.limits.clone(),
        }
    }
}

// The codec is self-contained (the fuzz target `mqtt_front` compiles it from its file), so the
// connection error type lives there.
pub use codec::ConnError;

struct Front {
    ingest: Ingest,
    settings: MqttSettings,
    broker: BrokerHandle,
    metrics: MqttMetrics,
    /// Encoded publishes for the shared broker connection (see [`forward`]).
    shared: mpsc::Sender<BytesMut>,
    /// Packet ids on the shared connection.
    shared_pkid: AtomicU16,
    /// Open connections by broker client id, with a generation number: a new CONNECT with the
    /// same (device, client id) closes the older connection (MQTT 3.1.4-2). The broker does
    /// this for devices with a session there; this covers the others.
    sessions: std::sync::Mutex<HashMap<String, (u64, CancellationToken)>>,
    next_generation: AtomicU64,
    /// Per-device rate limits; `None` when `[mqtt.limits]` sets none.
    limiters: Option<Limiters>,
    /// The broker's subscriptions as the front saw them go by: publishes nobody can receive
    /// skip the broker.
    interest: interest::Interest,
}

/// Removes a connection from [`Front::sessions`] when it ends (unless a newer one took over),
/// and tells [`Front::interest`] that its broker session, if it had one, is gone.
struct SessionEntry<'a> {
    front: &'a Front,
    key: String,
    generation: u64,
    /// Set once the connection has a broker session of its own: is that session clean?
    broker_clean: Option<bool>,
}

impl SessionEntry<'_> {
    fn broker_session_started(&mut self, clean: bool) {
        self.front
            .interest
            .session_started(&self.key, self.generation, clean);
        self.broker_clean = Some(clean);
    }
}

impl Drop for SessionEntry<'_> {
    fn drop(&mut self) {
        if let Some(clean) = self.broker_clean {
            self.front
                .interest
                .session_ended(&self.key, self.generation, clean);
        }
        let mut sessions = self
            .front
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if sessions
            .get(&self.key)
            .is_some_and(|(g, _)| *g == self.generation)
        {
            sessions.remove(&self.key);
        }
    }
}

/// Batches of publishes waiting for the shared broker connection; when full, connections wait.
const SHARED_QUEUE: usize = 256;

/// Accepts device connections (plain, and TLS with `tls`) until `shutdown`, then waits for them
/// to end. Both listeners share the connection limit, sessions and rate limits.
pub async fn run(
    listener: TcpListener,
    tls: Option<tls::TlsListener>,
    ingest: Ingest,
    settings: MqttSettings,
    broker: BrokerHandle,
    metrics: MqttMetrics,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let (shared, shared_rx) = mpsc::channel(SHARED_QUEUE);
    let connections = TaskTracker::new();
    connections.spawn(forward(shared_rx, broker.clone(), shutdown.clone()));
    let limiters = Limiters::new(&settings.limits);
    let front = Arc::new(Front {
        ingest,
        limiters,
        settings,
        broker,
        metrics,
        shared,
        shared_pkid: AtomicU16::new(0),
        sessions: std::sync::Mutex::default(),
        next_generation: AtomicU64::new(0),
        interest: interest::Interest::default(),
    });
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (accepted, acceptor) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => (accepted, None),
            (accepted, acceptor) = tls::accept(tls.as_ref()) => (accepted, Some(acceptor)),
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "MQTT accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let front = Arc::clone(&front);
        let stop = shutdown.clone();
        connections.spawn(async move {
            front.metrics.connections.inc();
            let span = tracing::debug_span!("mqtt", peer = %peer);
            let result =
                tracing::Instrument::instrument(serve_stream(stream, acceptor, &front, stop), span)
                    .await;
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
    // The shared forwarder ends once no connection can send to it any more.
    drop(front);
    connections.close();
    connections.wait().await;
}

/// The shared broker connection: routes the publishes of devices that have no broker session
/// of their own (no subscription, no will, clean session), so an idle publishing device costs
/// the broker nothing. Reconnects after a failure; meanwhile the queue fills and connections
/// wait (a batch being written when the connection failed is not routed: it is in the outbox,
/// and the failure is logged). Ends when every sender is gone or on `stop`.
async fn forward(mut rx: mpsc::Receiver<BytesMut>, broker: BrokerHandle, stop: CancellationToken) {
    const CLIENT_ID: &str = "outpost-front|shared";
    loop {
        let connected = tokio::select! {
            () = stop.cancelled() => return,
            c = connect_front(&broker, CLIENT_ID, u16::MAX, true, None) => c,
        };
        let (mut rd, mut wr) = match connected {
            // The shared connection has no session: nothing follows the CONNACK unasked.
            Ok((rd, wr, _, _)) => (rd, wr),
            Err(e) => {
                tracing::error!(error = %e, "MQTT shared broker connection failed; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let mut sink = BytesMut::with_capacity(1024);
        let mut ping = tokio::time::interval(Duration::from_secs(60));
        let error = loop {
            tokio::select! {
                () = stop.cancelled() => return,
                batch = rx.recv() => match batch {
                    None => return,
                    Some(bytes) => if let Err(e) = wr.write_all(&bytes).await { break e.to_string() },
                },
                // The broker's PUBACKs and PINGRESPs: read and dropped.
                r = rd.read_buf(&mut sink) => match r {
                    Ok(0) => break "closed by the broker".to_owned(),
                    Ok(_) => sink.clear(),
                    Err(e) => break e.to_string(),
                },
                _ = ping.tick() => {
                    if let Err(e) = wr.write_all(&[0xC0, 0]).await { break e.to_string() }
                }
            }
        };
        tracing::error!(error = %error, "MQTT shared broker connection lost; reconnecting");
    }
}

/// Room for the first read of a connection: an idle device holds little more than this.
const READ_START: usize = 256;
/// Room a busy connection's reads grow to.
const READ_MAX: usize = 64 * 1024;

/// Reads more bytes into `buf`: returns false on EOF. The room for a read starts at
/// [`READ_START`] and doubles each time a read fills it (up to [`READ_MAX`]): idle connections
/// stay small, busy ones read many packets per system call.
async fn fill(stream: &mut (impl AsyncRead + Unpin), buf: &mut BytesMut) -> std::io::Result<bool> {
    buf.reserve(READ_START);
    let room = buf.capacity() - buf.len();
    let n = stream.read_buf(buf).await?;
    if n == room {
        buf.reserve((room * 2).min(READ_MAX));
    }
    Ok(n > 0)
}

fn refusal_code(refusal: Refusal) -> ConnRefusal {
    match refusal {
        Refusal::UnknownDevice | Refusal::BadSecret => ConnRefusal::BadCredentials,
        Refusal::Disabled | Refusal::ProtocolNotAllowed => ConnRefusal::NotAuthorized,
    }
}

/// One device connection: plain TCP (split without a lock) or TLS after its handshake.
async fn serve_stream(
    stream: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    front: &Front,
    stop: CancellationToken,
) -> Result<(), ConnError> {
    let _ = stream.set_nodelay(true);
    match tls {
        None => {
            let (rd, wr) = stream.into_split();
            serve(rd, wr, &[], front, stop).await
        }
        Some(acceptor) => {
            let (stream, cert_names) = tls::handshake(acceptor, stream, CONNECT_TIMEOUT).await?;
            let (rd, wr) = tokio::io::split(stream);
            serve(rd, wr, &cert_names, front, stop).await
        }
    }
}

/// Serves one device connection; `cert_names` are the names of its verified TLS client
/// certificate (see `tls.rs`), empty without one.
async fn serve(
    mut rd: impl AsyncRead + Unpin,
    mut wr: impl AsyncWrite + Unpin,
    cert_names: &[String],
    front: &Front,
    stop: CancellationToken,
) -> Result<(), ConnError> {
    let max = front.settings.max_packet;
    let mut buf = BytesMut::new();
    // The CONNECT: which protocol level, then the whole packet.
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let connect = loop {
        if let Some(level) = codec::connect_level(&buf)?
            && let Some(connect) = codec::read_connect(&mut buf, level, max)?
        {
            break connect;
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
    let version = connect.version;
    // A verified client certificate naming a device authenticates it without a password.
    let certified = match tls::certified_device(
        cert_names,
        connect.login.as_ref().map(|l| l.username.as_str()),
        front.ingest.registry(),
    ) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(refusal)) => {
            front.metrics.connects_refused.inc();
            tracing::warn!(names = ?cert_names, reason = %refusal, "Refused MQTT CONNECT with a client certificate");
            wr.write_all(&codec::refuse(version, refusal_code(refusal)))
                .await?;
            return Ok(());
        }
    };
    let device_id = match &connect.login {
        _ if certified.is_some() => certified.clone().unwrap_or_default(),
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
                    wr.write_all(&codec::refuse(version, refusal_code(refusal)))
                        .await?;
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
            wr.write_all(&codec::refuse(version, ConnRefusal::NotAuthorized))
                .await?;
            return Ok(());
        }
    };
    let authenticated = connect.login.is_some() || certified.is_some();
    let acl = front
        .ingest
        .bus()
        .acl_for(&front.settings.acl, front.ingest.registry(), &device_id);
    if let Some(will) = &connect.will
        && !acl.may_publish(&will.topic)
    {
        front.metrics.connects_refused.inc();
        front.metrics.refuse(RefusedReason::Acl);
        tracing::warn!(device = %device_id, topic = %will.topic, "Refused MQTT CONNECT: will outside ACL");
        wr.write_all(&codec::refuse(version, ConnRefusal::NotAuthorized))
            .await?;
        return Ok(());
    }
    let assigned = connect
        .client_id
        .is_empty()
        .then(crate::registry::secrets::generate);
    let client_id = assigned
        .clone()
        .unwrap_or_else(|| connect.client_id.clone());
    let taken_over = CancellationToken::new();
    let mut entry = {
        let key = broker_client_id(&device_id, &client_id);
        let generation = front.next_generation.fetch_add(1, Ordering::Relaxed);
        let older = front
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.clone(), (generation, taken_over.clone()));
        if let Some((_, older)) = older {
            older.cancel();
        }
        SessionEntry {
            front,
            key,
            generation,
            broker_clean: None,
        }
    };
    // A broker session of its own only when the device needs one now (a will, a persistent
    // session); otherwise at its first SUBSCRIBE. Until then its publishes are routed through
    // the shared connection.
    let mut broker_conn: Option<(OwnedReadHalf, OwnedWriteHalf)> = None;
    let mut session_present = false;
    let mut early = BytesMut::new();
    if connect.will.is_some() || !connect.clean_session {
        match connect_broker(front, &device_id, &client_id, &connect).await {
            Ok((rd, wr, present, rest)) => {
                broker_conn = Some((rd, wr));
                session_present = present;
                early = rest;
                entry.broker_session_started(connect.clean_session);
            }
            Err(e) => {
                front.metrics.connects_refused.inc();
                tracing::error!(device = %device_id, error = %e, "MQTT broker unavailable");
                wr.write_all(&codec::refuse(version, ConnRefusal::Unavailable))
                    .await?;
                return Ok(());
            }
        }
    }
    let limit = front.settings.max_inflight;
    let codec = DeviceCodec::new(version, max);
    let mut out = BytesMut::new();
    codec.connack(
        &mut out,
        session_present,
        u16::try_from(limit).unwrap_or(u16::MAX),
        assigned.filter(|_| version == Version::V5),
    );
    wr.write_all(&out).await?;
    out.clear();
    let counters = if authenticated {
        front.metrics.device(&device_id)
    } else {
        DeviceCounters::default()
    };
    let limiter = front.limiters.as_ref().map(|l| l.for_device(&device_id));
    let mut session = Session {
        front,
        device_id: Arc::from(device_id),
        broker_key: entry.key.clone(),
        acl,
        codec,
        counters,
        limiter,
        rate_limited: false,
        awaiting_rel: HashSet::new(),
        pending_subs: HashMap::new(),
        next_pkid: 0,
        closing: false,
        own_broker: broker_conn.is_some(),
        out,
        bout: BytesMut::new(),
        shared_out: BytesMut::new(),
    };
    let mut inflight: InFlight<'_> = FuturesOrdered::new();
    // The broker stream of the device's session, starting with what came with its CONNACK.
    let mut bbuf = early;
    let mut recheck = tokio::time::interval(RECHECK_EVERY);
    // Keep-alive: the device must send something within 1.5 × its keep-alive (MQTT 3.1.2.10).
    let keep_alive = Duration::from_millis(u64::from(connect.keep_alive) * 1500);
    let mut last_heard = Instant::now();
    loop {
        // Every complete packet already buffered from the device, while the window has room.
        while inflight.len() < limit && !session.closing {
            let Some(packet) = session.codec.read(&mut buf)? else {
                break;
            };
            if broker_conn.is_none() && needs_broker(&packet) {
                match connect_broker(front, &session.device_id, &client_id, &connect).await {
                    Ok((rd, wr, _, rest)) => {
                        broker_conn = Some((rd, wr));
                        bbuf.unsplit(rest);
                        session.own_broker = true;
                        entry.broker_session_started(connect.clean_session);
                    }
                    Err(e) => {
                        tracing::error!(device = %session.device_id, error = %e, "MQTT broker unavailable");
                        return Err(ConnError::Broker(e));
                    }
                }
            }
            if let Flow::Disconnect { tell_broker } =
                session.on_device_packet(packet, &mut inflight)?
            {
                // Finish what is committing (acks and routing), then leave.
                while let Some(done) = inflight.next().await {
                    if session.complete(done).is_err() {
                        break;
                    }
                }
                if tell_broker && session.own_broker {
                    // Forwarded so the broker drops the will.
                    codec::encode4(&mut session.bout, &Packet::Disconnect);
                }
                let _ = session
                    .flush(&mut wr, broker_conn.as_mut().map(|b| &mut b.1))
                    .await;
                return Ok(());
            }
        }
        loop {
            match Packet::read(&mut bbuf, MAX_WRITE) {
                Ok(p) => session.on_broker_packet(p)?,
                Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => return Err(ConnError::Broker(e.to_string())),
            }
        }
        session
            .flush(&mut wr, broker_conn.as_mut().map(|b| &mut b.1))
            .await?;
        let room = inflight.len() < limit && !session.closing;
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = taken_over.cancelled() => {
                return Err(ConnError::Refused("taken over by a new connection with the same client id".into()));
            }
            r = fill(&mut rd, &mut buf), if room => {
                if !r? { return Ok(()) }
                last_heard = Instant::now();
            }
            r = fill_broker(broker_conn.as_mut(), &mut bbuf) => match r {
                Ok(true) => {}
                Ok(false) => return Err(ConnError::Broker("closed by the broker".into())),
                Err(e) => return Err(ConnError::Broker(e.to_string())),
            },
            Some(done) = inflight.next(), if !inflight.is_empty() => {
                // This one and whatever else completed meanwhile, in order: one write for all.
                let mut result = session.complete(done);
                while result.is_ok()
                    && let Some(Some(done)) = inflight.next().now_or_never()
                {
                    result = session.complete(done);
                }
                if let Err(e) = result {
                    let _ = session.flush(&mut wr, broker_conn.as_mut().map(|b| &mut b.1)).await;
                    return Err(e);
                }
            }
            _ = recheck.tick() => {
                if let Err(refusal) = front.ingest.registry().identify(&session.device_id, Protocol::Mqtt)
                    && authenticated
                {
                    tracing::warn!(device = %session.device_id, reason = %refusal, "Disconnecting MQTT device");
                    return Err(ConnError::Refused(refusal.to_string()));
                }
                if !keep_alive.is_zero() && room && last_heard.elapsed() > keep_alive {
                    return Err(ConnError::Refused("keep-alive expired".into()));
                }
            }
        }
    }
}

/// Does this packet need the device's own broker session?
fn needs_broker(packet: &Inbound) -> bool {
    matches!(
        packet,
        Inbound::Packet(Packet::Subscribe(_) | Packet::Unsubscribe(_))
    )
}

/// Reads from the device's broker session; never completes without one.
async fn fill_broker(
    conn: Option<&mut (OwnedReadHalf, OwnedWriteHalf)>,
    buf: &mut BytesMut,
) -> std::io::Result<bool> {
    match conn {
        Some((rd, _)) => fill(rd, buf).await,
        None => std::future::pending().await,
    }
}

/// A connection to the broker logged in as the front: (read half, write half, session present,
/// the bytes read after the CONNACK). A resumed persistent session's queued publishes can
/// arrive in the same read as the CONNACK; they are the start of the broker stream.
type BrokerConn = (
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::tcp::OwnedWriteHalf,
    bool,
    BytesMut,
);

/// Opens a device's own broker session.
async fn connect_broker(
    front: &Front,
    device_id: &str,
    client_id: &str,
    device: &DeviceConnect,
) -> Result<BrokerConn, String> {
    // rumqttd refuses keep-alive 0 ("none"); the longest one stands in for it.
    let keep_alive = if device.keep_alive == 0 {
        u16::MAX
    } else {
        device.keep_alive
    };
    connect_front(
        &front.broker,
        &broker_client_id(device_id, client_id),
        keep_alive,
        device.clean_session,
        device.will.clone(),
    )
    .await
}

async fn connect_front(
    broker: &BrokerHandle,
    client_id: &str,
    keep_alive: u16,
    clean_session: bool,
    last_will: Option<rumqttc::LastWill>,
) -> Result<BrokerConn, String> {
    let stream = TcpStream::connect(broker.addr)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let connect = Connect {
        protocol: mqttbytes::Protocol::V4,
        keep_alive,
        client_id: client_id.to_owned(),
        clean_session,
        last_will,
        login: Some(Login::new(broker::FRONT_USER, broker.secret.clone())),
    };
    let mut out = BytesMut::new();
    codec::encode4(&mut out, &Packet::Connect(connect));
    wr.write_all(&out).await.map_err(|e| e.to_string())?;
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
    Ok((rd, wr, ack.session_present, buf))
}

/// The broker client id of a device's session: `<device id>|<client id>`, each part with `%`,
/// `/` and `|` percent-encoded, because rumqttd refuses a `/` in a client id (an anonymous
/// identity has one) and so that no two (device, client) pairs share a session.
fn broker_client_id(device_id: &str, client_id: &str) -> String {
    let escape = |s: &str| {
        s.replace('%', "%25")
            .replace('/', "%2F")
            .replace('|', "%7C")
    };
    format!("{}|{}", escape(device_id), escape(client_id))
}

/// Publishes of one connection awaiting their commit, completed in arrival order.
type InFlight<'a> = FuturesOrdered<Pin<Box<dyn Future<Output = Done> + Send + 'a>>>;

/// What a slot of the in-flight queue yields, in the order the publishes arrived.
enum Done {
    /// A publish's commit resolved.
    Committed {
        publish: Publish,
        received: Instant,
        result: Result<(), AppendError>,
        /// To be passed on to the broker once stored (else its payload was already dropped).
        routed: bool,
    },
    /// A publish refused before the outbox: negative ack (v5 ACL, or rate limit: v5 0x97,
    /// 3.1.1 no ack, QoS 0 nothing).
    Refused {
        pkid: u16,
        qos: QoS,
        reason: AckReason,
    },
    /// A QoS 2 retransmission of a packet id already stored: PUBREC again.
    Rec(u16),
    /// A 3.1.1 publish outside the ACL: close once the earlier acks are out.
    Close(String),
}

/// What the loop does after a device packet.
enum Flow {
    Continue,
    /// The device is leaving; `tell_broker` false keeps the will (v5 reason 0x04).
    Disconnect {
        tell_broker: bool,
    },
}

/// One authenticated device connection.
struct Session<'a> {
    front: &'a Front,
    device_id: Arc<str>,
    /// The broker client id of this connection's session ([`broker_client_id`]).
    broker_key: String,
    acl: Acl,
    codec: DeviceCodec,
    counters: DeviceCounters,
    /// The device's rate limits, shared with its other connections.
    limiter: Option<LimiterHandle<'a>>,
    /// The last publish was refused by the rate limit (the next refusal is not logged again).
    rate_limited: bool,
    /// QoS 2 packet ids being stored or PUBREC'd, awaiting the device's PUBREL.
    awaiting_rel: HashSet<u16>,
    /// SUBSCRIBE packet id → per filter: allowed by the ACL (sent to the broker) or not.
    pending_subs: HashMap<u16, Vec<bool>>,
    /// Packet ids of the front's publishes to the broker.
    next_pkid: u16,
    /// A 3.1.1 ACL refusal is queued: read nothing more from the device.
    closing: bool,
    /// The device has its own broker session (else its publishes go to the shared one).
    own_broker: bool,
    /// Bytes for the device, its broker session and the shared connection, written once per
    /// loop turn.
    out: BytesMut,
    bout: BytesMut,
    shared_out: BytesMut,
}

impl<'a> Session<'a> {
    async fn flush(
        &mut self,
        device: &mut (impl AsyncWrite + Unpin),
        broker: Option<&mut OwnedWriteHalf>,
    ) -> Result<(), ConnError> {
        if !self.out.is_empty() {
            device.write_all(&self.out).await?;
            self.out.clear();
        }
        if let Some(broker) = broker
            && !self.bout.is_empty()
        {
            broker
                .write_all(&self.bout)
                .await
                .map_err(|e| ConnError::Broker(e.to_string()))?;
        }
        self.bout.clear();
        if !self.shared_out.is_empty() {
            // Closed only while shutting down: then routing does not matter any more.
            let _ = self.front.shared.send(self.shared_out.split()).await;
        }
        Ok(())
    }

    /// Handles one packet from the device.
    fn on_device_packet(
        &mut self,
        packet: Inbound,
        inflight: &mut InFlight<'a>,
    ) -> Result<Flow, ConnError> {
        match packet {
            Inbound::Publish(p, meta) => self.publish(p, meta, inflight),
            Inbound::DisconnectWithWill => return Ok(Flow::Disconnect { tell_broker: false }),
            Inbound::Packet(Packet::PubRel(rel)) => {
                self.awaiting_rel.remove(&rel.pkid);
                self.codec.pubcomp(&mut self.out, rel.pkid);
            }
            Inbound::Packet(Packet::Subscribe(sub)) => self.subscribe(sub),
            Inbound::Packet(Packet::PingReq) if !self.own_broker => {
                self.codec.relay(&mut self.out, &Packet::PingResp);
            }
            Inbound::Packet(Packet::Unsubscribe(unsub)) => {
                for filter in &unsub.topics {
                    self.front.interest.unsubscribe(&self.broker_key, filter);
                }
                codec::encode4(&mut self.bout, &Packet::Unsubscribe(unsub));
            }
            Inbound::Packet(
                p @ (Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) | Packet::PingReq),
            ) => codec::encode4(&mut self.bout, &p),
            Inbound::Packet(Packet::Disconnect) => {
                return Ok(Flow::Disconnect { tell_broker: true });
            }
            Inbound::Packet(other) => {
                return Err(ConnError::Malformed(format!(
                    "unexpected {} from a client",
                    packet_name(&other)
                )));
            }
        }
        Ok(Flow::Continue)
    }

    /// Queues a publish: refused (in order with the acks before it) or submitted to the outbox.
    fn publish(&mut self, mut p: Publish, meta: PublishMeta, inflight: &mut InFlight<'a>) {
        let received = Instant::now();
        if let Err(why) = outpost_config::check_record_topic(&p.topic) {
            // The topic rule of every ingress: refused like a publish outside the ACL, with
            // MQTT 5's "Topic Name invalid".
            self.front.metrics.refuse(RefusedReason::InvalidTopic);
            let done = if self.codec.version == Version::V5 {
                tracing::warn!(device = %self.device_id, topic = %p.topic.escape_debug(), error = %why, "Refused publish to an invalid topic");
                Done::Refused {
                    pkid: p.pkid,
                    qos: p.qos,
                    reason: AckReason::TopicNameInvalid,
                }
            } else {
                tracing::warn!(device = %self.device_id, topic = %p.topic.escape_debug(), error = %why, "Refused publish to an invalid topic; disconnecting");
                self.closing = true;
                Done::Close(format!("publish to an invalid topic: {why}"))
            };
            inflight.push_back(Box::pin(std::future::ready(done)));
            return;
        }
        if !self.acl.may_publish(&p.topic) {
            self.front.metrics.refuse(RefusedReason::Acl);
            let done = if self.codec.version == Version::V5 {
                tracing::warn!(device = %self.device_id, topic = %p.topic, "Refused publish outside ACL");
                Done::Refused {
                    pkid: p.pkid,
                    qos: p.qos,
                    reason: AckReason::NotAuthorized,
                }
            } else {
                tracing::warn!(device = %self.device_id, topic = %p.topic, "Refused publish outside ACL; disconnecting");
                self.closing = true;
                Done::Close(format!("publish to {} outside ACL", p.topic))
            };
            inflight.push_back(Box::pin(std::future::ready(done)));
            return;
        }
        if p.qos == QoS::ExactlyOnce && !self.awaiting_rel.insert(p.pkid) {
            inflight.push_back(Box::pin(std::future::ready(Done::Rec(p.pkid))));
            return;
        }
        if let Some(limiter) = &self.limiter {
            if !limiter.admit(p.payload.len(), received) {
                // Refused like a full outbox (QoS 2: `ack` forgets the packet id again). Logged
                // once per run of refusals: this is load shedding, the counter has every one.
                self.front.metrics.refuse(RefusedReason::RateLimit);
                if !self.rate_limited {
                    tracing::warn!(device = %self.device_id, topic = %p.topic, "Refusing MQTT publishes over the device's rate limit");
                    self.rate_limited = true;
                }
                inflight.push_back(Box::pin(std::future::ready(Done::Refused {
                    pkid: p.pkid,
                    qos: p.qos,
                    reason: AckReason::QuotaExceeded,
                })));
                return;
            }
            self.rate_limited = false;
        }
        let mut headers = vec![("mqtt_qos".to_owned(), (p.qos as u8).to_string())];
        if p.retain {
            headers.push(("mqtt_retain".to_owned(), "true".to_owned()));
        }
        headers.extend(meta.user_properties);
        let record = IngestRecord {
            topic: p.topic.clone(),
            content_type: meta.content_type,
            payload: p.payload.to_vec(),
            headers,
        };
        // Decided now, so that a publish nobody can receive lets go of its payload at once: the
        // payload shares the connection's read buffer, which can then be reused for the next
        // read instead of being reallocated while the commit is pending. A subscription made
        // during the commit misses this publish, as if it had come a moment later.
        let routed = p.retain || self.front.interest.wanted(&p.topic);
        if !routed {
            p.payload = bytes::Bytes::new();
        }
        let front = self.front;
        let device_id = Arc::clone(&self.device_id);
        inflight.push_back(Box::pin(async move {
            let result = front
                .ingest
                .submit(
                    &device_id,
                    Source::Mqtt,
                    &front.settings.route,
                    vec![record],
                )
                .await
                .map(|_| ());
            Done::Committed {
                publish: p,
                received,
                result,
                routed,
            }
        }));
    }

    /// Writes the outcome of the oldest in-flight publish: its ack, and the publish to the
    /// broker if it was stored.
    fn complete(&mut self, done: Done) -> Result<(), ConnError> {
        let metrics = &self.front.metrics;
        let (publish, received, result, routed) = match done {
            Done::Committed {
                publish,
                received,
                result,
                routed,
            } => (publish, received, result, routed),
            Done::Refused { pkid, qos, reason } => {
                self.ack(pkid, qos, reason);
                return Ok(());
            }
            Done::Rec(pkid) => {
                self.codec.pubrec(&mut self.out, pkid, AckReason::Success);
                return Ok(());
            }
            Done::Close(reason) => return Err(ConnError::Refused(reason)),
        };
        let reason = match result {
            Ok(()) => AckReason::Success,
            Err(e @ AppendError::TooLarge { .. }) => {
                metrics.refuse(RefusedReason::OutboxError);
                tracing::warn!(device = %self.device_id, error = %e, "Refused MQTT publish; disconnecting");
                return Err(ConnError::Refused(e.to_string()));
            }
            Err(e @ AppendError::Full { .. }) => {
                metrics.refuse(RefusedReason::OutboxFull);
                tracing::warn!(device = %self.device_id, error = %e, "Outbox refused MQTT publish");
                AckReason::QuotaExceeded
            }
            Err(e) => {
                metrics.refuse(RefusedReason::OutboxError);
                tracing::warn!(device = %self.device_id, error = %e, "Outbox refused MQTT publish");
                AckReason::Unspecified
            }
        };
        self.ack(publish.pkid, publish.qos, reason);
        if reason != AckReason::Success {
            return Ok(());
        }
        metrics.publishes.inc();
        if let Some(c) = &self.counters.publishes {
            c.inc();
        }
        if publish.qos != QoS::AtMostOnce {
            metrics
                .ack_latency
                .observe(received.elapsed().as_secs_f64());
        }
        // Stored and acknowledged; routed only if a subscriber can get it (or the broker must
        // retain it).
        if !routed {
            self.front.metrics.unrouted.inc();
            return Ok(());
        }
        let mut forward = publish;
        forward.dup = false;
        if forward.qos == QoS::AtMostOnce {
            forward.pkid = 0;
        } else {
            forward.qos = QoS::AtLeastOnce;
            forward.pkid = if self.own_broker {
                self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
                self.next_pkid
            } else {
                // Wrapping; 0 is not a packet id.
                self.front
                    .shared_pkid
                    .fetch_add(1, Ordering::Relaxed)
                    .max(1)
            };
        }
        let target = if self.own_broker {
            &mut self.bout
        } else {
            &mut self.shared_out
        };
        codec::encode4(target, &Packet::Publish(forward));
        Ok(())
    }

    fn ack(&mut self, pkid: u16, qos: QoS, reason: AckReason) {
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.codec.puback(&mut self.out, pkid, reason),
            QoS::ExactlyOnce => {
                if reason != AckReason::Success {
                    // Not stored: a retransmission is a new attempt.
                    self.awaiting_rel.remove(&pkid);
                }
                self.codec.pubrec(&mut self.out, pkid, reason);
            }
        }
    }

    fn subscribe(&mut self, sub: Subscribe) {
        let allowed: Vec<bool> = sub
            .filters
            .iter()
            .map(|f| self.acl.may_subscribe(&f.path))
            .collect();
        for (f, ok) in sub.filters.iter().zip(&allowed) {
            if !ok {
                self.front.metrics.refuse(RefusedReason::Acl);
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
            let codes = vec![SubCode::Denied; allowed.len()];
            self.codec.suback(&mut self.out, sub.pkid, &codes);
            return;
        }
        for f in &filters {
            self.front.interest.subscribe(&self.broker_key, &f.path);
        }
        self.pending_subs.insert(sub.pkid, allowed);
        codec::encode4(
            &mut self.bout,
            &Packet::Subscribe(Subscribe {
                pkid: sub.pkid,
                filters,
            }),
        );
    }

    /// Handles one packet from the broker.
    fn on_broker_packet(&mut self, packet: Packet) -> Result<(), ConnError> {
        match packet {
            // Acks of the front's own forwarded publishes.
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => {}
            Packet::SubAck(ack) => {
                let Some(allowed) = self.pending_subs.remove(&ack.pkid) else {
                    return Ok(());
                };
                let mut granted = ack.return_codes.into_iter();
                let codes: Vec<SubCode> = allowed
                    .into_iter()
                    .map(|ok| {
                        if !ok {
                            return SubCode::Denied;
                        }
                        match granted.next() {
                            Some(rumqttc::SubscribeReasonCode::Success(q)) => SubCode::Granted(q),
                            _ => SubCode::Failed,
                        }
                    })
                    .collect();
                self.codec.suback(&mut self.out, ack.pkid, &codes);
                if codes.iter().any(|c| matches!(c, SubCode::Granted(_))) {
                    // Commands queued while the device was away go out now.
                    self.front.ingest.bus().subscribed(&self.device_id);
                }
            }
            Packet::Disconnect => {
                return Err(ConnError::Broker("disconnected by the broker".into()));
            }
            p => {
                if let Packet::Publish(publish) = &p {
                    // A command from the bus becomes `delivered` as it is written to the device.
                    self.front
                        .ingest
                        .bus()
                        .relayed(&self.device_id, &publish.topic);
                    self.front.metrics.deliveries.inc();
                    if let Some(c) = &self.counters.deliveries {
                        c.inc();
                    }
                }
                self.codec.relay(&mut self.out, &p);
            }
        }
        Ok(())
    }
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
    fn broker_client_ids_have_no_slash_and_do_not_collide() {
        assert_eq!(broker_client_id("dev-1", "c"), "dev-1|c");
        assert_eq!(
            broker_client_id("anonymous/x", "x"),
            "anonymous%2Fx|x",
            "rumqttd refuses `/`"
        );
        assert_ne!(
            broker_client_id("anonymous", "x|y"),
            broker_client_id("anonymous|x", "y")
        );
    }
}
