//! `[edge]` over the API: the alerts raised now, and the dry run of the rules on a sample.
//!
//! `GET /api/v1/alerts` (scope `read`) → `{alerts: [{rule, device, severity, topic,
//! raised_at_ms, reading}]}`, by rule then device.
//!
//! `POST /api/v1/edge/test` (scope `read`) with `{device, topic, payload, source?,
//! content_type?}` → what the rules in force would do to that reading: `verdict` (`stored`,
//! `refused` or `dead_letter`), the `payload` and `headers` as they would be stored, and per
//! matching rule its trace (skipped by `when`, transformed, enriched, aggregated values, alert
//! conditions, expression errors). Nothing is stored and no window or alert changes; `payload`
//! is any JSON value (sent as JSON unless `content_type` says otherwise, then as its text).

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{Authorized, Read};
use super::error::ApiError;
use super::{ApiState, JsonBody};

/// The body of `POST /api/v1/edge/test`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    /// The device the reading is from (its registry facts are used when it is registered).
    pub device: String,
    pub topic: String,
    pub payload: Value,
    /// `mqtt`, `coap`, `http` or `driver`. Default `mqtt`.
    #[serde(default)]
    pub source: Option<String>,
    /// Default `application/json`.
    #[serde(default)]
    pub content_type: Option<String>,
}

fn engine(s: &ApiState) -> Result<std::sync::Arc<outpost_edge::Engine>, ApiError> {
    s.edge
        .as_ref()
        .map(crate::edge::SharedEdge::load)
        .ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "no_edge",
                "edge rules are not available in this API",
            )
        })
}

/// `GET /api/v1/alerts` → 200.
pub async fn alerts(
    _: Authorized<Read>,
    State(s): State<ApiState>,
) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(json!({ "alerts": engine(&s)?.active_alerts() })))
}

/// `POST /api/v1/edge/test` → 200.
pub async fn test(
    _: Authorized<Read>,
    State(s): State<ApiState>,
    JsonBody(sample): JsonBody<Sample>,
) -> Result<axum::Json<Value>, ApiError> {
    let engine = engine(&s)?;
    let source = sample.source.as_deref().unwrap_or("mqtt");
    if !["mqtt", "coap", "http", "driver"].contains(&source) {
        return Err(ApiError::invalid(
            "source",
            format!("unknown source \"{source}\" (expected mqtt, coap, http or driver)"),
        ));
    }
    let content_type = sample
        .content_type
        .clone()
        .unwrap_or_else(|| "application/json".to_owned());
    let bytes = match (&sample.payload, content_type.as_str()) {
        (v, "application/json") => v.to_string().into_bytes(),
        (Value::String(text), _) => text.clone().into_bytes(),
        (v, _) => v.to_string().into_bytes(),
    };
    let reading = outpost_edge::Reading {
        device_id: &sample.device,
        source,
        topic: &sample.topic,
        content_type: Some(&content_type),
        payload: &bytes,
        received_at_ms: u64::try_from(outpost_sync::outbox::now_unix_ms()).unwrap_or(0),
    };
    let as_value = |bytes: &[u8]| {
        serde_json::from_slice::<Value>(bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
    };
    let answer = match engine.dry_run(&reading, &s.registry) {
        outpost_edge::Verdict::Refuse(invalid) => json!({
            "verdict": "refused",
            "refused": { "rule": invalid.rule, "error": invalid.error },
            "payload": null,
            "headers": {},
            "rules": [],
        }),
        outpost_edge::Verdict::Store(p) => {
            let headers: serde_json::Map<String, Value> = p
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            let payload = match &p.payload {
                Some(new) if content_type == "application/cbor" => {
                    outpost_edge::value::decode(Some(&content_type), new)
                        .map_or(Value::Null, |d| d.value)
                }
                Some(new) => as_value(new),
                None => sample.payload.clone(),
            };
            json!({
                "verdict": if p.invalid.is_some() { "dead_letter" } else { "stored" },
                "dead_letter": p.invalid.map(|i| json!({ "rule": i.rule, "error": i.error })),
                "payload": payload,
                "headers": headers,
                "rules": p.trace,
            })
        }
    };
    Ok(axum::Json(answer))
}
