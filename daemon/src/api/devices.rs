//! Device inventory and monitoring handlers: list, create, show, update, delete,
//! enable/disable, rotate-secret, status.
//!
//! A device's secret appears in exactly two responses: `POST /api/v1/devices` and
//! `POST /api/v1/devices/{id}/rotate-secret`, as `{"device": …, "secret": …}`. Every other
//! response shows only `has_secret`.

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::auth::{Admin, Authorized, Read, Write};
use super::error::ApiError;
use super::{ApiState, DevicePath, JsonBody};
use crate::registry::{Device, DeviceChanges, ListQuery, NewDevice, State as DeviceState};

/// A device with its secret, in the two responses that show it.
#[derive(Debug, Serialize)]
pub struct WithSecret {
    pub device: Device,
    /// Shown once: store it now. Only its argon2id hash is kept.
    pub secret: String,
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no device \"{id}\""))
}

/// `GET /api/v1/devices?tag=&state=&limit=&cursor=`
pub async fn list(
    _: Authorized<Read>,
    State(s): State<ApiState>,
    query: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut q = ListQuery::default();
    for (key, value) in params {
        match key.as_str() {
            "tag" => q.tag = Some(value),
            "state" => {
                q.state = Some(DeviceState::parse(&value).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "state must be one of {}, found \"{value}\"",
                        DeviceState::NAMES.join(", ")
                    ))
                    .field("state")
                })?);
            }
            "limit" => {
                q.limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=crate::registry::MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "limit must be a number from 1 to {}, found \"{value}\"",
                            crate::registry::MAX_PAGE
                        ))
                        .field("limit")
                    })?;
            }
            "cursor" => q.cursor = Some(value),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter \"{other}\"; known: tag, state, limit, cursor"
                ))
                .field(other));
            }
        }
    }
    Ok(axum::Json(s.registry.list(&q)?).into_response())
}

/// `POST /api/v1/devices` → 201 with the device and its secret.
pub async fn create(
    _: Authorized<Write>,
    State(s): State<ApiState>,
    JsonBody(new): JsonBody<NewDevice>,
) -> Result<Response, ApiError> {
    let (device, secret) = s.registry.create(new).await?;
    let location = format!("/api/v1/devices/{}", device.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        axum::Json(WithSecret { device, secret }),
    )
        .into_response())
}

/// `GET /api/v1/devices/{id}`
pub async fn show(
    _: Authorized<Read>,
    State(s): State<ApiState>,
    path: DevicePath,
) -> Result<axum::Json<Device>, ApiError> {
    s.registry
        .get(&path.id)
        .map(axum::Json)
        .ok_or_else(|| not_found(&path.id))
}

/// `PATCH /api/v1/devices/{id}`: absent fields are kept.
pub async fn update(
    _: Authorized<Write>,
    State(s): State<ApiState>,
    path: DevicePath,
    JsonBody(changes): JsonBody<DeviceChanges>,
) -> Result<axum::Json<Device>, ApiError> {
    Ok(axum::Json(s.registry.update(&path.id, changes).await?))
}

/// `DELETE /api/v1/devices/{id}` → 204.
pub async fn remove(
    auth: Authorized<Admin>,
    State(s): State<ApiState>,
    path: DevicePath,
) -> Result<StatusCode, ApiError> {
    s.registry.delete(&path.id).await?;
    tracing::info!(device = %path.id, token = %auth.token, "Device deleted through the API");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/devices/{id}/disable`
pub async fn disable(
    _: Authorized<Write>,
    State(s): State<ApiState>,
    path: DevicePath,
) -> Result<axum::Json<Device>, ApiError> {
    Ok(axum::Json(s.registry.set_enabled(&path.id, false).await?))
}

/// `POST /api/v1/devices/{id}/enable`
pub async fn enable(
    _: Authorized<Write>,
    State(s): State<ApiState>,
    path: DevicePath,
) -> Result<axum::Json<Device>, ApiError> {
    Ok(axum::Json(s.registry.set_enabled(&path.id, true).await?))
}

/// `POST /api/v1/devices/{id}/rotate-secret` → the device and its new secret.
pub async fn rotate_secret(
    auth: Authorized<Admin>,
    State(s): State<ApiState>,
    path: DevicePath,
) -> Result<axum::Json<WithSecret>, ApiError> {
    let (device, secret) = s.registry.rotate_secret(&path.id).await?;
    tracing::info!(device = %path.id, token = %auth.token, "Device secret rotated through the API");
    Ok(axum::Json(WithSecret { device, secret }))
}

/// `GET /api/v1/devices/{id}/status`
pub async fn status(
    _: Authorized<Read>,
    State(s): State<ApiState>,
    path: DevicePath,
) -> Result<Response, ApiError> {
    s.registry
        .status(&path.id)
        .map(|st| axum::Json(st).into_response())
        .ok_or_else(|| not_found(&path.id))
}
