//! CoAP for tests and the bench client: a minimal RFC 7252 message codec written independently
//! of the daemon's (so the tests check the daemon against a second reading of the RFC), a
//! blocking request helper over UDP, and finding Debian's `coap-client`.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use crate::daemon::Daemon;
use crate::{SETUP_HINT, find_command};

pub const CON: u8 = 0;
pub const NON: u8 = 1;
pub const ACK: u8 = 2;
pub const RST: u8 = 3;

pub const GET: u8 = 0x01;
pub const POST: u8 = 0x02;
pub const PUT: u8 = 0x03;
pub const DELETE: u8 = 0x04;

pub const URI_PATH: u16 = 11;
pub const CONTENT_FORMAT: u16 = 12;
pub const MAX_AGE: u16 = 14;
pub const URI_QUERY: u16 = 15;
pub const BLOCK1: u16 = 27;
pub const SIZE1: u16 = 60;

/// One CoAP message. Options are kept in the order given; [`Message::encode`] sorts them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: u8,
    /// Code as `class << 5 | detail`: 0x02 POST, 0x41 2.01, 0x83 4.03.
    pub code: u8,
    pub mid: u16,
    pub token: Vec<u8>,
    pub options: Vec<(u16, Vec<u8>)>,
    pub payload: Vec<u8>,
}

