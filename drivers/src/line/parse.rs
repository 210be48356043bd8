//! Line parsers of the serial line driver: JSON lines, CSV with a declared column map, and
//! `key=value` pairs. Pure functions over one line's bytes (without the line end), so they are
//! unit-tested and fuzzed without a port.
//!
//! Every parser produces the same reading: a JSON object of the line's fields (the device and
//! timestamp fields removed, since they travel beside it), `"time_ms"` (the line's timestamp,
//! else the receive time) and `"units"` for the declared units of the fields present.
//!
//! Rules:
//! * CSV and `key=value` values become JSON numbers when they parse as a finite number
//!   (integers stay integers), `true`/`false` become booleans, anything else stays a string;
//!   an empty value becomes `null`. No quoting: the separator cannot appear inside a value.
//! * CSV: values are matched to `columns` in order; extra values are ignored, missing ones make
//!   the line bad. Spaces around values are trimmed.
//! * `key=value`: pairs separated by spaces, tabs, `,` or `;`; a token without `=` or with an
//!   empty key makes the line bad.
//! * JSON: the line must be one JSON object; values are kept as written.
//! * Timestamp field: a number is Unix **seconds** when below 1e11 (until year 5138) and Unix
//!   **milliseconds** from 1e11 on; fractions are allowed. A string is parsed as a number the
//!   same way, else as RFC 3339 (`2024-05-01T12:00:00Z`, `…+02:00`, fractional seconds).
//!   A missing or unreadable timestamp makes the line bad only if it cannot be read; a missing
//!   field means the receive time.
//! * Device id: the declared field's string (or integer) value, or the fixed id; it must be a
//!   valid registry id (`[A-Za-z0-9._:-]{1,128}`), else the line is bad.

use std::collections::BTreeMap;

use outpost_config::{LineFormat, SerialLineConfig};
use serde_json::{Map, Number, Value};

/// Why a line was not turned into a reading. Callers count it and move on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// Not UTF-8.
    #[error("line is not UTF-8")]
    NotUtf8,
    /// The format's syntax is broken.
    #[error("{0}")]
    Syntax(String),
    /// The device field is missing or not a string/integer.
    #[error("device field `{0}` missing or not a string")]
    NoDevice(String),
    /// The device id is not a valid registry id.
    #[error("invalid device id {0:?}")]
    BadDeviceId(String),
    /// The timestamp field holds something that is not a time.
    #[error("timestamp field `{field}`: cannot read {value:?} as a time")]
    BadTimestamp { field: String, value: String },
}

/// One parsed line.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedLine {
    pub device_id: String,
    /// The line's own timestamp (Unix ms), if it had one.
    pub time_ms: Option<i64>,
    /// The reading: a JSON object (see the module docs).
    pub payload: Vec<u8>,
}

/// A line parser configured for one port. Cheap to call per line.
#[derive(Debug, Clone)]
pub struct LineParser {
    format: LineFormat,
    device_field: Option<String>,
    device_id: Option<String>,
    timestamp_field: Option<String>,
    columns: Vec<String>,
    separator: char,
    units: BTreeMap<String, String>,
}

impl LineParser {
    /// The parser a (validated) driver config describes.
    pub fn new(config: &SerialLineConfig) -> Self {
        Self {
            format: config.format,
            device_field: config.device_field.clone(),
            device_id: config.device_id.clone(),
            timestamp_field: config.timestamp_field.clone(),
            columns: config.columns.clone(),
            separator: config.separator.chars().next().unwrap_or(','),
            units: config.units.clone(),
        }
    }

    /// Parses one line (without its line end). `received_ms` is used when the line has no
    /// timestamp.
    pub fn parse(&self, line: &[u8], received_ms: i64) -> Result<ParsedLine, LineError> {
        let mut fields = match self.format {
            LineFormat::Json => parse_json(line)?,
            LineFormat::Csv => parse_csv(to_str(line)?, &self.columns, self.separator)?,
            LineFormat::Kv => parse_kv(to_str(line)?)?,
        };
        let device_id = match (&self.device_field, &self.device_id) {
            (Some(field), _) => match fields.remove(field) {
                Some(Value::String(s)) => s,
                Some(Value::Number(n)) if n.is_u64() || n.is_i64() => n.to_string(),
                _ => return Err(LineError::NoDevice(field.clone())),
            },
            (None, Some(id)) => id.clone(),
            (None, None) => return Err(LineError::NoDevice(String::new())),
        };
        if !valid_device_id(&device_id) {
            return Err(LineError::BadDeviceId(device_id));
        }
        let time_ms = match &self.timestamp_field {
            Some(field) => match fields.remove(field) {
                None | Some(Value::Null) => None,
                Some(value) => {
                    Some(timestamp_ms(&value).ok_or_else(|| LineError::BadTimestamp {
                        field: field.clone(),
                        value: value.to_string(),
                    })?)
                }
            },
            None => None,
        };
        let mut units = Map::new();
        for (field, unit) in &self.units {
            if fields.contains_key(field) {
                units.insert(field.clone(), Value::String(unit.clone()));
            }
        }
        fields.insert(
            "time_ms".to_owned(),
            Value::from(time_ms.unwrap_or(received_ms)),
        );
        if !units.is_empty() {
            fields.insert("units".to_owned(), Value::Object(units));
        }
        let payload = serde_json::to_vec(&Value::Object(fields))
            .map_err(|e| LineError::Syntax(e.to_string()))?;
        Ok(ParsedLine {
            device_id,
            time_ms,
            payload,
        })
    }
}

