//! CoAP messages on the wire (RFC 7252 §3, RFC 7959 §2.2), on top of `coap-lite`.
//!
//! `coap-lite` decodes and encodes; this module adds the checks it leaves out and decides what
//! a datagram is: a request to process, a message to reject with a Reset, or one to ignore
//! silently. The rules (RFC 7252 §4.2, §4.3, §5.4.1):
//!
//! * fewer than 4 bytes, or a version other than 1: silently ignored (no message id to answer);
//! * a format error (token length 9–15, a bad option delta or length, a payload marker with no
//!   payload, an Empty message with a token or body, a reserved code class): a Confirmable
//!   message gets a Reset, anything else is ignored;
//! * a Confirmable Empty message (a "CoAP ping") or a Confirmable response (we never asked
//!   anything): Reset;
//! * Acknowledgement and Reset messages: [`Inbound::Answer`], for the endpoint to match against
//!   the Confirmable notifications it sent (RFC 7641); an answer that matches nothing is dropped
//!   there.

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, ResponseType};

/// Option numbers the endpoint understands (RFC 7252 §5.10, RFC 7959 §2.1, RFC 9175 §3.2).
/// An unrecognized *critical* option (odd number) makes a request fail with 4.02.
pub const URI_HOST: u16 = 3;
pub const OBSERVE: u16 = 6;
pub const URI_PORT: u16 = 7;
pub const URI_PATH: u16 = 11;
pub const CONTENT_FORMAT: u16 = 12;
pub const MAX_AGE: u16 = 14;
pub const URI_QUERY: u16 = 15;
pub const ACCEPT: u16 = 17;
pub const BLOCK2: u16 = 23;
pub const BLOCK1: u16 = 27;
pub const PROXY_URI: u16 = 35;
pub const PROXY_SCHEME: u16 = 39;
pub const SIZE1: u16 = 60;
pub const REQUEST_TAG: u16 = 292;

/// Critical options this endpoint acts on (or, for Uri-Host/Uri-Port and Block2, may safely
/// ignore: it serves one origin and its responses fit in one datagram).
const UNDERSTOOD_CRITICAL: &[u16] = &[
    URI_HOST, URI_PORT, URI_PATH, URI_QUERY, ACCEPT, BLOCK2, BLOCK1,
];

