//! Hand-made MQTT bytes for the tests that must control the wire exactly (a DUP retransmission
//! before PUBREL, a PUBACK that must not come, a silent keep-alive): no client library hides
//! what is sent.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
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
