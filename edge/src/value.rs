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
    /// The whole payload (the pack for SenML); transforms change its members in place.
    pub value: Value,
    /// SenML only: the records by resolved name.
    senml: Option<Map<String, Value>>,
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

    /// The fields of a payload transforms may change: JSON and CBOR objects.
    pub fn fields_mut(&mut self) -> Option<&mut Map<String, Value>> {
        match (&self.senml, &mut self.value) {
            (None, Value::Object(map)) => Some(map),
            _ => None,
        }
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
    Some(Decoded {
        encoding,
        value,
        senml,
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
pub fn encode(decoded: &Decoded) -> Option<Vec<u8>> {
    match decoded.encoding {
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
        assert_eq!(encode(&d).unwrap(), cbor);
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
        assert!(encode(&d).is_none());
    }
}
