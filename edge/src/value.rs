//! The payload model: a reading decoded once into the fields the rules work on.
//!
//! | Content type | Fields the rules see | Transformable |
//! |---|---|---|
//! | JSON (`application/json`, or none and the payload starts with `{`) | an object's top-level members | yes, re-encoded as JSON |
//! | CBOR (`application/cbor`) | a map's members (text keys) | yes, re-encoded as CBOR |
//! | SenML JSON / CBOR (RFC 8428) | each record's resolved name (`bn` + `n`) and value (`v`, `vs`, `vb`, `vd`) | no: forwarded unchanged |
//!
//! Anything else (text, binary, a JSON array) has no fields: conditions see only `payload`,
//! `device`, `topic` and `source`, and transforms leave it alone.
//!
//! Two forms, one meaning. A JSON object whose members are all scalars — the usual reading,
//! `{"temperature":21.5,"humidity":48.2}` — is kept as [`Form::Members`]: its members located
//! by one pass of `serde_json` over the received text, numbers and booleans parsed, names
//! borrowed from the text, no map built. Members a transform adds are listed beside them and
//! appended to the received text when the payload is written. Anything else, and a JSON object
//! once a rule needs it whole (the CEL interpreter, a JSON Schema, a renamed or removed
//! member), is [`Form::Tree`]: a `serde_json` value. Building and dropping that map for every
//! reading was most of what 20 rules cost (docs/BENCHMARKS.md, "Edge rules"); the members form
//! answers the native evaluator's lookups (`crate::fast`) without it. Both forms come from the
//! same parser, so a payload has the same fields, with the same values, in either
//! (`members_and_tree_agree` holds them together).

use std::borrow::Cow;
use std::cell::OnceCell;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};
use smallvec::SmallVec;

use crate::fast::Native;

/// How the payload was encoded, which decides how a transformed one is written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Cbor,
    /// SenML, either encoding: fields are derived from the pack, so it is never rewritten.
    Senml,
}

/// A decoded payload, borrowing the received bytes (and the names rules add).
#[derive(Debug, Clone)]
pub struct Decoded<'a> {
    pub encoding: Encoding,
    form: Form<'a>,
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

// On the stack, once per reading: boxing the members would cost the allocation they save.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Form<'a> {
    /// A JSON object of scalar members, not parsed into a tree (see the module docs).
    Members(Members<'a>),
    /// The whole payload as a value (the pack for SenML); transforms change its members in
    /// place ([`Decoded::insert`], [`Decoded::remove`]).
    Tree {
        value: Value,
        /// SenML only: the records by resolved name.
        senml: Option<Map<String, Value>>,
    },
}

/// A JSON object's members by name, and the value of each that is a number or a boolean
/// (`None`: a string or null); inline for the usual few.
type Scanned = SmallVec<[(Name, Option<Native>); 8]>;

/// A received member's name: where it is in the text (bytes from, to), or unescaped.
#[derive(Debug, Clone)]
enum Name {
    At(u32, u32),
    Escaped(Box<str>),
}

impl Name {
    fn is(&self, name: &str, received: &[u8]) -> bool {
        match self {
            Name::At(from, to) => {
                received.get(*from as usize..*to as usize) == Some(name.as_bytes())
            }
            Name::Escaped(own) => &**own == name,
        }
    }
}

/// A JSON object's members, as received and as added since.
#[derive(Debug, Clone)]
struct Members<'a> {
    received: &'a [u8],
    /// Each received member's name and, for a number or a boolean, its value (`None`: a string
    /// or null). In order; a repeated name counts by its last member, as in a parsed object.
    members: Scanned,
    /// Members added by transforms: names distinct from the received ones and each other
    /// (adding an existing name turns the payload into a tree).
    added: Vec<(Cow<'a, str>, Value)>,
    /// The whole object as a tree, built the first time something asks for it and kept in step
    /// with `added` from then on.
    tree: OnceCell<Value>,
}

