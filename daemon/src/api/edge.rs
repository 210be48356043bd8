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

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{Admin, Authorized, Read};
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

fn control(s: &ApiState) -> Result<&crate::edge::EdgeControl, ApiError> {
    s.edge.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_edge",
            "edge rules are not available in this API",
        )
    })
}

fn engine(s: &ApiState) -> Result<std::sync::Arc<outpost_edge::Engine>, ApiError> {
    Ok(control(s)?.rules.shared().load())
}

/// `GET /api/v1/edge/rules` → 200 `{rules: [{…rule, origin}]}`, in the order they apply.
pub async fn list_rules(
    _: Authorized<Read>,
    State(s): State<ApiState>,
) -> Result<axum::Json<Value>, ApiError> {
    let rules: Vec<Value> = control(&s)?
        .rules
        .list()
        .into_iter()
        .map(|(rule, source)| {
            let mut v = serde_json::to_value(&rule).unwrap_or(Value::Null);
            v["origin"] = json!(source);
            v
        })
        .collect();
    Ok(axum::Json(json!({ "rules": rules })))
}

/// `PUT /api/v1/edge/rules/{name}` with a rule (the keys of an `[[edge.rules]]` table, TOML
/// tables as JSON objects, durations as strings) → 201 created or 200 replaced, the rule in
/// force from the next reading.
pub async fn put_rule(
    _: Authorized<Admin>,
    State(s): State<ApiState>,
    Path(name): Path<String>,
    JsonBody(mut rule): JsonBody<outpost_config::EdgeRule>,
) -> Result<Response, ApiError> {
    let control = control(&s)?;
    if rule.name.is_empty() {
        rule.name.clone_from(&name);
    } else if rule.name != name {
        return Err(ApiError::invalid(
            "name",
            format!(
                "\"{}\" differs from the name in the path (\"{name}\")",
                rule.name
            ),
        ));
    }
    let shown = serde_json::to_value(&rule).unwrap_or(Value::Null);
    let created = control
        .rules
        .put(rule, &control.ingest)
        .await
        .map_err(change_error)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(shown)).into_response())
}

/// `DELETE /api/v1/edge/rules/{name}` → 204.
pub async fn delete_rule(
    _: Authorized<Admin>,
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let control = control(&s)?;
    control
        .rules
        .delete(&name, &control.ingest)
        .await
        .map_err(change_error)?;
    Ok(StatusCode::NO_CONTENT)
}

fn change_error(e: crate::edge::RuleChangeError) -> ApiError {
    use crate::edge::RuleChangeError as E;
    match e {
        E::Invalid(problems) => {
            let text: Vec<String> = problems
                .iter()
                .map(|(k, m)| {
                    if k.is_empty() {
                        m.clone()
                    } else {
                        format!("{k}: {m}")
                    }
                })
                .collect();
            let field = problems.first().map(|(k, _)| k.clone()).unwrap_or_default();
            ApiError::invalid(field, text.join("; "))
        }
        E::InConfig(name) => ApiError::new(
            StatusCode::CONFLICT,
            "rule_in_config",
            format!(
                "rule \"{name}\" is defined in the configuration file: change it there and reload"
            ),
        ),
        E::NotFound(name) => {
            ApiError::not_found(format!("no rule \"{name}\" was created through the API"))
        }
        E::Storage(why) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the rules file could not be written, nothing changed: {why}"),
        ),
    }
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
                        .map_or(Value::Null, outpost_edge::value::Decoded::into_value)
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
