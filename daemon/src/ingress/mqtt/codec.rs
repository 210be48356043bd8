//! The device side of the wire: MQTT 3.1.1 or MQTT 5, translated to and from the 3.1.1
//! packets the front reasons about and the broker speaks.
//!
//! The broker hop is MQTT 3.1.1 (see `docs/MQTT.md` for why), so a v5 device's packets are
//! decoded with the v5 codec and mapped onto their 3.1.1 counterparts; what 3.1.1 cannot carry
//! is either kept aside for the outbox record ([`PublishMeta`]) or dropped, as documented there.
//! Answers to a v5 device carry v5 reason codes; a 3.1.1 device gets the 3.1.1 packet or, where
//! 3.1.1 has no negative ack, nothing.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self, QoS};
use rumqttc::v5::mqttbytes as mb5;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Login, Packet, PubAck, PubComp, PubRec, Publish,
    SubAck, Subscribe, SubscribeFilter, SubscribeReasonCode, Unsubscribe,
};

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

/// Largest packet the front writes (to the device or the broker); larger ones are bugs.
pub const MAX_WRITE: usize = 64 * 1024 * 1024;

/// The device's protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (and 3.1).
    V4,
    /// MQTT 5.
    V5,
}

/// What a v5 PUBLISH carries that is kept in the outbox record (the broker hop drops it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishMeta {
    pub content_type: Option<String>,
    pub user_properties: Vec<(String, String)>,
}

/// A device's CONNECT, whatever its version.
#[derive(Debug)]
pub struct DeviceConnect {
    pub version: Version,
    pub client_id: String,
    pub keep_alive: u16,
    /// 3.1.1 clean session; for v5 `clean_start` or a session expiry of 0.
    pub clean_session: bool,
    pub will: Option<LastWill>,
    pub login: Option<Login>,
}

/// One packet from the device, in 3.1.1 terms.
#[derive(Debug)]
pub enum Inbound {
    Publish(Publish, PublishMeta),
    /// v5 DISCONNECT 0x04 ("disconnect with will message"): close without telling the broker.
    DisconnectWithWill,
    Packet(Packet),
}

/// The outcome of a PUBLISH, as a v5 reason code (3.1.1: only `Success` is sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckReason {
    Success,
    /// 0x87: outside the ACL.
    NotAuthorized,
    /// 0x97: the outbox is full, or the device is over its rate limit.
    QuotaExceeded,
    /// 0x80: storage error or shutting down.
    Unspecified,
    /// 0x90: the topic breaks the record topic rule (`outpost_config::check_record_topic`).
    TopicNameInvalid,
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRefusal {
    /// 3.1.1 0x04, v5 0x86.
    BadCredentials,
    /// 3.1.1 0x05, v5 0x87.
    NotAuthorized,
    /// 3.1.1 0x03, v5 0x88.
    Unavailable,
}

/// One filter's answer in a SUBACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubCode {
    Granted(QoS),
    /// Outside the ACL: 3.1.1 0x80, v5 0x87.
    Denied,
    /// The broker refused: 0x80.
    Failed,
}

