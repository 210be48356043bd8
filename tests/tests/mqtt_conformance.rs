//! MQTT conformance: one case per normative statement of MQTT 3.1.1 / 5.0 that Outpost
//! implements (the statement's number is in the case's name), run against the real `outpost`
//! binary **and against Mosquitto** (Debian's `mosquitto`, the reference broker), with the same
//! bytes on the wire (`outpost_e2e::mqtt_wire`, written from the specifications).
//!
//! Every case must pass on Outpost. On Mosquitto a case either passes or is listed in
//! [`MOSQUITTO_DIFFERS`] with the reason; a case listed as failing that starts passing on
//! Mosquitto fails the reference test, so the list stays true (a case whose outcome there
//! depends on timing is listed as varying, with the measurement).
//!
//! Both servers run with anonymous access and an ACL allowing every topic, so the cases test
//! the protocol, not Outpost's authentication (tested in `mqtt.rs`).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code, no async runtime here

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost_e2e::daemon::Daemon;
use outpost_e2e::mqtt_wire::{
    Connect, Next, Props, Will, Wire, ack, packet, publish, subscribe, unsubscribe,
};
use outpost_e2e::require_command;

const SHORT: Duration = Duration::from_millis(700);
const CLOSE: Duration = Duration::from_secs(3);

type Case = fn(SocketAddr, &str) -> Result<(), String>;

fn check(ok: bool, what: impl Into<String>) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what.into()) }
}

/// An accepted connection (anonymous).
fn open(addr: SocketAddr, c: &Connect) -> Result<Wire, String> {
    let (w, ack) = Wire::connect(addr, c);
    check(ack.connack().1 == 0, format!("CONNACK refused: {ack:?}"))?;
    Ok(w)
}

fn v3(addr: SocketAddr, id: &str) -> Result<Wire, String> {
    open(addr, &Connect::v311(id))
}

fn v5(addr: SocketAddr, id: &str) -> Result<Wire, String> {
    open(addr, &Connect::v5(id))
}

/// A subscription (one filter) and its SUBACK codes.
fn sub(w: &mut Wire, is_v5: bool, filter: &str, options: u8) -> Result<Vec<u8>, String> {
    let props = Props::new();
    w.send(&subscribe(1, is_v5.then_some(&props), &[(filter, options)]));
    let p = w.expect()?;
    check(p.kind() == 9, format!("expected SUBACK, got {p:?}"))?;
    Ok(p.codes(is_v5))
}

/// Publishes at QoS 1 and waits for the PUBACK.
fn pub1(
    w: &mut Wire,
    is_v5: bool,
    topic: &str,
    payload: &[u8],
    props: Option<&Props>,
) -> Result<(), String> {
    let empty = Props::new();
    let props = if is_v5 {
        Some(props.unwrap_or(&empty))
    } else {
        None
    };
    w.send(&publish(1, false, false, topic, 42, props, payload));
    let p = w.expect()?;
    check(
        p.kind() == 4 && p.pkid() == 42,
        format!("expected PUBACK, got {p:?}"),
    )?;
    check(
        p.reason() == 0,
        format!("PUBACK reason {:#04x}", p.reason()),
    )
}

/// The connection must be refused or closed without a successful CONNACK.
fn refused_connect(addr: SocketAddr, bytes: &[u8]) -> Result<(), String> {
    let mut w = Wire::open(addr);
    w.send(bytes);
    let (closed, seen) = w.closes_within(CLOSE);
    check(closed, format!("not closed; saw {seen:?}"))?;
    check(
        !seen.iter().any(|p| p.kind() == 2 && p.connack().1 == 0),
        format!("accepted: {seen:?}"),
    )
}

/// After `bytes`, the connection must be closed (MQTT 5 may send a DISCONNECT first), and no
/// PUBACK/PUBREC of success may come for it.
fn closes_after(mut w: Wire, bytes: &[u8]) -> Result<(), String> {
    w.send(bytes);
    let (closed, seen) = w.closes_within(CLOSE);
    check(closed, format!("not closed; saw {seen:?}"))?;
    check(
        !seen
            .iter()
            .any(|p| matches!(p.kind(), 4 | 5 | 9) && p.reason() < 0x80),
        format!("answered as if valid: {seen:?}"),
    )
}

// ---- CONNECT -----------------------------------------------------------------------------------

fn mqtt_3_1_2_2_an_unsupported_protocol_level_gets_connack_0x01(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let mut c = Connect::v311(id);
    c.level = 7;
    let mut w = Wire::open(addr);
    w.send(&c.encode());
    let (closed, seen) = w.closes_within(CLOSE);
    check(closed, "not closed")?;
    check(
        seen.first()
            .is_some_and(|p| p.kind() == 2 && p.connack().1 == 0x01),
        format!("expected CONNACK 0x01, saw {seen:?}"),
    )
}

fn mqtt_3_1_2_3_the_reserved_connect_flag_closes(addr: SocketAddr, id: &str) -> Result<(), String> {
    let mut c = Connect::v311(id);
    c.extra_flags = 0x01;
    refused_connect(addr, &c.encode())
}

fn mqtt_3_1_0_2_a_second_connect_closes(addr: SocketAddr, id: &str) -> Result<(), String> {
    let w = v3(addr, id)?;
    closes_after(w, &Connect::v311(id).encode())
}

