//! The CoAP endpoint (RFC 7252, Block1 of RFC 7959) for devices on UDP.
//!
//! Devices POST (or PUT) readings to `/t/{topic...}?d=<device id>`; `GET /.well-known/core`
//! lists the resources. The contract this module keeps:
//!
//! * **Acknowledged means durable.** The piggy-backed ACK with 2.01 Created (POST) / 2.04
//!   Changed (PUT) is sent only after [`Ingest::submit`] resolved, i.e. after the outbox commit.
//!   A Non-confirmable request is stored the same way and gets no response at all.
//! * **Processed once.** A retransmitted message (same source endpoint and message id) is never
//!   processed twice while it is remembered: see [`exchange`] for the exact behaviour while the
//!   first copy is still being committed and after.
//! * **Bounded.** Requests in flight, remembered exchanges, Block1 transfers and their bytes all
//!   have fixed limits, each with a written "when full" rule ([`server`], [`exchange`],
//!   [`block1`]).
//! * **Bad input is answered, not fatal.** Malformed datagrams get a Reset (Confirmable, message
//!   id readable) or are ignored ([`message`]), and are counted; the loop keeps serving.
//!
//! # Device identity: plain CoAP is unauthenticated
//!
//! DTLS with per-device pre-shared keys (CoAP over DTLS on 5684) is the secure mode and is **not
//! implemented yet**. Until it is, CoAP is *plain*: anyone who can send a datagram from an
//! address inside `coap.plain_networks` (default: loopback only) can claim to be any device by
//! naming it in `?d=<device id>`; the endpoint only checks that the device exists, is enabled
//! and may use CoAP. Datagrams from anywhere else are refused with 4.01. Only list networks you
//! trust as much as the gateway itself (an isolated sensor VLAN, never a shared or public one).
//!
//! Answers and their order are listed in [`resource`].

pub mod backend;
pub mod block1;
pub mod commands;
pub mod exchange;
pub use outpost_codec::coap as message;
pub mod network;
pub mod observe;
pub mod resource;
pub mod server;
#[cfg(test)]
mod tests;

use std::time::Instant;

use outpost_config::CoapConfig;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::ingress::Ingest;
pub use message::Response;
pub use network::{Network, NetworkError};

/// Serves CoAP on `socket` (bound by the caller, so it can log the address and report
/// readiness) until `shutdown` is cancelled; requests in flight are finished first.
pub async fn run(
    socket: UdpSocket,
    ingest: Ingest,
    settings: CoapSettings,
    metrics: CoapMetrics,
    shutdown: CancellationToken,
) {
    server::serve(socket, ingest, settings, metrics, shutdown).await;
}

/// The endpoint's settings, resolved from `[coap]`.
#[derive(Debug, Clone)]
pub struct CoapSettings {
    /// Sources allowed to use plain (unauthenticated) CoAP.
    pub plain_networks: Vec<Network>,
    /// Outbox route of the records.
    pub route: String,
    /// Largest request body in bytes, Block1 transfers included.
    pub max_body: usize,
    /// Finished exchanges remembered for de-duplication.
    pub max_exchanges: usize,
    /// Requests handled at once; more get 5.03. Not in the config: [`server::MAX_IN_FLIGHT`].
    pub max_in_flight: usize,
    /// The ingress byte budget: a request whose payload's bytes are not free gets 5.03.
    /// `None`: unbounded.
    pub budget: Option<crate::ingress::budget::IngressBudget>,
}

