//! UNPI / MT frame codec for TI Z-Stack (Z-Stack Monitor and Test API, "General Frame Format").
//!
//! ```text
//! SOF 0xFE | LEN | CMD0 | CMD1 | DATA[LEN] | FCS
//! ```
//! `FCS` is the XOR of `LEN`, `CMD0`, `CMD1` and `DATA`. `CMD0` carries the command type in bits
//! 7-5 (POLL 0, SREQ 1, AREQ 2, SRSP 3) and the subsystem in bits 4-0.
//!
//! [`Decoder`] is a pure streaming decoder. Contract:
//! - bytes before a start-of-frame are skipped and counted;
//! - a frame with a bad checksum or an impossible length is reported as an error and only its
//!   start byte is dropped, so that a following frame (even one that the bad frame's claimed
//!   length overlaps) is still found;
//! - buffering is bounded: after [`Decoder::next_frame`] returned `None`, at most one incomplete
//!   frame ([`MAX_FRAME`] bytes) is held; [`Decoder::push`] never lets the buffer grow beyond
//!   [`MAX_BUFFER`] (the oldest bytes are dropped and counted).

/// Start of frame.
pub const SOF: u8 = 0xFE;
/// Largest `LEN` Z-Stack's MT transport accepts (`MT_RPC_DATA_MAX`).
pub const MAX_DATA: usize = 250;
/// SOF + LEN + CMD0 + CMD1 + DATA + FCS.
pub const MAX_FRAME: usize = MAX_DATA + 5;
/// Hard cap of the decoder's buffer.
pub const MAX_BUFFER: usize = 4096;

/// Command type, `CMD0` bits 7-5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdType {
    Poll = 0,
    /// Synchronous request; the stick answers with an SRSP.
    Sreq = 1,
    /// Asynchronous request or indication.
    Areq = 2,
    /// Synchronous response.
    Srsp = 3,
}

impl CmdType {
    fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(Self::Poll),
            1 => Some(Self::Sreq),
            2 => Some(Self::Areq),
            3 => Some(Self::Srsp),
            _ => None,
        }
    }
}

/// MT subsystem ids, `CMD0` bits 4-0.
pub mod subsystem {
    pub const SYS: u8 = 0x01;
    pub const AF: u8 = 0x04;
    pub const ZDO: u8 = 0x05;
    pub const UTIL: u8 = 0x07;
    pub const APP_CNF: u8 = 0x0F;
}

/// One MT frame (without SOF, LEN and FCS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub cmd0: u8,
    pub cmd1: u8,
    pub data: Vec<u8>,
}

impl Frame {
    pub fn new(kind: CmdType, subsystem: u8, id: u8, data: Vec<u8>) -> Self {
        Self {
            cmd0: ((kind as u8) << 5) | (subsystem & 0x1F),
            cmd1: id,
            data,
        }
    }

    /// The command type; `None` for the reserved values 4-7.
    pub fn kind(&self) -> Option<CmdType> {
        CmdType::from_bits(self.cmd0 >> 5)
    }

    pub fn subsystem(&self) -> u8 {
        self.cmd0 & 0x1F
    }

    /// True when this frame is `kind` `subsystem`/`id`.
    pub fn is(&self, kind: CmdType, subsystem: u8, id: u8) -> bool {
        self.kind() == Some(kind) && self.subsystem() == subsystem & 0x1F && self.cmd1 == id
    }

    /// The bytes on the wire. Data longer than [`MAX_DATA`] is refused.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        if self.data.len() > MAX_DATA {
            return Err(FrameError::TooLong {
                len: self.data.len(),
            });
        }
        let mut out = Vec::with_capacity(self.data.len() + 5);
        out.push(SOF);
        out.push(self.data.len() as u8);
        out.push(self.cmd0);
        out.push(self.cmd1);
        out.extend_from_slice(&self.data);
        out.push(fcs(&out[1..]));
        Ok(out)
    }
}

/// XOR of all bytes.
pub fn fcs(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |acc, b| acc ^ b)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame's checksum did not match: count it and go on with the next frame.
    #[error(
        "bad frame checksum (cmd {cmd0:#04x} {cmd1:#04x}, expected {expected:#04x}, got {got:#04x})"
    )]
    BadChecksum {
        cmd0: u8,
        cmd1: u8,
        expected: u8,
        got: u8,
    },
    /// A frame declared a length above the MT maximum: count it and go on.
    #[error("frame length {len} exceeds {MAX_DATA}")]
    TooLong { len: usize },
    /// An incomplete frame was abandoned after an idle gap on the line (its length was wrong
    /// or bytes were lost): count it and go on.
    #[error("incomplete frame abandoned ({pending} bytes held)")]
    Stale { pending: usize },
}

