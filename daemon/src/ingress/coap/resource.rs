//! The resources: what a request asks for and what it gets back.
//!
//! | resource | method | answer |
//! | --- | --- | --- |
//! | `/t/{topic...}?d=<device>` | POST, PUT | readings stored: 2.01 (POST) / 2.04 (PUT) **after** the outbox commit |
//! | `/c?d=<device>` | GET | 2.05, the device's queued commands as JSON, marked delivered; with Observe (RFC 7641) a notification whenever commands are queued ([`super::commands`]) |
//! | `/c/{id}?d=<device>` | POST | 2.04: the device acknowledges command `id` with the body as its result; 4.04 no such command, 4.09 expired |
//! | `/.well-known/core` | GET | 2.05, `application/link-format` (RFC 6690) |
//!
//! Checks, in order, with their answers:
//!
//! | answer | when |
//! | --- | --- |
//! | 4.01 | the source address is outside `coap.plain_networks` (checked in the receive loop) |
//! | 4.02 | an unrecognized critical option (RFC 7252 §5.4.1) |
//! | 5.05 | Proxy-Uri / Proxy-Scheme: this is not a proxy |
//! | 4.04 | no such resource (`/t` without a topic included) |
//! | 4.05 | a method the resource does not have |
//! | 4.06 | discovery with an Accept other than 40 |
//! | 4.01 | no `d=<device id>` query, unknown or disabled device |
//! | 4.03 | the device may not use CoAP |
//! | 4.00 | a topic an MQTT PUBLISH would not accept (wildcards, `$…`, too long) |
//! | 4.15 | a Content-Format other than 0, 42, 50, 60, 110, 112 (none means 42, octet stream) |
//! | 2.31 | a Block1 block that is not the last (RFC 7959) |
//! | 4.08 | a Block1 block out of order or for no transfer in progress |
//! | 4.13 + Size1 | a body over `coap.max_body` (Size1 = the limit), or a batch over the record limit |
//! | 4.00 + diagnostic | an invalid body: the diagnostic names the place (`/3/v: …`) |
//! | 5.03 + Max-Age | the outbox is full (`reject` policy) or shutting down, too many transfers |
//! | 5.00 | the commit failed |
//!
//! Error answers carry a short UTF-8 diagnostic payload (RFC 7252 §5.5.2).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Instant;

use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};
use outpost_sync::AppendError;

use super::backend::{Backend, Denied, Event};
use super::block1::{BlockError, Held, Step, TransferKey, Transfers};
use super::message::{self, Block, OptionProblem, Response};
use super::observe::Observers;
use super::{CoapMetrics, CoapSettings};
use crate::ingress::IngestRecord;
use crate::ingress::body::{self, BodyError, Format};

/// Seconds a device is told to wait (Max-Age of a 5.03) before retrying.
pub const RETRY_AFTER_SECS: u32 = 5;
/// Records one request body may hold (a JSON/CBOR array is a batch).
pub const MAX_RECORDS: usize = 1000;
/// `application/link-format` (RFC 6690).
const LINK_FORMAT: u16 = 40;
/// `application/octet-stream`: the format of a body without Content-Format.
const OCTET_STREAM: u16 = 42;

/// The discovery document (RFC 6690): one resource type for readings, posted as single records
/// or batches.
pub const WELL_KNOWN_CORE: &str =
    "</t>;rt=\"outpost.readings\";if=\"core.b\",</c>;rt=\"outpost.commands\";obs";

/// What to do after a request was handled.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Send this response (piggy-backed on the ACK of a CON; a NON response to a NON GET).
    Respond(Response),
    /// Send nothing: RFC 7252 §5.4.1 says a NON with an unrecognized critical option is ignored.
    Ignore,
}

/// The endpoint's request handling, shared by every request task.
pub struct Resources<B> {
    pub backend: B,
    pub settings: CoapSettings,
    pub metrics: CoapMetrics,
    /// Block1 transfers in progress. Locked only for a table update, never across an await.
    pub transfers: Mutex<Transfers>,
    /// Devices observing `/c`. Locked only for a table update, never across an await.
    pub observers: Mutex<Observers>,
}

