//! What the CoAP endpoint needs from the rest of the gateway, as one narrow trait.
//!
//! The real implementation is [`Ingest`] (device registry + outbox). Unit tests of the protocol
//! logic use a fake beside them; the end-to-end tests in `tests/tests/coap.rs` use the real
//! daemon.

use std::future::Future;

use outpost_sync::{AppendError, Source};

use crate::ingress::{Ingest, IngestRecord};
use crate::registry::{Protocol, Refusal, Registry, Traffic};

/// Why a device may not use plain CoAP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// 4.01: unknown or disabled device.
    Unauthorized(String),
    /// 4.03: the device exists but may not use CoAP.
    Forbidden(String),
}

/// An error event of a known device, for its monitoring counters. Accepted and dropped traffic
/// is recorded by [`Backend::submit`] itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The request could not be used: bad body, unsupported format, bad topic.
    Malformed,
    /// The device was refused: not allowed to use CoAP, body too large.
    Refused,
}

pub trait Backend: Send + Sync + 'static {
    /// Checks that `device` exists, is enabled and may use CoAP.
    fn identify(&self, device: &str) -> impl Future<Output = Result<(), Denied>> + Send;

    /// Records an error event of a device (ignored for unknown devices).
    fn observe(&self, device: &str, event: Event);

    /// Appends records of one identified device; resolves only after the outbox commit.
    fn submit(
        &self,
        device: &str,
        route: &str,
        records: Vec<IngestRecord>,
    ) -> impl Future<Output = Result<Vec<u64>, AppendError>> + Send;

    /// The registry behind the command resources (`/c`); `None`: they answer 5.01.
    fn registry(&self) -> Option<&Registry>;
}

impl Backend for Ingest {
    async fn identify(&self, device: &str) -> Result<(), Denied> {
        match self.registry().identify(device, Protocol::Coap) {
            Ok(()) => Ok(()),
            Err(r @ Refusal::ProtocolNotAllowed) => Err(Denied::Forbidden(r.to_string())),
            Err(r) => Err(Denied::Unauthorized(r.to_string())),
        }
    }

    fn observe(&self, device: &str, event: Event) {
        let traffic = match event {
            Event::Malformed => Traffic::Malformed,
            Event::Refused => Traffic::Refused,
        };
        self.registry().observe(device, traffic);
    }

    async fn submit(
        &self,
        device: &str,
        route: &str,
        records: Vec<IngestRecord>,
    ) -> Result<Vec<u64>, AppendError> {
        Ingest::submit(self, device, Source::Coap, route, records).await
    }

    fn registry(&self) -> Option<&Registry> {
        Some(Ingest::registry(self))
    }
}