/// Streaming frame decoder; see the module docs for its contract.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    skipped_bytes: u64,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > MAX_BUFFER {
            let excess = self.buf.len() - MAX_BUFFER;
            self.buf.drain(..excess);
            self.skipped_bytes += excess as u64;
        }
    }

    /// Bytes dropped so far outside frames (garbage, bad frames' start bytes, overflow).
    pub fn skipped_bytes(&self) -> u64 {
        self.skipped_bytes
    }

    /// Bytes held for an incomplete frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Gives up on an incomplete frame (call after an idle gap on the line): drops its start
    /// byte so that whatever follows it is scanned again. `None` when nothing was held.
    pub fn discard_stale(&mut self) -> Option<FrameError> {
        let pending = self.buf.len();
        if pending == 0 {
            return None;
        }
        self.drop_front(1);
        self.skip_to_sof();
        Some(FrameError::Stale { pending })
    }

    /// The next complete frame or bad frame, `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Result<Frame, FrameError>> {
        self.skip_to_sof();
        let len = usize::from(*self.buf.get(1)?);
        if len > MAX_DATA {
            self.drop_front(1);
            return Some(Err(FrameError::TooLong { len }));
        }
        let total = len + 5;
        if self.buf.len() < total {
            return None;
        }
        let expected = fcs(&self.buf[1..total - 1]);
        let got = self.buf[total - 1];
        let (cmd0, cmd1) = (self.buf[2], self.buf[3]);
        if expected != got {
            self.drop_front(1);
            return Some(Err(FrameError::BadChecksum {
                cmd0,
                cmd1,
                expected,
                got,
            }));
        }
        let data = self.buf[4..total - 1].to_vec();
        self.buf.drain(..total);
        Some(Ok(Frame { cmd0, cmd1, data }))
    }

    fn skip_to_sof(&mut self) {
        let start = self
            .buf
            .iter()
            .position(|&b| b == SOF)
            .unwrap_or(self.buf.len());
        if start > 0 {
            self.drop_front(start);
        }
    }

    fn drop_front(&mut self, n: usize) {
        self.buf.drain(..n);
        self.skipped_bytes += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(d: &mut Decoder) -> Vec<Result<Frame, FrameError>> {
        std::iter::from_fn(|| d.next_frame()).collect()
    }

    // SYS_PING request as printed in the MT API document: FE 00 21 01 20.
    const PING: [u8; 5] = [0xFE, 0x00, 0x21, 0x01, 0x20];
    // SYS_PING response, capabilities 0x0159: FE 02 61 01 59 01 3A.
    const PING_RSP: [u8; 7] = [0xFE, 0x02, 0x61, 0x01, 0x59, 0x01, 0x3A];

    #[test]
    fn encodes_as_the_spec_writes_it() {
        let f = Frame::new(CmdType::Sreq, subsystem::SYS, 0x01, vec![]);
        assert_eq!(f.encode().unwrap(), PING);
        let mut d = Decoder::new();
        d.push(&PING_RSP);
        let got = d.next_frame().unwrap().unwrap();
        assert!(got.is(CmdType::Srsp, subsystem::SYS, 0x01));
        assert_eq!(got.data, [0x59, 0x01]);
        assert!(d.next_frame().is_none());
        assert_eq!(d.skipped_bytes(), 0);
    }

    #[test]
    fn byte_by_byte_and_garbage_between() {
        let mut stream = vec![0x00, 0x13];
        stream.extend_from_slice(&PING_RSP);
        stream.extend_from_slice(&[0x55]);
        stream.extend_from_slice(&PING);
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in stream {
            d.push(&[b]);
            got.extend(decode_all(&mut d));
        }
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(Result::is_ok));
        assert_eq!(d.skipped_bytes(), 3);
    }

    #[test]
    fn bad_checksum_loses_only_that_frame() {
        let mut bad = PING_RSP;
        bad[6] ^= 0xFF;
        let mut stream = bad.to_vec();
        stream.extend_from_slice(&PING);
        let mut d = Decoder::new();
        d.push(&stream);
        let got = decode_all(&mut d);
        assert!(matches!(got[0], Err(FrameError::BadChecksum { .. })));
        assert_eq!(got.last().unwrap().as_ref().unwrap().cmd0, 0x21);
        assert_eq!(got.iter().filter(|r| r.is_ok()).count(), 1);
    }

    #[test]
    fn wrong_length_does_not_swallow_the_next_frame() {
        // A length too long: it overlaps the following frame.
        let mut stream = vec![0xFE, 0x09, 0x61, 0x01, 0x59, 0x01, 0x3A];
        stream.extend_from_slice(&PING);
        stream.extend_from_slice(&PING_RSP);
        // A length too short.
        stream.extend_from_slice(&[0xFE, 0x01, 0x61, 0x01, 0x59, 0x01, 0x3A]);
        stream.extend_from_slice(&PING);
        // A length above the MT maximum.
        stream.extend_from_slice(&[0xFE, 0xFF, 0x61]);
        stream.extend_from_slice(&PING_RSP);
        let mut d = Decoder::new();
        d.push(&stream);
        let got = decode_all(&mut d);
        let ok: Vec<_> = got.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(ok.len(), 4, "{got:?}");
        assert!(
            got.iter()
                .any(|r| matches!(r, Err(FrameError::TooLong { len: 255 })))
        );
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn stale_partial_frame_is_given_up() {
        let mut d = Decoder::new();
        d.push(&[0xFE, 0x30, 0x61, 0x01]);
        d.push(&PING);
        assert!(d.next_frame().is_none());
        assert_eq!(d.discard_stale(), Some(FrameError::Stale { pending: 9 }));
        assert_eq!(d.next_frame().unwrap().unwrap().cmd1, 0x01);
    }

    #[test]
    fn buffer_is_bounded() {
        let mut d = Decoder::new();
        for _ in 0..100 {
            d.push(&[0xFE, 0xF0]);
            d.push(&[0u8; 100]);
        }
        assert!(d.pending() <= MAX_BUFFER);
        while d.next_frame().is_some() {}
        assert!(d.pending() <= MAX_FRAME);
    }

    #[test]
    fn refuses_oversized_data() {
        let f = Frame::new(CmdType::Areq, subsystem::AF, 0x81, vec![0; 251]);
        assert!(f.encode().is_err());
    }
}
