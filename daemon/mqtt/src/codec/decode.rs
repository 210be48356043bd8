//! Decoding what a client sends: the CONNECT that opens a connection ([`read_connect`]), then
//! every later packet ([`read_packet`]). Both take whole packets off the front of a read
//! buffer and leave partial ones there (`Ok(None)`: read more).

use bytes::{Buf, Bytes, BytesMut};
use bytestring::ByteString;

use super::{
    Ack, Connect, Disconnect, MAX_VARINT, Packet, Publish, QoS, Subscribe, SubscribeFilter,
    Unsubscribe, Version, Will, props, reason,
};

/// Why a packet cannot be accepted. The connection answers an MQTT 5 client with a DISCONNECT
/// carrying [`DecodeError::reason`] and closes; a 3.1.1 client's connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a valid packet (0x81).
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// A valid packet the protocol does not allow here (0x82).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Bigger than the server's maximum packet size (0x95).
    #[error("packet of {size} bytes is larger than the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    /// A topic alias of 0, above the server's Topic Alias Maximum, or not yet defined (0x94).
    #[error("invalid topic alias: {0}")]
    TopicAliasInvalid(String),
}

impl DecodeError {
    /// The MQTT 5 reason code for this failure.
    pub fn reason(&self) -> u8 {
        match self {
            DecodeError::Malformed(_) => reason::MALFORMED_PACKET,
            DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
            DecodeError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::TopicAliasInvalid(_) => reason::TOPIC_ALIAS_INVALID,
        }
    }
}

/// Why the first packet of a connection is not an acceptable CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The first packet is something else: close without answering (MQTT-3.1.0-1).
    #[error("expected CONNECT, got packet type {0}")]
    NotConnect(u8),
    /// A protocol name other than `MQTT`/`MQIsdp`: close without answering (MQTT-3.1.2-1).
    #[error("unknown protocol name {0:?}")]
    ProtocolName(String),
    /// A level this server does not speak: answer CONNACK 0x01 (3.1.1 format, MQTT-3.1.2-2),
    /// then close.
    #[error("unsupported protocol level {0}")]
    UnsupportedVersion(u8),
    /// A CONNECT of a known version that breaks a rule: MQTT 5 clients get a CONNACK with the
    /// reason code, then the connection closes.
    #[error("invalid CONNECT: {error}")]
    Invalid {
        version: Version,
        error: DecodeError,
    },
    /// The CONNECT is larger than the server accepts.
    #[error("{0}")]
    TooLarge(DecodeError),
}

/// A read position in a packet body.
#[derive(Debug)]
pub struct Cursor {
    data: Bytes,
}

fn truncated(what: &str) -> DecodeError {
    DecodeError::Malformed(format!("packet ends inside {what}"))
}

impl Cursor {
    pub fn new(data: Bytes) -> Cursor {
        Cursor { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn remaining(&self) -> usize {
        self.data.len()
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        if self.data.is_empty() {
            return Err(truncated("a byte"));
        }
        Ok(self.data.get_u8())
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        if self.data.len() < 2 {
            return Err(truncated("a two-byte integer"));
        }
        Ok(self.data.get_u16())
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        if self.data.len() < 4 {
            return Err(truncated("a four-byte integer"));
        }
        Ok(self.data.get_u32())
    }

    /// A Variable Byte Integer (at most four bytes).
    pub fn varint(&mut self) -> Result<usize, DecodeError> {
        let mut value = 0usize;
        for i in 0..4 {
            let b = self.u8()?;
            value |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed(
            "variable byte integer longer than four bytes".into(),
        ))
    }

    /// The next `len` bytes as their own cursor.
    pub fn sub(&mut self, len: usize) -> Result<Cursor, DecodeError> {
        if self.data.len() < len {
            return Err(truncated("a length-prefixed section"));
        }
        Ok(Cursor {
            data: self.data.split_to(len),
        })
    }

    /// Binary Data: a two-byte length, then that many bytes (shared, not copied).
    pub fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = usize::from(self.u16()?);
        if self.data.len() < len {
            return Err(truncated("binary data"));
        }
        Ok(self.data.split_to(len))
    }

    /// A UTF-8 Encoded String: well-formed UTF-8 without U+0000 (MQTT-1.5.4-1, -2).
    pub fn string(&mut self) -> Result<String, DecodeError> {
        Ok(String::from(&*self.text()?))
    }

    /// [`Cursor::string`], sharing the packet's buffer instead of copying: for the MQTT 5
    /// properties a message carries to its subscribers and into the outbox.
    pub fn text(&mut self) -> Result<ByteString, DecodeError> {
        let text = ByteString::try_from(self.binary()?)
            .map_err(|_| DecodeError::Malformed("a string is not well-formed UTF-8".into()))?;
        if text.contains('\0') {
            return Err(DecodeError::Malformed(
                "a string contains U+0000".to_owned(),
            ));
        }
        Ok(text)
    }

    /// Everything left.
    pub fn rest(self) -> Bytes {
        self.data
    }
}

/// The fixed header of the next packet, once complete: (first byte, header length, remaining
/// length). `Ok(None)` until enough bytes are there.
fn fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((first, 2 + i, remaining)));
        }
    }
    Err(DecodeError::Malformed(
        "remaining length longer than four bytes".into(),
    ))
}

