//! Codec tests: packets written out byte by byte from the specifications (not with the
//! encoder), each rule a server must enforce, and encoder round trips.

use bytes::{BufMut, Bytes, BytesMut};

use super::encode::{self, AckKind, PublishHeader};
use super::props::{ConnAckProps, PublishProps};
use super::*;

fn s(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// A whole packet: first byte, remaining length, body.
fn packet(first: u8, body: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_u8(first);
    encode::put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

fn connect_body(name: &str, level: u8, flags: u8, props: Option<&[u8]>, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    s(&mut b, name);
    b.push(level);
    b.push(flags);
    b.extend_from_slice(&60u16.to_be_bytes());
    if let Some(p) = props {
        b.push(p.len() as u8);
        b.extend_from_slice(p);
    }
    b.extend_from_slice(payload);
    b
}

fn client_id(id: &str) -> Vec<u8> {
    let mut b = Vec::new();
    s(&mut b, id);
    b
}

fn read_one(bytes: &[u8], version: Version) -> Result<Option<Packet>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    read_packet(&mut buf, version, 1 << 20, 10)
}

#[test]
fn connect_of_every_version_and_its_flags() {
    let c = read_connect(
        &mut packet(0x10, &connect_body("MQTT", 4, 0x02, None, &client_id("c1"))),
        1024,
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        (c.version, c.clean_start, c.client_id.as_str()),
        (Version::V311, true, "c1")
    );
    let c = read_connect(
        &mut packet(
            0x10,
            &connect_body("MQIsdp", 3, 0x02, None, &client_id("c1")),
        ),
        1024,
    )
    .unwrap()
    .unwrap();
    assert_eq!(c.version, Version::V31);
    // MQTT 5 with Session Expiry 300 and Receive Maximum 10.
    let props = [0x11, 0, 0, 1, 0x2c, 0x21, 0, 10];
    let c = read_connect(
        &mut packet(
            0x10,
            &connect_body("MQTT", 5, 0x00, Some(&props), &client_id("")),
        ),
        1024,
    )
    .unwrap()
    .unwrap();
    assert_eq!(c.version, Version::V5);
    assert!(!c.clean_start);
    assert_eq!(c.props.session_expiry, Some(300));
    assert_eq!(c.props.receive_maximum, Some(10));
    // With a will, user name and password.
    let mut payload = client_id("c2");
    s(&mut payload, "will/t");
    s(&mut payload, "gone");
    s(&mut payload, "user");
    s(&mut payload, "pw");
    let c = read_connect(
        &mut packet(0x10, &connect_body("MQTT", 4, 0xee, None, &payload)),
        1024,
    )
    .unwrap()
    .unwrap();
    let will = c.will.unwrap();
    assert_eq!(
        (will.topic.as_str(), &will.payload[..]),
        ("will/t", &b"gone"[..])
    );
    assert_eq!((will.qos, will.retain), (QoS::AtLeastOnce, true));
    assert_eq!(c.username.as_deref(), Some("user"));
    assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
}

#[test]
fn connect_refusals() {
    let read = |bytes: BytesMut| read_connect(&mut bytes.clone(), 1024);
    // Protocol level 7: CONNACK 0x01 (MQTT-3.1.2-2).
    assert_eq!(
        read(packet(
            0x10,
            &connect_body("MQTT", 7, 0x02, None, &client_id("c"))
        )),
        Err(ConnectError::UnsupportedVersion(7))
    );
    // The reserved flag (MQTT-3.1.2-3).
    assert!(matches!(
        read(packet(
            0x10,
            &connect_body("MQTT", 4, 0x03, None, &client_id("c"))
        )),
        Err(ConnectError::Invalid {
            error: DecodeError::Malformed(_),
            ..
        })
    ));
    // Will QoS without a will.
    assert!(matches!(
        read(packet(
            0x10,
            &connect_body("MQTT", 4, 0x0a, None, &client_id("c"))
        )),
        Err(ConnectError::Invalid { .. })
    ));
    // Password without user name in 3.1.1 (MQTT-3.1.2-22).
    let mut payload = client_id("c");
    s(&mut payload, "pw");
    assert!(matches!(
        read(packet(0x10, &connect_body("MQTT", 4, 0x42, None, &payload))),
        Err(ConnectError::Invalid { .. })
    ));
    // Receive Maximum 0 and a duplicate property: protocol errors.
    for props in [&[0x21u8, 0, 0][..], &[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2]] {
        assert!(matches!(
            read(packet(
                0x10,
                &connect_body("MQTT", 5, 0x02, Some(props), &client_id("c"))
            )),
            Err(ConnectError::Invalid {
                version: Version::V5,
                error: DecodeError::Protocol(_)
            })
        ));
    }
    // A property not valid in CONNECT: malformed.
    assert!(matches!(
        read(packet(
            0x10,
            &connect_body("MQTT", 5, 0x02, Some(&[0x23, 0, 1]), &client_id("c"))
        )),
        Err(ConnectError::Invalid {
            error: DecodeError::Malformed(_),
            ..
        })
    ));
    // Trailing bytes, and a client id with U+0000.
    let mut payload = client_id("c");
    payload.push(0);
    assert!(read(packet(0x10, &connect_body("MQTT", 4, 0x02, None, &payload))).is_err());
    assert!(
        read(packet(
            0x10,
            &connect_body("MQTT", 4, 0x02, None, &client_id("a\0b"))
        ))
        .is_err()
    );
    // Something else first; a foreign protocol name; flags in the fixed header.
    assert_eq!(
        read(packet(0x30, b"\0\x01a")),
        Err(ConnectError::NotConnect(3))
    );
    assert!(matches!(
        read(packet(
            0x10,
            &connect_body("HTTP", 4, 0x02, None, &client_id("c"))
        )),
        Err(ConnectError::ProtocolName(_))
    ));
    assert!(
        read(packet(
            0x11,
            &connect_body("MQTT", 4, 0x02, None, &client_id("c"))
        ))
        .is_err()
    );
    // Too large.
    assert!(matches!(
        read_connect(
            &mut packet(
                0x10,
                &connect_body("MQTT", 4, 0x02, None, &client_id(&"x".repeat(100)))
            ),
            50
        ),
        Err(ConnectError::TooLarge(_))
    ));
}

#[test]
fn partial_packets_wait_for_more() {
    let whole = packet(0x10, &connect_body("MQTT", 4, 0x02, None, &client_id("c")));
    for cut in 0..whole.len() {
        let mut buf = BytesMut::from(&whole[..cut]);
        assert_eq!(read_connect(&mut buf, 1024), Ok(None), "cut at {cut}");
        assert_eq!(buf.len(), cut, "nothing consumed");
    }
    // Remaining length over four bytes.
    let mut buf = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
    assert!(matches!(
        read_packet(&mut buf, Version::V311, usize::MAX, 0),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn disconnect_of_mqtt_5_with_remaining_length_0_is_normal() {
    assert_eq!(
        read_one(&[0xe0, 0x00], Version::V5),
        Ok(Some(Packet::Disconnect(Disconnect {
            reason: 0,
            session_expiry: None
        })))
    );
    assert_eq!(
        read_one(&[0xe0, 0x01, 0x04], Version::V5),
        Ok(Some(Packet::Disconnect(Disconnect {
            reason: 4,
            session_expiry: None
        })))
    );
    assert_eq!(
        read_one(&[0xe0, 0x07, 0x00, 0x05, 0x11, 0, 0, 0, 9], Version::V5),
        Ok(Some(Packet::Disconnect(Disconnect {
            reason: 0,
            session_expiry: Some(9)
        })))
    );
    assert!(read_one(&[0xe0, 0x01, 0x00], Version::V311).is_err());
}

#[test]
fn publish_rules() {
    let mut body = Vec::new();
    s(&mut body, "a/b");
    body.extend_from_slice(&[0, 7]);
    body.extend_from_slice(b"hi");
    let Some(Packet::Publish(p)) = read_one(&packet(0x33, &body), Version::V311).unwrap() else {
        panic!("a publish");
    };
    assert_eq!(
        (p.qos, p.retain, p.pkid, &p.payload[..]),
        (QoS::AtLeastOnce, true, 7, &b"hi"[..])
    );
    // QoS 3, DUP on QoS 0, packet id 0.
    assert!(read_one(&packet(0x36, &body), Version::V311).is_err());
    let mut q0 = Vec::new();
    s(&mut q0, "a/b");
    q0.extend_from_slice(b"hi");
    assert!(read_one(&packet(0x38, &q0), Version::V311).is_err());
    let mut zero = Vec::new();
    s(&mut zero, "a/b");
    zero.extend_from_slice(&[0, 0]);
    assert!(read_one(&packet(0x32, &zero), Version::V311).is_err());
    // U+0000, wildcards, empty topic.
    for topic in ["a\0b", "a/+", "a/#", ""] {
        let mut b = Vec::new();
        s(&mut b, topic);
        b.extend_from_slice(b"x");
        assert!(
            read_one(&packet(0x30, &b), Version::V311).is_err(),
            "{topic:?}"
        );
    }
    // MQTT 5: a topic alias with an empty topic is for the connection to resolve; alias 0 and
    // above the maximum are invalid; a Subscription Identifier from a client is a protocol error.
    let v5 = |topic: &str, props: &[u8]| {
        let mut b = Vec::new();
        s(&mut b, topic);
        b.push(props.len() as u8);
        b.extend_from_slice(props);
        b.extend_from_slice(b"x");
        read_one(&packet(0x30, &b), Version::V5)
    };
    let Ok(Some(Packet::Publish(p))) = v5("", &[0x23, 0, 3]) else {
        panic!("alias publish");
    };
    assert_eq!((p.topic.as_str(), p.props.topic_alias), ("", Some(3)));
    assert!(matches!(
        v5("t", &[0x23, 0, 0]),
        Err(DecodeError::TopicAliasInvalid(_))
    ));
    assert!(matches!(
        v5("t", &[0x23, 0, 11]),
        Err(DecodeError::TopicAliasInvalid(_))
    ));
    assert!(matches!(v5("", &[]), Err(DecodeError::Protocol(_))));
    assert!(matches!(v5("t", &[0x0b, 1]), Err(DecodeError::Protocol(_))));
    assert!(matches!(v5("t", &[0x01, 2]), Err(DecodeError::Protocol(_))));
    assert!(matches!(
        v5("t", &[0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 1]),
        Err(DecodeError::Protocol(_))
    ));
    // Properties kept.
    let mut props = vec![0x01, 1, 0x03];
    props.extend_from_slice(&[0, 4]);
    props.extend_from_slice(b"text");
    props.extend_from_slice(&[0x26, 0, 1, b'k', 0, 1, b'v']);
    let Ok(Some(Packet::Publish(p))) = v5("t", &props) else {
        panic!("publish with properties");
    };
    assert_eq!(p.props.payload_format, Some(1));
    assert_eq!(p.props.content_type.as_deref(), Some("text"));
    assert_eq!(p.props.user, vec![("k".into(), "v".into())]);
}

#[test]
fn acks_subscribe_and_unsubscribe_rules() {
    // PUBREL must have flags 0010.
    assert!(read_one(&[0x60, 2, 0, 1], Version::V311).is_err());
    assert_eq!(
        read_one(&[0x62, 2, 0, 1], Version::V311),
        Ok(Some(Packet::PubRel(Ack { pkid: 1, reason: 0 })))
    );
    assert_eq!(
        read_one(&[0x40, 3, 0, 1, 0x10], Version::V5),
        Ok(Some(Packet::PubAck(Ack {
            pkid: 1,
            reason: 0x10
        })))
    );
    let sub = |first: u8, options: u8, version: Version| {
        let mut b = vec![0, 5];
        if version.is_v5() {
            b.push(0);
        }
        s(&mut b, "a/#");
        b.push(options);
        read_one(&packet(first, &b), version)
    };
    let Ok(Some(Packet::Subscribe(s5))) = sub(0x82, 0x2d, Version::V5) else {
        panic!("subscribe");
    };
    let f = &s5.filters[0];
    assert_eq!(
        (f.qos, f.no_local, f.retain_as_published, f.retain_handling),
        (QoS::AtLeastOnce, true, true, 2)
    );
    assert!(sub(0x80, 0x01, Version::V311).is_err(), "flags 0000");
    assert!(
        sub(0x82, 0x04, Version::V311).is_err(),
        "reserved QoS bits in 3.1.1"
    );
    assert!(sub(0x82, 0x03, Version::V311).is_err(), "QoS 3");
    assert!(
        sub(0x82, 0x41, Version::V5).is_err(),
        "reserved option bits"
    );
    assert!(matches!(
        sub(0x82, 0x30, Version::V5),
        Err(DecodeError::Protocol(_))
    ));
    // No filter at all.
    assert!(matches!(
        read_one(&packet(0x82, &[0, 5]), Version::V311),
        Err(DecodeError::Protocol(_))
    ));
    assert!(matches!(
        read_one(&packet(0xa2, &[0, 5]), Version::V311),
        Err(DecodeError::Protocol(_))
    ));
    // Server-only packets and a second CONNECT.
    assert!(matches!(
        read_one(&[0x20, 2, 0, 0], Version::V311),
        Err(DecodeError::Protocol(_))
    ));
    assert!(matches!(
        read_one(&[0x10, 0], Version::V311),
        Err(DecodeError::Protocol(_))
    ));
    assert!(
        read_one(&[0xf0, 0], Version::V311).is_err(),
        "AUTH is reserved before 5"
    );
    assert!(
        read_one(&[0xc0, 1, 0], Version::V311).is_err(),
        "PINGREQ with a body"
    );
}

#[test]
fn encoded_packets_match_the_specification() {
    let mut out = BytesMut::new();
    encode::connack(
        &mut out,
        Version::V311,
        true,
        reason::SUCCESS,
        &ConnAckProps::default(),
    );
    assert_eq!(&out[..], [0x20, 2, 1, 0]);
    out.clear();
    encode::connack(
        &mut out,
        Version::V31,
        true,
        reason::SUCCESS,
        &ConnAckProps::default(),
    );
    assert_eq!(&out[..], [0x20, 2, 0, 0], "3.1 has no session present flag");
    out.clear();
    encode::connack(
        &mut out,
        Version::V311,
        false,
        reason::NOT_AUTHORIZED,
        &ConnAckProps::default(),
    );
    assert_eq!(&out[..], [0x20, 2, 0, 5]);
    out.clear();
    let props = ConnAckProps {
        receive_maximum: Some(8),
        ..ConnAckProps::default()
    };
    encode::connack(&mut out, Version::V5, false, reason::SUCCESS, &props);
    assert_eq!(&out[..], [0x20, 6, 0, 0, 3, 0x21, 0, 8]);
    out.clear();
    encode::ack(
        &mut out,
        Version::V5,
        AckKind::PubAck,
        9,
        reason::QUOTA_EXCEEDED,
    );
    assert_eq!(&out[..], [0x40, 4, 0, 9, 0x97, 0]);
    out.clear();
    encode::ack(&mut out, Version::V5, AckKind::PubRel, 9, reason::SUCCESS);
    assert_eq!(&out[..], [0x62, 2, 0, 9]);
    out.clear();
    encode::suback(&mut out, Version::V311, 3, &[0, 2, reason::NOT_AUTHORIZED]);
    assert_eq!(&out[..], [0x90, 5, 0, 3, 0, 2, 0x80]);
    out.clear();
    encode::suback(&mut out, Version::V5, 3, &[1, reason::TOPIC_FILTER_INVALID]);
    assert_eq!(&out[..], [0x90, 5, 0, 3, 0, 1, 0x8f]);
    out.clear();
    encode::unsuback(&mut out, Version::V311, 4, &[0]);
    assert_eq!(&out[..], [0xb0, 2, 0, 4]);
}

#[test]
fn a_publish_round_trips_with_its_properties() {
    let props = PublishProps {
        payload_format: Some(1),
        message_expiry: Some(30),
        response_topic: Some("r/1".into()),
        correlation_data: Some(Bytes::from_static(b"\x01\x02")),
        user: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
        content_type: Some("application/json".into()),
        ..PublishProps::default()
    };
    let payload = vec![b'x'; 300];
    let mut out = BytesMut::new();
    let h = PublishHeader {
        dup: false,
        qos: QoS::ExactlyOnce,
        retain: true,
        pkid: 77,
    };
    encode::publish(&mut out, Version::V5, h, "t/1", &props, &payload);
    assert_eq!(
        out.len(),
        encode::publish_len(Version::V5, "t/1", &props, payload.len())
    );
    let Some(Packet::Publish(p)) = read_packet(&mut out, Version::V5, 1 << 20, 0).unwrap() else {
        panic!("publish");
    };
    assert_eq!(p.props, props);
    assert_eq!(
        (p.topic.as_str(), p.pkid, p.qos, p.retain),
        ("t/1", 77, QoS::ExactlyOnce, true)
    );
    assert_eq!(&p.payload[..], &payload[..]);
}

#[test]
fn variable_byte_integers_at_their_boundaries() {
    for v in [
        0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, MAX_VARINT,
    ] {
        let mut out = BytesMut::new();
        encode::put_varint(&mut out, v);
        assert_eq!(out.len(), encode::varint_len(v), "{v}");
        let mut c = decode::Cursor::new(out.freeze());
        assert_eq!(c.varint(), Ok(v));
    }
}