fn mqtt_3_1_3_8_an_empty_client_id_needs_a_clean_session(
    addr: SocketAddr,
    _: &str,
) -> Result<(), String> {
    let (_, ack) = Wire::connect(addr, &Connect::v311("").clean(false));
    check(
        ack.connack().1 == 0x02,
        format!("expected 0x02, got {ack:?}"),
    )
}

fn mqtt_3_1_3_6_an_empty_client_id_with_a_clean_session_is_accepted(
    addr: SocketAddr,
    _: &str,
) -> Result<(), String> {
    let (_, ack) = Wire::connect(addr, &Connect::v311(""));
    check(ack.connack().1 == 0, format!("refused: {ack:?}"))
}

fn mqtt5_3_2_2_3_7_an_empty_client_id_gets_an_assigned_one(
    addr: SocketAddr,
    _: &str,
) -> Result<(), String> {
    let (_, ack) = Wire::connect(addr, &Connect::v5(""));
    check(ack.connack().1 == 0, format!("refused: {ack:?}"))?;
    check(
        ack.connack_prop(0x12).is_some_and(|v| v.len() > 2),
        format!("no Assigned Client Identifier: {ack:?}"),
    )
}

fn mqtt5_3_1_2_11_6_receive_maximum_0_is_a_protocol_error(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    refused_connect(
        addr,
        &Connect::v5(id).props(Props::new().u16(0x21, 0)).encode(),
    )
}

fn mqtt5_2_2_2_2_a_repeated_property_is_a_protocol_error(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let props = Props::new().u32(0x11, 10).u32(0x11, 20);
    refused_connect(addr, &Connect::v5(id).props(props).encode())
}

fn mqtt_3_1_2_2_mqtt_3_1_is_accepted(addr: SocketAddr, id: &str) -> Result<(), String> {
    let mut c = Connect::v311(id);
    c.protocol = "MQIsdp";
    c.level = 3;
    let (_, ack) = Wire::connect(addr, &c);
    check(ack.connack().1 == 0, format!("refused: {ack:?}"))
}

// ---- PUBLISH -----------------------------------------------------------------------------------

fn mqtt_1_5_4_2_u0000_in_a_topic_closes(addr: SocketAddr, id: &str) -> Result<(), String> {
    closes_after(
        v3(addr, id)?,
        &publish(1, false, false, "a\0b", 1, None, b"x"),
    )
}

fn mqtt_3_3_1_4_qos_3_closes(addr: SocketAddr, id: &str) -> Result<(), String> {
    let mut bytes = publish(1, false, false, "a", 1, None, b"x");
    bytes[0] |= 0x06;
    closes_after(v3(addr, id)?, &bytes)
}

fn mqtt_3_3_2_2_a_wildcard_in_a_topic_name_closes(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    closes_after(
        v3(addr, id)?,
        &publish(1, false, false, "a/+", 1, None, b"x"),
    )
}

fn mqtt_3_6_1_1_pubrel_with_flags_0000_closes(addr: SocketAddr, id: &str) -> Result<(), String> {
    let mut w = v3(addr, id)?;
    w.send(&publish(2, false, false, "t/rel", 5, None, b"x"));
    check(w.expect()?.kind() == 5, "PUBREC")?;
    closes_after(w, &[0x60, 2, 0, 5])
}

fn mqtt_3_8_1_1_subscribe_with_flags_0000_closes(addr: SocketAddr, id: &str) -> Result<(), String> {
    let mut bytes = subscribe(1, None, &[("a", 0)]);
    bytes[0] = 0x80;
    closes_after(v3(addr, id)?, &bytes)
}

fn mqtt_3_8_3_4_reserved_requested_qos_bits_close(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    closes_after(v3(addr, id)?, &subscribe(1, None, &[("a", 0x04)]))
}

fn mqtt5_3_8_3_5_reserved_subscription_option_bits_close(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    closes_after(
        v5(addr, id)?,
        &subscribe(1, Some(&Props::new()), &[("a", 0x41)]),
    )
}

fn mqtt_3_8_3_3_a_subscribe_without_filters_closes(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    closes_after(v3(addr, id)?, &packet(0x82, &[0, 1]))
}

fn mqtt_4_7_1_invalid_filters_are_not_granted(addr: SocketAddr, id: &str) -> Result<(), String> {
    for filter in ["a/#/b", "a+", "a/b#"] {
        let mut w = v3(addr, &format!("{id}-{}", filter.len()))?;
        w.send(&subscribe(1, None, &[(filter, 0)]));
        match w.next(CLOSE) {
            Next::Packet(p) if p.kind() == 9 => {
                check(p.codes(false) == [0x80], format!("{filter}: granted {p:?}"))?;
            }
            Next::Closed => {}
            other => return Err(format!("{filter}: {other:?}")),
        }
    }
    Ok(())
}

// ---- wills -------------------------------------------------------------------------------------

fn will(topic: &str, props: Props) -> Will {
    Will {
        topic: topic.to_owned(),
        payload: b"gone".to_vec(),
        qos: 1,
        retain: false,
        props,
    }
}

fn watch(addr: SocketAddr, id: &str, filter: &str) -> Result<Wire, String> {
    let mut w = v5(addr, &format!("{id}-watch"))?;
    check(sub(&mut w, true, filter, 1)? == [1], "watch subscription")?;
    Ok(w)
}

