//! HTTP ingestion: `POST /api/v1/ingest/{topic...}` by a device with its own credential.
//!
//! Credentials: HTTP Basic (`device id` : `secret`) or `Authorization: Bearer <device id>:<secret>`.
//! Both split at the **last** colon: generated secrets never contain one, so device ids may.
//!
//! Answers, in the order they are checked:
//!
//! | status | when |
//! | --- | --- |
//! | 401 + `WWW-Authenticate` | no or wrong credentials (unknown device and wrong secret look the same) |
//! | 403 | device disabled, or not allowed to use HTTP |
//! | 400 `field: "topic"` | empty topic, wildcard (`+`, `#`), leading `$`, over 256 bytes |
//! | 415 `field: "content-type"` | missing or unsupported `Content-Type` |
//! | 413 | body over `http_ingest.max_body`, batch over `http_ingest.max_batch` |
//! | 400 `field: <JSON pointer>` | malformed or invalid body (see [`super::body`]) |
//! | 503 + `Retry-After` | outbox full (`reject` policy), commit failed, shutting down |
//! | 201 | every record of the body is committed to the outbox (never before) |

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use outpost_sync::{AppendError, Source};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry as Metrics;
use serde_json::json;

use super::body::{self, BodyError, Format};
use super::{Ingest, IngestRecord};
use crate::api::error::ApiError;
use crate::registry::commands::Acked;
use crate::registry::{Protocol, Refusal, Traffic};

/// Seconds a device is told to wait before retrying when the outbox refuses.
const RETRY_AFTER_SECS: u32 = 5;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: u16,
}

/// `outpost_http_ingest_*` metrics.
#[derive(Debug, Clone, Default)]
pub struct HttpIngestMetrics {
    pub requests: Family<StatusLabel, Counter>,
    pub records: Counter,
}

impl HttpIngestMetrics {
    pub fn register(&self, registry: &mut Metrics) {
        let r = registry.sub_registry_with_prefix("outpost_http_ingest");
        r.register(
            "requests",
            "Ingestion requests by response status",
            self.requests.clone(),
        );
        r.register(
            "records",
            "Records committed from HTTP ingestion",
            self.records.clone(),
        );
    }
}

#[derive(Debug, Clone)]
pub struct HttpIngestState {
    pub ingest: Ingest,
    pub route: Arc<str>,
    pub max_body: usize,
    pub max_batch: usize,
    pub metrics: HttpIngestMetrics,
}

/// The routes of [`router`], `(method, path)`.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/v1/ingest/{*topic}"),
    ("GET", "/api/v1/device/commands"),
    ("POST", "/api/v1/device/commands/{id}/ack"),
];

pub fn router(state: HttpIngestState) -> Router {
    Router::new()
        .route(ROUTES[0].1, post(ingest))
        .route(ROUTES[1].1, get(poll_commands))
        .route(ROUTES[2].1, post(ack_command))
        .with_state(state)
}

/// `POST /api/v1/device/commands/{id}/ack`: the calling device acknowledges its command `id`
/// with a result, the JSON body. 200 with the command (also when it was acknowledged before),
/// 404 when the device has no such command, 409 when it expired undelivered.
async fn ack_command(
    State(s): State<HttpIngestState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let device = match authenticate(&s, &headers).await {
        Ok(device) => device,
        Err(response) => return response,
    };
    let Ok(id) = id.parse::<i64>() else {
        let message = format!("not a command id: \"{}\"", id.escape_debug());
        return error(StatusCode::BAD_REQUEST, "invalid_id", Some("id"), message);
    };
    if body.len() > crate::registry::commands::MAX_PAYLOAD {
        let message = format!(
            "a result is at most {} bytes",
            crate::registry::commands::MAX_PAYLOAD
        );
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            Some("body"),
            message,
        );
    }
    let result: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            let message = format!("the result must be JSON: {e}");
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                Some("body"),
                message,
            );
        }
    };
    match s.ingest.registry().ack_command(&device, id, result).await {
        Ok(Acked::Ok(command)) => axum::Json(json!({ "command": command })).into_response(),
        Ok(Acked::NotFound) => {
            let message = format!("device \"{device}\" has no command {id}");
            error(
                StatusCode::NOT_FOUND,
                "command_not_found",
                Some("id"),
                message,
            )
        }
        Ok(Acked::Expired) => {
            let message = format!("command {id} expired before it was delivered");
            error(StatusCode::CONFLICT, "command_expired", Some("id"), message)
        }
        Err(e) => {
            tracing::error!(device = %device, error = %e, "Recording an acknowledgement failed");
            unavailable("unavailable", "commands are unavailable right now".into())
        }
    }
}

