//! Errors of the management API, always JSON: `{"error": code, "message": text, "field": path}`.
//!
//! Statuses (also in the OpenAPI document):
//! - 400 `malformed_json`: the body is not JSON (syntax, truncation, trailing data);
//!   `bad_request`: a path or query parameter is not understood;
//! - 401 `unauthorized` (with `WWW-Authenticate: Bearer`), 403 `forbidden`;
//! - 404 `not_found`; 409 `already_exists` / `command_queue_full` / `apps_disabled` /
//!   `no_zigbee_driver` / `no_outbox`;
//! - 413 `body_too_large`;
//! - 422 `unknown_field`, `invalid_type`, `missing_field`, `invalid_value`: the JSON is well-formed
//!   but does not fit the schema; `field` is the JSON path of the culprit (`tags[2]`, `ttl`);
//! - 500 `internal`: storage failed; the message says what, nothing of the request took effect;
//! - 503 `outbox_unavailable`: the outbox could not be read or written (dead letters); retry.
//!
//! Request bodies are deserialized here from bytes with `serde_path_to_error`, because axum's
//! `Json` rejection does not say which field was wrong.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::registry::RegistryError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorBody {
    pub error: &'static str,
    pub message: String,
    pub field: Option<String>,
}

/// An API error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    /// `WWW-Authenticate` value for 401/403.
    pub challenge: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error,
                message: message.into(),
                field: None,
            },
            challenge: None,
        }
    }

    pub fn field(mut self, field: impl Into<String>) -> ApiError {
        self.body.field = Some(field.into());
        self
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_value", message).field(field)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if let Some(challenge) = self.challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        match e {
            RegistryError::NotFound { .. } => ApiError::not_found(e.to_string()),
            RegistryError::AlreadyExists { .. } => {
                ApiError::new(StatusCode::CONFLICT, "already_exists", e.to_string()).field("id")
            }
            RegistryError::Invalid { field, message } => ApiError::invalid(field, message),
            RegistryError::CommandQueueFull { .. } => {
                ApiError::new(StatusCode::CONFLICT, "command_queue_full", e.to_string())
            }
            RegistryError::Io { .. }
            | RegistryError::Open { .. }
            | RegistryError::SchemaTooNew { .. }
            | RegistryError::Storage(_)
            | RegistryError::Hash(_)
            | RegistryError::Task(_) => {
                tracing::error!(error = %e, "Registry operation failed");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            }
        }
    }
}

/// Deserializes a JSON body, naming the offending field on failure.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            "the request body is empty; a JSON object is expected",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(json_error)?;
    de.end().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("malformed JSON: {e}"),
        )
    })?;
    Ok(value)
}

fn json_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    use serde_json::error::Category;
    let path = e.path().to_string();
    let inner = e.into_inner();
    // `?` marks a position serde_path_to_error could not name (e.g. inside a truncated object).
    let at = |path: String| (path != "." && !path.contains('?')).then_some(path);
    match inner.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError {
            status: StatusCode::BAD_REQUEST,
            body: ErrorBody {
                error: "malformed_json",
                message: format!("malformed JSON: {inner}"),
                field: at(path),
            },
            challenge: None,
        },
        Category::Data => {
            let message = inner.to_string();
            let (code, field) = if let Some(name) = quoted(&message, "unknown field `") {
                ("unknown_field", Some(join(&path, &name)))
            } else if let Some(name) = quoted(&message, "missing field `") {
                ("missing_field", Some(join(&path, &name)))
            } else if message.starts_with("invalid type") {
                ("invalid_type", at(path))
            } else {
                ("invalid_value", at(path))
            };
            ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                body: ErrorBody {
                    error: code,
                    message,
                    field,
                },
                challenge: None,
            }
        }
    }
}

/// The name between `prefix` and the next backtick, if `message` starts with `prefix`.
fn quoted(message: &str, prefix: &str) -> Option<String> {
    let rest = message.strip_prefix(prefix)?;
    rest.split_once('`').map(|(name, _)| name.to_owned())
}

/// `parent.name` unless `parent` already ends with `name` (serde_path_to_error sometimes
/// records the unknown key itself).
fn join(parent: &str, name: &str) -> String {
    if parent == "." || parent.is_empty() {
        name.to_owned()
    } else if parent == name || parent.ends_with(&format!(".{name}")) {
        parent.to_owned()
    } else {
        format!("{parent}.{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // fields are read by serde only
    struct Body {
        id: String,
        #[serde(default)]
        tags: Vec<String>,
        #[serde(default)]
        inner: Option<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        n: u32,
    }

    fn err(body: &str) -> (StatusCode, &'static str, Option<String>) {
        let e = parse_json::<Body>(body.as_bytes()).unwrap_err();
        (e.status, e.body.error, e.body.field)
    }

    #[test]
    fn errors_name_the_field() {
        use StatusCode as S;
        assert_eq!(err(r#"{"id": "a",}"#).1, "malformed_json");
        assert_eq!(
            err(r#"{"id": "a""#),
            (S::BAD_REQUEST, "malformed_json", None)
        );
        assert_eq!(
            err(r#"{"id": "a", "tags": ["x""#),
            (S::BAD_REQUEST, "malformed_json", Some("tags".into()))
        );
        assert_eq!(err("").1, "malformed_json");
        assert_eq!(err(r#"{"id": "a"} x"#).1, "malformed_json");
        assert_eq!(
            err(r#"{"id": "a", "colour": 1}"#),
            (
                S::UNPROCESSABLE_ENTITY,
                "unknown_field",
                Some("colour".into())
            )
        );
        assert_eq!(
            err(r#"{"id": "a", "inner": {"n": 1, "m": 2}}"#),
            (
                S::UNPROCESSABLE_ENTITY,
                "unknown_field",
                Some("inner.m".into())
            )
        );
        assert_eq!(
            err(r#"{"id": 5}"#),
            (S::UNPROCESSABLE_ENTITY, "invalid_type", Some("id".into()))
        );
        assert_eq!(
            err(r#"{"id": "a", "tags": ["x", 3]}"#),
            (
                S::UNPROCESSABLE_ENTITY,
                "invalid_type",
                Some("tags[1]".into())
            )
        );
        assert_eq!(
            err(r#"{"id": "a", "inner": {"n": -1}}"#),
            (
                S::UNPROCESSABLE_ENTITY,
                "invalid_value",
                Some("inner.n".into())
            )
        );
        assert_eq!(
            err(r#"{"tags": []}"#),
            (S::UNPROCESSABLE_ENTITY, "missing_field", Some("id".into()))
        );
        assert_eq!(
            err(r#"{"id": "a", "inner": {}}"#),
            (
                S::UNPROCESSABLE_ENTITY,
                "missing_field",
                Some("inner.n".into())
            )
        );
        assert_eq!(err("[1]").1, "invalid_type");
        assert!(parse_json::<Body>(br#" {"id": "a"} "#).is_ok());
    }
}
