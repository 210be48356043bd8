//! MQTT 5 properties: the ones a server reads in CONNECT (with the will's), PUBLISH and
//! SUBSCRIBE, and writes in CONNACK and PUBLISH.
//!
//! Reading is strict (MQTT 5 §2.2.2): an identifier not valid for the packet is a Malformed
//! Packet (0x81); a property other than User Property (and, server to client, Subscription
//! Identifier) given twice is a Protocol Error (0x82), as is a value outside its range
//! (Receive Maximum 0, Maximum Packet Size 0, a Payload Format Indicator other than 0 or 1, …).

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use super::decode::{Cursor, DecodeError};
use super::encode::{put_binary, put_str, put_varint, varint_len};

pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
pub const CONTENT_TYPE: u8 = 0x03;
pub const RESPONSE_TOPIC: u8 = 0x08;
pub const CORRELATION_DATA: u8 = 0x09;
pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
pub const AUTHENTICATION_METHOD: u8 = 0x15;
pub const AUTHENTICATION_DATA: u8 = 0x16;
pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
pub const WILL_DELAY_INTERVAL: u8 = 0x18;
pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
pub const REASON_STRING: u8 = 0x1F;
pub const RECEIVE_MAXIMUM: u8 = 0x21;
pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
pub const TOPIC_ALIAS: u8 = 0x23;
pub const MAXIMUM_QOS: u8 = 0x24;
pub const RETAIN_AVAILABLE: u8 = 0x25;
pub const USER_PROPERTY: u8 = 0x26;
pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

/// The properties of an application message (PUBLISH, and a will's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishProps {
    /// 1: the payload is UTF-8 (checked by the server: PUBACK 0x99 if it is not).
    pub payload_format: Option<u8>,
    /// Seconds; a delivery carries what is left of it.
    pub message_expiry: Option<u32>,
    /// Client to server only (resolved by the connection, never forwarded).
    pub topic_alias: Option<u16>,
    pub response_topic: Option<ByteString>,
    pub correlation_data: Option<Bytes>,
    pub user: Vec<(ByteString, ByteString)>,
    /// Server to client only: the identifiers of the subscriptions a delivery matched.
    pub subscription_ids: Vec<u32>,
    pub content_type: Option<ByteString>,
}

impl PublishProps {
    /// Bytes these properties take on the wire (without the property length itself).
    pub fn wire_len(&self) -> usize {
        let str_len = |s: &str| 1 + 2 + s.len();
        self.payload_format.map_or(0, |_| 2)
            + self.message_expiry.map_or(0, |_| 5)
            + self.topic_alias.map_or(0, |_| 3)
            + self.response_topic.as_deref().map_or(0, str_len)
            + self
                .correlation_data
                .as_ref()
                .map_or(0, |d| 1 + 2 + d.len())
            + self
                .user
                .iter()
                .map(|(k, v)| 1 + 2 + k.len() + 2 + v.len())
                .sum::<usize>()
            + self
                .subscription_ids
                .iter()
                .map(|id| 1 + varint_len(*id as usize))
                .sum::<usize>()
            + self.content_type.as_deref().map_or(0, str_len)
    }

    /// Writes the properties (without their length).
    pub fn put(&self, out: &mut BytesMut) {
        if let Some(v) = self.payload_format {
            out.put_u8(PAYLOAD_FORMAT_INDICATOR);
            out.put_u8(v);
        }
        if let Some(v) = self.message_expiry {
            out.put_u8(MESSAGE_EXPIRY_INTERVAL);
            out.put_u32(v);
        }
        if let Some(v) = self.topic_alias {
            out.put_u8(TOPIC_ALIAS);
            out.put_u16(v);
        }
        if let Some(v) = &self.response_topic {
            out.put_u8(RESPONSE_TOPIC);
            put_str(out, v);
        }
        if let Some(v) = &self.correlation_data {
            out.put_u8(CORRELATION_DATA);
            put_binary(out, v);
        }
        for (k, v) in &self.user {
            out.put_u8(USER_PROPERTY);
            put_str(out, k);
            put_str(out, v);
        }
        for id in &self.subscription_ids {
            out.put_u8(SUBSCRIPTION_IDENTIFIER);
            put_varint(out, *id as usize);
        }
        if let Some(v) = &self.content_type {
            out.put_u8(CONTENT_TYPE);
            put_str(out, v);
        }
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.wire_len() == 0
    }
}

/// A will's properties: its message's, plus the Will Delay Interval.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WillProps {
    pub delay: Option<u32>,
    pub message: PublishProps,
}

/// The properties of a CONNECT.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectProps {
    pub session_expiry: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub max_packet_size: Option<u32>,
    pub topic_alias_maximum: Option<u16>,
    pub request_response_information: Option<u8>,
    pub request_problem_information: Option<u8>,
    pub user: Vec<(ByteString, ByteString)>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
}

/// Tracks which properties were seen, for the duplicate rule.
#[derive(Default)]
struct Seen(u64);