impl<'a> Members<'a> {
    /// The member `name`: `Some(value)` when present (`value` as in `members`).
    fn get(&self, name: &str) -> Option<Option<Native>> {
        if let Some((_, v)) = self.added.iter().find(|(n, _)| n == name) {
            return Some(Native::of(v));
        }
        self.members
            .iter()
            .rev()
            .find(|(n, _)| n.is(name, self.received))
            .map(|(_, v)| *v)
    }

    fn tree(&self) -> &Value {
        self.tree.get_or_init(|| {
            // The text parsed once already (`scan`), by the same parser: it parses again.
            let mut object = match serde_json::from_slice(self.received) {
                Ok(Value::Object(map)) => map,
                _ => Map::new(),
            };
            for (name, value) in &self.added {
                object.insert(name.clone().into_owned(), value.clone());
            }
            Value::Object(object)
        })
    }

    fn into_tree(self) -> Value {
        self.tree();
        self.tree.into_inner().unwrap_or_default()
    }
}

pub(crate) static NO_FIELDS: std::sync::LazyLock<Map<String, Value>> =
    std::sync::LazyLock::new(Map::new);

impl<'a> Decoded<'a> {
    /// The whole decoded payload (the pack for SenML). Builds the tree of a members-form
    /// payload, once.
    pub fn value(&self) -> &Value {
        match &self.form {
            Form::Members(m) => m.tree(),
            Form::Tree { value, .. } => value,
        }
    }

    /// The top-level fields the rules see by name (none when the payload is not a map).
    /// Builds the tree of a members-form payload, once.
    pub fn fields(&self) -> &Map<String, Value> {
        match &self.form {
            Form::Members(m) => m.tree().as_object().unwrap_or(&NO_FIELDS),
            Form::Tree {
                senml: Some(senml), ..
            } => senml,
            Form::Tree {
                value: Value::Object(map),
                ..
            } => map,
            Form::Tree { .. } => &NO_FIELDS,
        }
    }

    /// The field `name` as the native evaluator sees it, without building a tree: `None` when
    /// missing, `Some(None)` when it is not a number or a boolean.
    pub(crate) fn field(&self, name: &str) -> Option<Option<Native>> {
        match &self.form {
            Form::Members(m) => m.get(name),
            Form::Tree { .. } => self.fields().get(name).map(Native::of),
        }
    }

    /// `payload.<name>`: like [`Decoded::field`], for the payload object's member (for SenML
    /// the pack, which is no object: `None`).
    pub(crate) fn member(&self, name: &str) -> Option<Option<Native>> {
        match &self.form {
            Form::Members(m) => m.get(name),
            Form::Tree { value, .. } => value.as_object()?.get(name).map(Native::of),
        }
    }

    /// `has(payload.<name>)`; `None` when the payload is not an object.
    pub(crate) fn has(&self, name: &str) -> Option<bool> {
        match &self.form {
            Form::Members(m) => Some(m.get(name).is_some()),
            Form::Tree { value, .. } => Some(value.as_object()?.contains_key(name)),
        }
    }

    /// [`Decoded::value`], owned.
    pub fn into_value(self) -> Value {
        match self.form {
            Form::Members(m) => m.into_tree(),
            Form::Tree { value, .. } => value,
        }
    }

    /// [`Decoded::fields`] as one object, without a copy when the payload is that object.
    pub fn into_fields(self) -> Value {
        match self.form {
            Form::Members(m) => m.into_tree(),
            Form::Tree {
                senml: Some(senml), ..
            } => Value::Object(senml),
            Form::Tree {
                value: object @ Value::Object(_),
                ..
            } => object,
            Form::Tree { .. } => Value::Object(Map::new()),
        }
    }

    /// Whether transforms may change the fields: JSON and CBOR objects.
    pub fn is_writable(&self) -> bool {
        match &self.form {
            Form::Members(_) => true,
            Form::Tree { value, senml } => senml.is_none() && value.is_object(),
        }
    }