/// Commands a device takes at most at once when polling.
const MAX_POLLED_COMMANDS: usize = 100;

/// `GET /api/v1/device/commands`: the calling device's queued commands, oldest first. Taking
/// them marks them delivered (at most once): a device that loses the response loses them.
async fn poll_commands(State(s): State<HttpIngestState>, headers: HeaderMap) -> Response {
    let device = match authenticate(&s, &headers).await {
        Ok(device) => device,
        Err(response) => return response,
    };
    match s
        .ingest
        .registry()
        .take_pending_commands(&device, MAX_POLLED_COMMANDS)
        .await
    {
        Ok(commands) => axum::Json(json!({ "commands": commands })).into_response(),
        Err(e) => {
            tracing::error!(device = %device, error = %e, "Reading queued commands failed");
            unavailable("unavailable", "commands are unavailable right now".into())
        }
    }
}

/// The management API's JSON error body (`{"error": code, "message": ..., "field": ...}`), so
/// devices and installers see one error format.
fn error(
    status: StatusCode,
    code: &'static str,
    field: Option<&str>,
    message: impl Into<String>,
) -> Response {
    let e = ApiError::new(status, code, message);
    match field {
        Some(field) => e.field(field),
        None => e,
    }
    .into_response()
}

fn unavailable(code: &'static str, message: String) -> Response {
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, code, None, message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    response
}

async fn ingest(
    State(s): State<HttpIngestState>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = handle(&s, topic, &headers, body).await;
    s.metrics
        .requests
        .get_or_create(&StatusLabel {
            status: response.status().as_u16(),
        })
        .inc();
    response
}

