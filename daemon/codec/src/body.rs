//! Request bodies of HTTP and CoAP ingestion: content types, validation, batches.
//!
//! A body becomes one or more records whose payload bytes are stored **unchanged** (the cloud
//! receives what the device sent):
//!
//! | format | one record per | validation |
//! | --- | --- | --- |
//! | JSON (`application/json`) | object, or element of a top-level array (a batch) | well-formed JSON; every record an object |
//! | CBOR (`application/cbor`) | item, or element of a top-level array (a batch) | well-formed CBOR (RFC 8949), elements sliced from the original bytes |
//! | SenML JSON (`application/senml+json`) | pack | RFC 8428: an array of records, known fields with the right types, a name, at most one value |
//! | SenML CBOR (`application/senml+cbor`) | pack | well-formed CBOR: an array of maps |
//! | octet stream, text | body | text must be UTF-8 |
//!
//! Errors name the offending place as a JSON pointer (`/3/v`) or `body`.

use bytes::Bytes;
use serde_json::value::RawValue;

/// A supported payload format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Cbor,
    SenmlJson,
    SenmlCbor,
    OctetStream,
    Text,
}

impl Format {
    /// From a CoAP Content-Format number (RFC 7252 12.3, RFC 8428).
    pub fn from_coap(content_format: u16) -> Option<Format> {
        Some(match content_format {
            0 => Format::Text,
            42 => Format::OctetStream,
            50 => Format::Json,
            60 => Format::Cbor,
            110 => Format::SenmlJson,
            112 => Format::SenmlCbor,
            _ => return None,
        })
    }

    /// From a MIME type; parameters such as `; charset=utf-8` are ignored.
    pub fn from_mime(mime: &str) -> Option<Format> {
        let essence = mime
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        Some(match essence.as_str() {
            "application/json" => Format::Json,
            "application/cbor" => Format::Cbor,
            "application/senml+json" => Format::SenmlJson,
            "application/senml+cbor" => Format::SenmlCbor,
            "application/octet-stream" => Format::OctetStream,
            "text/plain" => Format::Text,
            _ => return None,
        })
    }

    pub fn mime(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Cbor => "application/cbor",
            Format::SenmlJson => "application/senml+json",
            Format::SenmlCbor => "application/senml+cbor",
            Format::OctetStream => "application/octet-stream",
            Format::Text => "text/plain",
        }
    }

    /// Every supported MIME type, for error messages and discovery.
    pub const MIMES: &'static [&'static str] = &[
        "application/json",
        "application/cbor",
        "application/senml+json",
        "application/senml+cbor",
        "application/octet-stream",
        "text/plain",
    ];
}

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Malformed or invalid: answer 400 / 4.00 naming `field`.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// A batch with more records than allowed: answer 413 / 4.13.
    #[error("batch of {count} records exceeds the limit of {max}")]
    TooMany { count: usize, max: usize },
}

impl BodyError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        BodyError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Validates `body` and splits it into record payloads (unchanged bytes).
pub fn split(format: Format, body: &Bytes, max_records: usize) -> Result<Vec<Bytes>, BodyError> {
    if body.is_empty() {
        return Err(BodyError::invalid("body", "empty body"));
    }
    let records = match format {
        Format::Json => split_json(body)?,
        Format::Cbor => split_cbor(body)?,
        Format::SenmlJson => {
            validate_senml_json(body)?;
            vec![body.clone()]
        }
        Format::SenmlCbor => {
            validate_senml_cbor(body)?;
            vec![body.clone()]
        }
        Format::Text => {
            std::str::from_utf8(body)
                .map_err(|e| BodyError::invalid("body", format!("text is not UTF-8: {e}")))?;
            vec![body.clone()]
        }
        Format::OctetStream => vec![body.clone()],
    };
    if records.len() > max_records {
        return Err(BodyError::TooMany {
            count: records.len(),
            max: max_records,
        });
    }
    Ok(records)
}

