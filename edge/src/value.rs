//! The payload model: a reading decoded once into a JSON value the rules work on.
//!
//! | Content type | Fields the rules see | Transformable |
//! |---|---|---|
//! | JSON (`application/json`, or none and the payload starts with `{`) | an object's top-level members | yes, re-encoded as JSON |
//! | CBOR (`application/cbor`) | a map's members (text keys) | yes, re-encoded as CBOR |
//! | SenML JSON / CBOR (RFC 8428) | each record's resolved name (`bn` + `n`) and value (`v`, `vs`, `vb`, `vd`) | no: forwarded unchanged |
//!
//! Anything else (text, binary, a JSON array) has no fields: conditions see only `payload`,
//! `device`, `topic` and `source`, and transforms leave it alone.

use serde_json::{Map, Value};

/// How the payload was encoded, which decides how a transformed one is written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Cbor,
    /// SenML, either encoding: fields are derived from the pack, so it is never rewritten.
    Senml,
}

/// A decoded payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub encoding: Encoding,
    /// The whole payload (the pack for SenML); transforms change its members in place
    /// ([`Decoded::insert`], [`Decoded::remove`]).
    pub value: Value,
    /// SenML only: the records by resolved name.
    senml: Option<Map<String, Value>>,
    /// JSON only: the members added to the received object, as `,"name":value` text, while
    /// nothing received was changed or removed. [`encode`] then appends it to the received text
    /// instead of writing the whole object again (most transforms only add a computed field).
    appended: Vec<u8>,
    /// The received object was empty (the first appended member needs no comma).
    was_empty: bool,
    /// A received member was changed or removed (or a member added twice): [`encode`] writes
    /// the whole value.
    rewritten: bool,
}

static NO_FIELDS: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

impl Decoded {
    /// The top-level fields the rules see by name (none when the payload is not a map).
    pub fn fields(&self) -> &Map<String, Value> {
        match (&self.senml, &self.value) {
            (Some(senml), _) => senml,
            (None, Value::Object(map)) => map,
            (None, _) => &NO_FIELDS,
        }
    }

    /// [`Decoded::fields`] as one object, without a copy when the payload is that object.
    pub fn into_fields(self) -> Value {
        match (self.senml, self.value) {
            (Some(senml), _) => Value::Object(senml),
            (None, object @ Value::Object(_)) => object,
            (None, _) => Value::Object(Map::new()),
        }
    }

    /// Whether transforms may change the fields: JSON and CBOR objects.
    pub fn is_writable(&self) -> bool {
        self.senml.is_none() && self.value.is_object()
    }

    fn fields_mut(&mut self) -> Option<&mut Map<String, Value>> {
        match (&self.senml, &mut self.value) {
            (None, Value::Object(map)) => Some(map),
            _ => None,
        }
    }

    /// Sets a field of a writable payload; false when it is not writable.
    pub fn insert(&mut self, name: String, value: Value) -> bool {
        let json = self.encoding == Encoding::Json;
        // Borrowed field by field: the map and the appended text at once.
        let (None, Value::Object(fields)) = (&self.senml, &mut self.value) else {
            return false;
        };
        if json && !self.rewritten && !fields.contains_key(&name) {
            // Written as it is added: the name and the value are at hand, and serde_json's
            // text for them is what a whole-object encoding would write.
            let start = self.appended.len();
            self.appended.reserve(name.len() + 32);
            self.appended.push(b',');
            let written = serde_json::to_writer(&mut self.appended, &name)
                .and_then(|()| {
                    self.appended.push(b':');
                    serde_json::to_writer(&mut self.appended, &value)
                })
                .is_ok();
            if !written {
                self.appended.truncate(start);
                self.rewritten = true;
            }
            fields.insert(name, value);
        } else {
            fields.insert(name, value);
            self.rewritten = true;
        }
        true
    }

    /// Removes a field of a writable payload.
    pub fn remove(&mut self, name: &str) -> Option<Value> {
        let removed = self.fields_mut()?.remove(name);
        if removed.is_some() {
            self.rewritten = true;
        }
        removed
    }
}

