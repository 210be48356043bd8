//! A blocking MQTT client for conformance tests, written byte by byte from the MQTT 3.1.1 and
//! 5.0 specifications: it sends exactly what a case asks for (including what the
//! specifications forbid) and parses what the server answers, with nothing in between that
//! could hide a server's mistake. Independent of Outpost's own codec.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// An MQTT 5 property section being built (without its length).
#[derive(Debug, Clone, Default)]
pub struct Props(pub Vec<u8>);

impl Props {
    pub fn new() -> Props {
        Props::default()
    }
    pub fn byte(mut self, id: u8, v: u8) -> Props {
        self.0.extend_from_slice(&[id, v]);
        self
    }
    pub fn u16(mut self, id: u8, v: u16) -> Props {
        self.0.push(id);
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(mut self, id: u8, v: u32) -> Props {
        self.0.push(id);
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn str(mut self, id: u8, s: &str) -> Props {
        self.0.push(id);
        put_str(&mut self.0, s);
        self
    }
    pub fn bin(mut self, id: u8, b: &[u8]) -> Props {
        self.0.push(id);
        put_bin(&mut self.0, b);
        self
    }
    pub fn user(mut self, k: &str, v: &str) -> Props {
        self.0.push(0x26);
        put_str(&mut self.0, k);
        put_str(&mut self.0, v);
        self
    }
    pub fn varint(mut self, id: u8, v: usize) -> Props {
        self.0.push(id);
        put_varint(&mut self.0, v);
        self
    }
    fn section(&self, out: &mut Vec<u8>) {
        put_varint(out, self.0.len());
        out.extend_from_slice(&self.0);
    }
}

pub fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bin(out, s.as_bytes());
}

pub fn put_bin(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&u16::try_from(b.len()).expect("short field").to_be_bytes());
    out.extend_from_slice(b);
}

pub fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let mut b = u8::try_from(v & 0x7f).expect("7 bits");
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        out.push(b);
        if v == 0 {
            return;
        }
    }
}

pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// A will for [`Connect`].
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub props: Props,
}

/// A CONNECT being built.
#[derive(Debug, Clone)]
pub struct Connect {
    pub protocol: &'static str,
    pub level: u8,
    pub client_id: String,
    pub clean: bool,
    pub keep_alive: u16,
    pub login: Option<(String, String)>,
    pub will: Option<Will>,
    pub props: Props,
    /// Raw connect flags OR'ed in (to set reserved bits).
    pub extra_flags: u8,
}

impl Connect {
    pub fn v311(client_id: &str) -> Connect {
        Connect {
            protocol: "MQTT",
            level: 4,
            client_id: client_id.to_owned(),
            clean: true,
            keep_alive: 60,
            login: None,
            will: None,
            props: Props::new(),
            extra_flags: 0,
        }
    }

    pub fn v5(client_id: &str) -> Connect {
        Connect {
            level: 5,
            ..Connect::v311(client_id)
        }
    }

    pub fn clean(mut self, clean: bool) -> Connect {
        self.clean = clean;
        self
    }

    pub fn props(mut self, props: Props) -> Connect {
        self.props = props;
        self
    }

    pub fn will(mut self, will: Will) -> Connect {
        self.will = Some(will);
        self
    }

    pub fn keep_alive(mut self, secs: u16) -> Connect {
        self.keep_alive = secs;
        self
    }

    pub fn login(mut self, user: &str, password: &str) -> Connect {
        self.login = Some((user.to_owned(), password.to_owned()));
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_str(&mut b, self.protocol);
        b.push(self.level);
        let mut flags = self.extra_flags;
        if self.clean {
            flags |= 0x02;
        }
        if let Some(w) = &self.will {
            flags |= 0x04 | (w.qos << 3) | if w.retain { 0x20 } else { 0 };
        }
        if self.login.is_some() {
            flags |= 0xc0;
        }
        b.push(flags);
        b.extend_from_slice(&self.keep_alive.to_be_bytes());
        if self.level == 5 {
            self.props.section(&mut b);
        }
        put_str(&mut b, &self.client_id);
        if let Some(w) = &self.will {
            if self.level == 5 {
                w.props.section(&mut b);
            }
            put_str(&mut b, &w.topic);
            put_bin(&mut b, &w.payload);
        }
        if let Some((u, p)) = &self.login {
            put_str(&mut b, u);
            put_str(&mut b, p);
        }
        packet(0x10, &b)
    }
}

/// A PUBLISH; `props` is written only for MQTT 5 (`Some`).
pub fn publish(
    qos: u8,
    dup: bool,
    retain: bool,
    topic: &str,
    pkid: u16,
    props: Option<&Props>,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = Vec::new();
    put_str(&mut b, topic);
    if qos > 0 {
        b.extend_from_slice(&pkid.to_be_bytes());
    }
    if let Some(p) = props {
        p.section(&mut b);
    }
    b.extend_from_slice(payload);
    let first = 0x30 | (qos << 1) | if dup { 0x08 } else { 0 } | u8::from(retain);
    packet(first, &b)
}