async fn handle(s: &HttpIngestState, topic: String, headers: &HeaderMap, body: Body) -> Response {
    let device = match authenticate(s, headers).await {
        Ok(device) => device,
        Err(response) => return response,
    };
    let registry = s.ingest.registry();
    if let Err(message) = outpost_config::check_record_topic(&topic) {
        registry.observe(&device, Traffic::Malformed);
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_topic",
            Some("topic"),
            message,
        );
    }
    let Some(format) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(Format::from_mime)
    else {
        registry.observe(&device, Traffic::Malformed);
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            Some("content-type"),
            format!("Content-Type must be one of {}", Format::MIMES.join(", ")),
        );
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            Some("body"),
            format!("body exceeds the {} byte limit", s.max_body),
        )
    };
    if declared.is_some_and(|len| len > s.max_body) {
        registry.observe(&device, Traffic::Refused);
        return too_large();
    }
    // The body's bytes of the ingress budget, before it is read: while the budget is spent
    // the request waits here, unread.
    let _budget = s.ingest.budget().take(declared.unwrap_or(s.max_body)).await;
    let Ok(bytes) = axum::body::to_bytes(body, s.max_body).await else {
        // Over the limit while streaming (or the client went away, which nobody will read).
        registry.observe(&device, Traffic::Refused);
        return too_large();
    };
    let payloads = match body::split(format, &bytes, s.max_batch) {
        Ok(payloads) => payloads,
        Err(e @ BodyError::TooMany { .. }) => {
            registry.observe(&device, Traffic::Refused);
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "batch_too_large",
                Some("body"),
                e.to_string(),
            );
        }
        Err(BodyError::Invalid { field, message }) => {
            registry.observe(&device, Traffic::Malformed);
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                Some(&field),
                message,
            );
        }
    };
    let records = payloads
        .into_iter()
        .map(|payload| IngestRecord {
            topic: topic.clone(),
            content_type: Some(format.mime().to_owned()),
            payload,
            headers: Vec::new(),
        })
        .collect();
    match s
        .ingest
        .submit(&device, Source::Http, &s.route, records)
        .await
    {
        Ok(seqs) => {
            s.metrics.records.inc_by(seqs.len() as u64);
            (
                StatusCode::CREATED,
                axum::Json(json!({ "records": seqs.len(), "seqs": seqs })),
            )
                .into_response()
        }
        Err(e @ AppendError::Full { .. }) => unavailable("outbox_full", e.to_string()),
        Err(e @ (AppendError::Storage(_) | AppendError::Closed)) => {
            unavailable("unavailable", e.to_string())
        }
        Err(e @ AppendError::TooLarge { .. }) => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "record_too_large",
            Some("body"),
            e.to_string(),
        ),
        Err(e @ AppendError::Invalid { .. }) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_payload",
            Some("body"),
            e.to_string(),
        ),
        Err(e @ AppendError::UnknownRoute(_)) => {
            tracing::error!(error = %e, "HTTP ingestion is wired to an unknown route");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                None,
                "internal error",
            )
        }
    }
}

/// The device id of a request with valid credentials, or the response refusing it.
pub async fn authenticate(s: &HttpIngestState, headers: &HeaderMap) -> Result<String, Response> {
    let unauthorized = |message: &str| {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            Some("authorization"),
            message,
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"outpost\", charset=\"UTF-8\""),
        );
        r
    };
    let Some((device, secret)) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(credentials)
    else {
        return Err(unauthorized(
            "device credentials required (HTTP Basic or Bearer <id>:<secret>)",
        ));
    };
    let registry = s.ingest.registry();
    match registry
        .authenticate(&device, &secret, Protocol::Http)
        .await
    {
        Ok(()) => Ok(device),
        Err(Refusal::UnknownDevice | Refusal::BadSecret) => {
            registry.observe(&device, Traffic::Refused);
            Err(unauthorized("invalid device credentials"))
        }
        Err(refusal @ (Refusal::Disabled | Refusal::ProtocolNotAllowed)) => {
            registry.observe(&device, Traffic::Refused);
            Err(error(
                StatusCode::FORBIDDEN,
                "forbidden",
                None,
                refusal.to_string(),
            ))
        }
    }
}

/// `(device id, secret)` from a Basic or Bearer authorization value.
fn credentials(value: &str) -> Option<(String, String)> {
    let (scheme, rest) = value.split_once(' ')?;
    let pair = if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        String::from_utf8(decoded).ok()?
    } else if scheme.eq_ignore_ascii_case("bearer") {
        rest.trim().to_owned()
    } else {
        return None;
    };
    let (device, secret) = pair.rsplit_once(':')?;
    (!device.is_empty() && !secret.is_empty()).then(|| (device.to_owned(), secret.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_from_basic_and_bearer() {
        let basic = base64::engine::general_purpose::STANDARD.encode("urn:dev:42:s3cr3t");
        assert_eq!(
            credentials(&format!("Basic {basic}")),
            Some(("urn:dev:42".to_owned(), "s3cr3t".to_owned()))
        );
        assert_eq!(
            credentials("Bearer dev-1:abc"),
            Some(("dev-1".into(), "abc".into()))
        );
        assert_eq!(credentials("bearer dev-1:"), None);
        assert_eq!(credentials("Digest x"), None);
        assert_eq!(credentials("Basic !!!"), None);
    }
}
