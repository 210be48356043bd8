//! Human-readable durations and sizes.
//!
//! Durations are whole numbers with units, largest first, each unit at most once: `"250ms"`,
//! `"30s"`, `"2m"`, `"1h30m"`, `"1d"` (units `d`, `h`, `m`, `s`, `ms`; `"0s"` is zero). Sizes are a
//! whole number with an optional unit: binary `KiB`, `MiB`, `GiB`, `TiB`, decimal `kB` (also `KB`
//! and `kb`), `MB`, `GB`, `TB`, or `B`/no unit for bytes; a bare TOML integer is bytes too.
//!
//! Contract: `parse(format(x)) == x` for every value `parse` can return, so a configuration
//! serialized by this crate reads back unchanged.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// What a duration looks like, used in error messages.
pub(crate) const DURATION_EXPECTED: &str = "a duration like \"30s\" or \"250ms\"";
/// What a size looks like, used in error messages.
pub(crate) const SIZE_EXPECTED: &str = "a size like \"512MiB\" or a number of bytes";

/// Durations: `"1h30m"` ⇄ [`std::time::Duration`].
pub mod duration {
    use std::time::Duration;

    use super::{DURATION_EXPECTED, Deserializer, Serializer, Visitor, de, fmt};

    /// Units from largest to smallest, with their length in milliseconds.
    const UNITS: [(&str, u64); 5] = [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ];

    /// Parses `"1h30m"`, `"250ms"`, `"0s"`. The error names the input and says what is wrong.
    pub fn parse(text: &str) -> Result<Duration, String> {
        let fail = |why: &str| Err(format!("invalid duration \"{text}\": {why}"));
        let s = text.trim();
        if s.is_empty() {
            return fail("empty; write e.g. \"30s\" or \"250ms\"");
        }
        if s.starts_with('-') {
            return fail("durations cannot be negative");
        }
        let mut rest = s;
        let mut total: u64 = 0;
        let mut previous_unit: Option<usize> = None;
        while !rest.is_empty() {
            let digits_end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits_end == 0 {
                return fail(&format!("expected a whole number at \"{rest}\""));
            }
            let (digits, after) = rest.split_at(digits_end);
            if after.starts_with('.') {
                return fail("fractions are not supported; use a smaller unit (e.g. \"1500ms\")");
            }
            let unit_end = after
                .find(|c: char| !c.is_ascii_alphabetic())
                .unwrap_or(after.len());
            let (unit, tail) = after.split_at(unit_end);
            if unit.is_empty() {
                return fail(&format!(
                    "missing unit after {digits} (use ms, s, m, h or d, e.g. \"{digits}s\")"
                ));
            }
            let Some(rank) = UNITS.iter().position(|(name, _)| *name == unit) else {
                return fail(&format!("unknown unit \"{unit}\" (use ms, s, m, h or d)"));
            };
            if previous_unit.is_some_and(|p| rank <= p) {
                return fail(
                    "units must go from largest to smallest, each at most once (e.g. \"1h30m\")",
                );
            }
            previous_unit = Some(rank);
            let too_long = || format!("invalid duration \"{text}\": too long");
            let n: u64 = digits.parse().map_err(|_| too_long())?;
            let millis = n.checked_mul(UNITS[rank].1).ok_or_else(too_long)?;
            total = total.checked_add(millis).ok_or_else(too_long)?;
            rest = tail;
        }
        Ok(Duration::from_millis(total))
    }

    /// Formats with the largest units that fit, e.g. 90 s → `"1m30s"`, zero → `"0s"`.
    /// Precision below a millisecond is truncated (it cannot be written in a config file).
    pub fn format(duration: Duration) -> String {
        let mut millis = duration.as_millis();
        if millis == 0 {
            return "0s".to_owned();
        }
        let mut out = String::new();
        for (name, unit) in UNITS {
            let unit = u128::from(unit);
            if millis >= unit {
                out.push_str(&(millis / unit).to_string());
                out.push_str(name);
                millis %= unit;
            }
        }
        out
    }