fn json_syntax(e: &serde_json::Error) -> BodyError {
    BodyError::invalid(
        "body",
        format!(
            "malformed JSON at line {} column {}: {e}",
            e.line(),
            e.column()
        ),
    )
}

fn split_json(body: &Bytes) -> Result<Vec<Bytes>, BodyError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if first == Some(b'[') {
        let items: Vec<&RawValue> = serde_json::from_slice(body).map_err(|e| json_syntax(&e))?;
        if items.is_empty() {
            return Err(BodyError::invalid("body", "empty batch"));
        }
        items
            .into_iter()
            .enumerate()
            .map(|(i, raw)| {
                let text = raw.get();
                if !text.starts_with('{') {
                    return Err(BodyError::invalid(
                        format!("/{i}"),
                        "each record of a batch must be a JSON object",
                    ));
                }
                // A borrowed raw value is a slice of the body: shared, not copied.
                Ok(body.slice_ref(text.as_bytes()))
            })
            .collect()
    } else {
        let raw: &RawValue = serde_json::from_slice(body).map_err(|e| json_syntax(&e))?;
        if !raw.get().starts_with('{') {
            return Err(BodyError::invalid(
                "body",
                "a JSON reading must be an object (or an array of objects for a batch)",
            ));
        }
        Ok(vec![body.clone()])
    }
}

/// SenML fields (RFC 8428 4.2) and their JSON types.
fn senml_field_ok(key: &str, value: &serde_json::Value) -> Option<bool> {
    Some(match key {
        "bn" | "bu" | "n" | "u" | "vs" | "vd" => value.is_string(),
        "bt" | "bv" | "bs" | "v" | "s" | "t" | "ut" => value.is_number(),
        "bver" => value.is_u64(),
        "vb" => value.is_boolean(),
        _ => return None,
    })
}

fn validate_senml_json(body: &[u8]) -> Result<(), BodyError> {
    let pack: serde_json::Value = serde_json::from_slice(body).map_err(|e| json_syntax(&e))?;
    let records = pack
        .as_array()
        .ok_or_else(|| BodyError::invalid("body", "a SenML pack must be a JSON array"))?;
    if records.is_empty() {
        return Err(BodyError::invalid("body", "empty SenML pack"));
    }
    let mut base_name = String::new();
    for (i, record) in records.iter().enumerate() {
        let fields = record.as_object().ok_or_else(|| {
            BodyError::invalid(format!("/{i}"), "a SenML record must be an object")
        })?;
        for (key, value) in fields {
            match senml_field_ok(key, value) {
                Some(true) => {}
                Some(false) => {
                    return Err(BodyError::invalid(
                        format!("/{i}/{key}"),
                        format!("wrong type for SenML field `{key}`"),
                    ));
                }
                // RFC 8428 4.4: labels ending in `_` are must-understand; others may be ignored.
                None if key.ends_with('_') => {
                    return Err(BodyError::invalid(
                        format!("/{i}/{key}"),
                        format!("unsupported must-understand field `{key}`"),
                    ));
                }
                None => {}
            }
        }
        if let Some(bn) = fields.get("bn").and_then(|v| v.as_str()) {
            bn.clone_into(&mut base_name);
        }
        let values = ["v", "vs", "vb", "vd"]
            .iter()
            .filter(|k| fields.contains_key(**k))
            .count();
        if values > 1 {
            return Err(BodyError::invalid(
                format!("/{i}"),
                "more than one value field",
            ));
        }
        let name = fields.get("n").and_then(|v| v.as_str()).unwrap_or("");
        if values + usize::from(fields.contains_key("s")) > 0
            && base_name.is_empty()
            && name.is_empty()
        {
            return Err(BodyError::invalid(
                format!("/{i}/n"),
                "a record with a value needs a name (n or bn)",
            ));
        }
    }
    Ok(())
}