fn mqtt_3_14_4_3_a_normal_disconnect_discards_the_will(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let topic = format!("will/{id}");
    let mut watcher = watch(addr, id, &topic)?;
    let mut w = open(addr, &Connect::v5(id).will(will(&topic, Props::new())))?;
    w.send(&[0xe0, 0x00]); // MQTT 5 DISCONNECT, remaining length 0: reason 0x00
    watcher.quiet_for(SHORT)
}

fn mqtt5_3_14_2_1_disconnect_0x04_publishes_the_will(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let topic = format!("will/{id}");
    let mut watcher = watch(addr, id, &topic)?;
    let mut w = open(addr, &Connect::v5(id).will(will(&topic, Props::new())))?;
    w.send(&[0xe0, 0x01, 0x04]);
    let m = watcher.expect_publish(true)?;
    check(m.topic == topic && m.payload == b"gone", format!("{m:?}"))
}

fn mqtt_3_1_2_8_the_will_is_published_when_the_network_fails(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let topic = format!("will/{id}");
    let mut watcher = watch(addr, id, &topic)?;
    let w = open(addr, &Connect::v311(id).will(will(&topic, Props::new())))?;
    drop(w);
    let m = watcher.expect_publish(true)?;
    check(m.topic == topic, format!("{m:?}"))
}

fn mqtt5_3_1_3_2_2_the_will_waits_for_its_delay(addr: SocketAddr, id: &str) -> Result<(), String> {
    let topic = format!("will/{id}");
    let mut watcher = watch(addr, id, &topic)?;
    let c = Connect::v5(id)
        .props(Props::new().u32(0x11, 60))
        .will(will(&topic, Props::new().u32(0x18, 2)));
    let w = open(addr, &c)?;
    let gone = Instant::now();
    drop(w);
    let m = watcher.expect_publish(true)?;
    check(m.topic == topic, format!("{m:?}"))?;
    check(
        gone.elapsed() >= Duration::from_millis(1500),
        format!(
            "published {:?} after the connection ended, delay 2 s",
            gone.elapsed()
        ),
    )
}

// ---- routing -----------------------------------------------------------------------------------

fn mqtt_3_8_4_6_delivered_qos_is_the_lower_of_publish_and_subscription(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let topic = format!("q/{id}");
    let mut s2 = v3(addr, &format!("{id}-s2"))?;
    check(sub(&mut s2, false, &topic, 2)? == [2], "granted 2")?;
    let mut s0 = v3(addr, &format!("{id}-s0"))?;
    check(sub(&mut s0, false, &topic, 0)? == [0], "granted 0")?;
    let mut p = v3(addr, &format!("{id}-p"))?;
    p.send(&publish(0, false, false, &topic, 0, None, b"zero"));
    let m = s2.expect_publish(false)?;
    check(
        m.qos == 0,
        format!("QoS 0 publish delivered at QoS {}", m.qos),
    )?;
    s0.expect_publish(false)?;
    pub1(&mut p, false, &topic, b"one", None)?;
    let m = s2.expect_publish(false)?;
    check(
        m.qos == 1,
        format!("QoS 1 publish delivered at QoS {}", m.qos),
    )?;
    s2.send(&ack(0x40, m.pkid));
    let m = s0.expect_publish(false)?;
    check(m.qos == 0, format!("QoS 0 subscription got QoS {}", m.qos))
}

fn mqtt_3_3_1_9_a_live_delivery_has_retain_0(addr: SocketAddr, id: &str) -> Result<(), String> {
    let topic = format!("r/{id}");
    let mut s = v3(addr, &format!("{id}-s"))?;
    sub(&mut s, false, &topic, 0)?;
    let mut p = v3(addr, &format!("{id}-p"))?;
    p.send(&publish(0, false, true, &topic, 0, None, b"kept"));
    let m = s.expect_publish(false)?;
    check(!m.retain, "retain flag set on a live delivery")
}

fn mqtt_3_3_1_6_a_new_subscription_gets_the_retained_message_with_retain_1(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let topic = format!("r/{id}");
    let mut p = v3(addr, &format!("{id}-p"))?;
    p.send(&publish(1, false, true, &topic, 3, None, b"kept"));
    check(p.expect()?.kind() == 4, "PUBACK")?;
    let mut s = v3(addr, &format!("{id}-s"))?;
    sub(&mut s, false, &topic, 1)?;
    let m = s.expect_publish(false)?;
    check(m.retain && m.payload == b"kept", format!("{m:?}"))?;
    // An empty retained message clears it (MQTT-3.3.1-10).
    p.send(&publish(1, false, true, &topic, 4, None, b""));
    check(p.expect()?.kind() == 4, "PUBACK")?;
    let mut s = v3(addr, &format!("{id}-s2"))?;
    sub(&mut s, false, &topic, 1)?;
    s.quiet_for(SHORT)
}