/// Takes the next whole packet off `buf`: (first byte, body). `max` bounds the whole packet.
fn take_packet(buf: &mut BytesMut, max: usize) -> Result<Option<(u8, Bytes)>, DecodeError> {
    let Some((first, header, remaining)) = fixed_header(buf)? else {
        return Ok(None);
    };
    let size = header + remaining;
    if size > max {
        return Err(DecodeError::TooLarge { size, max });
    }
    if buf.len() < size {
        buf.reserve(size - buf.len());
        return Ok(None);
    }
    // The body is copied out rather than split off: a split-off body (and the payload sliced
    // from it) would keep the whole read buffer alive until the record is committed and
    // delivered, so every read would need a fresh buffer (a 64 KiB allocation and a copy of
    // the partial packet at its end). Copying keeps the read buffer reusable in place.
    let body = Bytes::copy_from_slice(&buf[header..size]);
    buf.advance(size);
    debug_assert!(remaining <= MAX_VARINT);
    Ok(Some((first, body)))
}

/// Reads the CONNECT that must open a connection. `max` bounds its size.
pub fn read_connect(buf: &mut BytesMut, max: usize) -> Result<Option<Connect>, ConnectError> {
    if let Some(&first) = buf.first()
        && first >> 4 != 1
    {
        return Err(ConnectError::NotConnect(first >> 4));
    }
    let (first, body) = match take_packet(buf, max) {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(None),
        Err(e @ DecodeError::TooLarge { .. }) => return Err(ConnectError::TooLarge(e)),
        Err(e) => {
            return Err(ConnectError::Invalid {
                version: Version::V311,
                error: e,
            });
        }
    };
    let mut c = Cursor::new(body);
    let early = |e: DecodeError| ConnectError::Invalid {
        version: Version::V311,
        error: e,
    };
    let name = c.binary().map_err(early)?;
    let level = c.u8().map_err(early)?;
    let version = match (&name[..], level) {
        (b"MQTT", 4) => Version::V311,
        (b"MQTT", 5) => Version::V5,
        (b"MQIsdp", 3) => Version::V31,
        (b"MQTT" | b"MQIsdp", other) => return Err(ConnectError::UnsupportedVersion(other)),
        (other, _) => {
            return Err(ConnectError::ProtocolName(
                String::from_utf8_lossy(other).into_owned(),
            ));
        }
    };
    let invalid = |error: DecodeError| ConnectError::Invalid { version, error };
    if first & 0x0f != 0 {
        return Err(invalid(DecodeError::Malformed(
            "CONNECT fixed header flags must be 0".into(),
        )));
    }
    connect_body(&mut c, version).map_err(invalid).map(Some)
}

fn connect_body(c: &mut Cursor, version: Version) -> Result<Connect, DecodeError> {
    let flags = c.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed(
            "the reserved CONNECT flag is set (MQTT-3.1.2-3)".into(),
        ));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if will_qos == 3 {
        return Err(DecodeError::Malformed("will QoS 3".into()));
    }
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::Malformed(
            "will QoS or retain set without a will (MQTT-3.1.2-11, -13)".into(),
        ));
    }
    if has_password && !has_username && !version.is_v5() {
        return Err(DecodeError::Malformed(
            "password flag without user name flag (MQTT-3.1.2-22)".into(),
        ));
    }
    let keep_alive = c.u16()?;
    let props = if version.is_v5() {
        props::read_connect(c)?
    } else {
        props::ConnectProps::default()
    };
    let client_id = c.string()?;
    let will = if will_flag {
        let will_props = if version.is_v5() {
            props::read_will(c)?
        } else {
            props::WillProps::default()
        };
        let topic = c.string()?;
        if topic.is_empty() || topic.contains(['+', '#']) {
            return Err(DecodeError::Malformed(
                "the will topic must be a topic name (not empty, no wildcards)".into(),
            ));
        }
        let payload = c.binary()?;
        Some(Will {
            topic,
            payload,
            qos: QoS::from_u8(will_qos).unwrap_or(QoS::AtMostOnce),
            retain: will_retain,
            props: will_props,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(c.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(c.binary()?)
    } else {
        None
    };
    if !c.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} bytes after the CONNECT payload",
            c.remaining()
        )));
    }
    Ok(Connect {
        version,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        props,
    })
}

