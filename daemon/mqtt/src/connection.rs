//! One client connection, from its CONNECT to its end. The contract with the client:
//!
//! - **CONNECT**: MQTT 3.1, 3.1.1 or 5. Credentials are checked by the backend; refusals are
//!   CONNACK 0x04/0x05 (MQTT 5 0x86/0x87), an unsupported protocol level 0x01, a 3.1.1 empty
//!   client id without Clean Session 0x02, too many connections 0x03 (MQTT 5 0x9F), too many
//!   persistent sessions 0x03 (MQTT 5 0x97); a will outside the ACL or breaking the topic rule
//!   0x05 (MQTT 5 0x87 / 0x90). An empty client id gets one assigned (MQTT 5: Assigned Client
//!   Identifier). Then the connection closes.
//! - **Sessions**: Clean Start 0 resumes the session (session present) with its subscriptions
//!   and queued messages; Clean Start 1 discards it. The Session Expiry Interval (MQTT 5; "never"
//!   for a 3.1.1 Clean Session 0) is capped by `mqtt.sessions.max_expiry` (an MQTT 5 client is
//!   told). A resumed session's unacknowledged deliveries are resent with DUP and their original
//!   packet identifiers, PUBRELs before anything new.
//! - **PUBLISH** (in order): revoked credentials close the connection; a topic alias is resolved
//!   (MQTT 5); the record topic rule (0x90) and the ACL (0x87) refuse it — 3.1.1 by closing the
//!   connection, after the acks of earlier publishes; a Payload Format Indicator of 1 needs UTF-8
//!   (0x99); over the rate limit, a full persistent-session queue or the retained cap: 0x97
//!   (3.1.1: no ack, the connection stays); then the outbox commit and the sessions commit, and
//!   only then PUBACK/PUBREC and routing. Up to `mqtt.max_inflight` publishes are in flight at
//!   once; acks go out in the order the publishes came. QoS 2 is exactly once into the outbox:
//!   a retransmission of a packet id awaiting PUBREL is answered like its original (after it,
//!   if it is still being stored) and never stored again; for a persistent session the packet
//!   id is also kept in the outbox's transaction, so this holds across reconnects and restarts.
//! - **Deliveries** at the lower of the publish's and the subscription's QoS, with the
//!   publish's properties, the matching subscription identifiers and what is left of the
//!   message expiry; at most the client's Receive Maximum unacknowledged; messages larger than
//!   the client's Maximum Packet Size, or expired, are dropped (counted).
//! - **Malformed input** (see [`crate::codec`]): MQTT 5 DISCONNECT with the reason code, then
//!   close; 3.1.1 close. Counted.
//! - **Keep-alive**: nothing from the client for 1.5 × its keep-alive closes the connection
//!   (MQTT 5 0x8D).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use futures_util::stream::{FuturesOrdered, FuturesUnordered};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{
    AuthRefusal, BoxFuture, Credentials, Identity, Observation, Record, StoreRefusal,
};
use crate::broker::{
    AttachError, AttachRequest, Broker, Delivery, Detach, Message, Out, Plan, PubRec, Session,
    SubOptions,
};
use crate::codec::encode::{self, AckKind, PublishHeader};
use crate::codec::props::{ConnAckProps, PublishProps};
use crate::codec::{
    Connect, ConnectError, DecodeError, Packet, Publish, QoS, Subscribe, Unsubscribe, Version,
    read_connect, read_packet, reason,
};
use crate::metrics::RefusedReason;
use crate::topic;

/// How often an idle connection rechecks its credentials and keep-alive.
const RECHECK_EVERY: Duration = Duration::from_millis(500);
/// Room for the first read of a connection: an idle client holds little more than this.
const READ_START: usize = 256;
/// Room a busy connection's reads grow to.
const READ_MAX: usize = 64 * 1024;
/// Written to the socket once this much is buffered, even mid-batch.
const WRITE_CHUNK: usize = 64 * 1024;

/// How a connection ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol (counted as malformed).
    #[error("malformed: {0}")]
    Malformed(String),
    /// The server ended it (refusal, revocation, keep-alive, takeover, shutdown).
    #[error("{0}")]
    Closed(String),
}