/// A SUBSCRIBE with (filter, options byte) pairs; `props` only for MQTT 5.
pub fn subscribe(pkid: u16, props: Option<&Props>, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    if let Some(p) = props {
        p.section(&mut b);
    }
    for (f, o) in filters {
        put_str(&mut b, f);
        b.push(*o);
    }
    packet(0x82, &b)
}

pub fn unsubscribe(pkid: u16, v5: bool, filters: &[&str]) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    if v5 {
        b.push(0);
    }
    for f in filters {
        put_str(&mut b, f);
    }
    packet(0xa2, &b)
}

/// PUBACK 0x40, PUBREC 0x50, PUBREL 0x62, PUBCOMP 0x70 with a packet identifier.
pub fn ack(first: u8, pkid: u16) -> Vec<u8> {
    let mut b = vec![first, 2];
    b.extend_from_slice(&pkid.to_be_bytes());
    b
}

/// A packet from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkt {
    pub first: u8,
    pub body: Vec<u8>,
}

/// A parsed PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub topic: String,
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    pub pkid: u16,
    /// MQTT 5 properties as (id, raw value bytes), in order.
    pub props: Vec<(u8, Vec<u8>)>,
    pub payload: Vec<u8>,
}

impl Msg {
    /// The first property `id`'s raw value.
    pub fn prop(&self, id: u8) -> Option<&[u8]> {
        self.props
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, v)| v.as_slice())
    }

    /// A string property's text (its length prefix dropped).
    pub fn prop_str(&self, id: u8) -> Option<String> {
        self.prop(id)
            .map(|v| String::from_utf8_lossy(&v[2..]).into_owned())
    }

    pub fn user_props(&self) -> Vec<(String, String)> {
        self.props
            .iter()
            .filter(|(i, _)| *i == 0x26)
            .map(|(_, v)| {
                let kl = usize::from(u16::from_be_bytes([v[0], v[1]]));
                let k = String::from_utf8_lossy(&v[2..2 + kl]).into_owned();
                let val = String::from_utf8_lossy(&v[4 + kl..]).into_owned();
                (k, val)
            })
            .collect()
    }

    pub fn sub_ids(&self) -> Vec<usize> {
        self.props
            .iter()
            .filter(|(i, _)| *i == 0x0b)
            .map(|(_, v)| {
                v.iter()
                    .enumerate()
                    .map(|(n, b)| usize::from(b & 0x7f) << (7 * n))
                    .sum()
            })
            .collect()
    }

    pub fn message_expiry(&self) -> Option<u32> {
        self.prop(0x02)
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }
}

impl Pkt {
    pub fn kind(&self) -> u8 {
        self.first >> 4
    }

    /// The packet identifier of an acknowledgement, SUBACK or UNSUBACK.
    pub fn pkid(&self) -> u16 {
        u16::from_be_bytes([self.body[0], self.body[1]])
    }

    /// The reason code of an MQTT 5 acknowledgement or DISCONNECT (0 when absent).
    pub fn reason(&self) -> u8 {
        match self.kind() {
            14 => self.body.first().copied().unwrap_or(0),
            2 => self.body.get(1).copied().unwrap_or(0),
            _ => self.body.get(2).copied().unwrap_or(0),
        }
    }

    /// SUBACK / UNSUBACK codes (MQTT 5 property section skipped when `v5`).
    pub fn codes(&self, v5: bool) -> Vec<u8> {
        let mut at = 2;
        if v5 {
            let (len, n) = varint_at(&self.body[at..]);
            at += n + len;
        }
        self.body[at..].to_vec()
    }

    /// CONNACK: (session present, code).
    pub fn connack(&self) -> (bool, u8) {
        (self.body[0] & 1 == 1, self.body[1])
    }

    /// An MQTT 5 CONNACK property's raw value.
    pub fn connack_prop(&self, id: u8) -> Option<Vec<u8>> {
        let (len, n) = varint_at(&self.body[2..]);
        parse_props(&self.body[2 + n..2 + n + len])
            .into_iter()
            .find(|(i, _)| *i == id)
            .map(|(_, v)| v)
    }

    /// This PUBLISH, parsed (`v5`: with properties).
    pub fn publish(&self, v5: bool) -> Msg {
        assert_eq!(self.kind(), 3, "expected PUBLISH, got {self:?}");
        let qos = (self.first >> 1) & 3;
        let tl = usize::from(u16::from_be_bytes([self.body[0], self.body[1]]));
        let topic = String::from_utf8_lossy(&self.body[2..2 + tl]).into_owned();
        let mut at = 2 + tl;
        let pkid = if qos > 0 {
            at += 2;
            u16::from_be_bytes([self.body[at - 2], self.body[at - 1]])
        } else {
            0
        };
        let mut props = Vec::new();
        if v5 {
            let (len, n) = varint_at(&self.body[at..]);
            props = parse_props(&self.body[at + n..at + n + len]);
            at += n + len;
        }
        Msg {
            topic,
            qos,
            dup: self.first & 0x08 != 0,
            retain: self.first & 1 == 1,
            pkid,
            props,
            payload: self.body[at..].to_vec(),
        }
    }
}