fn mqtt5_3_8_3_1_retain_handling_1_and_2(addr: SocketAddr, id: &str) -> Result<(), String> {
    let topic = format!("rh/{id}");
    let mut p = v5(addr, &format!("{id}-p"))?;
    p.send(&publish(
        1,
        false,
        true,
        &topic,
        3,
        Some(&Props::new()),
        b"kept",
    ));
    check(p.expect()?.kind() == 4, "PUBACK")?;
    let mut s = v5(addr, &format!("{id}-s"))?;
    // Retain Handling 2: never.
    sub(&mut s, true, &topic, 0x20)?;
    s.quiet_for(SHORT)?;
    let mut s = v5(addr, &format!("{id}-s1"))?;
    // Retain Handling 1: only for a new subscription.
    sub(&mut s, true, &topic, 0x10)?;
    check(
        s.expect_publish(true)?.retain,
        "retained message for the new subscription",
    )?;
    sub(&mut s, true, &topic, 0x10)?;
    s.quiet_for(SHORT)
}

fn mqtt5_3_8_3_1_no_local(addr: SocketAddr, id: &str) -> Result<(), String> {
    let topic = format!("nl/{id}");
    let mut w = v5(addr, id)?;
    sub(&mut w, true, &topic, 0x04)?;
    w.send(&publish(
        0,
        false,
        false,
        &topic,
        0,
        Some(&Props::new()),
        b"mine",
    ));
    w.quiet_for(SHORT)
}

fn mqtt5_3_8_3_1_retain_as_published(addr: SocketAddr, id: &str) -> Result<(), String> {
    let topic = format!("rap/{id}");
    let mut s = v5(addr, &format!("{id}-s"))?;
    sub(&mut s, true, &topic, 0x08)?;
    let mut p = v5(addr, &format!("{id}-p"))?;
    p.send(&publish(
        0,
        false,
        true,
        &topic,
        0,
        Some(&Props::new()),
        b"kept",
    ));
    check(
        s.expect_publish(true)?.retain,
        "retain flag kept as published",
    )
}

fn mqtt5_3_3_2_3_properties_reach_the_subscriber(addr: SocketAddr, id: &str) -> Result<(), String> {
    let topic = format!("props/{id}");
    let mut s = v5(addr, &format!("{id}-s"))?;
    sub(&mut s, true, &topic, 1)?;
    let mut p = v5(addr, &format!("{id}-p"))?;
    let props = Props::new()
        .byte(0x01, 1)
        .str(0x03, "application/json")
        .str(0x08, "reply/here")
        .bin(0x09, b"\x01\x02\x03")
        .user("a", "1")
        .user("b", "2")
        .user("a", "3");
    pub1(&mut p, true, &topic, b"{}", Some(&props))?;
    let m = s.expect_publish(true)?;
    check(
        m.prop(0x01) == Some(&[1][..]),
        format!("payload format: {m:?}"),
    )?;
    check(
        m.prop_str(0x03).as_deref() == Some("application/json"),
        format!("content type: {m:?}"),
    )?;
    check(
        m.prop_str(0x08).as_deref() == Some("reply/here"),
        format!("response topic: {m:?}"),
    )?;
    check(
        m.prop(0x09) == Some(&[0, 3, 1, 2, 3][..]),
        format!("correlation data: {m:?}"),
    )?;
    let user = m.user_props();
    let want: Vec<(String, String)> = [("a", "1"), ("b", "2"), ("a", "3")]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    check(user == want, format!("user properties in order: {user:?}"))
}

fn mqtt5_3_3_2_3_8_subscription_identifiers_come_with_deliveries(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let topic = format!("sid/{id}/x");
    let mut s = v5(addr, &format!("{id}-s"))?;
    s.send(&subscribe(
        1,
        Some(&Props::new().varint(0x0b, 7)),
        &[(&format!("sid/{id}/+"), 0)],
    ));
    check(s.expect()?.kind() == 9, "SUBACK")?;
    s.send(&subscribe(
        2,
        Some(&Props::new().varint(0x0b, 300)),
        &[(&format!("sid/{id}/#"), 0)],
    ));
    check(s.expect()?.kind() == 9, "SUBACK")?;
    let mut p = v5(addr, &format!("{id}-p"))?;
    p.send(&publish(
        0,
        false,
        false,
        &topic,
        0,
        Some(&Props::new()),
        b"x",
    ));
    // One copy with both identifiers (MQTT-3.3.4-4), or a copy per subscription, each with its
    // own (MQTT-3.3.4-5): every matching subscription's identifier reaches the client.
    let mut ids = s.expect_publish(true)?.sub_ids();
    while let Next::Packet(p) = s.next(SHORT) {
        ids.extend(p.publish(true).sub_ids());
    }
    ids.sort_unstable();
    check(ids == [7, 300], format!("subscription identifiers {ids:?}"))
}

fn mqtt5_3_3_2_3_3_message_expiry_is_counted_down_and_expired_messages_are_not_delivered(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let topic = format!("exp/{id}");
    let mut p = v5(addr, &format!("{id}-p"))?;
    p.send(&publish(
        1,
        false,
        true,
        &topic,
        3,
        Some(&Props::new().u32(0x02, 2)),
        b"soon gone",
    ));
    check(p.expect()?.kind() == 4, "PUBACK")?;
    let mut s = v5(addr, &format!("{id}-s"))?;
    sub(&mut s, true, &topic, 1)?;
    let m = s.expect_publish(true)?;
    check(
        m.message_expiry().is_some_and(|e| e <= 2),
        format!("expiry not carried or not counted down: {m:?}"),
    )?;
    std::thread::sleep(Duration::from_millis(3100));
    let mut late = v5(addr, &format!("{id}-late"))?;
    sub(&mut late, true, &topic, 1)?;
    late.quiet_for(SHORT)
}

