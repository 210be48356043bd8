//! The MQTT wire format, server side: strict decoding of what clients send, encoding of what a
//! server sends. MQTT 3.1 (`MQIsdp`, level 3), 3.1.1 (level 4) and 5 (level 5).
//!
//! Why our own codec rather than rumqttc's `mqttbytes`: a server must *refuse* what the
//! specification forbids, and `mqttbytes` is a client library that accepts it (a topic with
//! U+0000, reserved flag bits in CONNECT and SUBSCRIBE, PUBREL with flags 0000, duplicate
//! MQTT 5 properties, Receive Maximum 0) while rejecting what is valid (an MQTT 5 DISCONNECT with
//! remaining length 0, which every client sends). Here every rule the specification states with
//! MUST for packets a server receives is checked, and each failure says which MQTT 5 reason code
//! it stands for ([`DecodeError::reason`]): 0x81 Malformed Packet, 0x82 Protocol Error, 0x94
//! Topic Alias invalid, 0x95 Packet too large. The connection then sends an MQTT 5 DISCONNECT
//! with that code (or closes, for 3.1.1) — never a panic, never a partial packet acted on.
//!
//! Payloads are `Bytes` slices of the read buffer: a PUBLISH payload is not copied between the
//! socket, the outbox request and every subscriber's queue.
//!
//! Layout: [`decode`] (client → server), [`encode`] (server → client), [`props`] (MQTT 5
//! properties, both directions).

pub mod decode;
pub mod encode;
pub mod props;

use bytes::Bytes;

pub use decode::{ConnectError, DecodeError, read_connect, read_packet};
pub use props::{ConnectProps, PublishProps, WillProps};

/// The protocol level a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// MQTT 3.1, protocol name `MQIsdp`, level 3: 3.1.1's packets without the session present
    /// flag and without SUBACK failure codes in the specification (0x80 is sent anyway, as
    /// Mosquitto does).
    V31,
    /// MQTT 3.1.1, level 4.
    V311,
    /// MQTT 5, level 5.
    V5,
}

impl Version {
    pub fn is_v5(self) -> bool {
        self == Version::V5
    }

    /// The protocol level byte.
    pub fn level(self) -> u8 {
        match self {
            Version::V31 => 3,
            Version::V311 => 4,
            Version::V5 => 5,
        }
    }
}

/// Quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// MQTT 5 reason codes this server sends (and the 3.1.1 CONNACK return codes they map to).
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const GRANTED_QOS_1: u8 = 0x01;
    pub const GRANTED_QOS_2: u8 = 0x02;
    /// DISCONNECT: the client wants its will published.
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
    pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;

    /// The MQTT 3.1/3.1.1 CONNACK return code for an MQTT 5 CONNACK reason code.
    pub fn v3_connack(code: u8) -> u8 {
        match code {
            SUCCESS => 0x00,
            UNSUPPORTED_PROTOCOL_VERSION => 0x01,
            CLIENT_IDENTIFIER_NOT_VALID => 0x02,
            SERVER_UNAVAILABLE
            | SERVER_BUSY
            | SERVER_SHUTTING_DOWN
            | CONNECTION_RATE_EXCEEDED
            | QUOTA_EXCEEDED => 0x03,
            BAD_USER_NAME_OR_PASSWORD => 0x04,
            _ => 0x05, // not authorized
        }
    }
}

/// The will of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub props: WillProps,
}

/// A CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: Version,
    /// Clean Session (3.1.1) / Clean Start (5).
    pub clean_start: bool,
    pub keep_alive: u16,
    pub client_id: String,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub props: ConnectProps,
}

/// A PUBLISH, in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Empty only for an MQTT 5 publish that names its topic by alias (resolved by the caller).
    pub topic: String,
    /// 0 for QoS 0.
    pub pkid: u16,
    pub props: PublishProps,
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP: a packet id and a reason code (0 in 3.1.1). Properties
/// a client sends with them (a reason string, user properties) are read past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub pkid: u16,
    pub reason: u8,
}

/// One filter of a SUBSCRIBE with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeFilter {
    /// As sent; [`crate::topic::check_filter`] decides whether it is valid (SUBACK 0x8F if not).
    pub filter: String,
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained messages at subscribe; 1: only if the subscription is new; 2: never.
    pub retain_handling: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub pkid: u16,
    /// MQTT 5 Subscription Identifier (1 to 268,435,455).
    pub subscription_id: Option<u32>,
    pub filters: Vec<SubscribeFilter>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub pkid: u16,
    pub filters: Vec<String>,
}

/// A client's DISCONNECT. 3.1.1 and an MQTT 5 DISCONNECT with remaining length 0 mean reason
/// 0x00 (normal: the will is dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnect {
    pub reason: u8,
    /// MQTT 5: a new Session Expiry Interval.
    pub session_expiry: Option<u32>,
}

/// A packet a client sends after its CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    PingReq,
    Disconnect(Disconnect),
    /// MQTT 5 AUTH (enhanced authentication), which this server does not offer.
    Auth,
}

impl Packet {
    /// The packet's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::PingReq => "PINGREQ",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth => "AUTH",
        }
    }
}

/// The largest value of a Variable Byte Integer (remaining lengths, property lengths,
/// subscription identifiers).
pub const MAX_VARINT: usize = 268_435_455;

#[cfg(test)]
mod tests;
