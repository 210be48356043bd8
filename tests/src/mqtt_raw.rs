//! Hand-made MQTT bytes for the tests that must control the wire exactly (a DUP retransmission
//! before PUBREL, a PUBACK that must not come, a silent keep-alive): no client library hides
//! what is sent.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// An MQTT UTF-8 string: 16-bit big-endian length, then the bytes.
pub fn mqtt_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&u16::try_from(s.len()).expect("short string").to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A packet with a one-byte remaining length (the tests' packets are under 128 bytes).
pub fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![header, u8::try_from(body.len()).expect("short packet")];
    p.extend_from_slice(body);
    p
}

/// A packet with any remaining length (variable-length encoding).
pub fn long_packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![header];
    let mut len = body.len();
    loop {
        let mut byte = u8::try_from(len % 128).expect("below 128");
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        p.push(byte);
        if len == 0 {
            break;
        }
    }
    p.extend_from_slice(body);
    p
}

/// Exactly `n` bytes from `s`; panics on a short read or a timeout.
pub fn read_exact_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("read from the MQTT server");
    buf
}

/// An MQTT 3.1.1 CONNECT: clean session, user name and password, no will.
pub fn connect_311(client_id: &str, user: &str, password: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    mqtt_str(&mut body, client_id);
    mqtt_str(&mut body, user);
    mqtt_str(&mut body, password);
    packet(0x10, &body)
}

/// Connects over MQTT 3.1.1 and asserts the CONNACK accepted the login. Reads time out after
/// `read_timeout`.
pub fn login_311(
    addr: SocketAddr,
    client_id: &str,
    user: &str,
    password: &str,
    keep_alive: u16,
    read_timeout: Duration,
) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect to the MQTT server");
    s.set_read_timeout(Some(read_timeout))
        .expect("read timeout");
    s.write_all(&connect_311(client_id, user, password, keep_alive))
        .expect("send CONNECT");
    assert_eq!(read_exact_n(&mut s, 4), [0x20, 2, 0, 0], "CONNACK accepted");
    s
}

/// Reads one short packet (remaining length under 128): (first byte, body). `None` when the
/// connection ends or a read times out.
pub fn read_short_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).ok()?;
    assert!(head[1] < 128, "unexpected long packet {head:?}");
    let mut body = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut body).ok()?;
    Some((head[0], body))
}

/// One MQTT 3.1.1 connection (client id `prefix`, clean session) that publishes on `topic` at
/// `qos` (1 or 2) one message at a time, payload `{prefix}-{n}`, until `stop` is set or the
/// connection fails (the server was killed). Pushes the payload of every message whose PUBACK
/// (QoS 1) or PUBREC (QoS 2) arrived: exactly the acknowledgement "acknowledged means durable"
/// is about (a library's "published" callback fires at PUBCOMP for QoS 2). Sleeps `pause`
/// between messages to pace the load. Panics on a refused CONNACK or an unexpected packet.
#[allow(clippy::disallowed_methods)] // std::thread::sleep: a blocking client thread
#[allow(clippy::too_many_arguments)] // one call site per test; a struct would only rename them
pub fn publish_until_closed(
    addr: SocketAddr,
    user: &str,
    secret: &str,
    prefix: &str,
    topic: &str,
    qos: u8,
    pause: Duration,
    acked: &Mutex<Vec<String>>,
    stop: &AtomicBool,
) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return;
    };
    if s.write_all(&connect_311(prefix, user, secret, 60)).is_err() {
        return;
    }
    match read_short_packet(&mut s) {
        Some((0x20, body)) => assert_eq!(body, [0, 0], "CONNACK refused"),
        _ => return, // killed before the CONNACK
    }
    for n in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        #[allow(clippy::cast_possible_truncation)] // n % 65000 + 1 fits
        let pkid = (n % 65000 + 1) as u16;
        let key = format!("{prefix}-{n}");
        let mut publish = Vec::new();
        mqtt_str(&mut publish, topic);
        publish.extend_from_slice(&pkid.to_be_bytes());
        publish.extend_from_slice(key.as_bytes());
        if s.write_all(&packet(0x30 | (qos << 1), &publish)).is_err() {
            return;
        }
        let expected = if qos == 1 { 0x40 } else { 0x50 };
        match read_short_packet(&mut s) {
            Some((kind, body)) if kind == expected && body == pkid.to_be_bytes() => {
                acked.lock().unwrap_or_else(|e| e.into_inner()).push(key);
            }
            Some(other) => panic!("unexpected {other:?} for QoS {qos} publish {pkid}"),
            None => return, // the daemon was killed before the ack
        }
        if qos == 2 {
            if s.write_all(&packet(0x62, &pkid.to_be_bytes())).is_err() {
                return;
            }
            match read_short_packet(&mut s) {
                Some((0x70, _)) => {}
                Some(other) => panic!("expected PUBCOMP, got {other:?}"),
                None => return,
            }
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
}