impl Message {
    /// A request to `path` (`"t/room/temp"`) with Uri-Query arguments.
    pub fn request(
        kind: u8,
        code: u8,
        mid: u16,
        token: &[u8],
        path: &str,
        query: &[&str],
    ) -> Message {
        let mut options = Vec::new();
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            options.push((URI_PATH, segment.as_bytes().to_vec()));
        }
        for q in query {
            options.push((URI_QUERY, q.as_bytes().to_vec()));
        }
        Message {
            kind,
            code,
            mid,
            token: token.to_vec(),
            options,
            payload: Vec::new(),
        }
    }

    /// A CON POST of `payload` to `/t/{topic}?d={device}` with a Content-Format.
    pub fn post(
        mid: u16,
        topic: &str,
        device: &str,
        content_format: u16,
        payload: &[u8],
    ) -> Message {
        let token = mid.to_be_bytes();
        let mut m = Message::request(
            CON,
            POST,
            mid,
            &token,
            &format!("t/{topic}"),
            &[&format!("d={device}")],
        );
        m.options
            .push((CONTENT_FORMAT, uint(u32::from(content_format))));
        m.payload = payload.to_vec();
        m
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![
            0x40 | (self.kind << 4) | self.token.len() as u8,
            self.code,
            (self.mid >> 8) as u8,
            self.mid as u8,
        ];
        out.extend_from_slice(&self.token);
        let mut options = self.options.clone();
        options.sort_by_key(|(n, _)| *n); // stable: repeated options keep their order
        let mut last = 0u16;
        for (number, value) in &options {
            let delta = number - last;
            last = *number;
            let (d, d_ext) = nibble(u32::from(delta));
            let (l, l_ext) = nibble(value.len() as u32);
            out.push((d << 4) | l);
            out.extend_from_slice(&d_ext);
            out.extend_from_slice(&l_ext);
            out.extend_from_slice(value);
        }
        if !self.payload.is_empty() {
            out.push(0xFF);
            out.extend_from_slice(&self.payload);
        }
        out
    }

    /// Decodes a message; `None` if it is not well-formed.
    pub fn decode(bytes: &[u8]) -> Option<Message> {
        if bytes.len() < 4 || bytes[0] >> 6 != 1 {
            return None;
        }
        let tkl = usize::from(bytes[0] & 0xF);
        if tkl > 8 || bytes.len() < 4 + tkl {
            return None;
        }
        let mut m = Message {
            kind: (bytes[0] >> 4) & 0x3,
            code: bytes[1],
            mid: u16::from_be_bytes([bytes[2], bytes[3]]),
            token: bytes[4..4 + tkl].to_vec(),
            options: Vec::new(),
            payload: Vec::new(),
        };
        let mut at = 4 + tkl;
        let mut number = 0u32;
        while at < bytes.len() {
            if bytes[at] == 0xFF {
                if at + 1 == bytes.len() {
                    return None;
                }
                m.payload = bytes[at + 1..].to_vec();
                break;
            }
            let head = bytes[at];
            at += 1;
            let delta = extended(head >> 4, bytes, &mut at)?;
            let len = extended(head & 0xF, bytes, &mut at)? as usize;
            number += delta;
            let value = bytes.get(at..at + len)?;
            m.options
                .push((u16::try_from(number).ok()?, value.to_vec()));
            at += len;
        }
        Some(m)
    }

    /// `"2.01"` etc.
    pub fn code_text(&self) -> String {
        format!("{}.{:02}", self.code >> 5, self.code & 0x1F)
    }

    pub fn option(&self, number: u16) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(n, _)| *n == number)
            .map(|(_, v)| v.as_slice())
    }

    pub fn uint_option(&self, number: u16) -> Option<u32> {
        self.option(number)
            .map(|v| v.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// An option value in its shortest unsigned-integer form.
pub fn uint(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

/// A Block1/Block2 option value.
pub fn block(num: u32, more: bool, szx: u8) -> Vec<u8> {
    uint((num << 4) | (u32::from(more) << 3) | u32::from(szx))
}

fn nibble(value: u32) -> (u8, Vec<u8>) {
    match value {
        0..=12 => (value as u8, Vec::new()),
        13..=268 => (13, vec![(value - 13) as u8]),
        _ => (14, ((value - 269) as u16).to_be_bytes().to_vec()),
    }
}

fn extended(nibble: u8, bytes: &[u8], at: &mut usize) -> Option<u32> {
    match nibble {
        13 => {
            let v = u32::from(*bytes.get(*at)?) + 13;
            *at += 1;
            Some(v)
        }
        14 => {
            let v = u32::from(u16::from_be_bytes([*bytes.get(*at)?, *bytes.get(*at + 1)?])) + 269;
            *at += 2;
            Some(v)
        }
        15 => None,
        n => Some(u32::from(n)),
    }
}

/// A blocking UDP client bound to an ephemeral loopback port.
pub struct Client {
    pub socket: UdpSocket,
    pub server: SocketAddr,
}

impl Client {
    pub fn new(server: SocketAddr) -> Client {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
        Client { socket, server }
    }

    pub fn send(&self, bytes: &[u8]) {
        self.socket
            .send_to(bytes, self.server)
            .expect("send datagram");
    }

    /// The next datagram within `wait`, raw.
    pub fn recv_within(&self, wait: Duration) -> Option<Vec<u8>> {
        self.socket
            .set_read_timeout(Some(wait))
            .expect("set timeout");
        let mut buf = vec![0u8; 65_536];
        match self.socket.recv_from(&mut buf) {
            Ok((n, _)) => Some(buf[..n].to_vec()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("recv: {e}"),
        }
    }

    /// Sends a Confirmable request and waits for the response with its message id,
    /// retransmitting the same message like a CoAP client (every 2 s, 5 times at most).
    pub fn exchange(&self, request: &Message) -> Message {
        let bytes = request.encode();
        for _ in 0..5 {
            self.send(&bytes);
            while let Some(answer) = self.recv_within(Duration::from_secs(2)) {
                let m = Message::decode(&answer)
                    .unwrap_or_else(|| panic!("undecodable response {answer:02x?}"));
                if m.mid == request.mid {
                    return m;
                }
            }
        }
        panic!("no response to message {} within 10 s", request.mid)
    }
}

/// The daemon's CoAP address, from its "CoAP listener bound" log line.
pub fn coap_addr(daemon: &mut Daemon) -> SocketAddr {
    let line = daemon.wait_for_log("CoAP listener bound", Duration::from_secs(10));
    let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
    v["addr"]
        .as_str()
        .expect("addr field")
        .parse()
        .expect("socket addr")
}

/// Debian's `coap-client` from `libcoap3-bin` (installed as `coap-client-notls`, `-gnutls` or
/// `-openssl`, with `coap-client` as an alternative on some releases).
pub fn coap_client() -> PathBuf {
    [
        "coap-client",
        "coap-client-notls",
        "coap-client-gnutls",
        "coap-client-openssl",
    ]
    .into_iter()
    .find_map(find_command)
    .unwrap_or_else(|| {
        panic!("`coap-client` (Debian package libcoap3-bin) is not installed: {SETUP_HINT}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_round_trips_long_options_and_payload() {
        let mut m = Message::post(0x1234, "a/b", "dev", 50, b"{}");
        m.options.push((SIZE1, uint(70_000)));
        m.options.push((2048, vec![7; 300]));
        let decoded = Message::decode(&m.encode()).unwrap();
        assert_eq!(decoded.mid, 0x1234);
        assert_eq!(decoded.uint_option(SIZE1), Some(70_000));
        assert_eq!(decoded.option(2048).unwrap().len(), 300);
        assert_eq!(decoded.payload, b"{}");
        assert_eq!(
            Message {
                code: 0x83,
                ..decoded
            }
            .code_text(),
            "4.03"
        );
    }
}