/// Reads more bytes into `buf`: false on EOF. The room for a read starts small and doubles when
/// a read fills it (up to [`READ_MAX`]): idle connections stay small, busy ones read many packets
/// per system call.
pub async fn fill(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> std::io::Result<bool> {
    buf.reserve(READ_START);
    let room = buf.capacity() - buf.len();
    let n = stream.read_buf(buf).await?;
    if n == room {
        buf.reserve((room * 2).min(READ_MAX));
    }
    Ok(n > 0)
}

/// Reads the CONNECT (the caller bounds the time). Answers what deserves an answer
/// (unsupported version, an MQTT 5 CONNECT that breaks a rule) before returning the error.
pub async fn read_first(
    rd: &mut (impl AsyncRead + Unpin),
    wr: &mut (impl AsyncWrite + Unpin),
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<Option<Connect>, ConnError> {
    loop {
        match read_connect(buf, max_packet) {
            Ok(Some(c)) => return Ok(Some(c)),
            Ok(None) => {}
            Err(e) => {
                let mut out = BytesMut::new();
                match &e {
                    ConnectError::UnsupportedVersion(_) => {
                        encode::connack_unsupported_version(&mut out)
                    }
                    ConnectError::Invalid {
                        version: Version::V5,
                        error,
                    } => encode::connack(
                        &mut out,
                        Version::V5,
                        false,
                        error.reason(),
                        &ConnAckProps::default(),
                    ),
                    _ => {}
                }
                if !out.is_empty() {
                    let _ = wr.write_all(&out).await;
                }
                return Err(ConnError::Malformed(e.to_string()));
            }
        }
        if !fill(rd, buf).await? {
            return Ok(None);
        }
    }
}

/// What the in-flight queue yields, in the order the client's packets came.
enum Done {
    /// A publish after its commits (or the refusal that stopped them).
    Published {
        pkid: u16,
        qos: QoS,
        received: Instant,
        bytes: u64,
        result: Result<Vec<Plan>, Refusal>,
    },
    /// Refused before the outbox.
    Refused {
        pkid: u16,
        qos: QoS,
        refusal: Refusal,
    },
    /// A QoS 2 retransmission: PUBREC with its original's outcome (`None`: it was refused and
    /// 3.1.1 gets nothing).
    Rec {
        pkid: u16,
        code: Option<u8>,
    },
    /// PUBREL handled: PUBCOMP.
    Comp {
        pkid: u16,
        code: u8,
    },
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
        retained: Vec<Plan>,
    },
    UnsubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    /// Close the connection (MQTT 5: DISCONNECT with this code) once the earlier acks are out.
    Close {
        code: u8,
        why: String,
    },
}

/// Why a publish was not taken.
#[derive(Debug, Clone)]
enum Refusal {
    /// MQTT 5 negative ack with this code; 3.1.1: no ack, the connection stays.
    Nack(u8, RefusedReason),
    /// MQTT 5 negative ack; 3.1.1: close the connection (no way to say no).
    NackOrClose(u8, RefusedReason),
    /// Close the connection in any version.
    Close(String),
}

/// The inbound QoS 2 state of a packet id.
#[derive(Debug, Clone)]
enum Qos2In {
    /// Being stored: its outcome comes on the channel (`Some(0)` stored, `Some(code)` refused).
    Pending(watch::Receiver<Option<u8>>),
    /// Stored; waiting for PUBREL. `routed: false` only for a resumed session whose publish was
    /// stored in the outbox but whose routing was not committed when the gateway stopped: its
    /// retransmission is routed (and not stored again: the outbox key holds).
    Stored { routed: bool },
}

/// A served connection after a successful CONNECT.
struct Conn {
    broker: Arc<Broker>,
    version: Version,
    identity: Identity,
    session: Arc<Session>,
    generation: u64,
    persistent: bool,
    key_prefix: String,
    /// The client's topic aliases (MQTT 5).
    aliases: HashMap<u16, Arc<str>>,
    qos2: HashMap<u16, Qos2In>,
    rate_limited: bool,
    /// The device's rate limits, shared with its other connections.
    limiter: Option<crate::limits::LimiterHandle>,
    counters: crate::metrics::DeviceCounters,
    /// QoS 1/2 deliveries unacknowledged at most.
    window: usize,
    /// The client's Maximum Packet Size (MQTT 5).
    client_max_packet: Option<usize>,
    out: BytesMut,
    /// Set after a 3.1.1 refusal that closes: read nothing more.
    closing: bool,
}

type InFlight = FuturesOrdered<BoxFuture<'static, Done>>;

/// Waiting for a payload's bytes of the ingress budget (`None`: the budget was closed).
type Waiting = BoxFuture<'static, Option<OwnedSemaphorePermit>>;

/// How long a connection taken over by a new one keeps reading what its client had already
/// sent ([`Conn::take_what_was_sent`]): bytes already on their way arrive well within it; a
/// silent old connection costs the takeover this much.
const TAKEOVER_READ: Duration = Duration::from_millis(100);

/// A PUBLISH read while the ingress budget was spent, and the wait for its bytes.
struct Parked {
    publish: Publish,
    waiting: Waiting,
}

/// Serves a connection whose CONNECT was read: authenticates, attaches the session, answers
/// CONNACK and runs until the client leaves, is kicked, or `stop` fires.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    connect: Connect,
    mut rd: impl AsyncRead + Unpin,
    mut wr: impl AsyncWrite + Unpin,
    mut buf: BytesMut,
    cert_names: &[String],
    broker: &Arc<Broker>,
    admitted: bool,
    stop: CancellationToken,
) -> Result<(), ConnError> {
    let version = connect.version;
    let settings = &broker.settings;
    let mut out = BytesMut::new();
    let refuse = |out: &mut BytesMut, code: u8| {
        broker.metrics.connects_refused.inc();
        encode::connack(out, version, false, code, &ConnAckProps::default());
    };
    // A 3.1.1 client without a client id must ask for a clean session (MQTT-3.1.3-8).
    if connect.client_id.is_empty() && !connect.clean_start && !version.is_v5() {
        refuse(&mut out, reason::CLIENT_IDENTIFIER_NOT_VALID);
        wr.write_all(&out).await?;
        return Err(ConnError::Closed(
            "empty client id without clean session".into(),
        ));
    }
    if connect.props.authentication_method.is_some() {
        refuse(&mut out, reason::BAD_AUTHENTICATION_METHOD);
        wr.write_all(&out).await?;
        return Err(ConnError::Closed(
            "enhanced authentication is not offered".into(),
        ));
    }
    let assigned = connect
        .client_id
        .is_empty()
        .then(|| format!("auto-{:016x}", rand::random::<u64>()));
    let client_id = assigned
        .clone()
        .unwrap_or_else(|| connect.client_id.clone());
    let credentials = Credentials {
        username: connect.username.as_deref(),
        password: connect.password.as_deref(),
        client_id: &client_id,
        cert_names,
    };
    let identity = match broker.backend.authenticate(credentials).await {
        Ok(identity) => identity,
        Err(refusal) => {
            let code = match refusal {
                AuthRefusal::BadCredentials => reason::BAD_USER_NAME_OR_PASSWORD,
                AuthRefusal::NotAuthorized => reason::NOT_AUTHORIZED,
            };
            if let Some(user) = connect.username.as_deref() {
                broker.backend.observe(user, Observation::Refused);
            }
            tracing::warn!(user = ?connect.username, client_id = %client_id, refusal = ?refusal, "Refused MQTT CONNECT");
            refuse(&mut out, code);
            wr.write_all(&out).await?;
            return Err(ConnError::Closed(format!("CONNECT refused: {refusal:?}")));
        }
    };
    if let Some(will) = &connect.will {
        let bad = if outpost_config::check_record_topic(&will.topic).is_err() {
            Some(reason::TOPIC_NAME_INVALID)
        } else if !identity.acl.may_publish(&will.topic) {
            Some(reason::NOT_AUTHORIZED)
        } else {
            None
        };
        if let Some(code) = bad {
            broker.metrics.refuse(RefusedReason::Acl);
            tracing::warn!(device = %identity.device_id, topic = %will.topic, "Refused MQTT CONNECT: will topic not allowed");
            refuse(&mut out, code);
            wr.write_all(&out).await?;
            return Err(ConnError::Closed("will topic not allowed".into()));
        }
    }
    if !admitted {
        tracing::warn!(device = %identity.device_id, "Refused MQTT CONNECT: mqtt.max_connections reached");
        refuse(&mut out, reason::CONNECTION_RATE_EXCEEDED);
        wr.write_all(&out).await?;
        return Err(ConnError::Closed("too many connections".into()));
    }
    // Session Expiry Interval: MQTT 5's, or "never" for a 3.1.1 persistent session; capped.
    let requested = if version.is_v5() {
        connect.props.session_expiry.unwrap_or(0)
    } else if connect.clean_start {
        0
    } else {
        u32::MAX
    };
    let expiry = requested.min(settings.max_expiry());
    let attached = match broker
        .attach(AttachRequest {
            identity: identity.clone(),
            client_id: client_id.clone(),
            clean_start: connect.clean_start,
            expiry,
            will: connect.will.clone(),
        })
        .await
    {
        Ok(a) => a,
        Err(e) => {
            let code = match e {
                AttachError::TooManyPersistent => reason::QUOTA_EXCEEDED,
                AttachError::Store(_) => reason::SERVER_UNAVAILABLE,
            };
            tracing::warn!(device = %identity.device_id, error = %e, "Refused MQTT CONNECT");
            refuse(&mut out, code);
            wr.write_all(&out).await?;
            return Err(ConnError::Closed(e.to_string()));
        }
    };
    let session = Arc::clone(&attached.session);
    let generation = session.lock().generation;
    let mut conn = Conn {
        broker: Arc::clone(broker),
        version,
        persistent: expiry > 0,
        key_prefix: session.key_prefix(),
        identity,
        session,
        generation,
        aliases: HashMap::new(),
        qos2: HashMap::new(),
        rate_limited: false,
        limiter: broker.limiters.for_device(&identity_device(&attached)),
        counters: crate::metrics::DeviceCounters::default(),
        window: usize::from(
            connect
                .props
                .receive_maximum
                .unwrap_or(u16::MAX)
                .min(settings.sessions.max_inflight_out),
        ),
        client_max_packet: connect
            .props
            .max_packet_size
            .map(|m| usize::try_from(m).unwrap_or(usize::MAX)),
        out,
        closing: false,
    };
    if conn.identity.registered {
        conn.counters = broker.metrics.device(&conn.identity.device_id);
    }
    // A resumed persistent session's QoS 2 packets awaiting PUBREL.
    if attached.present && conn.persistent {
        let held = broker.backend.held_keys(conn.key_prefix.clone()).await;
        let routed = broker.routed_keys(&conn.key_prefix).await;
        match (held, routed) {
            (Ok(keys), Ok(routed)) => {
                for key in keys {
                    if let Some(pkid) = key
                        .strip_prefix(&conn.key_prefix)
                        .and_then(|p| p.parse::<u16>().ok())
                    {
                        let routed = routed.contains(&key);
                        conn.qos2.insert(pkid, Qos2In::Stored { routed });
                    }
                }
            }
            (Err(e), _) => {
                tracing::warn!(device = %conn.identity.device_id, error = %e, "Could not read a resumed session's QoS 2 state");
            }
            (_, Err(e)) => {
                tracing::warn!(device = %conn.identity.device_id, error = %e, "Could not read a resumed session's QoS 2 state");
            }
        }
    }
    let props = ConnAckProps {
        receive_maximum: Some(settings.max_inflight_in),
        max_packet_size: Some(u32::try_from(settings.max_packet).unwrap_or(u32::MAX)),
        assigned_client_identifier: assigned,
        topic_alias_maximum: Some(settings.topic_alias_maximum),
        shared_subscription_available: Some(0),
        session_expiry: (version.is_v5() && expiry != requested).then_some(expiry),
        ..ConnAckProps::default()
    };
    encode::connack(
        &mut conn.out,
        version,
        attached.present,
        reason::SUCCESS,
        &props,
    );
    broker.metrics.connections.inc();
    let keep_alive = Duration::from_millis(u64::from(connect.keep_alive) * 1500);
    let (result, how) = conn
        .run(
            &mut rd,
            &mut wr,
            &mut buf,
            keep_alive,
            &attached.kick,
            &stop,
            expiry,
        )
        .await;
    broker.metrics.connections.dec();
    broker.detach(&conn.session, attached.conn, how);
    result
}

