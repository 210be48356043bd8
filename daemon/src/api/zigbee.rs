//! `POST /api/v1/zigbee/permit-join`: opens the Zigbee network for joining.
//!
//! The request goes through [`ZigbeeControl`] (a bounded queue) to the running Zigbee driver,
//! which sends `ZDO_MGMT_PERMIT_JOIN_REQ` to the coordinator and answers with the granted
//! duration (capped by the driver's `permit_join_max` and Zigbee's 254 s).
//!
//! Statuses: 200 with `{"duration": "60s", "seconds": 60}`; 409 `no_zigbee_driver` when none is
//! configured; 503 `zigbee_unavailable` when the stick is unplugged, starting or busy (retry);
//! 502 `zigbee_refused` when the coordinator answered with an error status.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use outpost_drivers::zigbee::ControlError;
use serde::{Deserialize, Serialize};

use super::auth::{Authorized, Write};
use super::error::ApiError;
use super::{ApiState, JsonBody};

/// A duration as `"60s"` or as whole seconds.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum DurationValue {
    Seconds(u64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermitJoin {
    /// 1 to 254 seconds.
    pub duration: DurationValue,
}

#[derive(Debug, Serialize)]
pub struct PermitJoinGranted {
    pub duration: String,
    pub seconds: u64,
}

/// `POST /api/v1/zigbee/permit-join` → 200.
pub async fn permit_join(
    _: Authorized<Write>,
    State(s): State<ApiState>,
    JsonBody(req): JsonBody<PermitJoin>,
) -> Result<axum::Json<PermitJoinGranted>, ApiError> {
    let duration = match req.duration {
        DurationValue::Seconds(n) => Duration::from_secs(n),
        DurationValue::Text(text) => outpost_config::units::duration::parse(&text)
            .map_err(|e| ApiError::invalid("duration", e))?,
    };
    let seconds = duration.as_secs();
    if !(1..=254).contains(&seconds) || duration.subsec_nanos() != 0 {
        return Err(ApiError::invalid(
            "duration",
            "duration must be whole seconds from 1s to 254s",
        ));
    }
    let granted = s.zigbee.permit_join(duration).await.map_err(|e| match e {
        ControlError::NoDriver => {
            ApiError::new(StatusCode::CONFLICT, "no_zigbee_driver", e.to_string())
        }
        ControlError::Unavailable(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "zigbee_unavailable",
            e.to_string(),
        ),
        ControlError::Refused(_) => {
            ApiError::new(StatusCode::BAD_GATEWAY, "zigbee_refused", e.to_string())
        }
    })?;
    Ok(axum::Json(PermitJoinGranted {
        duration: outpost_config::units::duration::format(granted),
        seconds: granted.as_secs(),
    }))
}