fn mqtt5_3_3_4_9_the_client_s_receive_maximum_bounds_deliveries_in_flight(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let topic = format!("rm/{id}");
    let mut s = open(
        addr,
        &Connect::v5(&format!("{id}-s")).props(Props::new().u16(0x21, 2)),
    )?;
    sub(&mut s, true, &topic, 1)?;
    let mut p = v5(addr, &format!("{id}-p"))?;
    for i in 0..5u8 {
        pub1(&mut p, true, &topic, &[i], None)?;
    }
    let a = s.expect_publish(true)?;
    let b = s.expect_publish(true)?;
    s.quiet_for(SHORT)?;
    s.send(&ack(0x40, a.pkid));
    s.send(&ack(0x40, b.pkid));
    for _ in 0..3 {
        let m = s.expect_publish(true)?;
        s.send(&ack(0x40, m.pkid));
    }
    Ok(())
}

fn mqtt5_3_1_2_25_the_client_s_maximum_packet_size_is_honoured(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let topic = format!("mps/{id}");
    let mut s = open(
        addr,
        &Connect::v5(&format!("{id}-s")).props(Props::new().u32(0x27, 64)),
    )?;
    sub(&mut s, true, &topic, 0)?;
    let mut p = v5(addr, &format!("{id}-p"))?;
    pub1(&mut p, true, &topic, &[b'x'; 200], None)?;
    pub1(&mut p, true, &topic, b"small", None)?;
    let m = s.expect_publish(true)?;
    check(
        m.payload == b"small",
        format!("got {} bytes", m.payload.len()),
    )
}

fn mqtt5_3_3_2_3_4_a_topic_alias_names_the_topic_after_its_first_use(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let topic = format!("alias/{id}");
    let mut s = v5(addr, &format!("{id}-s"))?;
    sub(&mut s, true, &topic, 0)?;
    let mut p = v5(addr, &format!("{id}-p"))?;
    p.send(&publish(
        0,
        false,
        false,
        &topic,
        0,
        Some(&Props::new().u16(0x23, 1)),
        b"1",
    ));
    p.send(&publish(
        0,
        false,
        false,
        "",
        0,
        Some(&Props::new().u16(0x23, 1)),
        b"2",
    ));
    for want in [b"1", b"2"] {
        let m = s.expect_publish(true)?;
        check(m.topic == topic && m.payload == want, format!("{m:?}"))?;
    }
    Ok(())
}

fn mqtt5_3_3_2_3_4_a_topic_alias_above_the_maximum_closes(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let w = v5(addr, id)?;
    closes_after(
        w,
        &publish(
            1,
            false,
            false,
            "t",
            1,
            Some(&Props::new().u16(0x23, 60_000)),
            b"x",
        ),
    )
}

fn mqtt_4_3_3_qos_2_reaches_a_subscriber_once_despite_a_retransmission(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let topic = format!("eo/{id}");
    let mut s = v3(addr, &format!("{id}-s"))?;
    sub(&mut s, false, &topic, 2)?;
    let mut p = v3(addr, &format!("{id}-p"))?;
    p.send(&publish(2, false, false, &topic, 9, None, b"once"));
    check(p.expect()?.kind() == 5, "PUBREC")?;
    p.send(&publish(2, true, false, &topic, 9, None, b"once"));
    check(p.expect()?.kind() == 5, "PUBREC again")?;
    p.send(&ack(0x62, 9));
    check(p.expect()?.kind() == 7, "PUBCOMP")?;
    let m = s.expect_publish(false)?;
    s.send(&ack(0x50, m.pkid));
    check(s.expect()?.first == 0x62, "PUBREL")?;
    s.send(&ack(0x70, m.pkid));
    s.quiet_for(SHORT)
}

// ---- sessions ----------------------------------------------------------------------------------

fn mqtt5_3_1_2_4_clean_start_0_resumes_the_session_with_its_queued_messages(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let topic = format!("sess/{id}");
    let c = Connect::v5(id).props(Props::new().u32(0x11, 60));
    let mut s = open(addr, &c)?;
    sub(&mut s, true, &topic, 1)?;
    s.disconnect()?;
    let mut p = v5(addr, &format!("{id}-p"))?;
    pub1(&mut p, true, &topic, b"queued", None)?;
    let (mut s, ack) = Wire::connect(addr, &c.clean(false));
    check(
        ack.connack() == (true, 0),
        format!("session present expected: {ack:?}"),
    )?;
    let m = s.expect_publish(true)?;
    check(m.payload == b"queued" && m.qos == 1, format!("{m:?}"))
}

fn mqtt5_3_1_2_4_clean_start_1_with_an_expiry_starts_a_session_that_outlives_the_connection(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let topic = format!("sess/{id}");
    let mut s = open(addr, &Connect::v5(id).props(Props::new().u32(0x11, 60)))?;
    sub(&mut s, true, &topic, 1)?;
    s.hang_up()?;
    let mut p = v5(addr, &format!("{id}-p"))?;
    pub1(&mut p, true, &topic, b"queued", None)?;
    let (mut s, ack) = Wire::connect(
        addr,
        &Connect::v5(id)
            .clean(false)
            .props(Props::new().u32(0x11, 60)),
    );
    check(ack.connack() == (true, 0), format!("{ack:?}"))?;
    check(
        s.expect_publish(true)?.payload == b"queued",
        "queued message",
    )
}