    /// Sets a field of a writable payload; false when it is not writable.
    pub fn insert(&mut self, name: impl Into<Cow<'a, str>>, value: Value) -> bool {
        let name = name.into();
        let json = self.encoding == Encoding::Json;
        if let Form::Members(m) = &mut self.form
            && m.get(&name).is_none()
            && append(&mut self.appended, &name, &value)
        {
            if let Some(Value::Object(tree)) = m.tree.get_mut() {
                tree.insert(name.clone().into_owned(), value.clone());
            }
            m.added.push((name, value));
            return true;
        }
        // Borrowed field by field: the map and the appended text at once.
        let Some(fields) = writable_tree(&mut self.form) else {
            return false;
        };
        if json && !self.rewritten && !fields.contains_key(&*name) {
            if !append(&mut self.appended, &name, &value) {
                self.rewritten = true;
            }
        } else {
            self.rewritten = true;
        }
        fields.insert(name.into_owned(), value);
        true
    }

    /// Removes a field of a writable payload.
    pub fn remove(&mut self, name: &str) -> Option<Value> {
        if let Form::Members(m) = &self.form
            && m.get(name).is_none()
        {
            return None;
        }
        let fields = writable_tree(&mut self.form)?;
        let removed = fields.remove(name);
        if removed.is_some() {
            self.rewritten = true;
        }
        removed
    }
}

/// Turns a members-form payload into a tree (a rule changes what was received).
fn to_tree<'f, 'a>(form: &'f mut Form<'a>) -> &'f mut Form<'a> {
    if let Form::Members(m) = form {
        let members = std::mem::replace(
            m,
            Members {
                received: &[],
                members: SmallVec::new(),
                added: Vec::new(),
                tree: OnceCell::new(),
            },
        );
        *form = Form::Tree {
            value: members.into_tree(),
            senml: None,
        };
    }
    form
}

/// The fields of a writable payload as a map, a members-form one turned into a tree first.
fn writable_tree<'f>(form: &'f mut Form<'_>) -> Option<&'f mut Map<String, Value>> {
    match to_tree(form) {
        Form::Tree {
            value: Value::Object(fields),
            senml: None,
        } => Some(fields),
        _ => None,
    }
}

/// Writes `,"name":value` to `text` (serde_json's text for them, what a whole-object encoding
/// would write); false, and `text` as it was, when it cannot.
fn append(text: &mut Vec<u8>, name: &str, value: &Value) -> bool {
    let start = text.len();
    // Room for the usual few computed fields at once.
    text.reserve((name.len() + 32).max(128));
    text.push(b',');
    let written = serde_json::to_writer(&mut *text, name)
        .and_then(|()| {
            text.push(b':');
            serde_json::to_writer(&mut *text, value)
        })
        .is_ok();
    if !written {
        text.truncate(start);
    }
    written
}

/// Decodes a payload by its content type, or `None` when it is not one of the structured
/// formats (or does not parse: such a reading simply has no fields; schema validation, where
/// configured, refuses it).
pub fn decode<'a>(content_type: Option<&str>, payload: &'a [u8]) -> Option<Decoded<'a>> {
    let mime = content_type.map(|c| c.split(';').next().unwrap_or("").trim());
    let json = match mime {
        Some("application/json") => true,
        None => payload.trim_ascii_start().first() == Some(&b'{'),
        _ => false,
    };
    if json && let Some(members) = scan(payload) {
        return Some(Decoded {
            encoding: Encoding::Json,
            was_empty: members.is_empty(),
            form: Form::Members(Members {
                received: payload,
                members,
                added: Vec::new(),
                tree: OnceCell::new(),
            }),
            appended: Vec::new(),
            rewritten: false,
        });
    }
    let (encoding, value) = match mime {
        _ if json => (Encoding::Json, serde_json::from_slice(payload).ok()?),
        Some("application/cbor") => (Encoding::Cbor, cbor(payload)?),
        Some("application/senml+json") => (Encoding::Senml, serde_json::from_slice(payload).ok()?),
        Some("application/senml+cbor") => (Encoding::Senml, cbor(payload)?),
        _ => return None,
    };
    let senml = (encoding == Encoding::Senml).then(|| senml_fields(&value));
    let was_empty = value.as_object().is_some_and(Map::is_empty);
    Some(Decoded {
        encoding,
        form: Form::Tree { value, senml },
        appended: Vec::new(),
        was_empty,
        rewritten: false,
    })
}