impl Conn {
    /// The connection's life after CONNACK; returns how it ended and what that means for the
    /// session.
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &mut self,
        rd: &mut (impl AsyncRead + Unpin),
        wr: &mut (impl AsyncWrite + Unpin),
        buf: &mut BytesMut,
        keep_alive: Duration,
        kick: &CancellationToken,
        stop: &CancellationToken,
        expiry: u32,
    ) -> (Result<(), ConnError>, Detach) {
        let mut how = Detach { will: true, expiry };
        let mut inflight: InFlight = FuturesOrdered::new();
        let mut releasing: FuturesUnordered<BoxFuture<'static, (u16, bool)>> =
            FuturesUnordered::new();
        let mut refill: Option<BoxFuture<'static, ()>> = None;
        let mut recheck = tokio::time::interval(RECHECK_EVERY);
        let mut last_heard = Instant::now();
        let limit = usize::from(self.broker.settings.max_inflight_in);
        let session = Arc::clone(&self.session);
        // A PUBLISH read while the ingress byte budget was spent: held here, and nothing more
        // is read, until its bytes are granted (its future keeps its place in the queue).
        let mut parked: Option<Parked> = None;
        let result: Result<(), ConnError> = async {
            loop {
                // Every complete packet buffered, while the window has room.
                while inflight.len() < limit && !self.closing && parked.is_none() {
                    let packet = match self.next_packet(buf) {
                        Ok(Some(p)) => p,
                        Ok(None) => break,
                        Err(e) => {
                            self.malformed(&e);
                            return Err(ConnError::Malformed(e.to_string()));
                        }
                    };
                    match packet {
                        Packet::Disconnect(d) => {
                            if let Some(e) = d.session_expiry {
                                if expiry == 0 && e != 0 {
                                    let err = DecodeError::Protocol(
                                        "DISCONNECT sets a session expiry on a session without one (MQTT-3.14.2-2)".into(),
                                    );
                                    self.malformed(&err);
                                    return Err(ConnError::Malformed(err.to_string()));
                                }
                                how.expiry = e.min(self.broker.settings.max_expiry());
                            }
                            how.will = d.reason == reason::DISCONNECT_WITH_WILL;
                            // What is committing still gets its ack; then the client is gone.
                            self.settle(&mut inflight, &mut parked).await;
                            let _ = wr.write_all(&self.out).await;
                            return Ok(());
                        }
                        Packet::Publish(p) => match self.reserve(&p) {
                            Ok(permit) => self.publish(p, permit, &mut inflight)?,
                            Err(waiting) => {
                                self.broker.metrics.budget_waits.inc();
                                parked = Some(Parked { publish: p, waiting });
                            }
                        },
                        other => self.on_packet(other, &mut inflight, &mut releasing)?,
                    }
                }
                self.fill_outbound();
                if refill.is_none() {
                    let wants = {
                        let st = self.session.lock();
                        st.spilled && st.queue.len() < 64
                    };
                    if wants {
                        let (broker, session, generation) =
                            (Arc::clone(&self.broker), Arc::clone(&self.session), self.generation);
                        refill = Some(Box::pin(async move {
                            if let Err(e) = broker.refill(&session, generation).await {
                                tracing::warn!(session = %session.key, error = %e, "Could not read queued messages from sessions.db");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }));
                    }
                }
                if !self.out.is_empty() {
                    wr.write_all(&self.out).await?;
                    self.out.clear();
                }
                let room = inflight.len() < limit && !self.closing && parked.is_none();
                tokio::select! {
                    () = stop.cancelled() => {
                        how.will = false;
                        self.settle(&mut inflight, &mut parked).await;
                        self.disconnect(wr, reason::SERVER_SHUTTING_DOWN).await;
                        return Err(ConnError::Closed("server shutting down".into()));
                    }
                    () = kick.cancelled() => {
                        // The new connection may have won the race against this one's last
                        // packets (a client that publishes, disconnects and reconnects at once):
                        // what it sent here is still read and committed, never dropped.
                        self.take_what_was_sent(rd, buf, &mut inflight, &mut parked, &mut how)
                            .await;
                        self.settle(&mut inflight, &mut parked).await;
                        self.disconnect(wr, reason::SESSION_TAKEN_OVER).await;
                        return Err(ConnError::Closed("taken over by a new connection".into()));
                    }
                    r = fill(rd, buf), if room => {
                        if !r? {
                            // What the client sent before closing still counts (QoS 0 too).
                            self.settle(&mut inflight, &mut parked).await;
                            return Err(ConnError::Closed("closed by the client".into()));
                        }
                        last_heard = Instant::now();
                    }
                    Some(done) = inflight.next(), if !inflight.is_empty() => {
                        self.complete(done)?;
                        // Whatever else completed meanwhile, in order: one write for all.
                        while let Some(Some(done)) = futures_util::FutureExt::now_or_never(inflight.next()) {
                            self.complete(done)?;
                        }
                    }
                    Some((pkid, ok)) = releasing.next(), if !releasing.is_empty() => {
                        if ok {
                            encode::ack(&mut self.out, self.version, AckKind::PubRel, pkid, reason::SUCCESS);
                        }
                    }
                    () = async { if let Some(f) = refill.as_mut() { f.await } else { std::future::pending().await } } => {
                        refill = None;
                    }
                    permit = async { if let Some(p) = parked.as_mut() { (&mut p.waiting).await } else { std::future::pending().await } } => {
                        if let Some(Parked { publish, .. }) = parked.take() {
                            self.publish(publish, permit, &mut inflight)?;
                        }
                    }
                    () = session.wake.notified() => {}
                    _ = recheck.tick() => {
                        if let Err(why) = self.broker.backend.check(&self.identity) {
                            self.broker.metrics.refuse(RefusedReason::Revoked);
                            tracing::warn!(device = %self.identity.device_id, reason = %why, "Disconnecting MQTT client: no longer allowed");
                            self.disconnect(wr, reason::NOT_AUTHORIZED).await;
                            return Err(ConnError::Closed(why));
                        }
                        if !keep_alive.is_zero() && room && last_heard.elapsed() > keep_alive {
                            self.disconnect(wr, reason::KEEP_ALIVE_TIMEOUT).await;
                            return Err(ConnError::Closed("keep-alive expired".into()));
                        }
                    }
                }
            }
        }
        .await;
        if !self.out.is_empty() {
            let _ = wr.write_all(&self.out).await;
        }
        (result, how)
    }

    /// The next complete packet in `buf`, if there is one.
    fn next_packet(&self, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        read_packet(
            buf,
            self.version,
            self.broker.settings.max_packet,
            self.broker.settings.topic_alias_maximum,
        )
    }

    /// Publishes the PUBLISH parked for the ingress budget, once its bytes are granted.
    async fn publish_parked(
        &mut self,
        parked: &mut Option<Parked>,
        inflight: &mut InFlight,
    ) -> Result<(), ConnError> {
        match parked.take() {
            Some(Parked { publish, waiting }) => {
                let permit = waiting.await;
                self.publish(publish, permit, inflight)
            }
            None => Ok(()),
        }
    }

    /// A connection taken over by a new one: the PUBLISHes its client had already sent are read
    /// and committed too — up to its DISCONNECT, the end of the stream, or [`TAKEOVER_READ`]
    /// without more bytes. A client that publishes, disconnects and reconnects with the same
    /// client id at once (`mosquitto_pub` in a loop) would otherwise lose the last publish of the
    /// old connection whenever the new CONNECT is handled before that publish was read. Other
    /// packets are ignored: the session has moved to the new connection. A DISCONNECT read here
    /// counts as it would have: a normal one drops the will.
    async fn take_what_was_sent(
        &mut self,
        rd: &mut (impl AsyncRead + Unpin),
        buf: &mut BytesMut,
        inflight: &mut InFlight,
        parked: &mut Option<Parked>,
        how: &mut Detach,
    ) {
        if self.publish_parked(parked, inflight).await.is_err() {
            return;
        }
        let deadline = Instant::now() + TAKEOVER_READ;
        loop {
            let packet = match self.next_packet(buf) {
                Ok(Some(packet)) => packet,
                Ok(None) => match tokio::time::timeout_at(deadline, fill(rd, buf)).await {
                    Ok(Ok(true)) => continue,
                    _ => return,
                },
                Err(_) => return,
            };
            match packet {
                Packet::Publish(p) => {
                    let permit = match self.reserve(&p) {
                        Ok(permit) => permit,
                        Err(waiting) => waiting.await,
                    };
                    if self.publish(p, permit, inflight).is_err() {
                        return;
                    }
                }
                Packet::Disconnect(d) => {
                    how.will = d.reason == reason::DISCONNECT_WITH_WILL;
                    if let Some(e) = d.session_expiry
                        && how.expiry != 0
                    {
                        how.expiry = e.min(self.broker.settings.max_expiry());
                    }
                    return;
                }
                _ => {}
            }
        }
    }

    /// Finishes every publish, PUBREL and subscription under way before the connection ends,
    /// whatever ends it: a store future dropped half-way would lose a QoS 0 publish the client
    /// sent before it left. Their acks go into `out` (written if the socket still takes them).
    async fn settle(&mut self, inflight: &mut InFlight, parked: &mut Option<Parked>) {
        if self.publish_parked(parked, inflight).await.is_err() {
            return;
        }
        while let Some(done) = inflight.next().await {
            if self.complete(done).is_err() {
                break;
            }
        }
    }

    fn malformed(&mut self, e: &DecodeError) {
        self.broker.metrics.malformed.inc();
        if self.identity.registered {
            self.broker
                .backend
                .observe(&self.identity.device_id, Observation::Malformed);
        }
        encode::disconnect(&mut self.out, self.version, e.reason());
    }

    async fn disconnect(&mut self, wr: &mut (impl AsyncWrite + Unpin), code: u8) {
        encode::disconnect(&mut self.out, self.version, code);
        let _ = wr.write_all(&self.out).await;
        self.out.clear();
    }

    fn on_packet(
        &mut self,
        packet: Packet,
        inflight: &mut InFlight,
        releasing: &mut FuturesUnordered<BoxFuture<'static, (u16, bool)>>,
    ) -> Result<(), ConnError> {
        match packet {
            // Read from a buffer that was already in memory (the reading loop reserves).
            Packet::Publish(p) => self.publish(p, None, inflight),
            Packet::PubRel(a) => {
                self.pubrel(a.pkid, inflight);
                Ok(())
            }
            Packet::Subscribe(s) => self.subscribe(s, inflight),
            Packet::Unsubscribe(u) => {
                self.unsubscribe(u, inflight);
                Ok(())
            }
            Packet::PingReq => {
                encode::pingresp(&mut self.out);
                Ok(())
            }
            Packet::PubAck(a) | Packet::PubComp(a) => {
                self.broker.acknowledged(&self.session, a.pkid);
                Ok(())
            }
            Packet::PubRec(a) => {
                match self.broker.pubrec(&self.session, a.pkid, a.reason) {
                    PubRec::Release(None) => {
                        encode::ack(
                            &mut self.out,
                            self.version,
                            AckKind::PubRel,
                            a.pkid,
                            reason::SUCCESS,
                        );
                    }
                    PubRec::Release(Some(no)) => {
                        let (broker, session) =
                            (Arc::clone(&self.broker), Arc::clone(&self.session));
                        let pkid = a.pkid;
                        releasing.push(Box::pin(async move {
                            let ok = broker.released(&session, no).await.is_ok();
                            (pkid, ok)
                        }));
                    }
                    PubRec::Done | PubRec::Unknown => {}
                }
                Ok(())
            }
            Packet::Auth => {
                let e = DecodeError::Protocol("AUTH without an authentication method".into());
                self.malformed(&e);
                Err(ConnError::Malformed(e.to_string()))
            }
            Packet::Disconnect(_) => Ok(()), // handled by the loop
        }
    }

    /// Writes what the session has for the client, within the window.
    fn fill_outbound(&mut self) {
        let version = self.version;
        let max = self.client_max_packet;
        let now = self.broker.now();
        while self.out.len() < WRITE_CHUNK {
            let next = self.broker.next_out(&self.session, self.window, |d| {
                max.is_none_or(|m| {
                    encode::publish_len(
                        version,
                        &d.msg.topic,
                        &delivery_props(d, now),
                        d.msg.payload.len(),
                    ) <= m
                })
            });
            match next {
                None => return,
                Some(Out::PubRel(pkid)) => {
                    encode::ack(
                        &mut self.out,
                        version,
                        AckKind::PubRel,
                        pkid,
                        reason::SUCCESS,
                    );
                }
                Some(Out::Publish { pkid, delivery }) => {
                    let h = PublishHeader {
                        dup: delivery.sent,
                        qos: delivery.qos,
                        retain: delivery.retain,
                        pkid,
                    };
                    if version.is_v5() {
                        let props = delivery_props(&delivery, now);
                        encode::publish(
                            &mut self.out,
                            version,
                            h,
                            &delivery.msg.topic,
                            &props,
                            &delivery.msg.payload,
                        );
                    } else {
                        encode::publish(
                            &mut self.out,
                            version,
                            h,
                            &delivery.msg.topic,
                            &PublishProps::default(),
                            &delivery.msg.payload,
                        );
                    }
                    self.broker.metrics.deliveries.inc();
                    if let Some(c) = &self.counters.deliveries {
                        c.inc();
                    }
                    self.broker
                        .backend
                        .delivered(&self.identity, &delivery.msg.topic);
                }
            }
        }
    }

    fn push_ready(inflight: &mut InFlight, done: Done) {
        inflight.push_back(Box::pin(std::future::ready(done)));
    }

    /// The ingress budget's bytes for `p`'s payload: granted now, or the future that waits
    /// for them in the budget's queue.
    fn reserve(&self, p: &Publish) -> Result<Option<OwnedSemaphorePermit>, Waiting> {
        let Some(budget) = &self.broker.settings.budget else {
            return Ok(None);
        };
        if p.payload.is_empty() {
            return Ok(None);
        }
        let acquire = Arc::clone(&budget.bytes).acquire_many_owned(budget.permits(p.payload.len()));
        let mut waiting: Waiting = Box::pin(async move { acquire.await.ok() });
        match futures_util::FutureExt::now_or_never(&mut waiting) {
            Some(permit) => Ok(permit),
            None => Err(waiting),
        }
    }

    /// `permit`: the payload's bytes of the ingress budget, held until the publish is
    /// answered.
    fn publish(
        &mut self,
        mut p: Publish,
        permit: Option<OwnedSemaphorePermit>,
        inflight: &mut InFlight,
    ) -> Result<(), ConnError> {
        let received = Instant::now();
        let metrics = &self.broker.metrics;
        if let Err(why) = self.broker.backend.check(&self.identity) {
            metrics.refuse(RefusedReason::Revoked);
            tracing::warn!(device = %self.identity.device_id, reason = %why, "Refused MQTT publish: no longer allowed; disconnecting");
            self.closing = true;
            Self::push_ready(
                inflight,
                Done::Close {
                    code: reason::NOT_AUTHORIZED,
                    why,
                },
            );
            return Ok(());
        }
        // Topic aliases (MQTT 5): a topic with an alias defines it; an empty one uses it.
        if let Some(alias) = p.props.topic_alias.take() {
            if p.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => p.topic = t.to_string(),
                    None => {
                        let e =
                            DecodeError::Protocol(format!("topic alias {alias} is not defined"));
                        self.malformed(&e);
                        return Err(ConnError::Malformed(e.to_string()));
                    }
                }
            } else {
                self.aliases.insert(alias, Arc::from(p.topic.as_str()));
            }
        }
        let refusal = if let Err(why) = outpost_config::check_record_topic(&p.topic) {
            tracing::warn!(device = %self.identity.device_id, topic = %p.topic.escape_debug(), error = %why, "Refused publish to an invalid topic");
            Some(Refusal::NackOrClose(
                reason::TOPIC_NAME_INVALID,
                RefusedReason::InvalidTopic,
            ))
        } else if !self.identity.acl.may_publish(&p.topic) {
            tracing::warn!(device = %self.identity.device_id, topic = %p.topic, "Refused publish outside ACL");
            Some(Refusal::NackOrClose(
                reason::NOT_AUTHORIZED,
                RefusedReason::Acl,
            ))
        } else if p.props.payload_format == Some(1) && std::str::from_utf8(&p.payload).is_err() {
            Some(Refusal::Nack(
                reason::PAYLOAD_FORMAT_INVALID,
                RefusedReason::PayloadFormat,
            ))
        } else {
            None
        };
        if let Some(r) = refusal {
            if matches!(r, Refusal::NackOrClose(..)) && !self.version.is_v5() {
                self.closing = true;
            }
            Self::push_ready(
                inflight,
                Done::Refused {
                    pkid: p.pkid,
                    qos: p.qos,
                    refusal: r,
                },
            );
            return Ok(());
        }
        // QoS 2: a retransmission gets its original's answer and is not stored again.
        let mut outcome = None;
        if p.qos == QoS::ExactlyOnce {
            match self.qos2.get(&p.pkid) {
                Some(Qos2In::Stored { routed: true }) => {
                    Self::push_ready(
                        inflight,
                        Done::Rec {
                            pkid: p.pkid,
                            code: Some(0),
                        },
                    );
                    return Ok(());
                }
                Some(Qos2In::Pending(rx)) => {
                    let mut rx = rx.clone();
                    let (pkid, v5) = (p.pkid, self.version.is_v5());
                    inflight.push_back(Box::pin(async move {
                        let code = loop {
                            if let Some(c) = *rx.borrow_and_update() {
                                break c;
                            }
                            if rx.changed().await.is_err() {
                                break reason::UNSPECIFIED_ERROR;
                            }
                        };
                        Done::Rec {
                            pkid,
                            code: (code == 0 || v5).then_some(code),
                        }
                    }));
                    return Ok(());
                }
                // New, or stored but not routed before a restart: stored (idempotently)
                // and routed.
                None | Some(Qos2In::Stored { routed: false }) => {
                    let (tx, rx) = watch::channel(None);
                    self.qos2.insert(p.pkid, Qos2In::Pending(rx));
                    outcome = Some(tx);
                }
            }
        }
        if let Some(limiter) = &self.limiter
            && !limiter.admit(p.payload.len(), received)
        {
            if !self.rate_limited {
                tracing::warn!(device = %self.identity.device_id, topic = %p.topic, "Refusing MQTT publishes over the device's rate limit");
                self.rate_limited = true;
            }
            self.refused_qos2(&p, outcome, reason::QUOTA_EXCEEDED);
            Self::push_ready(
                inflight,
                Done::Refused {
                    pkid: p.pkid,
                    qos: p.qos,
                    refusal: Refusal::Nack(reason::QUOTA_EXCEEDED, RefusedReason::RateLimit),
                },
            );
            return Ok(());
        }
        self.rate_limited = false;
        let now = self.broker.now();
        let topic: Arc<str> = Arc::from(p.topic.as_str());
        let msg = Arc::new(Message {
            topic: Arc::clone(&topic),
            payload: p.payload.clone(),
            qos: p.qos,
            retain: p.retain,
            expires_at: p.props.message_expiry.map(|s| now + u64::from(s)),
            props: p.props.clone(),
            origin: Some(self.session.id),
        });
        let key = (self.persistent && p.qos == QoS::ExactlyOnce)
            .then(|| format!("{}{}", self.key_prefix, p.pkid));
        let plan = match self.broker.plan(msg) {
            Ok(mut plan) => {
                plan.routed_key.clone_from(&key);
                plan
            }
            Err(e) => {
                tracing::debug!(device = %self.identity.device_id, topic = %p.topic, error = ?e, "Refused publish: queue or retained cap full");
                self.refused_qos2(&p, outcome, reason::QUOTA_EXCEEDED);
                Self::push_ready(
                    inflight,
                    Done::Refused {
                        pkid: p.pkid,
                        qos: p.qos,
                        refusal: Refusal::Nack(reason::QUOTA_EXCEEDED, RefusedReason::QueueFull),
                    },
                );
                return Ok(());
            }
        };
        let record = Record {
            topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            content_type: p.props.content_type,
            user: p.props.user,
            will: false,
        };
        let bytes = record.payload.len() as u64;
        let stored = self.broker.backend.store(&self.identity, record, key);
        let broker = Arc::clone(&self.broker);
        let (pkid, qos) = (p.pkid, p.qos);
        inflight.push_back(Box::pin(async move {
            let _budget = permit; // released once the publish is answered
            let result = match stored.await {
                Ok(_) if !plan.needs_commit() => Ok(vec![plan]),
                // Boxed: most publishes never get here, and the commit's state would otherwise
                // make every publish's future (allocated per publish) that much larger.
                Ok(_) => Box::pin(broker.commit(vec![plan])).await.map_err(|e| {
                    tracing::warn!(error = %e, "sessions.db refused a publish's queued copies");
                    Refusal::Nack(reason::UNSPECIFIED_ERROR, RefusedReason::OutboxError)
                }),
                Err(StoreRefusal::Full(why)) => {
                    tracing::warn!(error = %why, "Outbox refused MQTT publish");
                    Err(Refusal::Nack(
                        reason::QUOTA_EXCEEDED,
                        RefusedReason::OutboxFull,
                    ))
                }
                Err(StoreRefusal::Unavailable(why)) => {
                    tracing::warn!(error = %why, "Outbox refused MQTT publish");
                    Err(Refusal::Nack(
                        reason::UNSPECIFIED_ERROR,
                        RefusedReason::OutboxError,
                    ))
                }
                Err(StoreRefusal::Never(why)) => Err(Refusal::Close(why)),
                Err(StoreRefusal::Invalid(why)) => {
                    tracing::debug!(error = %why, "Edge rule refused MQTT publish");
                    Err(Refusal::Nack(
                        reason::PAYLOAD_FORMAT_INVALID,
                        RefusedReason::Invalid,
                    ))
                }
            };
            if let Some(tx) = outcome {
                let code = match &result {
                    Ok(_) => 0,
                    Err(Refusal::Nack(c, _) | Refusal::NackOrClose(c, _)) => *c,
                    Err(Refusal::Close(_)) => reason::UNSPECIFIED_ERROR,
                };
                let _ = tx.send(Some(code));
            }
            Done::Published {
                pkid,
                qos,
                received,
                bytes,
                result,
            }
        }));
        Ok(())
    }

    /// A QoS 2 publish refused before its future was queued: its retransmissions see the
    /// refusal, and the packet id is free again.
    fn refused_qos2(&mut self, p: &Publish, outcome: Option<watch::Sender<Option<u8>>>, code: u8) {
        if let Some(tx) = outcome {
            let _ = tx.send(Some(code));
            self.qos2.remove(&p.pkid);
        }
    }

    fn pubrel(&mut self, pkid: u16, inflight: &mut InFlight) {
        let known = self.qos2.remove(&pkid);
        let code = if known.is_some() {
            reason::SUCCESS
        } else {
            reason::PACKET_IDENTIFIER_NOT_FOUND
        };
        let key = format!("{}{pkid}", self.key_prefix);
        // Both forgotten before PUBCOMP: the client may reuse the packet id right after it.
        let release = (self.persistent && known.is_some()).then(|| {
            let outbox = self.broker.backend.release(vec![key.clone()]);
            let broker = Arc::clone(&self.broker);
            async move {
                outbox.await?;
                broker
                    .forget_routed(vec![key])
                    .await
                    .map_err(|e| e.to_string())
            }
        });
        let pending = match known {
            Some(Qos2In::Pending(rx)) => Some(rx),
            _ => None,
        };
        inflight.push_back(Box::pin(async move {
            if let Some(mut rx) = pending {
                // A PUBREL before its PUBLISH was stored: complete once it is.
                while rx.borrow_and_update().is_none() {
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
            }
            if let Some(release) = release
                && let Err(e) = release.await
            {
                tracing::warn!(error = %e, "Could not release a QoS 2 packet id");
            }
            Done::Comp { pkid, code }
        }));
    }

    fn subscribe(&mut self, s: Subscribe, inflight: &mut InFlight) -> Result<(), ConnError> {
        if let Err(why) = self.broker.backend.check(&self.identity) {
            self.broker.metrics.refuse(RefusedReason::Revoked);
            self.closing = true;
            Self::push_ready(
                inflight,
                Done::Close {
                    code: reason::NOT_AUTHORIZED,
                    why,
                },
            );
            return Ok(());
        }
        let max = self.broker.settings.sessions.max_subscriptions;
        let mut held = self.session.lock().subs.len();
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut grants = Vec::new();
        for (i, f) in s.filters.iter().enumerate() {
            let code = if let Err(why) = topic::check_filter(&f.filter) {
                tracing::warn!(device = %self.identity.device_id, filter = %f.filter.escape_debug(), error = why, "Refused an invalid subscription");
                self.broker.metrics.refuse(RefusedReason::InvalidFilter);
                reason::TOPIC_FILTER_INVALID
            } else if topic::is_shared(&f.filter) {
                self.broker.metrics.refuse(RefusedReason::InvalidFilter);
                reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED
            } else if !self.identity.acl.may_subscribe(&f.filter) {
                tracing::warn!(device = %self.identity.device_id, filter = %f.filter, "Refused subscribe outside ACL");
                self.broker.metrics.refuse(RefusedReason::Acl);
                reason::NOT_AUTHORIZED
            } else if held >= max && !self.session.lock().subs.contains_key(&f.filter) {
                self.broker.metrics.refuse(RefusedReason::QueueFull);
                reason::QUOTA_EXCEEDED
            } else {
                if !self.session.lock().subs.contains_key(&f.filter) {
                    held += 1;
                }
                grants.push(i);
                f.qos as u8
            };
            codes.push(code);
        }
        let broker = Arc::clone(&self.broker);
        let session = Arc::clone(&self.session);
        let sub_id = s.subscription_id;
        let pkid = s.pkid;
        inflight.push_back(Box::pin(async move {
            let mut retained = Vec::new();
            for i in grants {
                let f = &s.filters[i];
                let opts = SubOptions {
                    qos: f.qos,
                    no_local: f.no_local,
                    retain_as_published: f.retain_as_published,
                    subscription_id: sub_id,
                };
                match broker.subscribe(&session, &f.filter, opts.clone()).await {
                    Ok(existed) => {
                        let send = match f.retain_handling {
                            0 => true,
                            1 => !existed,
                            _ => false,
                        };
                        if send {
                            retained.extend(broker.retained_for(&session, &f.filter, &opts));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(session = %session.key, error = %e, "Could not store a subscription");
                        codes[i] = reason::UNSPECIFIED_ERROR;
                    }
                }
            }
            let retained = if retained.is_empty() {
                retained
            } else {
                broker.commit(retained).await.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "Retained messages for a new subscription not queued");
                    Vec::new()
                })
            };
            Done::SubAck {
                pkid,
                codes,
                retained,
            }
        }));
        Ok(())
    }

    fn unsubscribe(&mut self, u: Unsubscribe, inflight: &mut InFlight) {
        let broker = Arc::clone(&self.broker);
        let session = Arc::clone(&self.session);
        inflight.push_back(Box::pin(async move {
            let mut codes = Vec::with_capacity(u.filters.len());
            for f in &u.filters {
                let code = if topic::check_filter(f).is_err() {
                    reason::TOPIC_FILTER_INVALID
                } else {
                    match broker.unsubscribe(&session, f).await {
                        Ok(true) => reason::SUCCESS,
                        Ok(false) => reason::NO_SUBSCRIPTION_EXISTED,
                        Err(_) => reason::UNSPECIFIED_ERROR,
                    }
                };
                codes.push(code);
            }
            Done::UnsubAck {
                pkid: u.pkid,
                codes,
            }
        }));
    }

    /// Writes the outcome of the oldest in-flight packet.
    fn complete(&mut self, done: Done) -> Result<(), ConnError> {
        let version = self.version;
        match done {
            Done::Published {
                pkid,
                qos,
                received,
                bytes,
                result,
            } => match result {
                Ok(plans) => {
                    if qos == QoS::ExactlyOnce {
                        self.qos2.insert(pkid, Qos2In::Stored { routed: true });
                    }
                    self.ack(pkid, qos, reason::SUCCESS);
                    let metrics = &self.broker.metrics;
                    metrics.publishes.inc();
                    if let Some(c) = &self.counters.publishes {
                        c.inc();
                    }
                    if qos != QoS::AtMostOnce {
                        metrics
                            .ack_latency
                            .observe(received.elapsed().as_secs_f64());
                    }
                    if self.identity.registered {
                        self.broker
                            .backend
                            .observe(&self.identity.device_id, Observation::Accepted { bytes });
                    }
                    if !plans.iter().any(Plan::routed) {
                        metrics.unrouted.inc();
                    }
                    self.broker.deliver(plans);
                }
                Err(refusal) => {
                    if qos == QoS::ExactlyOnce {
                        self.qos2.remove(&pkid);
                    }
                    return self.refuse(pkid, qos, refusal);
                }
            },
            Done::Refused { pkid, qos, refusal } => return self.refuse(pkid, qos, refusal),
            Done::Rec { pkid, code } => {
                if let Some(code) = code {
                    encode::ack(&mut self.out, version, AckKind::PubRec, pkid, code);
                }
            }
            Done::Comp { pkid, code } => {
                encode::ack(&mut self.out, version, AckKind::PubComp, pkid, code);
            }
            Done::SubAck {
                pkid,
                codes,
                retained,
            } => {
                encode::suback(&mut self.out, version, pkid, &codes);
                self.broker.metrics.subacks.inc();
                if codes.iter().any(|c| *c <= reason::GRANTED_QOS_2) {
                    self.broker.backend.subscribed(&self.identity);
                }
                self.broker.deliver(retained);
            }
            Done::UnsubAck { pkid, codes } => {
                encode::unsuback(&mut self.out, version, pkid, &codes);
            }
            Done::Close { code, why } => {
                encode::disconnect(&mut self.out, version, code);
                return Err(ConnError::Closed(why));
            }
        }
        Ok(())
    }

    fn refuse(&mut self, pkid: u16, qos: QoS, refusal: Refusal) -> Result<(), ConnError> {
        if self.identity.registered {
            self.broker
                .backend
                .observe(&self.identity.device_id, Observation::Refused);
        }
        match refusal {
            Refusal::Close(why) => {
                self.broker.metrics.refuse(RefusedReason::OutboxError);
                tracing::warn!(device = %self.identity.device_id, error = %why, "Refused MQTT publish; disconnecting");
                encode::disconnect(&mut self.out, self.version, reason::PACKET_TOO_LARGE);
                Err(ConnError::Closed(why))
            }
            Refusal::NackOrClose(code, why) if !self.version.is_v5() => {
                self.broker.metrics.refuse(why);
                let _ = code;
                Err(ConnError::Closed(format!(
                    "publish refused ({}); 3.1.1 has no negative ack",
                    why.as_str()
                )))
            }
            Refusal::Nack(code, why) | Refusal::NackOrClose(code, why) => {
                self.broker.metrics.refuse(why);
                if self.version.is_v5() {
                    self.ack(pkid, qos, code);
                }
                Ok(())
            }
        }
    }

    fn ack(&mut self, pkid: u16, qos: QoS, code: u8) {
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                encode::ack(&mut self.out, self.version, AckKind::PubAck, pkid, code)
            }
            QoS::ExactlyOnce => {
                encode::ack(&mut self.out, self.version, AckKind::PubRec, pkid, code)
            }
        }
    }
}

fn identity_device(a: &crate::broker::Attached) -> String {
    a.session.device_id.to_string()
}

/// The properties a delivery carries: the message's, its subscription identifiers, and what is
/// left of its expiry. Borrowed when there is nothing to add (the common case), so a delivery
/// does not copy every string property of its message.
fn delivery_props(d: &Delivery, now: u64) -> Cow<'_, PublishProps> {
    let expiry = d
        .msg
        .expires_at
        .map(|at| u32::try_from(at.saturating_sub(now).max(1)).unwrap_or(u32::MAX));
    // A stored message never keeps the publisher's topic alias (resolved on receipt) nor
    // subscription identifiers (server to client only), so its own properties are exact
    // whenever the delivery adds neither identifiers nor an expiry.
    if d.sub_ids.is_empty()
        && expiry.is_none()
        && d.msg.props.topic_alias.is_none()
        && d.msg.props.subscription_ids.is_empty()
    {
        return Cow::Borrowed(&d.msg.props);
    }
    let mut props = d.msg.props.clone();
    props.topic_alias = None;
    props.subscription_ids.clone_from(&d.sub_ids);
    props.message_expiry = expiry;
    Cow::Owned(props)
}
