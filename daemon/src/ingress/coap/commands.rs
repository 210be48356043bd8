//! Commands over CoAP: a device polls `/c`, observes it to wait for commands (RFC 7641), and
//! acknowledges each command with `POST /c/{id}` (docs/COAP.md, "Commands").
//!
//! * `GET /c?d=<device>`: 2.05, `{"commands": [...]}` (JSON, Content-Format 50) with the device's
//!   queued commands, oldest first, as many as fit [`MAX_BODY`] (at least one), marked delivered
//!   — at most once, like the HTTP poll: a response the device never gets loses them, while a
//!   retransmitted request gets the same answer from the exchange table.
//! * With `Observe: 0` the same answer registers the device (one observation per device, the
//!   newest wins; `Observe: 1` ends it). Whenever a command is queued for it, the endpoint sends
//!   a Confirmable 2.05 notification with the queued commands; they are marked delivered when
//!   the device acknowledges it (see [`super::observe`]); an unacknowledged notification ends
//!   the observation after 4 retransmissions and leaves the commands queued.
//! * `POST /c/{id}?d=<device>`: the body is the result (JSON with Content-Format 50, else its
//!   text): 2.04; 4.04 when the device has no command `id`; 4.09 when it expired undelivered;
//!   4.00 for an id that is not a number or a JSON body that does not parse.

use std::net::SocketAddr;

use coap_lite::{Packet, ResponseType};

use super::backend::Backend;
use super::message::{self, Response};
use super::observe::MAX_BODY;
use super::resource::Resources;
use crate::registry::commands::{Acked, MAX_PAYLOAD, MAX_QUEUED};
use crate::registry::{Command, Registry};

/// Devices that may observe `/c` at once.
pub const MAX_OBSERVERS: usize = 10_000;
/// `application/json`.
const JSON: u16 = 50;

/// The JSON listing of as many of `device`'s queued commands as fit [`MAX_BODY`] (at least
/// one), and their ids; not marked delivered. Empty ids: nothing queued.
pub async fn queued_body(registry: &Registry, device: &str) -> Result<(Vec<u8>, Vec<i64>), String> {
    let pending = registry
        .pending_commands(device, MAX_QUEUED)
        .await
        .map_err(|e| e.to_string())?;
    Ok(listing(&pending))
}

fn listing(pending: &[Command]) -> (Vec<u8>, Vec<i64>) {
    let mut taken: Vec<&Command> = Vec::new();
    let mut body = serde_json::json!({ "commands": [] })
        .to_string()
        .into_bytes();
    for command in pending {
        taken.push(command);
        let candidate = serde_json::json!({ "commands": taken })
            .to_string()
            .into_bytes();
        if candidate.len() > MAX_BODY && taken.len() > 1 {
            taken.pop();
            break;
        }
        body = candidate;
    }
    (body, taken.iter().map(|c| c.id).collect())
}

impl<B: Backend> Resources<B> {
    /// The authenticated device of a `/c` request and the registry holding its commands, or
    /// the answer that refuses the request.
    async fn command_device(
        &self,
        packet: &Packet,
        peer: SocketAddr,
    ) -> Result<(String, &Registry), Response> {
        let query = message::uri_query(packet).map_err(|p| p.into_response())?;
        let device = self.device(&query, peer).await?.to_owned();
        let registry = self
            .backend
            .registry()
            .ok_or_else(|| Response::error(ResponseType::NotImplemented, "no commands here"))?;
        Ok((device, registry))
    }