/// Reads the next packet after the CONNECT. `max` bounds the packet's size (the server's
/// Maximum Packet Size); `alias_max` is the server's Topic Alias Maximum (MQTT 5).
pub fn read_packet(
    buf: &mut BytesMut,
    version: Version,
    max: usize,
    alias_max: u16,
) -> Result<Option<Packet>, DecodeError> {
    let Some((first, body)) = take_packet(buf, max)? else {
        return Ok(None);
    };
    let (kind, flags) = (first >> 4, first & 0x0f);
    let mut c = Cursor::new(body);
    let flags_must_be = |want: u8, name: &str| {
        if flags == want {
            Ok(())
        } else {
            Err(DecodeError::Malformed(format!(
                "{name} fixed header flags must be {want:04b}, found {flags:04b}"
            )))
        }
    };
    let packet = match kind {
        3 => Packet::Publish(publish(&mut c, flags, version, alias_max)?),
        4 => {
            flags_must_be(0, "PUBACK")?;
            Packet::PubAck(ack(&mut c, version)?)
        }
        5 => {
            flags_must_be(0, "PUBREC")?;
            Packet::PubRec(ack(&mut c, version)?)
        }
        6 => {
            flags_must_be(0b0010, "PUBREL")?;
            Packet::PubRel(ack(&mut c, version)?)
        }
        7 => {
            flags_must_be(0, "PUBCOMP")?;
            Packet::PubComp(ack(&mut c, version)?)
        }
        8 => {
            flags_must_be(0b0010, "SUBSCRIBE")?;
            Packet::Subscribe(subscribe(&mut c, version)?)
        }
        10 => {
            flags_must_be(0b0010, "UNSUBSCRIBE")?;
            Packet::Unsubscribe(unsubscribe(&mut c, version)?)
        }
        12 => {
            flags_must_be(0, "PINGREQ")?;
            if !c.is_empty() {
                return Err(DecodeError::Malformed("PINGREQ with a body".into()));
            }
            Packet::PingReq
        }
        14 => {
            flags_must_be(0, "DISCONNECT")?;
            Packet::Disconnect(disconnect(&mut c, version)?)
        }
        15 if version.is_v5() => {
            flags_must_be(0, "AUTH")?;
            Packet::Auth
        }
        1 => {
            return Err(DecodeError::Protocol(
                "a second CONNECT (MQTT-3.1.0-2)".into(),
            ));
        }
        2 | 9 | 11 | 13 => {
            return Err(DecodeError::Protocol(format!(
                "packet type {kind} is sent by servers, not clients"
            )));
        }
        other => {
            return Err(DecodeError::Malformed(format!(
                "reserved packet type {other}"
            )));
        }
    };
    Ok(Some(packet))
}

fn pkid(c: &mut Cursor) -> Result<u16, DecodeError> {
    let id = c.u16()?;
    if id == 0 {
        return Err(DecodeError::Malformed(
            "packet identifier 0 (MQTT-2.2.1-3)".into(),
        ));
    }
    Ok(id)
}