impl<B: Backend> Resources<B> {
    pub fn new(backend: B, settings: CoapSettings, metrics: CoapMetrics) -> Self {
        let transfers = Transfers::new(
            super::block1::MAX_TRANSFERS,
            settings.max_body,
            settings.budget.clone(),
        );
        Self {
            backend,
            settings,
            metrics,
            transfers: Mutex::new(transfers),
            observers: Mutex::new(Observers::new(super::commands::MAX_OBSERVERS)),
        }
    }

    /// Handles one request: the first copy of a message from an allowed source address
    /// (duplicates and other sources never get here, see [`super::server`]).
    pub async fn handle(&self, packet: &Packet, peer: SocketAddr) -> Outcome {
        if let Some(number) = message::unrecognized_critical(packet) {
            if packet.header.get_type() == coap_lite::MessageType::NonConfirmable {
                return Outcome::Ignore;
            }
            return respond(
                ResponseType::BadOption,
                format!("unrecognized critical option {number}"),
            );
        }
        if message::wants_proxy(packet) {
            return respond(
                ResponseType::ProxyingNotSupported,
                "this endpoint is not a proxy",
            );
        }
        let path = match message::uri_path(packet) {
            Ok(path) => path,
            Err(p) => return problem(p),
        };
        let method = match packet.header.code {
            MessageClass::Request(m) => Some(m),
            _ => None,
        };
        let segments: Vec<&str> = path.iter().map(String::as_str).collect();
        match segments.as_slice() {
            [".well-known", "core"] => match method {
                Some(RequestType::Get) => {
                    match message::uint_option(packet, message::ACCEPT, "Accept", 2) {
                        Ok(None) => {}
                        Ok(Some(accept)) if accept == u32::from(LINK_FORMAT) => {}
                        Ok(Some(_)) => {
                            return respond(
                                ResponseType::NotAcceptable,
                                "/.well-known/core is application/link-format (40)",
                            );
                        }
                        Err(p) => return problem(p),
                    }
                    Outcome::Respond(
                        Response::new(ResponseType::Content)
                            .with_content(LINK_FORMAT, WELL_KNOWN_CORE.as_bytes().to_vec()),
                    )
                }
                _ => respond(
                    ResponseType::MethodNotAllowed,
                    "/.well-known/core allows GET",
                ),
            },
            ["t", topic @ ..] if !topic.is_empty() => {
                let success = match method {
                    Some(RequestType::Post) => ResponseType::Created,
                    Some(RequestType::Put) => ResponseType::Changed,
                    _ => {
                        return respond(
                            ResponseType::MethodNotAllowed,
                            "/t/{topic} allows POST and PUT",
                        );
                    }
                };
                Outcome::Respond(self.readings(packet, peer, &topic.join("/"), success).await)
            }
            ["t"] => respond(ResponseType::NotFound, "post readings to /t/{topic}"),
            ["c"] => match method {
                Some(RequestType::Get) => Outcome::Respond(self.poll_commands(packet, peer).await),
                _ => respond(
                    ResponseType::MethodNotAllowed,
                    "/c allows GET (with Observe to wait for commands)",
                ),
            },
            ["c", id] => match method {
                Some(RequestType::Post) => {
                    Outcome::Respond(self.ack_command(packet, peer, id).await)
                }
                _ => respond(
                    ResponseType::MethodNotAllowed,
                    "/c/{id} allows POST (acknowledge the command with its result)",
                ),
            },
            _ => respond(
                ResponseType::NotFound,
                "no such resource; see /.well-known/core",
            ),
        }
    }

