//! `GET /api/v1/devices/{id}/readings`: a device's readings as they are committed, as Server-Sent
//! Events — the web console's live view, and `curl -N` from a shell.
//!
//! Each committed reading of the device is one `reading` event whose data is JSON: `seq`,
//! `topic`, `source`, `content_type`, `received_at_ms` (when the stream saw it), and `payload` as
//! text when it is UTF-8, else `payload_base64`. Readings come from the same broadcast that feeds
//! the local MQTT bus; a viewer too slow to keep up gets a `lagged` event with the number of
//! readings it missed (the outbox has them all). The stream ends when the daemon shuts down.
//!
//! The request must accept `text/event-stream` (browsers' `EventSource` does): anything else
//! answers 406, so a plain client never hangs on a response that does not end.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures_util::StreamExt as _;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::auth::{Authorized, Read};
use super::error::ApiError;
use super::{ApiState, DevicePath};

/// `GET /api/v1/devices/{id}/readings` (scope `read`).
pub async fn stream(
    _: Authorized<Read>,
    State(s): State<ApiState>,
    path: DevicePath,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let accepts = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"));
    if !accepts {
        return Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "not_acceptable",
            "this is an event stream: send Accept: text/event-stream",
        ));
    }
    if s.registry.get(&path.id).is_none() {
        return Err(ApiError::not_found(format!("no device \"{}\"", path.id)));
    }
    let Some(readings) = &s.readings else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_readings",
            "this API was built without the readings stream",
        ));
    };
    let receiver = readings.subscribe();
    let device = path.id;
    let events = futures_util::stream::unfold(receiver, move |mut receiver| {
        let device = device.clone();
        async move {
            loop {
                match receiver.recv().await {
                    Ok(r) if r.device_id == device => {
                        let mut data = json!({
                            "seq": r.seq,
                            "topic": r.topic,
                            "source": r.source.as_str(),
                            "content_type": r.content_type,
                            "received_at_ms": outpost_sync::outbox::now_unix_ms(),
                        });
                        match std::str::from_utf8(&r.payload) {
                            Ok(text) => data["payload"] = json!(text),
                            Err(_) => {
                                data["payload_base64"] = json!(
                                    base64::engine::general_purpose::STANDARD.encode(&r.payload)
                                );
                            }
                        }
                        let event = Event::default().event("reading").data(data.to_string());
                        return Some((Ok::<_, Infallible>(event), receiver));
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(missed)) => {
                        let event = Event::default()
                            .event("lagged")
                            .data(json!({ "missed": missed }).to_string());
                        return Some((Ok(event), receiver));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    })
    .take_until(s.stop.clone().cancelled_owned());
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