fn varint_at(b: &[u8]) -> (usize, usize) {
    let mut v = 0;
    for (i, byte) in b.iter().enumerate().take(4) {
        v |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return (v, i + 1);
        }
    }
    (v, 4)
}

/// Properties as (id, raw value), knowing each identifier's type.
fn parse_props(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((&id, rest)) = b.split_first() {
        let len = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => 1,
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            0x0b => varint_at(rest).1,
            0x26 => {
                let kl = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let vl = usize::from(u16::from_be_bytes([rest[2 + kl], rest[3 + kl]]));
                4 + kl + vl
            }
            _ => 2 + usize::from(u16::from_be_bytes([rest[0], rest[1]])),
        };
        out.push((id, rest[..len].to_vec()));
        b = &rest[len..];
    }
    out
}

/// What reading the connection gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Packet(Pkt),
    /// The server closed the connection.
    Closed,
    /// Nothing within the wait.
    Nothing,
}

/// One connection to the server under test.
#[derive(Debug)]
pub struct Wire {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    pub fn open(addr: SocketAddr) -> Wire {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let _ = s.set_nodelay(true);
        Wire { s, buf: Vec::new() }
    }

    /// Opens a connection, sends `connect` and returns it with the CONNACK.
    pub fn connect(addr: SocketAddr, connect: &Connect) -> (Wire, Pkt) {
        let mut w = Wire::open(addr);
        w.send(&connect.encode());
        match w.next(Duration::from_secs(5)) {
            Next::Packet(p) if p.kind() == 2 => (w, p),
            other => panic!("no CONNACK for {connect:?}: {other:?}"),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        // A server that closed already makes this fail; the next read says so.
        let _ = self.s.write_all(bytes);
    }

    /// The next packet within `wait`.
    pub fn next(&mut self, wait: Duration) -> Next {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(p) = self.parse() {
                return Next::Packet(p);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Next::Nothing;
            }
            let _ = self.s.set_read_timeout(Some(left));
            let mut chunk = [0u8; 8192];
            match self.s.read(&mut chunk) {
                Ok(0) => return Next::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Next::Nothing;
                }
                Err(_) => return Next::Closed,
            }
        }
    }

    /// The next packet, which must come within 5 s.
    pub fn expect(&mut self) -> Result<Pkt, String> {
        match self.next(Duration::from_secs(5)) {
            Next::Packet(p) => Ok(p),
            other => Err(format!("expected a packet, got {other:?}")),
        }
    }

    /// The next packet must be a PUBLISH.
    pub fn expect_publish(&mut self, v5: bool) -> Result<Msg, String> {
        let p = self.expect()?;
        if p.kind() != 3 {
            return Err(format!("expected PUBLISH, got {p:?}"));
        }
        Ok(p.publish(v5))
    }

    /// Whether the server closes the connection within `wait` (after any packets, for example
    /// a DISCONNECT, which are returned).
    pub fn closes_within(&mut self, wait: Duration) -> (bool, Vec<Pkt>) {
        let deadline = Instant::now() + wait;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Next::Closed => return (true, seen),
                Next::Nothing => return (false, seen),
                Next::Packet(p) => seen.push(p),
            }
        }
    }

    /// Sends DISCONNECT (reason 0) and waits until the server has closed the connection: from
    /// then on the server has ended it (Outpost and Mosquitto both close the socket after the
    /// session is detached), so a test need not sleep hoping it did.
    pub fn disconnect(mut self) -> Result<(), String> {
        self.send(&[0xe0, 0]);
        self.wait_closed("DISCONNECT")
    }

    /// Ends the connection without a DISCONNECT, as a device that drops off does (the kernel
    /// still sends a FIN), and waits until the server has closed its side: from then on it has
    /// seen the connection end (session detached, will published).
    pub fn hang_up(mut self) -> Result<(), String> {
        let _ = self.s.shutdown(std::net::Shutdown::Write);
        self.wait_closed("hang-up")
    }

    fn wait_closed(&mut self, after: &str) -> Result<(), String> {
        match self.closes_within(Duration::from_secs(5)) {
            (true, _) => Ok(()),
            (false, seen) => Err(format!(
                "the server kept the connection open 5 s after the {after} (sent {seen:?})"
            )),
        }
    }

    /// Nothing arrives within `wait` (and the connection stays open).
    pub fn quiet_for(&mut self, wait: Duration) -> Result<(), String> {
        match self.next(wait) {
            Next::Nothing => Ok(()),
            other => Err(format!("expected silence, got {other:?}")),
        }
    }

    fn parse(&mut self) -> Option<Pkt> {
        if self.buf.len() < 2 {
            return None;
        }
        let (len, n) = varint_at(&self.buf[1..]);
        if self.buf.len() < 1 + n + len {
            return None;
        }
        let body = self.buf[1 + n..1 + n + len].to_vec();
        let first = self.buf[0];
        self.buf.drain(..1 + n + len);
        Some(Pkt { first, body })
    }
}