fn validate_senml_cbor(body: &[u8]) -> Result<(), BodyError> {
    let (header, _) = cbor::head(body, 0).map_err(|e| BodyError::invalid("body", e))?;
    if header.major != 4 {
        return Err(BodyError::invalid(
            "body",
            "a SenML pack must be a CBOR array",
        ));
    }
    let items = cbor::array_items(body).map_err(|e| BodyError::invalid("body", e))?;
    for (i, (start, end)) in items.iter().enumerate() {
        let (item, _) = cbor::head(&body[*start..*end], 0)
            .map_err(|e| BodyError::invalid(format!("/{i}"), e))?;
        if item.major != 5 {
            return Err(BodyError::invalid(
                format!("/{i}"),
                "a SenML record must be a CBOR map",
            ));
        }
    }
    Ok(())
}

fn split_cbor(body: &Bytes) -> Result<Vec<Bytes>, BodyError> {
    let (header, _) = cbor::head(body, 0).map_err(|e| BodyError::invalid("body", e))?;
    if header.major == 4 {
        let items = cbor::array_items(body).map_err(|e| BodyError::invalid("body", e))?;
        if items.is_empty() {
            return Err(BodyError::invalid("body", "empty batch"));
        }
        Ok(items.into_iter().map(|(s, e)| body.slice(s..e)).collect())
    } else {
        let end = cbor::skip(body, 0, 0).map_err(|e| BodyError::invalid("body", e))?;
        if end != body.len() {
            return Err(BodyError::invalid(
                "body",
                "trailing bytes after the CBOR item",
            ));
        }
        Ok(vec![body.clone()])
    }
}

/// A minimal well-formedness checker for CBOR (RFC 8949): enough to validate a body and slice a
/// top-level array into its elements without re-encoding them.
mod cbor {
    /// Nesting deeper than this is refused (a stack-exhaustion guard).
    const MAX_DEPTH: usize = 64;

    #[derive(Debug, Clone, Copy)]
    pub struct Head {
        pub major: u8,
        /// The argument: length, count or value; `None` for indefinite length.
        pub arg: Option<u64>,
        /// The low 5 bits, needed for major type 7.
        pub info: u8,
    }

    /// Reads the head at `at`; returns it and the offset just after it.
    pub fn head(buf: &[u8], at: usize) -> Result<(Head, usize), String> {
        let byte = *buf.get(at).ok_or("truncated CBOR")?;
        let (major, info) = (byte >> 5, byte & 0x1f);
        let take = |n: usize| -> Result<(u64, usize), String> {
            let bytes = buf.get(at + 1..at + 1 + n).ok_or("truncated CBOR")?;
            Ok((
                bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
                at + 1 + n,
            ))
        };
        let (arg, next) = match info {
            0..=23 => (Some(u64::from(info)), at + 1),
            24 => take(1).map(|(v, n)| (Some(v), n))?,
            25 => take(2).map(|(v, n)| (Some(v), n))?,
            26 => take(4).map(|(v, n)| (Some(v), n))?,
            27 => take(8).map(|(v, n)| (Some(v), n))?,
            31 if matches!(major, 2..=5 | 7) => (None, at + 1),
            _ => {
                return Err(format!(
                    "invalid CBOR head byte 0x{byte:02x} at offset {at}"
                ));
            }
        };
        Ok((Head { major, arg, info }, next))
    }