impl Seen {
    fn first(&mut self, id: u8) -> Result<(), DecodeError> {
        let bit = 1u64 << (id & 63);
        if self.0 & bit != 0 {
            return Err(DecodeError::Protocol(format!(
                "property {id:#04x} appears twice"
            )));
        }
        self.0 |= bit;
        Ok(())
    }
}

fn byte_flag(c: &mut Cursor, name: &str) -> Result<u8, DecodeError> {
    let v = c.u8()?;
    if v > 1 {
        return Err(DecodeError::Protocol(format!(
            "{name} must be 0 or 1, found {v}"
        )));
    }
    Ok(v)
}

/// Reads a property section (length, then properties) and hands each identifier to `each`,
/// which reads its value or says it is not allowed here.
fn read_section(
    c: &mut Cursor,
    each: impl FnMut(u8, &mut Cursor) -> Result<bool, DecodeError>,
) -> Result<(), DecodeError> {
    read_section_with(c, &[], each)
}

/// [`read_section`], with identifiers besides User Property that may repeat.
fn read_section_with(
    c: &mut Cursor,
    repeatable: &[u8],
    mut each: impl FnMut(u8, &mut Cursor) -> Result<bool, DecodeError>,
) -> Result<(), DecodeError> {
    let len = c.varint()?;
    let mut section = c.sub(len)?;
    let mut seen = Seen::default();
    while !section.is_empty() {
        let id = section.u8()?;
        if id != USER_PROPERTY && !repeatable.contains(&id) {
            seen.first(id)?;
        }
        if !each(id, &mut section)? {
            return Err(DecodeError::Malformed(format!(
                "property {id:#04x} is not valid in this packet"
            )));
        }
    }
    Ok(())
}

fn user_property(c: &mut Cursor) -> Result<(ByteString, ByteString), DecodeError> {
    Ok((c.text()?, c.text()?))
}

/// Reads one of the application-message properties into `p`; false if `id` is not one.
fn message_property(id: u8, c: &mut Cursor, p: &mut PublishProps) -> Result<bool, DecodeError> {
    match id {
        PAYLOAD_FORMAT_INDICATOR => {
            p.payload_format = Some(byte_flag(c, "Payload Format Indicator")?)
        }
        MESSAGE_EXPIRY_INTERVAL => p.message_expiry = Some(c.u32()?),
        CONTENT_TYPE => p.content_type = Some(c.text()?),
        RESPONSE_TOPIC => {
            let topic = c.text()?;
            if topic.is_empty() || topic.contains(['+', '#']) {
                return Err(DecodeError::Protocol(
                    "the Response Topic must be a topic name (no wildcards)".into(),
                ));
            }
            p.response_topic = Some(topic);
        }
        CORRELATION_DATA => p.correlation_data = Some(c.binary()?),
        USER_PROPERTY => p.user.push(user_property(c)?),
        _ => return Ok(false),
    }
    Ok(true)
}

/// The properties of a client's PUBLISH.
pub fn read_publish(c: &mut Cursor) -> Result<PublishProps, DecodeError> {
    read_message(c, false)
}

/// The properties of a message as the session store keeps them (with the subscription
/// identifiers of its delivery, which a client may not send).
pub fn read_stored(c: &mut Cursor) -> Result<PublishProps, DecodeError> {
    read_message(c, true)
}

fn read_message(c: &mut Cursor, stored: bool) -> Result<PublishProps, DecodeError> {
    let mut p = PublishProps::default();
    let repeatable: &[u8] = if stored {
        &[SUBSCRIPTION_IDENTIFIER]
    } else {
        &[]
    };
    read_section_with(c, repeatable, |id, c| {
        if stored && id == SUBSCRIPTION_IDENTIFIER {
            p.subscription_ids
                .push(u32::try_from(c.varint()?).unwrap_or(u32::MAX));
            return Ok(true);
        }
        if id == TOPIC_ALIAS {
            let alias = c.u16()?;
            if alias == 0 {
                return Err(DecodeError::TopicAliasInvalid("topic alias 0".into()));
            }
            p.topic_alias = Some(alias);
            return Ok(true);
        }
        if id == SUBSCRIPTION_IDENTIFIER {
            return Err(DecodeError::Protocol(
                "a client's PUBLISH must not carry a Subscription Identifier".into(),
            ));
        }
        message_property(id, c, &mut p)
    })?;
    Ok(p)
}

/// The properties of a CONNECT's will.
pub fn read_will(c: &mut Cursor) -> Result<WillProps, DecodeError> {
    let mut w = WillProps::default();
    read_section(c, |id, c| {
        if id == WILL_DELAY_INTERVAL {
            w.delay = Some(c.u32()?);
            return Ok(true);
        }
        message_property(id, c, &mut w.message)
    })?;
    Ok(w)
}