fn to_str(line: &[u8]) -> Result<&str, LineError> {
    std::str::from_utf8(line).map_err(|_| LineError::NotUtf8)
}

/// A JSON object line.
pub fn parse_json(line: &[u8]) -> Result<Map<String, Value>, LineError> {
    match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(LineError::Syntax(format!(
            "expected a JSON object, found {}",
            kind_of(&other)
        ))),
        Err(e) => Err(LineError::Syntax(format!("invalid JSON: {e}"))),
    }
}

/// A CSV line matched to `columns`.
pub fn parse_csv(
    line: &str,
    columns: &[String],
    separator: char,
) -> Result<Map<String, Value>, LineError> {
    let mut values = line.split(separator);
    let mut map = Map::new();
    for column in columns {
        let Some(value) = values.next() else {
            return Err(LineError::Syntax(format!(
                "{} values, expected {}",
                map.len(),
                columns.len()
            )));
        };
        map.insert(column.clone(), typed(value.trim()));
    }
    Ok(map)
}

/// `key=value` pairs.
pub fn parse_kv(line: &str) -> Result<Map<String, Value>, LineError> {
    let mut map = Map::new();
    for token in line
        .split(|c: char| c.is_ascii_whitespace() || c == ',' || c == ';')
        .filter(|t| !t.is_empty())
    {
        let Some((key, value)) = token.split_once('=') else {
            return Err(LineError::Syntax(format!("`{token}` is not key=value")));
        };
        if key.is_empty() {
            return Err(LineError::Syntax(format!("`{token}` has an empty key")));
        }
        map.insert(key.to_owned(), typed(value));
    }
    if map.is_empty() {
        return Err(LineError::Syntax("no key=value pairs".into()));
    }
    Ok(map)
}

/// A text value as the most specific JSON value it reads as.
pub fn typed(text: &str) -> Value {
    if text.is_empty() {
        return Value::Null;
    }
    if let Ok(i) = text.parse::<i64>() {
        return Value::from(i);
    }
    if looks_numeric(text)
        && let Ok(f) = text.parse::<f64>()
        && let Some(n) = Number::from_f64(f)
    {
        return Value::Number(n);
    }
    match text {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => Value::String(text.to_owned()),
    }
}

/// Rust's float parser also takes `inf`, `NaN` and `infinity`: only digits, sign, dot and
/// exponent count as numbers here.
fn looks_numeric(text: &str) -> bool {
    text.bytes().any(|b| b.is_ascii_digit())
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'))
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The registry's device id rule: `[A-Za-z0-9._:-]{1,128}`.
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Numbers below this are seconds, from it on milliseconds (1e11 s is the year 5138).
const MS_THRESHOLD: f64 = 1e11;

/// A timestamp value as Unix milliseconds (see the module docs for the rule).
pub fn timestamp_ms(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => number_ms(n.as_f64()?),
        Value::String(s) => match s.trim().parse::<f64>() {
            Ok(f) if looks_numeric(s.trim()) => number_ms(f),
            _ => rfc3339_ms(s.trim()),
        },
        _ => None,
    }
}