/// What one datagram is.
#[derive(Debug)]
pub enum Inbound {
    /// Nothing to send back. `malformed` says whether to count it as a format error.
    Ignore { malformed: bool, why: &'static str },
    /// Answer with a Reset carrying `message_id` and otherwise ignore it.
    Reset {
        message_id: u16,
        malformed: bool,
        why: &'static str,
    },
    /// A request (Confirmable or Non-confirmable) to process.
    Request(Packet),
    /// An Acknowledgement (`reset` false) or Reset of a message the endpoint sent.
    Answer { message_id: u16, reset: bool },
}

/// Classifies a received datagram.
pub fn classify(datagram: &[u8]) -> Inbound {
    if datagram.len() < 4 {
        return Inbound::Ignore {
            malformed: true,
            why: "shorter than the 4-byte header",
        };
    }
    if datagram[0] >> 6 != 1 {
        return Inbound::Ignore {
            malformed: true,
            why: "unknown CoAP version",
        };
    }
    let confirmable = (datagram[0] >> 4) & 0x3 == 0;
    let message_id = u16::from_be_bytes([datagram[2], datagram[3]]);
    let reject = |malformed, why| {
        if confirmable {
            Inbound::Reset {
                message_id,
                malformed,
                why,
            }
        } else {
            Inbound::Ignore { malformed, why }
        }
    };
    let packet = match Packet::from_bytes(datagram) {
        Ok(p) => p,
        Err(_) => return reject(true, "message format error"),
    };
    if packet.payload.is_empty()
        && datagram.last() == Some(&0xFF)
        && ends_with_empty_payload(&packet, datagram)
    {
        return reject(true, "payload marker without a payload");
    }
    match packet.header.get_type() {
        kind @ (MessageType::Acknowledgement | MessageType::Reset) => {
            return Inbound::Answer {
                message_id,
                reset: kind == MessageType::Reset,
            };
        }
        MessageType::Confirmable | MessageType::NonConfirmable => {}
    }
    match packet.header.code {
        MessageClass::Empty => {
            if datagram.len() > 4 {
                reject(true, "empty message with a token, options or payload")
            } else {
                reject(false, "empty message (ping)")
            }
        }
        MessageClass::Request(_) => Inbound::Request(packet),
        // A method code this crate does not name (0.08–0.31) is still a request: it gets 4.05.
        MessageClass::Reserved(code) if code >> 5 == 0 => Inbound::Request(packet),
        MessageClass::Reserved(_) => reject(true, "reserved code class"),
        MessageClass::Response(_) => reject(false, "a response we did not ask for"),
    }
}

/// `coap-lite` accepts a payload marker followed by nothing, which RFC 7252 §3 calls a format
/// error. The last byte can also legitimately be 0xFF inside an option value, so compare with the
/// re-encoded length: the encoding is canonical, so only a dangling marker makes it shorter.
fn ends_with_empty_payload(packet: &Packet, datagram: &[u8]) -> bool {
    packet
        .to_bytes_unlimited()
        .is_ok_and(|encoded| encoded.len() + 1 == datagram.len())
}

/// The 4-byte Reset message for `message_id`.
pub fn reset(message_id: u16) -> [u8; 4] {
    let [hi, lo] = message_id.to_be_bytes();
    [0x70, 0x00, hi, lo]
}

/// A problem with a request's options: answered with 4.02 (Bad Option) or 4.00.
#[derive(Debug, Clone, PartialEq)]
pub struct OptionProblem {
    pub code: ResponseType,
    pub diagnostic: String,
}

impl OptionProblem {
    /// The error answer that says what is wrong with the option.
    pub fn into_response(self) -> Response {
        Response::error(self.code, self.diagnostic)
    }
}

fn bad_option(diagnostic: String) -> OptionProblem {
    OptionProblem {
        code: ResponseType::BadOption,
        diagnostic,
    }
}

/// The first unrecognized critical option of a request, if any (RFC 7252 §5.4.1).
pub fn unrecognized_critical(packet: &Packet) -> Option<u16> {
    packet.options().map(|(number, _)| *number).find(|n| {
        n % 2 == 1 && !UNDERSTOOD_CRITICAL.contains(n) && *n != PROXY_URI && *n != PROXY_SCHEME
    })
}

/// True if the request asks to be proxied (answered with 5.05: this is not a proxy).
pub fn wants_proxy(packet: &Packet) -> bool {
    packet.get_option(CoapOption::ProxyUri).is_some()
        || packet.get_option(CoapOption::ProxyScheme).is_some()
}

/// An unsigned option value (RFC 7252 §3.2: big-endian, leading zeros allowed, at most
/// `max_bytes`). `None` if the option is absent.
pub fn uint_option(
    packet: &Packet,
    number: u16,
    name: &str,
    max_bytes: usize,
) -> Result<Option<u32>, OptionProblem> {
    let Some(values) = packet.get_option(CoapOption::from(number)) else {
        return Ok(None);
    };
    let mut values = values.iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(bad_option(format!("{name} must not be repeated")));
    }
    if value.len() > max_bytes {
        return Err(bad_option(format!(
            "{name} is longer than {max_bytes} bytes"
        )));
    }
    Ok(Some(
        value.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)),
    ))
}

/// The Uri-Path segments, each checked to be UTF-8.
pub fn uri_path(packet: &Packet) -> Result<Vec<String>, OptionProblem> {
    string_options(packet, CoapOption::UriPath, "Uri-Path")
}

/// The Uri-Query arguments, each checked to be UTF-8.
pub fn uri_query(packet: &Packet) -> Result<Vec<String>, OptionProblem> {
    string_options(packet, CoapOption::UriQuery, "Uri-Query")
}

fn string_options(
    packet: &Packet,
    option: CoapOption,
    name: &str,
) -> Result<Vec<String>, OptionProblem> {
    let Some(values) = packet.get_option(option) else {
        return Ok(Vec::new());
    };
    values
        .iter()
        .map(|v| {
            String::from_utf8(v.clone()).map_err(|_| bad_option(format!("{name} is not UTF-8")))
        })
        .collect()
}