/// The members of a JSON object of scalars, in one pass of `serde_json` over `payload`;
/// `None` when it is not valid JSON, not an object, or has an array or object member (those
/// take the tree: the parser's nesting limit is the tree's business).
fn scan(payload: &[u8]) -> Option<Scanned> {
    let mut de = serde_json::Deserializer::from_slice(payload);
    let members = de.deserialize_map(ObjectVisitor(payload)).ok()?;
    de.end().ok()?;
    Some(members)
}

/// Scans the object of this text.
struct ObjectVisitor<'t>(&'t [u8]);

impl<'de> Visitor<'de> for ObjectVisitor<'_> {
    type Value = Scanned;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Scanned::new();
        // Where a name borrowed from the text is in it.
        let start = self.0.as_ptr() as usize;
        let too_long = || de::Error::custom("a payload over 4 GiB");
        while let Some(name) = map.next_key_seed(NameSeed)? {
            let name = match name {
                Cow::Borrowed(n) => {
                    let from = n.as_ptr() as usize - start;
                    let from = u32::try_from(from).map_err(|_| too_long())?;
                    let len = u32::try_from(n.len()).map_err(|_| too_long())?;
                    let to = from.checked_add(len).ok_or_else(too_long)?;
                    Name::At(from, to)
                }
                Cow::Owned(n) => Name::Escaped(n.into_boxed_str()),
            };
            members.push((name, map.next_value_seed(ScalarSeed)?));
        }
        Ok(members)
    }
}

/// A member's name, borrowed from the text unless it has escapes.
struct NameSeed;

impl<'de> DeserializeSeed<'de> for NameSeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for NameSeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a member name")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
}

/// A scalar member's value as the native evaluator sees it (`None`: a string or null); an
/// array or an object is an error (the payload then takes the tree).
struct ScalarSeed;

impl<'de> DeserializeSeed<'de> for ScalarSeed {
    type Value = Option<Native>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ScalarSeed {
    type Value = Option<Native>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a number, string, boolean or null")
    }

