//! The admin HTTP listener: `/healthz`, `/readyz`, `/metrics` and the gateway status. The REST API
//! of later issues mounts under `/api/v1` here.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use outpost_sync::Outbox;
use outpost_sync::outbox::now_unix_ms;
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::status::StatusBoard;

/// What the admin handlers read. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub gateway_id: Arc<str>,
    pub outbox: Outbox,
    pub max_bytes: u64,
    pub status: StatusBoard,
    pub registry: Arc<Registry>,
    pub started: Instant,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .fallback(not_found)
        .with_state(state)
}

/// Liveness: the process answers.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: every essential subsystem is active.
async fn readyz(State(s): State<AdminState>) -> Response {
    let blocking = s.status.not_ready();
    if blocking.is_empty() {
        (StatusCode::OK, axum::Json(json!({ "ready": true }))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "ready": false, "inactive": blocking })),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    s.outbox.refresh_gauges(now_unix_ms());
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "Encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn status(State(s): State<AdminState>) -> Response {
    let (records, bytes, oldest) = s.outbox.figures();
    let quarantine = s
        .outbox
        .quarantine()
        .map(|q| json!({ "moved_to": q.moved_to.display().to_string(), "reason": q.reason }));
    axum::Json(json!({
        "gateway_id": &*s.gateway_id,
        "version": env!("CARGO_PKG_VERSION"),
        "build": {
            "version": env!("CARGO_PKG_VERSION"),
            "arch": std::env::consts::ARCH,
            "os": std::env::consts::OS,
            "outbox_schema": outpost_sync::outbox::SCHEMA_VERSION,
            "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        },
        "uptime_seconds": s.started.elapsed().as_secs(),
        "subsystems": s.status.subsystems(),
        "alarms": s.status.alarms(),
        "apps": s.status.apps(),
        "kafka": s.status.forwarder(),
        "mqtt": s.status.mqtt(),
        "outbox": {
            "path": s.outbox.path().display().to_string(),
            "records": records,
            "bytes": bytes,
            "max_bytes": s.max_bytes,
            "oldest_received_ms": oldest,
            "quarantined": quarantine,
        },
    }))
    .into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({ "error": "not_found" })),
    )
        .into_response()
}