    /// Serde serializer: writes [`format()`]'s string.
    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format(*duration))
    }

    /// Serde deserializer: reads a string accepted by [`parse`].
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_str(DurationVisitor)
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(DURATION_EXPECTED)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse(v).map_err(E::custom)
        }
    }
}

/// Sizes: `"512MiB"` ⇄ a number of bytes.
pub mod size {
    /// Accepted units and their multiplier.
    const UNITS: [(&str, u64); 12] = [
        ("B", 1),
        ("kB", 1_000),
        ("KB", 1_000),
        ("kb", 1_000),
        ("MB", 1_000_000),
        ("GB", 1_000_000_000),
        ("TB", 1_000_000_000_000),
        ("KiB", 1 << 10),
        ("MiB", 1 << 20),
        ("GiB", 1 << 30),
        ("TiB", 1 << 40),
        // Bare numbers are bytes.
        ("", 1),
    ];

    /// Binary units used by [`format()`], largest first.
    const BINARY: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];

    /// Parses `"512MiB"`, `"100MB"`, `"1kB"`, `"1024"` into bytes. The error names the input.
    pub fn parse(text: &str) -> Result<u64, String> {
        let fail = |why: &str| Err(format!("invalid size \"{text}\": {why}"));
        let s = text.trim();
        if s.starts_with('-') {
            return fail("sizes cannot be negative");
        }
        let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        if digits_end == 0 {
            return fail("expected a whole number followed by a unit, e.g. \"512MiB\"");
        }
        let (digits, unit) = s.split_at(digits_end);
        if unit.starts_with('.') {
            return fail("fractions are not supported; use a smaller unit (e.g. \"1536MiB\")");
        }
        let unit = unit.trim_start();
        let Some((_, multiplier)) = UNITS.iter().find(|(name, _)| *name == unit) else {
            return fail(&format!(
                "unknown unit \"{unit}\" (use B, kB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ));
        };
        let too_large = || format!("invalid size \"{text}\": too large");
        let n: u64 = digits.parse().map_err(|_| too_large())?;
        n.checked_mul(*multiplier).ok_or_else(too_large)
    }

    /// Formats with the largest binary unit that divides exactly: `"1GiB"`, `"512MiB"`,
    /// otherwise bytes: `"1000B"`.
    pub fn format(bytes: u64) -> String {
        for (name, unit) in BINARY {
            if bytes != 0 && bytes.is_multiple_of(unit) {
                return format!("{}{name}", bytes / unit);
            }
        }
        format!("{bytes}B")
    }
}

/// A number of bytes, written in config files as `"512MiB"`, `"100MB"` or a bare integer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// `n` KiB.
    pub const fn kib(n: u64) -> Self {
        Self(n << 10)
    }

    /// `n` MiB.
    pub const fn mib(n: u64) -> Self {
        Self(n << 20)
    }

    /// `n` GiB.
    pub const fn gib(n: u64) -> Self {
        Self(n << 30)
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&size::format(self.0))
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        size::parse(s).map(Self)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ByteSizeVisitor)
    }
}

struct ByteSizeVisitor;