/// A Block1/Block2 option value (RFC 7959 §2.2): block number, more flag, size exponent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub num: u32,
    pub more: bool,
    /// SZX: the block size is `2^(szx + 4)` bytes, 16 to 1024. 7 is reserved (BERT over TCP only).
    pub szx: u8,
}

impl Block {
    pub fn size(self) -> usize {
        1usize << (u32::from(self.szx) + 4)
    }

    /// The byte offset of this block in the body.
    pub fn offset(self) -> usize {
        self.num as usize * self.size()
    }

    /// Decodes the option from a request; a value longer than 3 bytes or SZX 7 is refused.
    pub fn from_request(
        packet: &Packet,
        number: u16,
        name: &str,
    ) -> Result<Option<Block>, OptionProblem> {
        let Some(value) = uint_option(packet, number, name, 3)? else {
            return Ok(None);
        };
        let szx = (value & 0x7) as u8;
        if szx == 7 {
            return Err(OptionProblem {
                code: ResponseType::BadRequest,
                diagnostic: format!("{name} SZX 7 is reserved"),
            });
        }
        Ok(Some(Block {
            num: value >> 4,
            more: value & 0x8 != 0,
            szx,
        }))
    }

    /// The option value bytes, shortest form.
    pub fn encode(self) -> Vec<u8> {
        let value = (self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx);
        uint_bytes(value)
    }
}

/// A uint option value in its shortest form (0 is the empty value).
pub fn uint_bytes(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

/// A response before it is put on the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub code: ResponseType,
    pub content_format: Option<u16>,
    pub max_age: Option<u32>,
    pub size1: Option<u32>,
    pub block1: Option<Block>,
    /// RFC 7641: the sequence number of a notification (or of the response that registered).
    pub observe: Option<u32>,
    /// For errors: a diagnostic message in UTF-8, no Content-Format (RFC 7252 §5.5.2).
    pub payload: Vec<u8>,
}

impl Response {
    pub fn new(code: ResponseType) -> Self {
        Self {
            code,
            content_format: None,
            max_age: None,
            size1: None,
            block1: None,
            observe: None,
            payload: Vec::new(),
        }
    }

    /// An error with a diagnostic payload.
    pub fn error(code: ResponseType, diagnostic: impl Into<String>) -> Self {
        let mut r = Self::new(code);
        r.payload = diagnostic.into().into_bytes();
        r
    }

    pub fn with_max_age(mut self, seconds: u32) -> Self {
        self.max_age = Some(seconds);
        self
    }

    pub fn with_size1(mut self, bytes: u32) -> Self {
        self.size1 = Some(bytes);
        self
    }

    pub fn with_block1(mut self, block: Block) -> Self {
        self.block1 = Some(block);
        self
    }

    /// An Observe option (RFC 7641 §3.2: 24 bits of sequence number).
    pub fn with_observe(mut self, sequence: u32) -> Self {
        self.observe = Some(sequence & 0x00FF_FFFF);
        self
    }

    pub fn with_content(mut self, content_format: u16, payload: Vec<u8>) -> Self {
        self.content_format = Some(content_format);
        self.payload = payload;
        self
    }

    /// The code as `c.dd`, for logs.
    pub fn code_text(&self) -> String {
        MessageClass::Response(self.code).to_string()
    }

    /// The class digit of the code: 2, 4 or 5.
    pub fn class(&self) -> u8 {
        u8::from(MessageClass::Response(self.code)) >> 5
    }

    /// Encodes the response. `kind` is Acknowledgement (piggy-backed, `message_id` of the
    /// request), or Non-confirmable or Confirmable (a notification; a fresh message id).
    pub fn encode(&self, kind: MessageType, message_id: u16, token: &[u8]) -> Vec<u8> {
        let mut packet = Packet::new();
        packet.header.set_type(kind);
        packet.header.code = MessageClass::Response(self.code);
        packet.header.message_id = message_id;
        packet.set_token(token.to_vec());
        if let Some(sequence) = self.observe {
            packet.add_option(CoapOption::from(OBSERVE), uint_bytes(sequence));
        }
        if let Some(cf) = self.content_format {
            packet.add_option(CoapOption::from(CONTENT_FORMAT), uint_bytes(u32::from(cf)));
        }
        if let Some(age) = self.max_age {
            packet.add_option(CoapOption::from(MAX_AGE), uint_bytes(age));
        }
        if let Some(block) = self.block1 {
            packet.add_option(CoapOption::from(BLOCK1), block.encode());
        }
        if let Some(size) = self.size1 {
            packet.add_option(CoapOption::from(SIZE1), uint_bytes(size));
        }
        packet.payload = self.payload.clone();
        // Tokens are at most 8 bytes (checked on decode) and options are few and short: encoding
        // cannot fail. Should it, an empty 5.00 is still a valid answer.
        packet.to_bytes_unlimited().unwrap_or_else(|_| {
            let [hi, lo] = message_id.to_be_bytes();
            vec![0x40 | (type_bits(kind) << 4), 0xA0, hi, lo]
        })
    }
}

