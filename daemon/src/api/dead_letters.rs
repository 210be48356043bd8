//! The outbox's dead letters (records Kafka refused for good, docs/KAFKA.md "Poison records"):
//! `GET /api/v1/dead-letters?after=&limit=`, `POST /api/v1/dead-letters/retry` and
//! `POST /api/v1/dead-letters/drop`.
//!
//! Listing reads through its own read-only SQLite connection on a blocking thread; retry and
//! drop go through the outbox writer and answer after the commit. Retried records go back under
//! their own sequence and the forwarder plans again at once; dropped ones are gone for good, so
//! dropping needs the admin scope (like deleting a device).
//!
//! Statuses: 200; 400 `bad_request` for a bad query parameter (`field` names it); 422 for a body
//! that is not exactly one of `{"seqs": [..]}` and `{"all": true}` (`field` names it); 409
//! `no_outbox` when this router was built without an outbox (only tests do that); 503
//! `outbox_unavailable` when the outbox cannot be read or written (nothing took effect).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use outpost_sync::Outbox;
use outpost_sync::outbox::{AckError, DeadLetter};
use serde::{Deserialize, Serialize};

use super::auth::{Admin, Authorized, Read, Write};
use super::error::ApiError;
use super::{ApiState, JsonBody};

/// Page size of `GET /api/v1/dead-letters` without `limit`.
pub const DEFAULT_PAGE: usize = 100;
/// Largest `limit`.
pub const MAX_PAGE: usize = 1000;

/// A page of dead letters.
#[derive(Debug, Serialize)]
pub struct DeadLetterPage {
    pub dead_letters: Vec<DeadLetter>,
    /// All dead letters held, and their bytes (not just this page's).
    pub total: u64,
    pub bytes: u64,
    /// `after` for the next page; `None` on the last page.
    pub next_after: Option<u64>,
}

/// The body of retry and drop: exactly one of the two fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    #[serde(default)]
    pub seqs: Option<Vec<u64>>,
    #[serde(default)]
    pub all: Option<bool>,
}

impl Selection {
    /// `None` for every dead letter, else the chosen sequences.
    fn resolve(self) -> Result<Option<Vec<u64>>, ApiError> {
        match (self.seqs, self.all) {
            (Some(_), Some(_)) => Err(ApiError::invalid(
                "all",
                "give either \"seqs\" or \"all\", not both",
            )),
            (None, None) => Err(ApiError::invalid(
                "seqs",
                "give \"seqs\" (a list of sequence numbers) or \"all\": true",
            )),
            (Some(seqs), None) if seqs.is_empty() => Err(ApiError::invalid(
                "seqs",
                "seqs is empty; give at least one sequence number, or \"all\": true",
            )),
            (Some(seqs), None) => Ok(Some(seqs)),
            (None, Some(true)) => Ok(None),
            (None, Some(false)) => Err(ApiError::invalid(
                "all",
                "all must be true; to choose records, give \"seqs\"",
            )),
        }
    }
}

fn outbox(s: &ApiState) -> Result<&Outbox, ApiError> {
    s.outbox.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_outbox",
            "this API was started without an outbox: there are no dead letters to manage",
        )
    })
}

fn unavailable(message: String) -> ApiError {
    tracing::error!(error = %message, "Dead-letter operation failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "outbox_unavailable",
        message,
    )
}

impl From<AckError> for ApiError {
    fn from(e: AckError) -> ApiError {
        unavailable(format!("{e}; nothing was changed"))
    }
}

/// `GET /api/v1/dead-letters?after=&limit=`: oldest first, only sequences above `after`.
pub async fn list(
    _: Authorized<Read>,
    State(s): State<ApiState>,
    query: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<DeadLetterPage>, ApiError> {
    let Query(params) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let (mut after, mut limit) = (0u64, DEFAULT_PAGE);
    for (key, value) in params {
        match key.as_str() {
            "after" => {
                after = value.parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "after must be a sequence number (0 or more), found \"{value}\""
                    ))
                    .field("after")
                })?;
            }
            "limit" => {
                limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "limit must be a number from 1 to {MAX_PAGE}, found \"{value}\""
                        ))
                        .field("limit")
                    })?;
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter \"{other}\"; known: after, limit"
                ))
                .field(other));
            }
        }
    }
    let outbox = outbox(&s)?.clone();
    // One more than asked tells whether another page follows.
    let reader = outbox.clone();
    let mut dead_letters =
        tokio::task::spawn_blocking(move || reader.list_dead_letters(after, limit + 1))
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?
            .map_err(|e| {
                unavailable(format!(
                    "reading dead letters from {}: {e}",
                    outbox.path().display()
                ))
            })?;
    let more = dead_letters.len() > limit;
    dead_letters.truncate(limit);
    let next_after = more.then(|| dead_letters.last().map(|d| d.seq)).flatten();
    let (total, bytes) = outbox.dead_letter_figures();
    Ok(axum::Json(DeadLetterPage {
        dead_letters,
        total,
        bytes,
        next_after,
    }))
}

/// `POST /api/v1/dead-letters/retry` → `{"retried": n}`.
pub async fn retry(
    auth: Authorized<Write>,
    State(s): State<ApiState>,
    JsonBody(selection): JsonBody<Selection>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let outbox = outbox(&s)?;
    let n = outbox.retry_dead_letters(selection.resolve()?).await?;
    tracing::info!(records = n, token = %auth.token, "Dead letters put back into the outbox through the API");
    Ok(axum::Json(serde_json::json!({ "retried": n })))
}

/// `POST /api/v1/dead-letters/drop` → `{"dropped": n}`.
pub async fn drop(
    auth: Authorized<Admin>,
    State(s): State<ApiState>,
    JsonBody(selection): JsonBody<Selection>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let outbox = outbox(&s)?;
    let n = outbox.drop_dead_letters(selection.resolve()?).await?;
    tracing::info!(records = n, token = %auth.token, "Dead letters dropped through the API");
    Ok(axum::Json(serde_json::json!({ "dropped": n })))
}
