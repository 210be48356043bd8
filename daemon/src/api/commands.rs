//! Command handlers: queue a command for a device and query its delivery state.
//!
//! `POST /api/v1/devices/{id}/commands` with `{"payload": <any JSON>, "ttl": "10m"}` answers 201
//! with the command (`state: "queued"`); 409 `command_queue_full` when the device already has
//! the maximum of queued commands (see `registry::commands`). Delivery happens elsewhere (device
//! polling, and MQTT through the local bus: `ingress::bus`); these routes only report it.

use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::auth::{Authorized, Read, Write};
use super::error::ApiError;
use super::{ApiState, DevicePath, JsonBody};
use crate::registry::Command;

/// The body of `POST /api/v1/devices/{id}/commands`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCommand {
    /// Any JSON value, handed to the device as is.
    pub payload: serde_json::Value,
    /// How long the command may wait for delivery, e.g. `"10m"`. Default `"24h"`, at most `"30d"`.
    #[serde(default)]
    pub ttl: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CommandList {
    pub commands: Vec<Command>,
}

/// `POST /api/v1/devices/{id}/commands` → 201.
pub async fn create(
    _: Authorized<Write>,
    State(s): State<ApiState>,
    path: DevicePath,
    JsonBody(new): JsonBody<NewCommand>,
) -> Result<Response, ApiError> {
    let ttl: Option<Duration> = match &new.ttl {
        None => None,
        Some(text) => Some(
            outpost_config::units::duration::parse(text)
                .map_err(|e| ApiError::invalid("ttl", e))?,
        ),
    };
    let command = s
        .registry
        .queue_command(&path.id, &new.payload, ttl)
        .await?;
    let location = format!("/api/v1/devices/{}/commands/{}", path.id, command.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        axum::Json(command),
    )
        .into_response())
}

/// `GET /api/v1/devices/{id}/commands`: every kept command, oldest first.
pub async fn list(
    _: Authorized<Read>,
    State(s): State<ApiState>,
    path: DevicePath,
) -> Result<axum::Json<CommandList>, ApiError> {
    let commands = s.registry.commands(&path.id).await?;
    Ok(axum::Json(CommandList { commands }))
}

/// `GET /api/v1/devices/{id}/commands/{cid}`
pub async fn show(
    _: Authorized<Read>,
    State(s): State<ApiState>,
    path: DevicePath,
) -> Result<axum::Json<Command>, ApiError> {
    let cid = path.cid.as_deref().unwrap_or_default();
    let missing = || ApiError::not_found(format!("device \"{}\" has no command {cid}", path.id));
    let Ok(n) = cid.parse::<i64>() else {
        return Err(missing());
    };
    s.registry
        .command(&path.id, n)
        .await?
        .map(axum::Json)
        .ok_or_else(missing)
}