/// Decodes a payload by its content type, or `None` when it is not one of the structured
/// formats (or does not parse: such a reading simply has no fields; schema validation, where
/// configured, refuses it).
pub fn decode(content_type: Option<&str>, payload: &[u8]) -> Option<Decoded> {
    let mime = content_type.map(|c| c.split(';').next().unwrap_or("").trim());
    let (encoding, value) = match mime {
        Some("application/json") => (Encoding::Json, serde_json::from_slice(payload).ok()?),
        None if payload.trim_ascii_start().first() == Some(&b'{') => {
            (Encoding::Json, serde_json::from_slice(payload).ok()?)
        }
        Some("application/cbor") => (Encoding::Cbor, cbor(payload)?),
        Some("application/senml+json") => (Encoding::Senml, serde_json::from_slice(payload).ok()?),
        Some("application/senml+cbor") => (Encoding::Senml, cbor(payload)?),
        _ => return None,
    };
    let senml = (encoding == Encoding::Senml).then(|| senml_fields(&value));
    let was_empty = value.as_object().is_some_and(Map::is_empty);
    Some(Decoded {
        encoding,
        value,
        senml,
        appended: Vec::new(),
        was_empty,
        rewritten: false,
    })
}

/// CBOR as a JSON value: integer map keys become their decimal text (SenML CBOR's labels),
/// byte strings arrays of numbers, tags their content; `None` for a non-finite float.
fn cbor(payload: &[u8]) -> Option<Value> {
    fn convert(v: ciborium::Value) -> Option<Value> {
        use ciborium::Value as C;
        Some(match v {
            C::Integer(i) => match i64::try_from(i) {
                Ok(n) => Value::from(n),
                Err(_) => Value::from(u64::try_from(i).ok()?),
            },
            C::Float(f) => Value::from(serde_json::Number::from_f64(f)?),
            C::Text(t) => Value::String(t),
            C::Bool(b) => Value::Bool(b),
            C::Null => Value::Null,
            C::Bytes(b) => Value::Array(b.into_iter().map(Value::from).collect()),
            C::Tag(_, inner) => convert(*inner)?,
            C::Array(items) => Value::Array(items.into_iter().map(convert).collect::<Option<_>>()?),
            C::Map(entries) => {
                let mut map = Map::new();
                for (k, v) in entries {
                    let key = match k {
                        C::Text(t) => t,
                        C::Integer(i) => i128::from(i).to_string(),
                        _ => return None,
                    };
                    map.insert(key, convert(v)?);
                }
                Value::Object(map)
            }
            _ => return None,
        })
    }
    convert(ciborium::from_reader(payload).ok()?)
}

/// Writes a (transformed) payload back in its encoding (JSON or CBOR; never SenML).
/// `received` is the payload it was decoded from: a JSON object that only gained members is
/// that text with the members appended (same members, received ones as they were sent).
pub fn encode(decoded: &Decoded, received: &[u8]) -> Option<Vec<u8>> {
    match decoded.encoding {
        Encoding::Json if !decoded.rewritten && !decoded.appended.is_empty() => {
            let text = received.trim_ascii_end();
            let Some((b'}', head)) = text.split_last() else {
                return serde_json::to_vec(&decoded.value).ok();
            };
            let tail = if decoded.was_empty {
                &decoded.appended[1..]
            } else {
                &decoded.appended[..]
            };
            let mut out = Vec::with_capacity(head.len() + tail.len() + 1);
            out.extend_from_slice(head);
            out.extend_from_slice(tail);
            out.push(b'}');
            Some(out)
        }
        Encoding::Json => serde_json::to_vec(&decoded.value).ok(),
        Encoding::Cbor => {
            let mut out = Vec::new();
            ciborium::into_writer(&decoded.value, &mut out).ok()?;
            Some(out)
        }
        Encoding::Senml => None,
    }
}