fn mqtt5_3_1_2_11_2_session_expiry_0_ends_the_session_with_the_connection(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let mut s = open(addr, &Connect::v5(id).clean(false))?;
    sub(&mut s, true, &format!("sess/{id}"), 1)?;
    s.disconnect()?;
    let (_, ack) = Wire::connect(addr, &Connect::v5(id).clean(false));
    check(
        ack.connack() == (false, 0),
        format!("no session expected: {ack:?}"),
    )
}

fn mqtt_3_1_2_4_a_3_1_1_persistent_session_keeps_its_subscriptions(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let topic = format!("sess/{id}");
    let mut s = open(addr, &Connect::v311(id).clean(false))?;
    sub(&mut s, false, &topic, 1)?;
    s.disconnect()?;
    let mut p = v3(addr, &format!("{id}-p"))?;
    pub1(&mut p, false, &topic, b"queued", None)?;
    let (mut s, ack) = Wire::connect(addr, &Connect::v311(id).clean(false));
    check(ack.connack() == (true, 0), format!("{ack:?}"))?;
    check(
        s.expect_publish(false)?.payload == b"queued",
        "queued message",
    )
}

fn mqtt_4_4_0_1_unacknowledged_deliveries_are_resent_with_dup_and_their_packet_id(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let topic = format!("dup/{id}");
    let c = Connect::v311(id).clean(false);
    let mut s = open(addr, &c)?;
    sub(&mut s, false, &topic, 1)?;
    let mut p = v3(addr, &format!("{id}-p"))?;
    pub1(&mut p, false, &topic, b"again", None)?;
    let first = s.expect_publish(false)?;
    s.hang_up()?; // not acknowledged
    let (mut s, ack) = Wire::connect(addr, &c);
    check(ack.connack() == (true, 0), format!("{ack:?}"))?;
    let again = s.expect_publish(false)?;
    check(
        again.dup && again.pkid == first.pkid && again.payload == b"again",
        format!("resent as {again:?}, first {first:?}"),
    )
}

fn mqtt_3_1_4_2_a_second_connection_with_the_client_id_takes_over(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let mut first = v5(addr, id)?;
    let _second = v5(addr, id)?;
    let (closed, seen) = first.closes_within(CLOSE);
    check(closed, "the first connection stays open")?;
    check(
        seen.iter().all(|p| p.kind() == 14 && p.reason() == 0x8e),
        format!("expected DISCONNECT 0x8E only: {seen:?}"),
    )
}

/// Keep-alive 1 s and silence: open until 1.5 s have passed (checked up to 1.2 s), closed by
/// 2.5 s (1.5 s plus a second for the server's timer and the machine).
fn mqtt_3_1_2_24_the_keep_alive_is_enforced(addr: SocketAddr, id: &str) -> Result<(), String> {
    let mut w = open(addr, &Connect::v311(id).keep_alive(1))?;
    w.quiet_for(Duration::from_millis(1200))
        .map_err(|e| format!("closed before 1.5 × keep-alive: {e}"))?;
    let (closed, _) = w.closes_within(Duration::from_millis(1300));
    check(
        closed,
        "still open 2.5 s after the last packet, keep-alive 1 s",
    )
}

fn mqtt_3_12_4_1_pingreq_gets_pingresp(addr: SocketAddr, id: &str) -> Result<(), String> {
    let mut w = v3(addr, id)?;
    w.send(&[0xc0, 0]);
    check(w.expect()?.first == 0xd0, "PINGRESP")
}

fn mqtt5_3_11_3_unsubscribe_says_which_subscriptions_existed(
    addr: SocketAddr,
    id: &str,
) -> Result<(), String> {
    let mut w = v5(addr, id)?;
    sub(&mut w, true, "u/a", 0)?;
    w.send(&unsubscribe(3, true, &["u/a", "u/never"]));
    let p = w.expect()?;
    check(
        p.kind() == 11 && p.codes(true) == [0x00, 0x11],
        format!("{p:?}"),
    )
}