fn type_bits(kind: MessageType) -> u8 {
    match kind {
        MessageType::Confirmable => 0,
        MessageType::NonConfirmable => 1,
        MessageType::Acknowledgement => 2,
        MessageType::Reset => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coap_lite::RequestType;

    fn request(kind: MessageType, code: RequestType, mid: u16) -> Packet {
        let mut p = Packet::new();
        p.header.set_type(kind);
        p.header.code = MessageClass::Request(code);
        p.header.message_id = mid;
        p.set_token(vec![1, 2, 3]);
        p
    }

    #[test]
    fn short_and_wrong_version_are_ignored() {
        assert!(matches!(
            classify(&[]),
            Inbound::Ignore {
                malformed: true,
                ..
            }
        ));
        assert!(matches!(
            classify(&[0x40, 0x01, 0x00]),
            Inbound::Ignore {
                malformed: true,
                ..
            }
        ));
        // Version 2, CON: unknown versions are silently ignored even when confirmable.
        assert!(matches!(
            classify(&[0x80, 0x01, 0x12, 0x34]),
            Inbound::Ignore {
                malformed: true,
                ..
            }
        ));
    }

    #[test]
    fn malformed_con_gets_a_reset_with_its_message_id() {
        // TKL 9 is reserved.
        match classify(&[0x49, 0x02, 0xBE, 0xEF, 1, 2, 3, 4, 5, 6, 7, 8, 9]) {
            Inbound::Reset {
                message_id,
                malformed: true,
                ..
            } => assert_eq!(message_id, 0xBEEF),
            other => panic!("{other:?}"),
        }
        // Option delta 15 without a payload marker.
        assert!(matches!(
            classify(&[0x40, 0x02, 0, 1, 0xF0]),
            Inbound::Reset {
                malformed: true,
                ..
            }
        ));
        // Option length running past the end.
        assert!(matches!(
            classify(&[0x40, 0x02, 0, 1, 0xB5, b'a']),
            Inbound::Reset {
                malformed: true,
                ..
            }
        ));
        // The same errors in a NON are ignored.
        assert!(matches!(
            classify(&[0x59, 0x02, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
            Inbound::Ignore {
                malformed: true,
                ..
            }
        ));
    }

    #[test]
    fn dangling_payload_marker_is_a_format_error() {
        let mut p = request(MessageType::Confirmable, RequestType::Post, 7);
        p.add_option(CoapOption::UriPath, b"t".to_vec());
        let mut bytes = p.to_bytes().unwrap();
        assert!(matches!(classify(&bytes), Inbound::Request(_)));
        bytes.push(0xFF);
        assert!(matches!(
            classify(&bytes),
            Inbound::Reset {
                message_id: 7,
                malformed: true,
                ..
            }
        ));
        // A 0xFF that ends an option value is fine.
        let mut p = request(MessageType::Confirmable, RequestType::Post, 8);
        p.add_option(CoapOption::UriPath, vec![b'a', 0xFF]);
        assert!(matches!(
            classify(&p.to_bytes().unwrap()),
            Inbound::Request(_)
        ));
    }

    #[test]
    fn pings_responses_and_acks() {
        assert!(matches!(
            classify(&[0x40, 0x00, 0, 9]),
            Inbound::Reset {
                message_id: 9,
                malformed: false,
                ..
            }
        ));
        assert!(matches!(
            classify(&[0x41, 0x00, 0, 9, 1]),
            Inbound::Reset {
                malformed: true,
                ..
            }
        ));
        assert!(matches!(
            classify(&[0x50, 0x00, 0, 9]),
            Inbound::Ignore {
                malformed: false,
                ..
            }
        ));
        assert!(matches!(
            classify(&[0x60, 0x00, 0, 9]),
            Inbound::Answer {
                message_id: 9,
                reset: false
            }
        ));
        assert!(matches!(
            classify(&[0x70, 0x00, 0, 9]),
            Inbound::Answer {
                message_id: 9,
                reset: true
            }
        ));
        // A CON 2.05 response sent to us: rejected.
        assert!(matches!(
            classify(&[0x40, 0x45, 0, 9]),
            Inbound::Reset {
                malformed: false,
                ..
            }
        ));
        // Reserved class 1.
        assert!(matches!(
            classify(&[0x40, 0x21, 0, 9]),
            Inbound::Reset {
                malformed: true,
                ..
            }
        ));
        // Unknown method 0.09 is still a request.
        assert!(matches!(classify(&[0x40, 0x09, 0, 9]), Inbound::Request(_)));
    }

    #[test]
    fn critical_options() {
        let mut p = request(MessageType::Confirmable, RequestType::Post, 1);
        p.add_option(CoapOption::UriPath, b"t".to_vec());
        p.add_option(CoapOption::Unknown(REQUEST_TAG), vec![1]);
        p.add_option(CoapOption::Unknown(2048), vec![1]); // elective
        assert_eq!(unrecognized_critical(&p), None);
        p.add_option(CoapOption::IfMatch, vec![1]);
        assert_eq!(unrecognized_critical(&p), Some(1));
        p.add_option(CoapOption::Unknown(65001), vec![]);
        assert_eq!(unrecognized_critical(&p), Some(1));
    }

    #[test]
    fn block_values() {
        let mut p = request(MessageType::Confirmable, RequestType::Post, 1);
        p.add_option(
            CoapOption::Block1,
            Block {
                num: 3000,
                more: true,
                szx: 2,
            }
            .encode(),
        );
        let b = Block::from_request(&p, BLOCK1, "Block1").unwrap().unwrap();
        assert_eq!(
            b,
            Block {
                num: 3000,
                more: true,
                szx: 2
            }
        );
        assert_eq!(b.size(), 64);
        assert_eq!(b.offset(), 192_000);
        assert_eq!(
            Block {
                num: 0,
                more: false,
                szx: 0
            }
            .encode(),
            Vec::<u8>::new()
        );
        let mut p = request(MessageType::Confirmable, RequestType::Post, 1);
        p.add_option(CoapOption::Block1, vec![0x17]);
        assert_eq!(
            Block::from_request(&p, BLOCK1, "Block1").unwrap_err().code,
            ResponseType::BadRequest
        );
        let mut p = request(MessageType::Confirmable, RequestType::Post, 1);
        p.add_option(CoapOption::Block1, vec![1, 2, 3, 4]);
        assert_eq!(
            Block::from_request(&p, BLOCK1, "Block1").unwrap_err().code,
            ResponseType::BadOption
        );
    }

    #[test]
    fn response_encoding_round_trips() {
        let r = Response::error(ResponseType::ServiceUnavailable, "outbox full")
            .with_max_age(5)
            .with_size1(1024)
            .with_block1(Block {
                num: 2,
                more: false,
                szx: 6,
            });
        let bytes = r.encode(MessageType::Acknowledgement, 0x1234, &[9, 8]);
        let p = Packet::from_bytes(&bytes).unwrap();
        assert_eq!(p.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(p.header.message_id, 0x1234);
        assert_eq!(p.get_token(), &[9, 8]);
        assert_eq!(
            p.header.code,
            MessageClass::Response(ResponseType::ServiceUnavailable)
        );
        assert_eq!(uint_option(&p, MAX_AGE, "Max-Age", 4).unwrap(), Some(5));
        assert_eq!(uint_option(&p, SIZE1, "Size1", 4).unwrap(), Some(1024));
        assert_eq!(
            Block::from_request(&p, BLOCK1, "Block1").unwrap(),
            Some(Block {
                num: 2,
                more: false,
                szx: 6
            })
        );
        assert_eq!(p.payload, b"outbox full");
        assert_eq!(r.code_text(), "5.03");
        assert_eq!(r.class(), 5);
        assert_eq!(reset(0xABCD), [0x70, 0, 0xAB, 0xCD]);
    }
}