    // As `Native::of` types a parsed `serde_json::Number`: serde_json calls `visit_u64` for
    // non-negative integers, `visit_i64` for negative ones and `visit_f64` for the rest.
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(Native::UInt(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Native::of_number(&serde_json::Number::from(v)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        // A parsed value would hold a non-finite number as null.
        Ok(serde_json::Number::from_f64(v).and_then(|n| Native::of_number(&n)))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Some(Native::Bool(v)))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
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
pub fn encode(decoded: &Decoded<'_>, received: &[u8]) -> Option<Vec<u8>> {
    match decoded.encoding {
        Encoding::Json if !decoded.rewritten && !decoded.appended.is_empty() => {
            let text = received.trim_ascii_end();
            let Some((b'}', head)) = text.split_last() else {
                return serde_json::to_vec(decoded.value()).ok();
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
        Encoding::Json => serde_json::to_vec(decoded.value()).ok(),
        Encoding::Cbor => {
            let mut out = Vec::new();
            ciborium::into_writer(decoded.value(), &mut out).ok()?;
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

    /// The members form answers like the tree the same text parses to: the same fields, the
    /// same numbers (integers, negative zero, exponents, out-of-range values refused alike),
    /// the last of repeated names, escaped names; and a nested member sends the payload to
    /// the tree.
    mod members_and_tree_agree {
        use proptest::prelude::*;

        use super::*;

        fn name() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec!["a", "b", "t\\u00e9", "\\\"q", ""])
        }

        fn value() -> impl Strategy<Value = String> {
            let fixed = prop::sample::select(vec![
                "0",
                "-0",
                "-0.0",
                "1e3",
                "1E-3",
                "12.50",
                "-7",
                "18446744073709551615",
                "18446744073709551616",
                "-9223372036854775808",
                "-9223372036854775809",
                "1e400",
                "true",
                "false",
                "null",
                "\"x\"",
                "\"\\u00e9\"",
                "[1]",
                "{\"n\":1}",
            ])
            .prop_map(str::to_owned);
            prop_oneof![
                fixed,
                any::<i64>().prop_map(|i| i.to_string()),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(|f| f.to_string()),
            ]
        }

        proptest! {
            #[test]
            fn on_any_object_of_scalars(
                members in prop::collection::vec((name(), value()), 0..6),
                spaces in any::<bool>(),
            ) {
                let gap = if spaces { " " } else { "" };
                let text = format!(
                    "{{{gap}{}{gap}}}",
                    members
                        .iter()
                        .map(|(n, v)| format!("\"{n}\"{gap}:{gap}{v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                );
                let tree: Option<Value> = serde_json::from_slice(text.as_bytes()).ok();
                let decoded = decode(None, text.as_bytes());
                prop_assert_eq!(decoded.is_some(), tree.is_some(), "{}", text);
                let (Some(d), Some(tree)) = (decoded, tree) else { return Ok(()) };
                let nested = members.iter().any(|(_, v)| v.starts_with(['[', '{']));
                prop_assert_eq!(matches!(d.form, Form::Members(_)), !nested, "{}", text);
                let names: Vec<String> = tree.as_object().unwrap().keys().cloned()
                    .chain(["a".to_owned(), "missing".to_owned()])
                    .collect();
                for n in &names {
                    let want = tree.get(n).map(Native::of);
                    prop_assert_eq!(d.field(n), want, "{} in {}", n, text);
                    prop_assert_eq!(d.member(n), want, "{} in {}", n, text);
                    prop_assert_eq!(d.has(n), Some(want.is_some()), "{} in {}", n, text);
                }
                prop_assert_eq!(d.value(), &tree);
                // An added member: appended to the text, which parses to the tree with it.
                let mut d = d;
                prop_assert!(d.insert("added", json!(1.5)));
                prop_assert_eq!(d.field("added"), Some(Some(Native::Double(1.5))));
                let mut want = tree.clone();
                want.as_object_mut().unwrap().insert("added".into(), json!(1.5));
                let out = encode(&d, text.as_bytes()).unwrap();
                prop_assert_eq!(serde_json::from_slice::<Value>(&out).unwrap(), want.clone());
                prop_assert_eq!(d.into_fields(), want);
            }
        }
    }

    /// Members added to a JSON object are appended to the received text; anything else
    /// rewrites the whole object. Either way the result parses to the transformed value.
    #[test]
    fn added_json_members_are_appended_to_the_received_text() {
        let received = br#"{"t": 21.5, "s":"x"}  "#;
        let mut d = decode(Some("application/json"), received).unwrap();
        assert!(d.insert("f", json!(70.7)));
        assert!(d.insert("k\"ey", json!({"a": [1]})));
        let out = encode(&d, received).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"t": 21.5, "s":"x","f":70.7,"k\"ey":{"a":[1]}}"#
        );
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap(), *d.value());

        let mut empty = decode(None, b"{ }").unwrap();
        empty.insert("a", json!(1));
        assert_eq!(encode(&empty, b"{ }").unwrap(), br#"{ "a":1}"#);

        // A received member changed, one removed, or one added twice: the whole object.
        for change in 0..3 {
            let mut d = decode(None, received).unwrap();
            d.insert("f", json!(1));
            match change {
                0 => assert!(d.insert("t", json!(0))),
                1 => assert!(d.remove("s").is_some()),
                _ => assert!(d.insert("f", json!(2))),
            }
            let out = encode(&d, received).unwrap();
            assert_eq!(
                out,
                serde_json::to_vec(d.value()).unwrap(),
                "change {change}"
            );
        }
        // Not an object: nothing is writable.
        let mut list = decode(Some("application/json"), b"[1]").unwrap();
        assert!(!list.insert("a", json!(1)));
    }
}
