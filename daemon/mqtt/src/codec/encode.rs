//! Encoding what a server sends: CONNACK, PUBLISH, the acknowledgements, SUBACK, UNSUBACK,
//! PINGRESP and (MQTT 5) DISCONNECT. Each writes one whole packet at the end of `out`.

use bytes::{BufMut, BytesMut};

use super::props::{ConnAckProps, PublishProps};
use super::{QoS, Version, reason};

pub fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub fn put_varint(out: &mut BytesMut, mut value: usize) {
    loop {
        let mut b = (value & 0x7f) as u8;
        value >>= 7;
        if value > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if value == 0 {
            return;
        }
    }
}

/// A string known to fit (topics and names the server itself holds are checked on the way in).
pub fn put_str(out: &mut BytesMut, s: &str) {
    put_binary(out, s.as_bytes());
}

pub fn put_binary(out: &mut BytesMut, b: &[u8]) {
    out.put_u16(u16::try_from(b.len()).unwrap_or(u16::MAX));
    out.extend_from_slice(&b[..b.len().min(usize::from(u16::MAX))]);
}

/// CONNACK. `code` is an MQTT 5 reason code, mapped to a 3.1.1 return code for older clients
/// (MQTT 3.1 has no session present flag).
pub fn connack(
    out: &mut BytesMut,
    version: Version,
    session_present: bool,
    code: u8,
    props: &ConnAckProps,
) {
    out.put_u8(0x20);
    let present = u8::from(session_present && code == reason::SUCCESS && version != Version::V31);
    if version.is_v5() {
        let mut body = BytesMut::new();
        body.put_u8(present);
        body.put_u8(code);
        props.put(&mut body);
        put_varint(out, body.len());
        out.extend_from_slice(&body);
    } else {
        out.put_u8(2);
        out.put_u8(present);
        out.put_u8(reason::v3_connack(code));
    }
}

/// The CONNACK for a CONNECT of a protocol level the server does not speak: MQTT 3.1.1's form
/// with return code 0x01 (MQTT-3.1.2-2), which every version's client can read.
pub fn connack_unsupported_version(out: &mut BytesMut) {
    out.extend_from_slice(&[0x20, 0x02, 0x00, 0x01]);
}

/// What a PUBLISH to a client carries besides its topic and payload.
#[derive(Debug, Clone, Copy)]
pub struct PublishHeader {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub pkid: u16,
}

/// The size a PUBLISH would have on the wire (to honour a client's Maximum Packet Size).
pub fn publish_len(version: Version, topic: &str, props: &PublishProps, payload: usize) -> usize {
    let mut body = 2 + topic.len() + payload;
    // A packet identifier is counted in any case: the check must not depend on the QoS.
    body += 2;
    if version.is_v5() {
        let p = props.wire_len();
        body += varint_len(p) + p;
    }
    1 + varint_len(body) + body
}

/// PUBLISH. Properties are written for MQTT 5 only.
pub fn publish(
    out: &mut BytesMut,
    version: Version,
    h: PublishHeader,
    topic: &str,
    props: &PublishProps,
    payload: &[u8],
) {
    let mut first = 0x30 | ((h.qos as u8) << 1);
    if h.dup {
        first |= 0x08;
    }
    if h.retain {
        first |= 0x01;
    }
    let props_len = if version.is_v5() {
        Some(props.wire_len())
    } else {
        None
    };
    let mut body = 2 + topic.len() + payload.len();
    if h.qos != QoS::AtMostOnce {
        body += 2;
    }
    if let Some(p) = props_len {
        body += varint_len(p) + p;
    }
    out.reserve(1 + varint_len(body) + body);
    out.put_u8(first);
    put_varint(out, body);
    put_str(out, topic);
    if h.qos != QoS::AtMostOnce {
        out.put_u16(h.pkid);
    }
    if let Some(p) = props_len {
        put_varint(out, p);
        props.put(out);
    }
    out.extend_from_slice(payload);
}

/// The four acknowledgements of the publish flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    PubAck,
    PubRec,
    PubRel,
    PubComp,
}

/// PUBACK / PUBREC / PUBREL / PUBCOMP. MQTT 5 with a reason other than success carries it,
/// followed by an empty property section; success is the short form.
pub fn ack(out: &mut BytesMut, version: Version, kind: AckKind, pkid: u16, code: u8) {
    let first = match kind {
        AckKind::PubAck => 0x40,
        AckKind::PubRec => 0x50,
        AckKind::PubRel => 0x62,
        AckKind::PubComp => 0x70,
    };
    out.put_u8(first);
    if version.is_v5() && code != reason::SUCCESS {
        out.put_u8(4);
        out.put_u16(pkid);
        out.put_u8(code);
        out.put_u8(0);
    } else {
        out.put_u8(2);
        out.put_u16(pkid);
    }
}

/// SUBACK with one code per filter (MQTT 5 reason codes; 3.1.1 gets 0x00-0x02 or 0x80).
pub fn suback(out: &mut BytesMut, version: Version, pkid: u16, codes: &[u8]) {
    out.put_u8(0x90);
    let props = usize::from(version.is_v5());
    put_varint(out, 2 + props + codes.len());
    out.put_u16(pkid);
    if version.is_v5() {
        out.put_u8(0);
        out.extend_from_slice(codes);
    } else {
        for &c in codes {
            out.put_u8(if c <= reason::GRANTED_QOS_2 { c } else { 0x80 });
        }
    }
}

/// UNSUBACK: MQTT 5 with a code per filter; 3.1.1 has none.
pub fn unsuback(out: &mut BytesMut, version: Version, pkid: u16, codes: &[u8]) {
    out.put_u8(0xb0);
    if version.is_v5() {
        put_varint(out, 3 + codes.len());
        out.put_u16(pkid);
        out.put_u8(0);
        out.extend_from_slice(codes);
    } else {
        out.put_u8(2);
        out.put_u16(pkid);
    }
}

pub fn pingresp(out: &mut BytesMut) {
    out.extend_from_slice(&[0xd0, 0x00]);
}

/// An MQTT 5 server DISCONNECT with a reason code (nothing for older clients, which are just
/// closed).
pub fn disconnect(out: &mut BytesMut, version: Version, code: u8) {
    if version.is_v5() {
        out.extend_from_slice(&[0xe0, 0x02, code, 0x00]);
    }
}