    /// The device a request's `?d=<device id>` names, once it is known to exist, be enabled
    /// and be allowed CoAP; else the refusal (4.01, 4.03) to answer.
    pub(super) async fn device<'q>(
        &self,
        query: &'q [String],
        peer: SocketAddr,
    ) -> Result<&'q str, Response> {
        let Some(device) = query
            .iter()
            .find_map(|arg| arg.strip_prefix("d="))
            .filter(|d| !d.is_empty())
        else {
            return Err(Response::error(
                ResponseType::Unauthorized,
                "name the device with the query ?d=<device id>",
            ));
        };
        let (code, why) = match self.backend.identify(device).await {
            Ok(()) => return Ok(device),
            Err(Denied::Unauthorized(why)) => (ResponseType::Unauthorized, why),
            Err(Denied::Forbidden(why)) => (ResponseType::Forbidden, why),
        };
        self.backend.observe(device, Event::Refused);
        tracing::debug!(%peer, device, reason = %why, "CoAP device refused");
        Err(Response::error(code, format!("device {device}: {why}")))
    }

    /// POST/PUT `/t/{topic}`: identify the device, reassemble, validate, store, answer.
    async fn readings(
        &self,
        packet: &Packet,
        peer: SocketAddr,
        topic: &str,
        success: ResponseType,
    ) -> Response {
        let query = match message::uri_query(packet) {
            Ok(q) => q,
            Err(p) => return p.into_response(),
        };
        let device = match self.device(&query, peer).await {
            Ok(device) => device,
            Err(refusal) => return refusal,
        };
        let malformed = |code, diagnostic: String| {
            self.backend.observe(device, Event::Malformed);
            Response::error(code, diagnostic)
        };
        if let Err(why) = outpost_config::check_record_topic(topic) {
            return malformed(ResponseType::BadRequest, format!("topic: {why}"));
        }
        let content_format =
            match message::uint_option(packet, message::CONTENT_FORMAT, "Content-Format", 2) {
                Ok(cf) => cf.map_or(OCTET_STREAM, |v| v as u16),
                Err(p) => return malformed(p.code, p.diagnostic),
            };
        let Some(format) = Format::from_coap(content_format) else {
            return malformed(
                ResponseType::UnsupportedContentFormat,
                format!(
                    "Content-Format {content_format} is not supported: use 50 (JSON), 60 (CBOR), \
                     110 (SenML JSON), 112 (SenML CBOR), 42 (octet stream) or 0 (text)"
                ),
            );
        };
        let (body, last_block, _held) = match self.body(packet, peer, device, &query) {
            Ok(Reassembly::Whole(body, last, held)) => (body, last, held),
            Ok(Reassembly::Continue(block)) => {
                return Response::new(ResponseType::Continue).with_block1(block);
            }
            Err(response) => return response,
        };
        let payloads = match body::split(format, &bytes::Bytes::from(body), MAX_RECORDS) {
            Ok(p) => p,
            Err(e @ BodyError::TooMany { .. }) => {
                self.backend.observe(device, Event::Refused);
                return Response::error(ResponseType::RequestEntityTooLarge, e.to_string());
            }
            Err(e @ BodyError::Invalid { .. }) => {
                return malformed(ResponseType::BadRequest, e.to_string());
            }
        };
        let records: Vec<IngestRecord> = payloads
            .into_iter()
            .map(|payload| IngestRecord {
                topic: topic.to_owned(),
                content_type: Some(format.mime().to_owned()),
                payload,
                headers: Vec::new(),
            })
            .collect();
        let count = records.len() as u64;
        let response = match self
            .backend
            .submit(device, &self.settings.route, records)
            .await
        {
            Ok(_) => {
                self.metrics.records.inc_by(count);
                Response::new(success)
            }
            Err(e @ (AppendError::Full { .. } | AppendError::Closed)) => {
                tracing::debug!(device, error = %e, "CoAP readings refused by the outbox");
                Response::error(ResponseType::ServiceUnavailable, e.to_string())
                    .with_max_age(RETRY_AFTER_SECS)
            }
            Err(AppendError::TooLarge { size, max }) => Response::error(
                ResponseType::RequestEntityTooLarge,
                format!("record of {size} bytes exceeds the {max} byte limit"),
            )
            .with_size1(u32::try_from(max).unwrap_or(u32::MAX)),
            Err(e @ AppendError::Storage(_)) => {
                // The outbox writer logs and counts the failed commit itself.
                tracing::debug!(device, error = %e, "CoAP readings not stored");
                Response::error(
                    ResponseType::InternalServerError,
                    "storage error: the readings were not stored",
                )
            }
            Err(e @ AppendError::Invalid { .. }) => {
                Response::error(ResponseType::BadRequest, e.to_string())
            }
            Err(e @ AppendError::UnknownRoute(_)) => {
                tracing::error!(error = %e, "CoAP ingestion is wired to an unknown route");
                Response::error(ResponseType::InternalServerError, "internal error")
            }
        };
        match last_block {
            Some(block) => response.with_block1(block),
            None => response,
        }
    }

    /// The whole request body: the payload, or a finished Block1 transfer.
    fn body(
        &self,
        packet: &Packet,
        peer: SocketAddr,
        device: &str,
        query: &[String],
    ) -> Result<Reassembly, Response> {
        let too_large = || {
            self.backend.observe(device, Event::Refused);
            Response::error(
                ResponseType::RequestEntityTooLarge,
                format!("the body exceeds the {} byte limit", self.settings.max_body),
            )
            .with_size1(u32::try_from(self.settings.max_body).unwrap_or(u32::MAX))
        };
        let block = match Block::from_request(packet, message::BLOCK1, "Block1") {
            Ok(b) => b,
            Err(p) => return Err(p.into_response()),
        };
        let Some(block) = block else {
            if packet.payload.len() > self.settings.max_body {
                return Err(too_large());
            }
            return Ok(Reassembly::Whole(
                packet.payload.clone(),
                None,
                Held::default(),
            ));
        };
        let size1 = match message::uint_option(packet, message::SIZE1, "Size1", 4) {
            Ok(s) => s,
            Err(p) => return Err(p.into_response()),
        };
        let key = TransferKey {
            peer,
            uri: format!(
                "{}?{}",
                message::uri_path(packet).unwrap_or_default().join("/"),
                query.join("&")
            ),
            tag: packet
                .get_first_option(CoapOption::Unknown(message::REQUEST_TAG))
                .cloned()
                .unwrap_or_default(),
        };
        let step = {
            let mut transfers = self.transfers.lock().unwrap_or_else(|e| e.into_inner());
            let step = transfers.offer(key, block, &packet.payload, size1, Instant::now());
            self.metrics.block1_in_progress.set(transfers.len() as i64);
            step
        };
        let outcome = |o| self.metrics.block1(o);
        match step {
            Ok(Step::Continue(b)) => {
                if b.num == 0 {
                    outcome("started");
                }
                Ok(Reassembly::Continue(b))
            }
            Ok(Step::Complete { body, last, held }) => {
                if last.num > 0 {
                    outcome("completed");
                }
                Ok(Reassembly::Whole(body, Some(last), held))
            }
            Err(BlockError::TooLarge) => {
                outcome("too_large");
                Err(too_large())
            }
            Err(BlockError::Incomplete(why)) => {
                outcome("incomplete");
                self.backend.observe(device, Event::Malformed);
                Err(Response::error(ResponseType::RequestEntityIncomplete, why))
            }
            Err(BlockError::BadBlock(why)) => {
                outcome("bad_block");
                self.backend.observe(device, Event::Malformed);
                Err(Response::error(ResponseType::BadRequest, why))
            }
            Err(BlockError::BudgetSpent) => {
                outcome("budget_spent");
                Err(Response::error(
                    ResponseType::ServiceUnavailable,
                    "ingress byte budget spent: send this block again",
                )
                .with_max_age(RETRY_AFTER_SECS))
            }
            Err(BlockError::Busy) => {
                outcome("busy");
                Err(Response::error(
                    ResponseType::ServiceUnavailable,
                    "too many block transfers in progress",
                )
                .with_max_age(RETRY_AFTER_SECS))
            }
        }
    }

    /// Forgets idle Block1 transfers.
    pub fn purge(&self, now: Instant) {
        let mut transfers = self.transfers.lock().unwrap_or_else(|e| e.into_inner());
        let expired = transfers.purge(now);
        for _ in 0..expired {
            self.metrics.block1("expired");
        }
        self.metrics.block1_in_progress.set(transfers.len() as i64);
    }
}

enum Reassembly {
    /// The whole body, the last Block1 block if it came in blocks, and the body's bytes of the
    /// ingress budget (held until the request is answered).
    Whole(Vec<u8>, Option<Block>, Held),
    /// A block that is not the last one was stored.
    Continue(Block),
}

fn respond(code: ResponseType, diagnostic: impl Into<String>) -> Outcome {
    Outcome::Respond(Response::error(code, diagnostic))
}

fn problem(p: OptionProblem) -> Outcome {
    Outcome::Respond(p.into_response())
}