    /// Returns the offset just after the item starting at `at`.
    pub fn skip(buf: &[u8], at: usize, depth: usize) -> Result<usize, String> {
        if depth > MAX_DEPTH {
            return Err("CBOR nested too deeply".into());
        }
        let (h, mut next) = head(buf, at)?;
        match (h.major, h.arg) {
            (0 | 1, _) => Ok(next),
            (2 | 3, Some(len)) => {
                let end = next
                    .checked_add(usize::try_from(len).map_err(|_| "CBOR length too large")?)
                    .ok_or("CBOR length too large")?;
                if end > buf.len() {
                    return Err("truncated CBOR string".into());
                }
                if h.major == 3 {
                    std::str::from_utf8(&buf[next..end])
                        .map_err(|_| "CBOR text string is not UTF-8")?;
                }
                Ok(end)
            }
            (2 | 3, None) => loop {
                if buf.get(next) == Some(&0xff) {
                    return Ok(next + 1);
                }
                let (chunk, _) = head(buf, next)?;
                if chunk.major != h.major || chunk.arg.is_none() {
                    return Err("invalid chunk in indefinite-length CBOR string".into());
                }
                next = skip(buf, next, depth + 1)?;
            },
            (4 | 5, Some(count)) => {
                let items = if h.major == 5 {
                    count.saturating_mul(2)
                } else {
                    count
                };
                // Each item takes at least one byte: a count beyond the buffer is a lie.
                if items > buf.len() as u64 {
                    return Err("CBOR container count exceeds the body".into());
                }
                for _ in 0..items {
                    next = skip(buf, next, depth + 1)?;
                }
                Ok(next)
            }
            (4 | 5, None) => {
                let mut n = 0u64;
                loop {
                    if buf.get(next) == Some(&0xff) {
                        if h.major == 5 && n % 2 == 1 {
                            return Err("CBOR map with a key but no value".into());
                        }
                        return Ok(next + 1);
                    }
                    next = skip(buf, next, depth + 1)?;
                    n += 1;
                }
            }
            (6, _) => skip(buf, next, depth + 1),
            (7, _) if h.info == 31 => Err("unexpected CBOR break".into()),
            (7, _) => Ok(next),
            _ => Err("invalid CBOR".into()),
        }
    }