    /// `GET /c`.
    pub(super) async fn poll_commands(&self, packet: &Packet, peer: SocketAddr) -> Response {
        let (device, registry) = match self.command_device(packet, peer).await {
            Ok(found) => found,
            Err(refusal) => return refusal,
        };
        let device = device.as_str();
        let observe = match message::uint_option(packet, message::OBSERVE, "Observe", 3) {
            Ok(o) => o,
            Err(p) => return p.into_response(),
        };
        let mut sequence = None;
        {
            let mut observers = self.observers.lock().unwrap_or_else(|e| e.into_inner());
            match observe {
                Some(0) => match observers.register(device, peer, packet.get_token()) {
                    Some(seq) => sequence = Some(seq),
                    None => {
                        return Response::error(
                            ResponseType::ServiceUnavailable,
                            format!("{MAX_OBSERVERS} devices observe already"),
                        )
                        .with_max_age(super::resource::RETRY_AFTER_SECS);
                    }
                },
                Some(1) => observers.deregister(device),
                // RFC 7641 §2: other values are not defined; treat it as a plain GET.
                _ => {}
            }
            self.metrics.observers.set(observers.len() as i64);
        }
        let (body, ids) = match queued_body(registry, device).await {
            Ok(listing) => listing,
            Err(e) => {
                tracing::error!(device, error = %e, "Reading queued commands failed");
                return Response::error(ResponseType::InternalServerError, "commands unavailable");
            }
        };
        if !ids.is_empty()
            && let Err(e) = registry.mark_delivered(device, &ids).await
        {
            tracing::error!(device, error = %e, "Marking commands delivered failed");
            return Response::error(ResponseType::InternalServerError, "commands unavailable");
        }
        let response = Response::new(ResponseType::Content).with_content(JSON, body);
        match sequence {
            Some(seq) => response.with_observe(seq),
            None => response,
        }
    }

    /// `POST /c/{id}`.
    pub(super) async fn ack_command(
        &self,
        packet: &Packet,
        peer: SocketAddr,
        id: &str,
    ) -> Response {
        let (device, registry) = match self.command_device(packet, peer).await {
            Ok(found) => found,
            Err(refusal) => return refusal,
        };
        let device = device.as_str();
        let Ok(id) = id.parse::<i64>() else {
            return Response::error(ResponseType::BadRequest, format!("not a command id: {id}"));
        };
        if packet.payload.len() > MAX_PAYLOAD {
            return Response::error(
                ResponseType::RequestEntityTooLarge,
                format!("a result is at most {MAX_PAYLOAD} bytes"),
            )
            .with_size1(MAX_PAYLOAD as u32);
        }
        let format =
            match message::uint_option(packet, message::CONTENT_FORMAT, "Content-Format", 2) {
                Ok(cf) => cf,
                Err(p) => return p.into_response(),
            };
        let result = if format == Some(u32::from(JSON)) {
            match serde_json::from_slice(&packet.payload) {
                Ok(v) => v,
                Err(e) => {
                    return Response::error(
                        ResponseType::BadRequest,
                        format!("the result is not JSON: {e}"),
                    );
                }
            }
        } else {
            serde_json::Value::String(String::from_utf8_lossy(&packet.payload).into_owned())
        };
        match registry.ack_command(device, id, result).await {
            Ok(Acked::Ok(_)) => Response::new(ResponseType::Changed),
            Ok(Acked::NotFound) => Response::error(
                ResponseType::NotFound,
                format!("device {device} has no command {id}"),
            ),
            Ok(Acked::Expired) => Response::error(
                ResponseType::Conflict,
                format!("command {id} expired before it was delivered"),
            ),
            Err(e) => {
                tracing::error!(device, error = %e, "Recording an acknowledgement failed");
                Response::error(ResponseType::InternalServerError, "commands unavailable")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::commands::CommandState;

    fn command(id: i64, payload_len: usize) -> Command {
        Command {
            id,
            device_id: "d".into(),
            command_id: None,
            name: None,
            payload: serde_json::json!("x".repeat(payload_len)),
            payload_base64: None,
            state: CommandState::Queued,
            created_at_ms: 0,
            expires_at_ms: 1,
            delivered_at_ms: None,
            acked_at_ms: None,
            result: None,
            correlation: None,
        }
    }

    #[test]
    fn a_listing_fits_one_datagram_but_always_carries_a_command() {
        assert_eq!(listing(&[]), (br#"{"commands":[]}"#.to_vec(), vec![]));
        let small: Vec<Command> = (1..=20).map(|i| command(i, 100)).collect();
        let (body, ids) = listing(&small);
        assert!(
            body.len() <= MAX_BODY && ids.len() > 1 && ids.len() < 20,
            "{}",
            ids.len()
        );
        assert_eq!(ids, (1..=ids.len() as i64).collect::<Vec<_>>());
        let (body, ids) = listing(&[command(7, 5000), command(8, 1)]);
        assert_eq!(ids, vec![7]);
        assert!(body.len() > MAX_BODY);
    }
}