/// The protocol level of a CONNECT at the start of `buf`, once enough bytes are there.
pub fn connect_level(buf: &[u8]) -> Result<Option<u8>, ConnError> {
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

/// Decodes the CONNECT of protocol `level` once complete (`None`: more bytes needed).
pub fn read_connect(
    buf: &mut BytesMut,
    level: u8,
    max: usize,
) -> Result<Option<DeviceConnect>, ConnError> {
    if level == 5 {
        let max5 = u32::try_from(max).unwrap_or(u32::MAX);
        return match p5::Packet::read(buf, Some(max5)) {
            Ok(p5::Packet::Connect(c, will, login)) => {
                let expiry = c
                    .properties
                    .as_ref()
                    .and_then(|p| p.session_expiry_interval)
                    .unwrap_or(0);
                let will = will.map(v5_will).transpose()?;
                Ok(Some(DeviceConnect {
                    version: Version::V5,
                    client_id: c.client_id,
                    keep_alive: c.keep_alive,
                    clean_session: c.clean_start || expiry == 0,
                    will,
                    login: login.map(|l| Login::new(l.username, l.password)),
                }))
            }
            Ok(_) => Err(ConnError::Malformed("expected CONNECT".into())),
            Err(mb5::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(ConnError::Malformed(e.to_string())),
        };
    }
    match Packet::read(buf, max) {
        Ok(Packet::Connect(c)) => Ok(Some(DeviceConnect {
            version: Version::V4,
            client_id: c.client_id,
            keep_alive: c.keep_alive,
            clean_session: c.clean_session,
            will: c.last_will,
            login: c.login,
        })),
        Ok(_) => Err(ConnError::Malformed("expected CONNECT".into())),
        Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(ConnError::Malformed(e.to_string())),
    }
}

fn v5_will(w: p5::LastWill) -> Result<LastWill, ConnError> {
    Ok(LastWill {
        topic: utf8(w.topic)?,
        message: w.message,
        qos: qos_from5(w.qos),
        retain: w.retain,
    })
}

fn utf8(b: Bytes) -> Result<String, ConnError> {
    String::from_utf8(b.to_vec()).map_err(|_| ConnError::Malformed("topic is not UTF-8".into()))
}

fn qos_from5(q: mb5::QoS) -> QoS {
    match q {
        mb5::QoS::AtMostOnce => QoS::AtMostOnce,
        mb5::QoS::AtLeastOnce => QoS::AtLeastOnce,
        mb5::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_to5(q: QoS) -> mb5::QoS {
    match q {
        QoS::AtMostOnce => mb5::QoS::AtMostOnce,
        QoS::AtLeastOnce => mb5::QoS::AtLeastOnce,
        QoS::ExactlyOnce => mb5::QoS::ExactlyOnce,
    }
}

/// Writes a packet the front built or relays (sizes were checked on decode).
fn put4(out: &mut BytesMut, packet: &Packet) {
    let _ = packet.write(out, MAX_WRITE);
}

fn put5(out: &mut BytesMut, packet: &p5::Packet) {
    let _ = packet.write(out, None);
}

/// Encodes one 3.1.1 packet (for the broker).
pub fn encode4(out: &mut BytesMut, packet: &Packet) {
    put4(out, packet);
}

/// The CONNACK that refuses a CONNECT of `version`.
pub fn refuse(version: Version, why: ConnRefusal) -> BytesMut {
    let mut out = BytesMut::new();
    match version {
        Version::V4 => {
            let code = match why {
                ConnRefusal::BadCredentials => ConnectReturnCode::BadUserNamePassword,
                ConnRefusal::NotAuthorized => ConnectReturnCode::NotAuthorized,
                ConnRefusal::Unavailable => ConnectReturnCode::ServiceUnavailable,
            };
            put4(&mut out, &Packet::ConnAck(ConnAck::new(code, false)));
        }
        Version::V5 => {
            let code = match why {
                ConnRefusal::BadCredentials => p5::ConnectReturnCode::BadUserNamePassword,
                ConnRefusal::NotAuthorized => p5::ConnectReturnCode::NotAuthorized,
                ConnRefusal::Unavailable => p5::ConnectReturnCode::ServerUnavailable,
            };
            put5(
                &mut out,
                &p5::Packet::ConnAck(p5::ConnAck {
                    session_present: false,
                    code,
                    properties: None,
                }),
            );
        }
    }
    out
}

/// The device side of one connection: decodes what the device sends, encodes what it gets.
#[derive(Debug)]
pub struct DeviceCodec {
    pub version: Version,
    max: usize,
    /// v5 UNSUBSCRIBE packet id → number of filters (the v5 UNSUBACK has one code per filter).
    unsubscribes: HashMap<u16, usize>,
}

impl DeviceCodec {
    pub fn new(version: Version, max: usize) -> Self {
        Self {
            version,
            max,
            unsubscribes: HashMap::new(),
        }
    }

    /// The accepting CONNACK. For v5 it states the limits the front keeps: `receive_max`
    /// in-flight publishes, no topic aliases, no subscription identifiers, no shared
    /// subscriptions, `max_packet`; and the client id the front assigned, if any.
    pub fn connack(
        &self,
        out: &mut BytesMut,
        session_present: bool,
        receive_max: u16,
        assigned_client_id: Option<String>,
    ) {
        match self.version {
            Version::V4 => put4(
                out,
                &Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, session_present)),
            ),
            Version::V5 => put5(
                out,
                &p5::Packet::ConnAck(p5::ConnAck {
                    session_present,
                    code: p5::ConnectReturnCode::Success,
                    properties: Some(p5::ConnAckProperties {
                        session_expiry_interval: None,
                        receive_max: Some(receive_max),
                        max_qos: None,
                        retain_available: None,
                        max_packet_size: Some(u32::try_from(self.max).unwrap_or(u32::MAX)),
                        assigned_client_identifier: assigned_client_id,
                        topic_alias_max: Some(0),
                        reason_string: None,
                        user_properties: Vec::new(),
                        wildcard_subscription_available: None,
                        subscription_identifiers_available: Some(0),
                        shared_subscription_available: Some(0),
                        server_keep_alive: None,
                        response_information: None,
                        server_reference: None,
                        authentication_method: None,
                        authentication_data: None,
                    }),
                }),
            ),
        }
    }

    /// Decodes the next complete packet in `buf`, if any.
    pub fn read(&mut self, buf: &mut BytesMut) -> Result<Option<Inbound>, ConnError> {
        match self.version {
            Version::V4 => match Packet::read(buf, self.max) {
                Ok(Packet::Publish(p)) => Ok(Some(Inbound::Publish(p, PublishMeta::default()))),
                Ok(p) => Ok(Some(Inbound::Packet(p))),
                Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(ConnError::Malformed(e.to_string())),
            },
            Version::V5 => {
                let max = u32::try_from(self.max).unwrap_or(u32::MAX);
                match p5::Packet::read(buf, Some(max)) {
                    Ok(p) => self.translate(p).map(Some),
                    Err(mb5::Error::InsufficientBytes(_)) => Ok(None),
                    Err(e) => Err(ConnError::Malformed(e.to_string())),
                }
            }
        }
    }

    fn translate(&mut self, packet: p5::Packet) -> Result<Inbound, ConnError> {
        Ok(Inbound::Packet(match packet {
            p5::Packet::Publish(p) => {
                let props = p.properties.unwrap_or_default();
                if props.topic_alias.is_some() {
                    // The CONNACK said topic_alias_max 0.
                    return Err(ConnError::Malformed("topic alias not allowed".into()));
                }
                let meta = PublishMeta {
                    content_type: props.content_type,
                    user_properties: props.user_properties,
                };
                let publish = Publish {
                    dup: p.dup,
                    qos: qos_from5(p.qos),
                    retain: p.retain,
                    topic: utf8(p.topic)?,
                    pkid: p.pkid,
                    payload: p.payload,
                };
                return Ok(Inbound::Publish(publish, meta));
            }
            p5::Packet::PubAck(a) => Packet::PubAck(PubAck::new(a.pkid)),
            p5::Packet::PubRec(a) => Packet::PubRec(PubRec::new(a.pkid)),
            p5::Packet::PubRel(a) => Packet::PubRel(rumqttc::PubRel::new(a.pkid)),
            p5::Packet::PubComp(a) => Packet::PubComp(PubComp::new(a.pkid)),
            p5::Packet::Subscribe(s) => Packet::Subscribe(Subscribe {
                pkid: s.pkid,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| SubscribeFilter::new(f.path, qos_from5(f.qos)))
                    .collect(),
            }),
            p5::Packet::Unsubscribe(u) => {
                self.unsubscribes.insert(u.pkid, u.filters.len());
                Packet::Unsubscribe(Unsubscribe {
                    pkid: u.pkid,
                    topics: u.filters,
                })
            }
            p5::Packet::PingReq(_) => Packet::PingReq,
            p5::Packet::Disconnect(d) => {
                if d.reason_code == p5::DisconnectReasonCode::DisconnectWithWillMessage {
                    return Ok(Inbound::DisconnectWithWill);
                }
                Packet::Disconnect
            }
            p5::Packet::Connect(..) => Packet::Connect(Connect::new("")),
            p5::Packet::ConnAck(_) => {
                Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))
            }
            p5::Packet::SubAck(_) => Packet::SubAck(SubAck::new(0, Vec::new())),
            p5::Packet::UnsubAck(_) => Packet::UnsubAck(rumqttc::UnsubAck::new(0)),
            p5::Packet::PingResp(_) => Packet::PingResp,
            p5::Packet::Auth(_) => {
                return Err(ConnError::Malformed("AUTH is not supported".into()));
            }
        }))
    }

    /// PUBACK for a QoS 1 publish. 3.1.1 has no negative PUBACK: nothing is written then.
    pub fn puback(&self, out: &mut BytesMut, pkid: u16, reason: AckReason) {
        match self.version {
            Version::V4 if reason == AckReason::Success => {
                put4(out, &Packet::PubAck(PubAck::new(pkid)));
            }
            Version::V4 => {}
            Version::V5 => {
                let mut ack = p5::PubAck::new(pkid, None);
                ack.reason = match reason {
                    AckReason::Success => p5::PubAckReason::Success,
                    AckReason::NotAuthorized => p5::PubAckReason::NotAuthorized,
                    AckReason::QuotaExceeded => p5::PubAckReason::QuotaExceeded,
                    AckReason::Unspecified => p5::PubAckReason::UnspecifiedError,
                    AckReason::TopicNameInvalid => p5::PubAckReason::TopicNameInvalid,
                };
                put5(out, &p5::Packet::PubAck(ack));
            }
        }
    }

    /// PUBREC for a QoS 2 publish; like [`Self::puback`].
    pub fn pubrec(&self, out: &mut BytesMut, pkid: u16, reason: AckReason) {
        match self.version {
            Version::V4 if reason == AckReason::Success => {
                put4(out, &Packet::PubRec(PubRec::new(pkid)));
            }
            Version::V4 => {}
            Version::V5 => {
                let mut ack = p5::PubRec::new(pkid, None);
                ack.reason = match reason {
                    AckReason::Success => p5::PubRecReason::Success,
                    AckReason::NotAuthorized => p5::PubRecReason::NotAuthorized,
                    AckReason::QuotaExceeded => p5::PubRecReason::QuotaExceeded,
                    AckReason::Unspecified => p5::PubRecReason::UnspecifiedError,
                    AckReason::TopicNameInvalid => p5::PubRecReason::TopicNameInvalid,
                };
                put5(out, &p5::Packet::PubRec(ack));
            }
        }
    }

    pub fn pubcomp(&self, out: &mut BytesMut, pkid: u16) {
        match self.version {
            Version::V4 => put4(out, &Packet::PubComp(PubComp::new(pkid))),
            Version::V5 => put5(out, &p5::Packet::PubComp(p5::PubComp::new(pkid, None))),
        }
    }

    pub fn suback(&self, out: &mut BytesMut, pkid: u16, codes: &[SubCode]) {
        match self.version {
            Version::V4 => {
                let codes = codes
                    .iter()
                    .map(|c| match c {
                        SubCode::Granted(q) => SubscribeReasonCode::Success(*q),
                        SubCode::Denied | SubCode::Failed => SubscribeReasonCode::Failure,
                    })
                    .collect();
                put4(out, &Packet::SubAck(SubAck::new(pkid, codes)));
            }
            Version::V5 => {
                let return_codes = codes
                    .iter()
                    .map(|c| match c {
                        SubCode::Granted(q) => p5::SubscribeReasonCode::Success(qos_to5(*q)),
                        SubCode::Denied => p5::SubscribeReasonCode::NotAuthorized,
                        SubCode::Failed => p5::SubscribeReasonCode::Unspecified,
                    })
                    .collect();
                put5(
                    out,
                    &p5::Packet::SubAck(p5::SubAck {
                        pkid,
                        return_codes,
                        properties: None,
                    }),
                );
            }
        }
    }

    /// Relays a packet from the broker (deliveries, their PUBRELs, UNSUBACK, PINGRESP).
    pub fn relay(&mut self, out: &mut BytesMut, packet: &Packet) {
        if self.version == Version::V4 {
            put4(out, packet);
            return;
        }
        let p = match packet {
            Packet::Publish(p) => p5::Packet::Publish(p5::Publish {
                dup: p.dup,
                qos: qos_to5(p.qos),
                retain: p.retain,
                topic: Bytes::copy_from_slice(p.topic.as_bytes()),
                pkid: p.pkid,
                payload: p.payload.clone(),
                properties: None,
            }),
            Packet::PubRel(r) => p5::Packet::PubRel(p5::PubRel::new(r.pkid, None)),
            Packet::PubAck(a) => p5::Packet::PubAck(p5::PubAck::new(a.pkid, None)),
            Packet::PubRec(a) => p5::Packet::PubRec(p5::PubRec::new(a.pkid, None)),
            Packet::PubComp(a) => p5::Packet::PubComp(p5::PubComp::new(a.pkid, None)),
            Packet::UnsubAck(a) => {
                let n = self.unsubscribes.remove(&a.pkid).unwrap_or(1);
                p5::Packet::UnsubAck(p5::UnsubAck {
                    pkid: a.pkid,
                    reasons: vec![p5::UnsubAckReason::Success; n],
                    properties: None,
                })
            }
            Packet::PingResp => p5::Packet::PingResp(p5::PingResp),
            // Nothing else comes from the broker to a client.
            _ => return,
        };
        put5(out, &p);
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

    #[test]
    fn v5_publish_keeps_content_type_and_user_properties() {
        let mut wire = BytesMut::new();
        let mut p = p5::Publish::new("devices/d/t", mb5::QoS::AtLeastOnce, "x", None);
        p.pkid = 3;
        p.properties = Some(p5::PublishProperties {
            content_type: Some("text/plain".into()),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        });
        p5::Packet::Publish(p).write(&mut wire, None).unwrap();
        let mut codec = DeviceCodec::new(Version::V5, 1024);
        let Some(Inbound::Publish(p, meta)) = codec.read(&mut wire).unwrap() else {
            panic!("not a publish");
        };
        assert_eq!(
            (p.topic.as_str(), p.pkid, p.qos),
            ("devices/d/t", 3, QoS::AtLeastOnce)
        );
        assert_eq!(meta.content_type.as_deref(), Some("text/plain"));
        assert_eq!(meta.user_properties, [("k".to_owned(), "v".to_owned())]);
    }

    #[test]
    fn negative_acks_exist_only_in_v5() {
        let mut out = BytesMut::new();
        DeviceCodec::new(Version::V4, 1024).puback(&mut out, 1, AckReason::QuotaExceeded);
        assert!(out.is_empty());
        DeviceCodec::new(Version::V5, 1024).puback(&mut out, 1, AckReason::QuotaExceeded);
        assert_eq!(&out[..], [0x40, 4, 0, 1, 0x97, 0]);
        out.clear();
        DeviceCodec::new(Version::V5, 1024).pubrec(&mut out, 2, AckReason::NotAuthorized);
        assert_eq!(&out[..], [0x50, 4, 0, 2, 0x87, 0]);
    }
}