fn publish(
    c: &mut Cursor,
    flags: u8,
    version: Version,
    alias_max: u16,
) -> Result<Publish, DecodeError> {
    let dup = flags & 0x08 != 0;
    let qos = QoS::from_u8((flags >> 1) & 0x03)
        .ok_or_else(|| DecodeError::Malformed("PUBLISH with QoS 3 (MQTT-3.3.1-4)".into()))?;
    let retain = flags & 0x01 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::Malformed(
            "DUP set on a QoS 0 PUBLISH (MQTT-3.3.1-2)".into(),
        ));
    }
    let topic = c.string()?;
    if topic.contains(['+', '#']) {
        return Err(DecodeError::Malformed(
            "wildcards in a PUBLISH topic (MQTT-3.3.2-2)".into(),
        ));
    }
    let pkid = if qos == QoS::AtMostOnce { 0 } else { pkid(c)? };
    let props = if version.is_v5() {
        props::read_publish(c)?
    } else {
        props::PublishProps::default()
    };
    if let Some(alias) = props.topic_alias
        && alias > alias_max
    {
        return Err(DecodeError::TopicAliasInvalid(format!(
            "alias {alias} above the maximum {alias_max}"
        )));
    }
    if topic.is_empty() && props.topic_alias.is_none() {
        return Err(if version.is_v5() {
            DecodeError::Protocol("empty topic without a topic alias".into())
        } else {
            DecodeError::Malformed("empty topic (MQTT-4.7.3-1)".into())
        });
    }
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        pkid,
        props,
        payload: std::mem::replace(c, Cursor::new(Bytes::new())).rest(),
    })
}

fn ack(c: &mut Cursor, version: Version) -> Result<Ack, DecodeError> {
    let pkid = pkid(c)?;
    if !version.is_v5() {
        if !c.is_empty() {
            return Err(DecodeError::Malformed(
                "an acknowledgement longer than its packet identifier".into(),
            ));
        }
        return Ok(Ack { pkid, reason: 0 });
    }
    let reason = if c.is_empty() { 0 } else { c.u8()? };
    if !c.is_empty() {
        props::read_ack(c)?;
    }
    if !c.is_empty() {
        return Err(DecodeError::Malformed("bytes after the properties".into()));
    }
    Ok(Ack { pkid, reason })
}

fn subscribe(c: &mut Cursor, version: Version) -> Result<Subscribe, DecodeError> {
    let pkid = pkid(c)?;
    let subscription_id = if version.is_v5() {
        props::read_subscribe(c)?
    } else {
        None
    };
    let mut filters = Vec::new();
    while !c.is_empty() {
        let filter = c.string()?;
        let options = c.u8()?;
        let qos = QoS::from_u8(options & 0x03).ok_or_else(|| {
            DecodeError::Malformed("subscription with QoS 3 (MQTT-3.8.3-4)".into())
        })?;
        let sub = if version.is_v5() {
            if options & 0xc0 != 0 {
                return Err(DecodeError::Malformed(
                    "reserved subscription option bits set (MQTT-3.8.3-5)".into(),
                ));
            }
            let retain_handling = (options >> 4) & 0x03;
            if retain_handling == 3 {
                return Err(DecodeError::Protocol("Retain Handling 3".into()));
            }
            SubscribeFilter {
                filter,
                qos,
                no_local: options & 0x04 != 0,
                retain_as_published: options & 0x08 != 0,
                retain_handling,
            }
        } else {
            if options & 0xfc != 0 {
                return Err(DecodeError::Malformed(
                    "reserved bits of the requested QoS byte set (MQTT-3.8.3-4)".into(),
                ));
            }
            SubscribeFilter {
                filter,
                qos,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
            }
        };
        filters.push(sub);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol(
            "SUBSCRIBE without a topic filter (MQTT-3.8.3-3)".into(),
        ));
    }
    Ok(Subscribe {
        pkid,
        subscription_id,
        filters,
    })
}

fn unsubscribe(c: &mut Cursor, version: Version) -> Result<Unsubscribe, DecodeError> {
    let pkid = pkid(c)?;
    if version.is_v5() {
        props::read_unsubscribe(c)?;
    }
    let mut filters = Vec::new();
    while !c.is_empty() {
        filters.push(c.string()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol(
            "UNSUBSCRIBE without a topic filter (MQTT-3.10.3-2)".into(),
        ));
    }
    Ok(Unsubscribe { pkid, filters })
}

fn disconnect(c: &mut Cursor, version: Version) -> Result<Disconnect, DecodeError> {
    if !version.is_v5() {
        if !c.is_empty() {
            return Err(DecodeError::Malformed("DISCONNECT with a body".into()));
        }
        return Ok(Disconnect {
            reason: 0,
            session_expiry: None,
        });
    }
    // Remaining length 0: reason 0x00 (normal disconnection) and no properties (MQTT 5 §3.14.2.1).
    let reason = if c.is_empty() { 0 } else { c.u8()? };
    let session_expiry = if c.is_empty() {
        None
    } else {
        props::read_disconnect(c)?
    };
    if !c.is_empty() {
        return Err(DecodeError::Malformed("bytes after the properties".into()));
    }
    Ok(Disconnect {
        reason,
        session_expiry,
    })
}