    /// The byte ranges of a top-level array's elements; the array must span the whole buffer.
    pub fn array_items(buf: &[u8]) -> Result<Vec<(usize, usize)>, String> {
        let (h, mut next) = head(buf, 0)?;
        let mut items = Vec::new();
        match h.arg {
            Some(count) => {
                if count > buf.len() as u64 {
                    return Err("CBOR array count exceeds the body".into());
                }
                for _ in 0..count {
                    let end = skip(buf, next, 1)?;
                    items.push((next, end));
                    next = end;
                }
            }
            None => loop {
                if buf.get(next) == Some(&0xff) {
                    next += 1;
                    break;
                }
                let end = skip(buf, next, 1)?;
                items.push((next, end));
                next = end;
            },
        }
        if next != buf.len() {
            return Err("trailing bytes after the CBOR array".into());
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`super::split`] of a copy of `body`.
    fn split(format: Format, body: &[u8], max: usize) -> Result<Vec<Bytes>, BodyError> {
        super::split(format, &Bytes::copy_from_slice(body), max)
    }

    impl BodyError {
        fn field(&self) -> &str {
            match self {
                BodyError::Invalid { field, .. } => field,
                BodyError::TooMany { .. } => "body",
            }
        }
    }

    #[test]
    fn json_object_is_one_record_unchanged() {
        let body = br#" {"t": 21.5,  "unit":"C"} "#;
        assert_eq!(split(Format::Json, body, 10).unwrap(), vec![body.to_vec()]);
    }

    #[test]
    fn json_array_is_a_batch_of_unchanged_elements() {
        let body = br#"[{"a":1}, {"b" : [1,2]}]"#;
        let records = split(Format::Json, body, 10).unwrap();
        assert_eq!(
            records,
            vec![br#"{"a":1}"#.to_vec(), br#"{"b" : [1,2]}"#.to_vec()]
        );
    }

    #[test]
    fn json_errors_name_the_place() {
        let err = split(Format::Json, br#"[{"a":1}, 5]"#, 10).unwrap_err();
        assert_eq!(err.field(), "/1");
        let err = split(Format::Json, br#"{"a":"#, 10).unwrap_err();
        assert_eq!(err.field(), "body");
        assert!(err.to_string().contains("line 1"), "{err}");
        assert_eq!(split(Format::Json, b"42", 10).unwrap_err().field(), "body");
        assert!(matches!(
            split(Format::Json, br#"[{},{},{}]"#, 2),
            Err(BodyError::TooMany { count: 3, max: 2 })
        ));
    }

    #[test]
    fn senml_json_is_validated_and_kept_as_one_pack() {
        let pack = br#"[{"bn":"urn:dev:ow:10e2073a01080063:","bt":1.320067464e+09,"n":"voltage","u":"V","v":120.1},{"n":"current","t":-5,"v":1.2}]"#;
        assert_eq!(
            split(Format::SenmlJson, pack, 1).unwrap(),
            vec![pack.to_vec()]
        );
        let err = split(Format::SenmlJson, br#"[{"n":"x","v":"high"}]"#, 1).unwrap_err();
        assert_eq!(err.field(), "/0/v");
        let err = split(Format::SenmlJson, br#"[{"n":"x","v":1,"vs":"a"}]"#, 1).unwrap_err();
        assert_eq!(err.field(), "/0");
        let err = split(Format::SenmlJson, br#"[{"v":1}]"#, 1).unwrap_err();
        assert_eq!(err.field(), "/0/n");
        let err = split(Format::SenmlJson, br#"{"n":"x"}"#, 1).unwrap_err();
        assert_eq!(err.field(), "body");
        let err = split(Format::SenmlJson, br#"[{"n":"x","v":1,"foo_":1}]"#, 1).unwrap_err();
        assert_eq!(err.field(), "/0/foo_");
    }

    #[test]
    fn cbor_items_and_batches() {
        // {"t": 21}
        let item = [0xa1, 0x61, b't', 0x15];
        assert_eq!(split(Format::Cbor, &item, 10).unwrap(), vec![item.to_vec()]);
        // [ {"t":21}, 7, "hi" ] with a definite and an indefinite array.
        let batch = [0x83, 0xa1, 0x61, b't', 0x15, 0x07, 0x62, b'h', b'i'];
        let records = split(Format::Cbor, &batch, 10).unwrap();
        assert_eq!(
            records,
            vec![
                vec![0xa1, 0x61, b't', 0x15],
                vec![0x07],
                vec![0x62, b'h', b'i']
            ]
        );
        let indefinite = [0x9f, 0x01, 0x02, 0xff];
        assert_eq!(split(Format::Cbor, &indefinite, 10).unwrap().len(), 2);
    }

    #[test]
    fn malformed_cbor_is_refused_without_panicking() {
        for bad in [
            &[0x83, 0x01][..],                                       // truncated array
            &[0x1c],                                                 // reserved additional info
            &[0x7a, 0xff, 0xff, 0xff],                               // truncated length
            &[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // absurd count
            &[0x62, 0xff, 0xfe],                                     // text that is not UTF-8
            &[0x01, 0x02],                                           // trailing bytes
            &[0xff],                                                 // lone break
        ] {
            assert!(split(Format::Cbor, bad, 10).is_err(), "{bad:02x?}");
        }
        let deep = vec![0x81; 1000];
        assert!(split(Format::Cbor, &deep, 10).is_err());
    }

    #[test]
    fn senml_cbor_must_be_an_array_of_maps() {
        // [{0: "x", 2: 1}]
        let pack = [0x81, 0xa2, 0x00, 0x61, b'x', 0x02, 0x01];
        assert_eq!(
            split(Format::SenmlCbor, &pack, 1).unwrap(),
            vec![pack.to_vec()]
        );
        assert_eq!(
            split(Format::SenmlCbor, &[0x81, 0x01], 1)
                .unwrap_err()
                .field(),
            "/0"
        );
    }

    #[test]
    fn mime_and_coap_formats() {
        assert_eq!(
            Format::from_mime("application/json; charset=utf-8"),
            Some(Format::Json)
        );
        assert_eq!(
            Format::from_mime("Application/SenML+JSON"),
            Some(Format::SenmlJson)
        );
        assert_eq!(Format::from_mime("image/png"), None);
        assert_eq!(Format::from_coap(60), Some(Format::Cbor));
        assert_eq!(Format::from_coap(41), None);
        assert!(split(Format::Text, &[0xff], 1).is_err());
        assert_eq!(
            split(Format::OctetStream, &[0xff], 1).unwrap(),
            vec![vec![0xff]]
        );
        assert!(split(Format::OctetStream, &[], 1).is_err());
    }
}
