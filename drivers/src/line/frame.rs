//! Line framing with a length cap: bytes in, complete lines out.
//!
//! Lines end at `\n`; a `\r` before it is removed; empty lines are skipped. A line longer than
//! the cap is reported once as [`Frame::Overlong`] and its bytes are discarded up to the next
//! `\n`, so memory stays bounded by the cap whatever the sensor sends.

/// What the framer found.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete line without its line end.
    Line(&'a [u8]),
    /// A line longer than the cap was dropped.
    Overlong,
}

/// See the module docs.
#[derive(Debug)]
pub struct LineFramer {
    buf: Vec<u8>,
    max: usize,
    discarding: bool,
}

impl LineFramer {
    /// Lines of at most `max` bytes (line end excluded).
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::with_capacity(max.min(64 * 1024) + 1),
            max,
            discarding: false,
        }
    }

    /// Feeds bytes; calls `f` for every complete line or dropped overlong line.
    pub fn push(&mut self, mut data: &[u8], mut f: impl FnMut(Frame<'_>)) {
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            let chunk = &data[..pos];
            data = &data[pos + 1..];
            if self.discarding {
                self.discarding = false;
                continue;
            }
            let line: &[u8] = if self.buf.is_empty() {
                chunk
            } else {
                self.buf.extend_from_slice(chunk);
                &self.buf
            };
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > self.max {
                f(Frame::Overlong);
            } else if !line.is_empty() {
                f(Frame::Line(line));
            }
            self.buf.clear();
        }
        if self.discarding || data.is_empty() {
            return;
        }
        // One more byte than the cap may be a `\r` waiting for its `\n`.
        if self.buf.len() + data.len() > self.max + 1 {
            f(Frame::Overlong);
            self.buf.clear();
            self.discarding = true;
        } else {
            self.buf.extend_from_slice(data);
        }
    }

    /// Forgets a partial line (the port was closed mid-line); true if there was one.
    pub fn reset(&mut self) -> bool {
        let partial = !self.buf.is_empty() || self.discarding;
        self.buf.clear();
        self.discarding = false;
        partial
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(framer: &mut LineFramer, data: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        framer.push(data, |f| {
            out.push(match f {
                Frame::Line(l) => String::from_utf8_lossy(l).into_owned(),
                Frame::Overlong => "<overlong>".to_owned(),
            })
        });
        out
    }

    #[test]
    fn splits_joins_and_caps() {
        let mut f = LineFramer::new(8);
        assert_eq!(frames(&mut f, b"ab\r\ncd\n\n\r\nef"), ["ab", "cd"]);
        assert_eq!(frames(&mut f, b"gh\r"), Vec::<String>::new());
        assert_eq!(frames(&mut f, b"\n12345678\n"), ["efgh", "12345678"]);
        assert_eq!(frames(&mut f, b"123456789\nok\n"), ["<overlong>", "ok"]);
        // Overlong across pushes: reported once, the rest discarded up to the next \n.
        assert_eq!(frames(&mut f, b"123456"), Vec::<String>::new());
        assert_eq!(frames(&mut f, b"7890"), ["<overlong>"]);
        assert_eq!(frames(&mut f, b"abcdefghijkl"), Vec::<String>::new());
        assert_eq!(frames(&mut f, b"xyz\nnext\n"), ["next"]);
        assert!(!f.reset());
        assert_eq!(frames(&mut f, b"part"), Vec::<String>::new());
        assert!(f.reset());
        assert_eq!(frames(&mut f, b"ial\n"), ["ial"]);
    }
}