fn number_ms(f: f64) -> Option<i64> {
    if !f.is_finite() || f < 0.0 {
        return None;
    }
    let ms = if f < MS_THRESHOLD { f * 1000.0 } else { f };
    // Up to the year 9999 in ms fits easily; beyond is nonsense for a sensor.
    (ms < 253_402_300_800_000.0).then(|| ms.round() as i64)
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`; `t`/space accepted for `T`, `z` for `Z`.
pub fn rfc3339_ms(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ms = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let digits = &text[start..i.min(start + 3)];
        frac_ms = digits.parse::<i64>().ok()? * 10i64.pow(3 - digits.len() as u32);
    }
    let offset_min = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let total = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if *sign == b'+' { total } else { -total }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_min * 60;
    Some(seconds * 1000 + frac_ms)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(format: LineFormat) -> SerialLineConfig {
        SerialLineConfig {
            name: "l".into(),
            format,
            device_field: Some("id".into()),
            timestamp_field: Some("ts".into()),
            units: [("temp".to_owned(), "Cel".to_owned())].into(),
            ..SerialLineConfig::default()
        }
    }

    fn value(parsed: &ParsedLine) -> Value {
        serde_json::from_slice(&parsed.payload).expect("payload is JSON")
    }

    #[test]
    fn json_lines() {
        let p = LineParser::new(&config(LineFormat::Json));
        let parsed = p
            .parse(br#"{"id":"t1","ts":1700000000,"temp":21.5,"ok":true}"#, 5)
            .expect("valid");
        assert_eq!(parsed.device_id, "t1");
        assert_eq!(parsed.time_ms, Some(1_700_000_000_000));
        assert_eq!(
            value(&parsed),
            serde_json::json!({"temp": 21.5, "ok": true, "time_ms": 1_700_000_000_000_i64,
                               "units": {"temp": "Cel"}})
        );
        // No timestamp: the receive time; no declared unit present: no units.
        let parsed = p.parse(br#"{"id":"t2","hum":40}"#, 5).expect("valid");
        assert_eq!(value(&parsed), serde_json::json!({"hum": 40, "time_ms": 5}));
        for bad in [
            &b"{\"id\":\"t1\""[..],
            b"[1,2]",
            b"{\"temp\":1}",
            b"{\"id\":\"a b\"}",
            b"{\"id\":\"x\",\"ts\":\"yesterday\"}",
            b"\xff\xfe",
        ] {
            assert!(p.parse(bad, 0).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn csv_lines() {
        let mut c = config(LineFormat::Csv);
        c.columns = vec!["id".into(), "ts".into(), "temp".into(), "state".into()];
        let p = LineParser::new(&c);
        let parsed = p
            .parse(b"t1, 1700000000123 ,-3.25,open,extra", 0)
            .expect("valid");
        assert_eq!(parsed.device_id, "t1");
        assert_eq!(parsed.time_ms, Some(1_700_000_000_123));
        assert_eq!(
            value(&parsed),
            serde_json::json!({"temp": -3.25, "state": "open",
                               "time_ms": 1_700_000_000_123_i64, "units": {"temp": "Cel"}})
        );
        assert!(matches!(p.parse(b"t1,1", 0), Err(LineError::Syntax(_))));
        c.separator = ";".into();
        let p = LineParser::new(&c);
        let parsed = p.parse(b"7;;12;", 9).expect("valid");
        assert_eq!(parsed.device_id, "7");
        assert_eq!(
            value(&parsed),
            serde_json::json!({"temp": 12, "state": null, "time_ms": 9, "units": {"temp": "Cel"}})
        );
    }

    #[test]
    fn kv_lines() {
        let p = LineParser::new(&config(LineFormat::Kv));
        let parsed = p
            .parse(
                b"id=t9 temp=22.0;hum=41,ts=2024-05-01T12:00:00.5+02:00 st=ok",
                0,
            )
            .expect("valid");
        assert_eq!(parsed.device_id, "t9");
        assert_eq!(parsed.time_ms, Some(1_714_557_600_500));
        assert_eq!(
            value(&parsed),
            serde_json::json!({"temp": 22.0, "hum": 41, "st": "ok",
                               "time_ms": 1_714_557_600_500_i64, "units": {"temp": "Cel"}})
        );
        for bad in ["", "   ", "id=t1 garbage", "=3 id=x", "temp=1"] {
            assert!(p.parse(bad.as_bytes(), 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn fixed_device_id() {
        let c = SerialLineConfig {
            device_id: Some("port-1".into()),
            format: LineFormat::Kv,
            ..SerialLineConfig::default()
        };
        let parsed = LineParser::new(&c).parse(b"v=1", 3).expect("valid");
        assert_eq!(parsed.device_id, "port-1");
        assert_eq!(value(&parsed), serde_json::json!({"v": 1, "time_ms": 3}));
    }

    #[test]
    fn typed_values() {
        assert_eq!(typed("12"), Value::from(12));
        assert_eq!(typed("-1.5e2"), Value::from(-150.0));
        assert_eq!(typed("inf"), Value::from("inf"));
        assert_eq!(typed("NaN"), Value::from("NaN"));
        assert_eq!(typed("1.2.3"), Value::from("1.2.3"));
        assert_eq!(typed("false"), Value::Bool(false));
        assert_eq!(typed(""), Value::Null);
    }

    #[test]
    fn timestamps() {
        use serde_json::json;
        assert_eq!(timestamp_ms(&json!(1_700_000_000)), Some(1_700_000_000_000));
        assert_eq!(
            timestamp_ms(&json!(1_700_000_000.25)),
            Some(1_700_000_000_250)
        );
        assert_eq!(
            timestamp_ms(&json!(1_700_000_000_000_i64)),
            Some(1_700_000_000_000)
        );
        assert_eq!(timestamp_ms(&json!("1700000000")), Some(1_700_000_000_000));
        assert_eq!(timestamp_ms(&json!("1970-01-01T00:00:00Z")), Some(0));
        assert_eq!(
            timestamp_ms(&json!("2000-02-29T23:59:59.999Z")),
            Some(951_868_799_999)
        );
        assert_eq!(
            timestamp_ms(&json!("2024-05-01T12:00:00-01:30")),
            Some(1_714_570_200_000)
        );
        for bad in [
            json!(-1),
            json!("2024-13-01T00:00:00Z"),
            json!("2024-05-01T12:00:00"),
            json!("2024-05-01T12:00:00.Z"),
            json!(true),
            json!("soon"),
        ] {
            assert_eq!(timestamp_ms(&bad), None, "{bad}");
        }
    }
}