/// A SenML pack's records by resolved name: base name plus name, with the record's value.
/// SenML CBOR uses integer labels (RFC 8428 §6): -2 bn, 0 n, 2 v, 3 vs, 4 vb, 8 vd.
fn senml_fields(pack: &Value) -> Map<String, Value> {
    let mut fields = Map::new();
    let Value::Array(records) = pack else {
        return fields;
    };
    let mut base = String::new();
    for record in records {
        let Value::Object(r) = record else { continue };
        let get = |text: &str, label: &str| r.get(text).or_else(|| r.get(label));
        if let Some(Value::String(bn)) = get("bn", "-2") {
            base.clone_from(bn);
        }
        let name = match get("n", "0") {
            Some(Value::String(n)) => format!("{base}{n}"),
            _ => base.clone(),
        };
        let value = ["v", "vs", "vb", "vd"]
            .iter()
            .zip(["2", "3", "4", "8"])
            .find_map(|(text, label)| get(text, label));
        if let Some(value) = value
            && !name.is_empty()
        {
            fields.insert(name, value.clone());
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_cbor_and_senml_decode_to_fields() {
        let d = decode(Some("application/json"), br#"{"t":21.5,"ok":true}"#).unwrap();
        assert_eq!(
            (d.encoding, d.fields()["t"].clone()),
            (Encoding::Json, json!(21.5))
        );
        // No content type: JSON objects are recognised, anything else is opaque.
        assert!(decode(None, br#" {"t":1}"#).is_some());
        assert!(decode(None, b"21.5").is_none());
        assert!(decode(Some("text/plain"), br#"{"t":1}"#).is_none());
        assert!(decode(Some("application/json"), b"{broken").is_none());

        let mut cbor = Vec::new();
        ciborium::into_writer(&json!({"t": 3, "s": "x"}), &mut cbor).unwrap();
        let d = decode(Some("application/cbor"), &cbor).unwrap();
        assert_eq!(d.fields()["t"], json!(3));
        assert_eq!(encode(&d, &cbor).unwrap(), cbor);
        // SenML CBOR: integer labels (-2 bn, 0 n, 2 v).
        let pack = ciborium::Value::Array(vec![ciborium::Value::Map(vec![
            (ciborium::Value::from(-2), ciborium::Value::from("d:")),
            (ciborium::Value::from(0), ciborium::Value::from("t")),
            (ciborium::Value::from(2), ciborium::Value::from(4.5)),
        ])]);
        let mut senml = Vec::new();
        ciborium::into_writer(&pack, &mut senml).unwrap();
        let d = decode(Some("application/senml+cbor"), &senml).unwrap();
        assert_eq!(d.fields()["d:t"], json!(4.5));

        let pack = br#"[{"bn":"urn:dev:1:","n":"temp","v":21.5},{"n":"door","vb":true},{"n":"x"}]"#;
        let d = decode(Some("application/senml+json"), pack).unwrap();
        assert_eq!(d.encoding, Encoding::Senml);
        assert_eq!(d.fields()["urn:dev:1:temp"], json!(21.5));
        assert_eq!(d.fields()["urn:dev:1:door"], json!(true));
        assert_eq!(d.fields().len(), 2);
        assert!(encode(&d, pack).is_none());
    }

    /// Members added to a JSON object are appended to the received text; anything else
    /// rewrites the whole object. Either way the result parses to the transformed value.
    #[test]
    fn added_json_members_are_appended_to_the_received_text() {
        let received = br#"{"t": 21.5, "s":"x"}  "#;
        let mut d = decode(Some("application/json"), received).unwrap();
        assert!(d.insert("f".into(), json!(70.7)));
        assert!(d.insert("k\"ey".into(), json!({"a": [1]})));
        let out = encode(&d, received).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"t": 21.5, "s":"x","f":70.7,"k\"ey":{"a":[1]}}"#
        );
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap(), d.value);

        let mut empty = decode(None, b"{ }").unwrap();
        empty.insert("a".into(), json!(1));
        assert_eq!(encode(&empty, b"{ }").unwrap(), br#"{ "a":1}"#);

        // A received member changed, one removed, or one added twice: the whole object.
        for change in 0..3 {
            let mut d = decode(None, received).unwrap();
            d.insert("f".into(), json!(1));
            match change {
                0 => assert!(d.insert("t".into(), json!(0))),
                1 => assert!(d.remove("s").is_some()),
                _ => assert!(d.insert("f".into(), json!(2))),
            }
            let out = encode(&d, received).unwrap();
            assert_eq!(
                out,
                serde_json::to_vec(&d.value).unwrap(),
                "change {change}"
            );
        }
        // Not an object: nothing is writable.
        let mut list = decode(Some("application/json"), b"[1]").unwrap();
        assert!(!list.insert("a".into(), json!(1)));
    }
}