impl CoapSettings {
    /// Resolves `[coap]`. The config validation has already checked the networks; an error here
    /// names the entry that does not parse.
    pub fn from_config(config: &CoapConfig) -> Result<Self, NetworkError> {
        Ok(Self {
            plain_networks: network::parse_all(&config.plain_networks)?,
            route: config.route.clone(),
            max_body: usize::try_from(config.max_body.bytes()).unwrap_or(usize::MAX),
            max_exchanges: config.max_exchanges,
            max_in_flight: server::MAX_IN_FLIGHT,
            budget: None,
        })
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    /// `2.xx`, `4.xx`, `5.xx`, or `ignored` (a NON with an unrecognized critical option).
    pub class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `started`, `completed`, `incomplete`, `too_large`, `bad_block`, `busy`, `expired`.
    pub outcome: &'static str,
}

/// `outpost_coap_*` metrics. Cheap to clone: clones share the counters.
#[derive(Debug, Clone)]
pub struct CoapMetrics {
    pub requests: Family<ClassLabel, Counter>,
    pub records: Counter,
    pub duplicates: Counter,
    pub malformed: Counter,
    pub resets: Counter,
    pub overloaded: Counter,
    pub exchanges: Gauge,
    pub exchanges_evicted: Counter,
    pub block1_transfers: Family<OutcomeLabel, Counter>,
    pub block1_in_progress: Gauge,
    pub response_latency: Histogram,
    /// Devices observing `/c` (waiting for commands).
    pub observers: Gauge,
    /// Command notifications sent (first transmissions) and retransmitted.
    pub notifications: Counter,
    pub notification_retransmits: Counter,
}

impl Default for CoapMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            records: Counter::default(),
            duplicates: Counter::default(),
            malformed: Counter::default(),
            resets: Counter::default(),
            overloaded: Counter::default(),
            exchanges: Gauge::default(),
            exchanges_evicted: Counter::default(),
            block1_transfers: Family::default(),
            block1_in_progress: Gauge::default(),
            observers: Gauge::default(),
            notifications: Counter::default(),
            notification_retransmits: Counter::default(),
            response_latency: Histogram::new([
                0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
            ]),
        }
    }
}

impl CoapMetrics {
    /// Registers every metric under the `outpost_coap_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("outpost_coap");
        r.register(
            "requests",
            "Requests handled (duplicates excluded), by response code class",
            self.requests.clone(),
        );
        r.register(
            "records",
            "Records committed from CoAP",
            self.records.clone(),
        );
        r.register(
            "duplicates",
            "Retransmitted copies of a message already seen (not processed again)",
            self.duplicates.clone(),
        );
        r.register(
            "malformed",
            "Datagrams with a message format error (answered with a reset or ignored)",
            self.malformed.clone(),
        );
        r.register("resets", "Reset messages sent", self.resets.clone());
        r.register(
            "overloaded",
            "Requests answered 5.03 because every in-flight slot was taken",
            self.overloaded.clone(),
        );
        r.register(
            "exchanges",
            "Finished exchanges remembered for de-duplication",
            self.exchanges.clone(),
        );
        r.register(
            "observers",
            "Devices observing /c (waiting for commands, RFC 7641)",
            self.observers.clone(),
        );
        r.register(
            "notifications",
            "Confirmable command notifications sent (first transmissions)",
            self.notifications.clone(),
        );
        r.register(
            "notification_retransmits",
            "Command notifications sent again for want of an acknowledgement",
            self.notification_retransmits.clone(),
        );
        r.register(
            "exchanges_evicted",
            "Finished exchanges evicted before their lifetime because the table was full",
            self.exchanges_evicted.clone(),
        );
        r.register(
            "block1_transfers",
            "Block1 transfers by outcome",
            self.block1_transfers.clone(),
        );
        r.register(
            "block1_in_progress",
            "Block1 transfers in progress",
            self.block1_in_progress.clone(),
        );
        r.register_with_unit(
            "response_latency",
            "Time from receiving a request to its response being ready (after the commit)",
            Unit::Seconds,
            self.response_latency.clone(),
        );
    }

    /// Counts a handled request; `sent` responses also feed the latency histogram.
    fn response(&self, response: Option<&Response>, sent: bool, received: Instant) {
        let class = match response.map(Response::class) {
            Some(2) => "2.xx",
            Some(4) => "4.xx",
            Some(5) => "5.xx",
            Some(_) => "other",
            None => "ignored",
        };
        self.requests.get_or_create(&ClassLabel { class }).inc();
        if sent {
            self.response_latency
                .observe(received.elapsed().as_secs_f64());
        }
    }

    fn block1(&self, outcome: &'static str) {
        self.block1_transfers
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }
}
