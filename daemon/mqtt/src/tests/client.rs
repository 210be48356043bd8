//! A minimal MQTT client for the unit tests, written from the specification (not with the
//! server's encoder): it builds client packets byte by byte and parses what the server sends.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

pub fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u16).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

pub fn varint(b: &mut Vec<u8>, mut v: usize) {
    loop {
        let mut byte = (v & 0x7f) as u8;
        v >>= 7;
        if v > 0 {
            byte |= 0x80;
        }
        b.push(byte);
        if v == 0 {
            return;
        }
    }
}

pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// A CONNECT with user `user`, password `secret`.
pub fn connect(level: u8, client_id: &str, user: &str, clean: bool, props: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    put_str(&mut b, "MQTT");
    b.push(level);
    b.push(0xc0 | if clean { 0x02 } else { 0 });
    b.extend_from_slice(&60u16.to_be_bytes());
    if level == 5 {
        varint(&mut b, props.len());
        b.extend_from_slice(props);
    }
    put_str(&mut b, client_id);
    put_str(&mut b, user);
    put_str(&mut b, "secret");
    packet(0x10, &b)
}

/// A PUBLISH; `props` only for MQTT 5 (`Some`).
pub fn publish(
    qos: u8,
    dup: bool,
    topic: &str,
    pkid: u16,
    props: Option<&[u8]>,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = Vec::new();
    put_str(&mut b, topic);
    if qos > 0 {
        b.extend_from_slice(&pkid.to_be_bytes());
    }
    if let Some(p) = props {
        varint(&mut b, p.len());
        b.extend_from_slice(p);
    }
    b.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | if dup { 0x08 } else { 0 }, &b)
}

pub fn subscribe(pkid: u16, filter: &str, options: u8, v5: bool) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    if v5 {
        b.push(0);
    }
    put_str(&mut b, filter);
    b.push(options);
    packet(0x82, &b)
}

pub fn ack(first: u8, pkid: u16) -> Vec<u8> {
    let mut b = vec![first, 2];
    b.extend_from_slice(&pkid.to_be_bytes());
    b
}

/// A packet from the server: its first byte and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Got {
    pub first: u8,
    pub body: Vec<u8>,
}

impl Got {
    pub fn kind(&self) -> u8 {
        self.first >> 4
    }

    /// The packet identifier of an ack or a QoS > 0 PUBLISH.
    pub fn pkid(&self) -> u16 {
        if self.kind() == 3 {
            let tl = usize::from(u16::from_be_bytes([self.body[0], self.body[1]]));
            u16::from_be_bytes([self.body[2 + tl], self.body[3 + tl]])
        } else {
            u16::from_be_bytes([self.body[0], self.body[1]])
        }
    }

    /// The reason code of an MQTT 5 ack (0 when absent).
    pub fn reason(&self) -> u8 {
        self.body.get(2).copied().unwrap_or(0)
    }

    pub fn topic(&self) -> String {
        let tl = usize::from(u16::from_be_bytes([self.body[0], self.body[1]]));
        String::from_utf8(self.body[2..2 + tl].to_vec()).unwrap()
    }

    pub fn qos(&self) -> u8 {
        (self.first >> 1) & 3
    }

    pub fn dup(&self) -> bool {
        self.first & 0x08 != 0
    }
}

pub struct Client {
    pub io: DuplexStream,
    buf: BytesMut,
}

impl Client {
    pub fn new(io: DuplexStream) -> Client {
        Client {
            io,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    /// The next packet, or `None` when the server closed or nothing came within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Got> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(got) = self.parse() {
                return Some(got);
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.io.read(&mut chunk))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.put_slice(&chunk[..n]);
        }
    }

    /// The next packet; panics if none comes.
    pub async fn expect(&mut self) -> Got {
        self.next(Duration::from_secs(5))
            .await
            .expect("a packet from the server")
    }

    fn parse(&mut self) -> Option<Got> {
        let mut len = 0usize;
        let mut i = 1;
        loop {
            let b = *self.buf.get(i)?;
            len |= usize::from(b & 0x7f) << (7 * (i - 1));
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if self.buf.len() < i + len {
            return None;
        }
        let p = self.buf.split_to(i + len);
        Some(Got {
            first: p[0],
            body: p[i..].to_vec(),
        })
    }
}
