//! Forwarded records as CloudEvents 1.0 in the Kafka protocol binding (docs/KAFKA.md,
//! "CloudEvents"). Outpost's own headers stay on every record; CloudEvents adds to them.
//!
//! The attributes, the same in both content modes:
//!
//! * `id`: `<outbox id>-<sequence>`. The outbox id is random per outbox (`buffer stats` shows
//!   it), so the id is unique across the fleet and across outbox resets, and a record forwarded
//!   twice (at-least-once) keeps its id: consumers deduplicate on it.
//! * `source`: `/outpost/<gateway id>/devices/<device id>`, the device that sent the reading.
//! * `type`: [`TYPE`].
//! * `time`: when the gateway received the record (RFC 3339, milliseconds, UTC).
//! * `subject`: the record's own topic (MQTT topic, CoAP path, HTTP topic), when it has one.
//! * `datacontenttype`: the content type the device gave, when it gave one.

use std::borrow::Cow;

use base64::Engine;
use outpost_config::CloudEvents;
use rdkafka::message::{Header, OwnedHeaders};

use crate::envelope::StoredRecord;
use crate::outbox::rfc3339_utc;

/// `type` of a forwarded reading.
pub const TYPE: &str = "outpost.reading";

/// The binary mode's header names (the Kafka protocol binding's `ce_` prefix).
pub mod header {
    pub const SPECVERSION: &str = "ce_specversion";
    pub const ID: &str = "ce_id";
    pub const SOURCE: &str = "ce_source";
    pub const TYPE: &str = "ce_type";
    pub const TIME: &str = "ce_time";
    pub const SUBJECT: &str = "ce_subject";
    /// `datacontenttype` in binary mode; the event format's media type in structured mode.
    pub const CONTENT_TYPE: &str = "content-type";
}

/// The media type of a structured-mode record.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=UTF-8";

/// The record's Kafka headers (Outpost's, [`super::headers`], then the mode's) and value in
/// `mode`: the payload itself unless `structured`.
pub fn encode<'a>(
    record: &'a StoredRecord,
    gateway_id: &str,
    outbox_id: &str,
    mode: CloudEvents,
) -> (OwnedHeaders, Cow<'a, [u8]>) {
    let mut headers = super::headers(record, gateway_id, outbox_id);
    match mode {
        CloudEvents::Off => (headers, Cow::Borrowed(&record.payload)),
        CloudEvents::Binary => {
            let attributes = Attributes::of(record, gateway_id, outbox_id);
            let mut add = |key, value: &str| {
                headers = std::mem::take(&mut headers).insert(Header {
                    key,
                    value: Some(value),
                });
            };
            add(header::SPECVERSION, "1.0");
            add(header::ID, &attributes.id);
            add(header::SOURCE, &attributes.source);
            add(header::TYPE, TYPE);
            add(header::TIME, &attributes.time);
            if !record.topic.is_empty() {
                add(header::SUBJECT, &record.topic);
            }
            if let Some(content_type) = &record.content_type {
                add(header::CONTENT_TYPE, content_type);
            }
            (headers, Cow::Borrowed(&record.payload))
        }
        CloudEvents::Structured => {
            let headers = headers.insert(Header {
                key: header::CONTENT_TYPE,
                value: Some(STRUCTURED_CONTENT_TYPE),
            });
            (
                headers,
                Cow::Owned(structured(record, gateway_id, outbox_id)),
            )
        }
    }
}

struct Attributes {
    id: String,
    source: String,
    time: String,
}

impl Attributes {
    fn of(record: &StoredRecord, gateway_id: &str, outbox_id: &str) -> Self {
        Self {
            id: format!("{outbox_id}-{}", record.seq),
            source: format!("/outpost/{gateway_id}/devices/{}", record.device_id),
            time: rfc3339_utc(record.received_at_ms, true),
        }
    }
}

/// The JSON event of structured mode. The payload is `data` when it is JSON (and its content
/// type, if any, says JSON), else `data_base64`.
fn structured(record: &StoredRecord, gateway_id: &str, outbox_id: &str) -> Vec<u8> {
    let attributes = Attributes::of(record, gateway_id, outbox_id);
    let mut event = serde_json::Map::new();
    let mut put = |key: &str, value: serde_json::Value| {
        event.insert(key.to_owned(), value);
    };
    put("specversion", "1.0".into());
    put("id", attributes.id.into());
    put("source", attributes.source.into());
    put("type", TYPE.into());
    put("time", attributes.time.into());
    if !record.topic.is_empty() {
        put("subject", record.topic.clone().into());
    }
    if let Some(content_type) = &record.content_type {
        put("datacontenttype", content_type.clone().into());
    }
    let says_json = record
        .content_type
        .as_deref()
        .is_none_or(is_json_media_type);
    match serde_json::from_slice::<serde_json::Value>(&record.payload) {
        Ok(data) if says_json => put("data", data),
        _ => put(
            "data_base64",
            base64::engine::general_purpose::STANDARD
                .encode(&record.payload)
                .into(),
        ),
    }
    serde_json::to_vec(&event).unwrap_or_default()
}

/// `application/json`, `text/json` or a `+json` suffix, parameters ignored.
fn is_json_media_type(media_type: &str) -> bool {
    let essence = media_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_media_types() {
        assert!(is_json_media_type("application/json"));
        assert!(is_json_media_type("Application/JSON; charset=utf-8"));
        assert!(is_json_media_type("application/senml+json"));
        assert!(!is_json_media_type("application/cbor"));
        assert!(!is_json_media_type("text/plain"));
    }
}