/// The cases, in the order they run.
const CASES: &[(&str, Case)] = &[
    (
        "mqtt_3_1_2_2_an_unsupported_protocol_level_gets_connack_0x01",
        mqtt_3_1_2_2_an_unsupported_protocol_level_gets_connack_0x01,
    ),
    (
        "mqtt_3_1_2_3_the_reserved_connect_flag_closes",
        mqtt_3_1_2_3_the_reserved_connect_flag_closes,
    ),
    (
        "mqtt_3_1_0_2_a_second_connect_closes",
        mqtt_3_1_0_2_a_second_connect_closes,
    ),
    (
        "mqtt_3_1_3_8_an_empty_client_id_needs_a_clean_session",
        mqtt_3_1_3_8_an_empty_client_id_needs_a_clean_session,
    ),
    (
        "mqtt_3_1_3_6_an_empty_client_id_with_a_clean_session_is_accepted",
        mqtt_3_1_3_6_an_empty_client_id_with_a_clean_session_is_accepted,
    ),
    (
        "mqtt5_3_2_2_3_7_an_empty_client_id_gets_an_assigned_one",
        mqtt5_3_2_2_3_7_an_empty_client_id_gets_an_assigned_one,
    ),
    (
        "mqtt5_3_1_2_11_6_receive_maximum_0_is_a_protocol_error",
        mqtt5_3_1_2_11_6_receive_maximum_0_is_a_protocol_error,
    ),
    (
        "mqtt5_2_2_2_2_a_repeated_property_is_a_protocol_error",
        mqtt5_2_2_2_2_a_repeated_property_is_a_protocol_error,
    ),
    (
        "mqtt_3_1_2_2_mqtt_3_1_is_accepted",
        mqtt_3_1_2_2_mqtt_3_1_is_accepted,
    ),
    (
        "mqtt_1_5_4_2_u0000_in_a_topic_closes",
        mqtt_1_5_4_2_u0000_in_a_topic_closes,
    ),
    ("mqtt_3_3_1_4_qos_3_closes", mqtt_3_3_1_4_qos_3_closes),
    (
        "mqtt_3_3_2_2_a_wildcard_in_a_topic_name_closes",
        mqtt_3_3_2_2_a_wildcard_in_a_topic_name_closes,
    ),
    (
        "mqtt_3_6_1_1_pubrel_with_flags_0000_closes",
        mqtt_3_6_1_1_pubrel_with_flags_0000_closes,
    ),
    (
        "mqtt_3_8_1_1_subscribe_with_flags_0000_closes",
        mqtt_3_8_1_1_subscribe_with_flags_0000_closes,
    ),
    (
        "mqtt_3_8_3_4_reserved_requested_qos_bits_close",
        mqtt_3_8_3_4_reserved_requested_qos_bits_close,
    ),
    (
        "mqtt5_3_8_3_5_reserved_subscription_option_bits_close",
        mqtt5_3_8_3_5_reserved_subscription_option_bits_close,
    ),
    (
        "mqtt_3_8_3_3_a_subscribe_without_filters_closes",
        mqtt_3_8_3_3_a_subscribe_without_filters_closes,
    ),
    (
        "mqtt_4_7_1_invalid_filters_are_not_granted",
        mqtt_4_7_1_invalid_filters_are_not_granted,
    ),
    (
        "mqtt_3_14_4_3_a_normal_disconnect_discards_the_will",
        mqtt_3_14_4_3_a_normal_disconnect_discards_the_will,
    ),
    (
        "mqtt5_3_14_2_1_disconnect_0x04_publishes_the_will",
        mqtt5_3_14_2_1_disconnect_0x04_publishes_the_will,
    ),
    (
        "mqtt_3_1_2_8_the_will_is_published_when_the_network_fails",
        mqtt_3_1_2_8_the_will_is_published_when_the_network_fails,
    ),
    (
        "mqtt5_3_1_3_2_2_the_will_waits_for_its_delay",
        mqtt5_3_1_3_2_2_the_will_waits_for_its_delay,
    ),
    (
        "mqtt_3_8_4_6_delivered_qos_is_the_lower_of_publish_and_subscription",
        mqtt_3_8_4_6_delivered_qos_is_the_lower_of_publish_and_subscription,
    ),
    (
        "mqtt_3_3_1_9_a_live_delivery_has_retain_0",
        mqtt_3_3_1_9_a_live_delivery_has_retain_0,
    ),
    (
        "mqtt_3_3_1_6_a_new_subscription_gets_the_retained_message_with_retain_1",
        mqtt_3_3_1_6_a_new_subscription_gets_the_retained_message_with_retain_1,
    ),
    (
        "mqtt5_3_8_3_1_retain_handling_1_and_2",
        mqtt5_3_8_3_1_retain_handling_1_and_2,
    ),
    ("mqtt5_3_8_3_1_no_local", mqtt5_3_8_3_1_no_local),
    (
        "mqtt5_3_8_3_1_retain_as_published",
        mqtt5_3_8_3_1_retain_as_published,
    ),
    (
        "mqtt5_3_3_2_3_properties_reach_the_subscriber",
        mqtt5_3_3_2_3_properties_reach_the_subscriber,
    ),
    (
        "mqtt5_3_3_2_3_8_subscription_identifiers_come_with_deliveries",
        mqtt5_3_3_2_3_8_subscription_identifiers_come_with_deliveries,
    ),
    (
        "mqtt5_3_3_2_3_3_message_expiry_is_counted_down_and_expired_messages_are_not_delivered",
        mqtt5_3_3_2_3_3_message_expiry_is_counted_down_and_expired_messages_are_not_delivered,
    ),
    (
        "mqtt5_3_3_4_9_the_client_s_receive_maximum_bounds_deliveries_in_flight",
        mqtt5_3_3_4_9_the_client_s_receive_maximum_bounds_deliveries_in_flight,
    ),
    (
        "mqtt5_3_1_2_25_the_client_s_maximum_packet_size_is_honoured",
        mqtt5_3_1_2_25_the_client_s_maximum_packet_size_is_honoured,
    ),
    (
        "mqtt5_3_3_2_3_4_a_topic_alias_names_the_topic_after_its_first_use",
        mqtt5_3_3_2_3_4_a_topic_alias_names_the_topic_after_its_first_use,
    ),
    (
        "mqtt5_3_3_2_3_4_a_topic_alias_above_the_maximum_closes",
        mqtt5_3_3_2_3_4_a_topic_alias_above_the_maximum_closes,
    ),
    (
        "mqtt_4_3_3_qos_2_reaches_a_subscriber_once_despite_a_retransmission",
        mqtt_4_3_3_qos_2_reaches_a_subscriber_once_despite_a_retransmission,
    ),
    (
        "mqtt5_3_1_2_4_clean_start_0_resumes_the_session_with_its_queued_messages",
        mqtt5_3_1_2_4_clean_start_0_resumes_the_session_with_its_queued_messages,
    ),
    (
        "mqtt5_3_1_2_4_clean_start_1_with_an_expiry_starts_a_session_that_outlives_the_connection",
        mqtt5_3_1_2_4_clean_start_1_with_an_expiry_starts_a_session_that_outlives_the_connection,
    ),
    (
        "mqtt5_3_1_2_11_2_session_expiry_0_ends_the_session_with_the_connection",
        mqtt5_3_1_2_11_2_session_expiry_0_ends_the_session_with_the_connection,
    ),
    (
        "mqtt_3_1_2_4_a_3_1_1_persistent_session_keeps_its_subscriptions",
        mqtt_3_1_2_4_a_3_1_1_persistent_session_keeps_its_subscriptions,
    ),
    (
        "mqtt_4_4_0_1_unacknowledged_deliveries_are_resent_with_dup_and_their_packet_id",
        mqtt_4_4_0_1_unacknowledged_deliveries_are_resent_with_dup_and_their_packet_id,
    ),
    (
        "mqtt_3_1_4_2_a_second_connection_with_the_client_id_takes_over",
        mqtt_3_1_4_2_a_second_connection_with_the_client_id_takes_over,
    ),
    (
        "mqtt_3_1_2_24_the_keep_alive_is_enforced",
        mqtt_3_1_2_24_the_keep_alive_is_enforced,
    ),
    (
        "mqtt_3_12_4_1_pingreq_gets_pingresp",
        mqtt_3_12_4_1_pingreq_gets_pingresp,
    ),
    (
        "mqtt5_3_11_3_unsubscribe_says_which_subscriptions_existed",
        mqtt5_3_11_3_unsubscribe_says_which_subscriptions_existed,
    ),
];