/// The properties of a CONNECT.
pub fn read_connect(c: &mut Cursor) -> Result<ConnectProps, DecodeError> {
    let mut p = ConnectProps::default();
    read_section(c, |id, c| {
        match id {
            SESSION_EXPIRY_INTERVAL => p.session_expiry = Some(c.u32()?),
            RECEIVE_MAXIMUM => {
                let v = c.u16()?;
                if v == 0 {
                    return Err(DecodeError::Protocol("Receive Maximum 0".into()));
                }
                p.receive_maximum = Some(v);
            }
            MAXIMUM_PACKET_SIZE => {
                let v = c.u32()?;
                if v == 0 {
                    return Err(DecodeError::Protocol("Maximum Packet Size 0".into()));
                }
                p.max_packet_size = Some(v);
            }
            TOPIC_ALIAS_MAXIMUM => p.topic_alias_maximum = Some(c.u16()?),
            REQUEST_RESPONSE_INFORMATION => {
                p.request_response_information =
                    Some(byte_flag(c, "Request Response Information")?);
            }
            REQUEST_PROBLEM_INFORMATION => {
                p.request_problem_information = Some(byte_flag(c, "Request Problem Information")?);
            }
            USER_PROPERTY => p.user.push(user_property(c)?),
            AUTHENTICATION_METHOD => p.authentication_method = Some(c.string()?),
            AUTHENTICATION_DATA => p.authentication_data = Some(c.binary()?),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if p.authentication_data.is_some() && p.authentication_method.is_none() {
        return Err(DecodeError::Protocol(
            "Authentication Data without an Authentication Method".into(),
        ));
    }
    Ok(p)
}

/// The properties of a SUBSCRIBE: its Subscription Identifier (user properties are read past).
pub fn read_subscribe(c: &mut Cursor) -> Result<Option<u32>, DecodeError> {
    let mut id_found = None;
    read_section(c, |id, c| {
        match id {
            SUBSCRIPTION_IDENTIFIER => {
                let v = c.varint()?;
                if v == 0 {
                    return Err(DecodeError::Protocol("Subscription Identifier 0".into()));
                }
                id_found = Some(v as u32);
            }
            USER_PROPERTY => {
                user_property(c)?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(id_found)
}

/// The properties of UNSUBSCRIBE: only user properties, read past.
pub fn read_unsubscribe(c: &mut Cursor) -> Result<(), DecodeError> {
    read_section(c, |id, c| {
        if id == USER_PROPERTY {
            user_property(c)?;
            return Ok(true);
        }
        Ok(false)
    })
}

/// The properties of PUBACK/PUBREC/PUBREL/PUBCOMP: a reason string and user properties, read
/// past.
pub fn read_ack(c: &mut Cursor) -> Result<(), DecodeError> {
    read_section(c, |id, c| {
        match id {
            REASON_STRING => {
                c.string()?;
            }
            USER_PROPERTY => {
                user_property(c)?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    })
}

/// The properties of a client's DISCONNECT: a new Session Expiry Interval (the rest is read
/// past).
pub fn read_disconnect(c: &mut Cursor) -> Result<Option<u32>, DecodeError> {
    let mut expiry = None;
    read_section(c, |id, c| {
        match id {
            SESSION_EXPIRY_INTERVAL => expiry = Some(c.u32()?),
            REASON_STRING => {
                c.string()?;
            }
            USER_PROPERTY => {
                user_property(c)?;
            }
            // Server Reference is for servers to send.
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(expiry)
}

/// What a CONNACK tells an MQTT 5 client (properties left `None` are not sent: their defaults
/// apply).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnAckProps {
    pub session_expiry: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub max_packet_size: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub topic_alias_maximum: Option<u16>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifiers_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
    pub server_keep_alive: Option<u16>,
}

impl ConnAckProps {
    /// Writes the property section (length first).
    pub fn put(&self, out: &mut BytesMut) {
        let mut body = BytesMut::new();
        let byte = |id: u8, v: Option<u8>, body: &mut BytesMut| {
            if let Some(v) = v {
                body.put_u8(id);
                body.put_u8(v);
            }
        };
        if let Some(v) = self.session_expiry {
            body.put_u8(SESSION_EXPIRY_INTERVAL);
            body.put_u32(v);
        }
        if let Some(v) = self.receive_maximum {
            body.put_u8(RECEIVE_MAXIMUM);
            body.put_u16(v);
        }
        byte(MAXIMUM_QOS, self.maximum_qos, &mut body);
        byte(RETAIN_AVAILABLE, self.retain_available, &mut body);
        if let Some(v) = self.max_packet_size {
            body.put_u8(MAXIMUM_PACKET_SIZE);
            body.put_u32(v);
        }
        if let Some(v) = &self.assigned_client_identifier {
            body.put_u8(ASSIGNED_CLIENT_IDENTIFIER);
            put_str(&mut body, v);
        }
        if let Some(v) = self.topic_alias_maximum {
            body.put_u8(TOPIC_ALIAS_MAXIMUM);
            body.put_u16(v);
        }
        byte(
            WILDCARD_SUBSCRIPTION_AVAILABLE,
            self.wildcard_subscription_available,
            &mut body,
        );
        byte(
            SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            self.subscription_identifiers_available,
            &mut body,
        );
        byte(
            SHARED_SUBSCRIPTION_AVAILABLE,
            self.shared_subscription_available,
            &mut body,
        );
        if let Some(v) = self.server_keep_alive {
            body.put_u8(0x13);
            body.put_u16(v);
        }
        put_varint(out, body.len());
        out.extend_from_slice(&body);
    }
}