impl Visitor<'_> for ByteSizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(SIZE_EXPECTED)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
        v.parse().map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
        Ok(ByteSize(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
        u64::try_from(v)
            .map(ByteSize)
            .map_err(|_| E::custom(format!("invalid size {v}: sizes cannot be negative")))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn durations_parse() {
        let ok = [
            ("5ms", 5),
            ("30s", 30_000),
            ("2m", 120_000),
            ("1h", 3_600_000),
            ("1h30m", 5_400_000),
            ("1d", 86_400_000),
            ("1d2h3m4s5ms", 93_784_005),
            ("0s", 0),
            ("0ms", 0),
            (" 10s ", 10_000),
        ];
        for (text, millis) in ok {
            assert_eq!(
                duration::parse(text),
                Ok(Duration::from_millis(millis)),
                "{text}"
            );
        }
    }

    #[test]
    fn durations_reject_with_reason() {
        let bad = [
            ("", "empty"),
            ("30", "missing unit"),
            ("1.5s", "fractions"),
            ("-5s", "negative"),
            ("5x", "unknown unit \"x\""),
            ("30m1h", "largest to smallest"),
            ("1s1s", "largest to smallest"),
            ("s", "whole number"),
            ("1h 30m", "whole number"),
            ("99999999999999999999s", "too long"),
            ("999999999999999d", "too long"),
        ];
        for (text, why) in bad {
            let err = duration::parse(text).expect_err(text);
            assert!(err.contains(why), "{text}: {err}");
            assert!(err.contains(&format!("\"{text}\"")), "{text}: {err}");
        }
    }

    #[test]
    fn durations_round_trip() {
        for millis in [
            0,
            1,
            999,
            1_000,
            1_500,
            60_000,
            90_000,
            5_400_000,
            86_400_001,
            u64::MAX / 2,
        ] {
            let d = Duration::from_millis(millis);
            let text = duration::format(d);
            assert_eq!(duration::parse(&text), Ok(d), "{text}");
        }
        assert_eq!(duration::format(Duration::from_secs(90)), "1m30s");
        assert_eq!(duration::format(Duration::from_millis(250)), "250ms");
        assert_eq!(duration::format(Duration::ZERO), "0s");
        assert_eq!(duration::format(Duration::from_micros(1_500)), "1ms");
    }

    #[test]
    fn sizes_parse() {
        let ok = [
            ("1GiB", 1 << 30),
            ("512MiB", 512 << 20),
            ("64KiB", 64 << 10),
            ("2TiB", 2 << 40),
            ("100MB", 100_000_000),
            ("1kB", 1_000),
            ("1KB", 1_000),
            ("1kb", 1_000),
            ("3GB", 3_000_000_000),
            ("1024", 1_024),
            ("7B", 7),
            ("512 MiB", 512 << 20),
            ("0", 0),
        ];
        for (text, bytes) in ok {
            assert_eq!(size::parse(text), Ok(bytes), "{text}");
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
    }

    #[test]
    fn sizes_reject_with_reason() {
        let bad = [
            ("", "whole number"),
            ("MiB", "whole number"),
            ("1.5GiB", "fractions"),
            ("-1MiB", "negative"),
            ("5mib", "unknown unit \"mib\""),
            ("5 XB", "unknown unit \"XB\""),
            ("99999999TiB", "too large"),
        ];
        for (text, why) in bad {
            let err = size::parse(text).expect_err(text);
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn sizes_round_trip() {
        for bytes in [
            0,
            1,
            1_000,
            1_024,
            1_536,
            1 << 20,
            100_000_000,
            1 << 30,
            3 << 40,
            u64::MAX,
        ] {
            let text = ByteSize(bytes).to_string();
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
        assert_eq!(ByteSize::gib(1).to_string(), "1GiB");
        assert_eq!(ByteSize::mib(512).to_string(), "512MiB");
        assert_eq!(ByteSize(1_000).to_string(), "1000B");
        assert_eq!(ByteSize(0).to_string(), "0B");
        assert_eq!(ByteSize::kib(1_536).to_string(), "1536KiB");
    }

    #[test]
    fn serde_accepts_strings_and_integers() {
        #[derive(Debug, Deserialize, Serialize, PartialEq)]
        struct T {
            size: ByteSize,
            #[serde(with = "duration")]
            wait: Duration,
        }
        let t: T = toml::from_str("size = \"1MiB\"\nwait = \"1h30m\"").expect("valid");
        assert_eq!(t.size, ByteSize::mib(1));
        assert_eq!(t.wait, Duration::from_secs(5_400));
        let t2: T = toml::from_str("size = 4096\nwait = \"0s\"").expect("valid");
        assert_eq!(t2.size, ByteSize(4096));
        let text = toml::to_string(&t).expect("serializes");
        assert_eq!(text, "size = \"1MiB\"\nwait = \"1h30m\"\n");
        assert_eq!(toml::from_str::<T>(&text).expect("round trip"), t);
        assert!(toml::from_str::<T>("size = -1\nwait = \"1s\"").is_err());
        let err = toml::from_str::<T>("size = 1\nwait = 5").expect_err("integer duration");
        assert!(err.message().contains(DURATION_EXPECTED), "{err}");
    }
}