/// How a case goes on Mosquitto when it does not simply pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnMosquitto {
    /// Fails every time; checked to still fail.
    Fails,
    /// Passes or fails from one run to the next (timing); not asserted either way.
    Varies,
}

/// Cases Mosquitto 2.0 (Debian's) does not reliably pass, and why.
const MOSQUITTO_DIFFERS: &[(&str, OnMosquitto, &str)] = &[(
    "mqtt_3_1_2_24_the_keep_alive_is_enforced",
    OnMosquitto::Varies,
    "Mosquitto 2.0 enforces keep-alives from a periodic check: with keep-alive 1 s an idle \
     broker closed the connection 4.7-5.8 s after the CONNACK (24 trials, measured), not by \
     1.5 s + 1 s; on a broker that is busy with other clients the check can fall inside the \
     window, so the case passes there now and then",
)];

/// Runs every case; returns the failures as (case, why).
fn run_all(addr: SocketAddr) -> Vec<(&'static str, String)> {
    let mut failed = Vec::new();
    for (i, (name, case)) in CASES.iter().enumerate() {
        let id = format!("c{i}");
        if let Err(why) = case(addr, &id) {
            failed.push((*name, why));
        }
    }
    failed
}

#[test]
fn outpost_passes_every_case() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        dir.path(),
        "[mqtt]\nlisten = \"127.0.0.1:0\"\nallow_anonymous = true\ntopic_alias_maximum = 10\n\
         [mqtt.acl]\npublish = [\"#\"]\nsubscribe = [\"#\"]\n",
    );
    let line = d.wait_for_log("MQTT listener bound", Duration::from_secs(10));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let addr: SocketAddr = v["addr"].as_str().unwrap().parse().unwrap();
    let failed = run_all(addr);
    assert!(
        failed.is_empty(),
        "{} of {} cases failed on Outpost:\n{}",
        failed.len(),
        CASES.len(),
        failed
            .iter()
            .map(|(n, w)| format!("  {n}: {w}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    d.terminate(Duration::from_secs(15));
}

/// Mosquitto on a free loopback port, anonymous, in memory; killed on drop.
struct Mosquitto {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mosquitto() -> Mosquitto {
    let bin = outpost_e2e::find_command("mosquitto")
        .or_else(|| {
            let sbin = std::path::PathBuf::from("/usr/sbin/mosquitto");
            sbin.exists().then_some(sbin)
        })
        .unwrap_or_else(|| require_command("mosquitto"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mosquitto");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "mosquitto did not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Mosquitto {
        child,
        addr,
        _dir: dir,
    }
}

#[test]
fn mosquitto_as_the_reference_passes_every_case_it_is_not_known_to_fail() {
    let m = mosquitto();
    let failed = run_all(m.addr);
    let mut wrong = Vec::new();
    for (name, why) in &failed {
        if !MOSQUITTO_DIFFERS.iter().any(|(n, ..)| n == name) {
            wrong.push(format!("  {name}: failed on Mosquitto: {why}"));
        }
    }
    for (name, how, reason) in MOSQUITTO_DIFFERS {
        if *how == OnMosquitto::Fails && !failed.iter().any(|(n, _)| n == name) {
            wrong.push(format!(
                "  {name}: listed as failing on Mosquitto ({reason}) but passes: update the list"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "Mosquitto results differ from the table:\n{}",
        wrong.join("\n")
    );
}
