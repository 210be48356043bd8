//! The receive loop: one task reads datagrams, de-duplicates, and hands each new request to its
//! own short-lived task.
//!
//! * **Source check first**: a request from outside `coap.plain_networks` is answered 4.01 right
//!   here, before it can take a place in the exchange table or a permit.
//! * **In flight**: at most `max_in_flight` ([`MAX_IN_FLIGHT`] = 1024) requests are handled at
//!   once (a semaphore). **When full, a new request is answered at once with 5.03 and Max-Age 1**
//!   instead of being queued: a CoAP client retransmits anyway, and an unbounded queue would
//!   only grow.
//! * **Exchanges**: see [`super::exchange`]; the table is behind a mutex held only for a lookup or
//!   an update, never across an await.
//! * **Shutdown**: the loop stops receiving; requests in flight finish (their commits complete
//!   while the outbox writer is still running, see `app/mod.rs`) and their ACKs are sent; then `run`
//!   returns.
//! * A receive error (e.g. an ICMP port-unreachable reported on the socket) never ends the loop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coap_lite::{MessageClass, MessageType, Packet, RequestType, ResponseType};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::backend::Backend;
use super::commands;
use super::exchange::{EXCHANGE_LIFETIME, Exchanges, Key, NON_LIFETIME, Seen};
use super::message::{self, Inbound, Response};
use super::observe::{Answered, Observers};
use super::resource::{Outcome, Resources};
use super::{CoapMetrics, CoapSettings, network};
use crate::registry::Command;

/// Requests handled concurrently; beyond this, 5.03.
pub const MAX_IN_FLIGHT: usize = 1024;
/// The largest UDP payload (IPv6 without jumbograms is 65,527; IPv4 65,507).
const DATAGRAM_BUFFER: usize = 65_536;
/// How often expired exchanges and idle transfers are dropped.
const PURGE_EVERY: Duration = Duration::from_secs(1);
/// Max-Age of the 5.03 sent when every in-flight permit is taken.
const BUSY_RETRY_SECS: u32 = 1;

struct Endpoint<B> {
    socket: UdpSocket,
    resources: Resources<B>,
    exchanges: Mutex<Exchanges>,
    permits: Arc<Semaphore>,
    /// Message ids of our Non-confirmable responses.
    next_mid: AtomicU16,
    metrics: CoapMetrics,
}

/// Serves CoAP on `socket` until `shutdown` is cancelled.
pub async fn serve<B: Backend>(
    socket: UdpSocket,
    backend: B,
    settings: CoapSettings,
    metrics: CoapMetrics,
    shutdown: CancellationToken,
) {
    let endpoint = Arc::new(Endpoint {
        socket,
        exchanges: Mutex::new(Exchanges::new(settings.max_exchanges)),
        permits: Arc::new(Semaphore::new(settings.max_in_flight)),
        resources: Resources::new(backend, settings, metrics.clone()),
        next_mid: AtomicU16::new(rand::random()),
        metrics,
    });
    let requests = TaskTracker::new();
    // Commands as they are queued, for the devices observing `/c`.
    let mut commands = endpoint
        .resources
        .backend
        .registry()
        .map(crate::registry::Registry::command_events);
    let mut buf = vec![0u8; DATAGRAM_BUFFER];
    let mut purge = tokio::time::interval(PURGE_EVERY);
    purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut receive_errors = 0u32;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            _ = purge.tick() => endpoint.purge(),
            queued = next_command(&mut commands) => match queued {
                Ok(command) => endpoint.command_queued(&command.device_id, &requests),
                Err(RecvError::Lagged(n)) => {
                    // Missed ones stay queued: sent with the next notification or poll.
                    tracing::debug!(missed = n, "CoAP endpoint missed command announcements");
                }
                Err(RecvError::Closed) => commands = None,
            },
            received = endpoint.socket.recv_from(&mut buf) => match received {
                Ok((len, peer)) => {
                    receive_errors = 0;
                    endpoint.datagram(&buf[..len], peer, &requests);
                }
                Err(e) => {
                    // ICMP errors from earlier sends surface here (ECONNREFUSED): not fatal.
                    receive_errors += 1;
                    if receive_errors == 1 || receive_errors.is_power_of_two() {
                        tracing::warn!(error = %e, count = receive_errors, "CoAP receive error");
                    }
                    if receive_errors > 16 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            },
        }
    }
    requests.close();
    let in_flight = requests.len();
    if in_flight > 0 {
        tracing::info!(
            in_flight,
            "CoAP endpoint stopping: finishing requests in flight"
        );
    }
    requests.wait().await;
}

/// The next announced command, or never when there are no announcements.
async fn next_command(
    commands: &mut Option<broadcast::Receiver<Command>>,
) -> Result<Command, RecvError> {
    match commands {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl<B: Backend> Endpoint<B> {
    /// A command was queued for `device`: notify it if it observes `/c` and has no
    /// notification in flight (else it gets the command in the next one).
    fn command_queued(self: &Arc<Self>, device: &str, requests: &TaskTracker) {
        if self.observers().wants(device) {
            let (endpoint, device) = (Arc::clone(self), device.to_owned());
            requests.spawn(async move { endpoint.notify(&device).await });
        }
    }

    /// Sends `device` a Confirmable notification with its queued commands (none queued: none).
    async fn notify(&self, device: &str) {
        let Some(registry) = self.resources.backend.registry() else {
            return;
        };
        let (body, ids) = match commands::queued_body(registry, device).await {
            Ok(listing) => listing,
            Err(e) => {
                tracing::warn!(device, error = %e, "Reading queued commands for a notification failed");
                return;
            }
        };
        if ids.is_empty() {
            return;
        }
        let mid = self.next_mid.fetch_add(1, Ordering::Relaxed);
        let (peer, bytes) = {
            let mut observers = self.observers();
            let Some((peer, token, seq)) = observers.next(device) else {
                return; // no longer observing, or one went out meanwhile
            };
            let bytes: Arc<[u8]> = Arc::from(
                Response::new(ResponseType::Content)
                    .with_observe(seq)
                    .with_content(50, body)
                    .encode(MessageType::Confirmable, mid, &token),
            );
            observers.sent(device, mid, ids, Arc::clone(&bytes), Instant::now());
            (peer, bytes)
        };
        self.metrics.notifications.inc();
        self.send_now(&bytes, peer);
    }

    /// An Acknowledgement or Reset arrived: if it answers a notification, the commands in it
    /// are delivered (and the next notification goes out), or the observation ends.
    fn answer(self: &Arc<Self>, message_id: u16, reset: bool, requests: &TaskTracker) {
        let answered = self.observers().answered(message_id, reset);
        match answered {
            Some(Answered::Delivered { device, ids, more }) => {
                let endpoint = Arc::clone(self);
                requests.spawn(async move {
                    if let Some(registry) = endpoint.resources.backend.registry()
                        && let Err(e) = registry.mark_delivered(&device, &ids).await
                    {
                        tracing::warn!(device, error = %e, "Marking notified commands delivered failed");
                    }
                    if more {
                        endpoint.notify(&device).await;
                    }
                });
            }
            Some(Answered::Cancelled { device }) => {
                tracing::debug!(
                    device,
                    "A device reset its command notification: no longer observing"
                );
                self.metrics.observers.set(self.observers().len() as i64);
            }
            None => {}
        }
    }

    fn observers(&self) -> std::sync::MutexGuard<'_, Observers> {
        self.resources
            .observers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Classifies one datagram and answers or dispatches it. Never blocks.
    fn datagram(self: &Arc<Self>, datagram: &[u8], peer: SocketAddr, requests: &TaskTracker) {
        let packet = match message::classify(datagram) {
            Inbound::Request(packet) => packet,
            Inbound::Reset {
                message_id,
                malformed,
                why,
            } => {
                if malformed {
                    self.metrics.malformed.inc();
                }
                tracing::debug!(%peer, reason = why, "CoAP message rejected with a reset");
                self.metrics.resets.inc();
                self.send_now(&message::reset(message_id), peer);
                return;
            }
            Inbound::Ignore { malformed, why } => {
                if malformed {
                    self.metrics.malformed.inc();
                }
                tracing::debug!(%peer, reason = why, "CoAP datagram ignored");
                return;
            }
            Inbound::Answer { message_id, reset } => {
                self.answer(message_id, reset, requests);
                return;
            }
        };
        let confirmable = packet.header.get_type() == MessageType::Confirmable;
        if !network::allowed(&self.resources.settings.plain_networks, peer.ip()) {
            // Refused before the exchange table, so strangers cannot fill it. The answer is
            // the same for every copy, so duplicates need no memory.
            let refusal = Response::error(
                ResponseType::Unauthorized,
                format!(
                    "plain CoAP is not accepted from {}: not inside coap.plain_networks \
                     (DTLS is not available yet)",
                    peer.ip()
                ),
            );
            tracing::debug!(%peer, "CoAP request from outside coap.plain_networks refused");
            self.metrics
                .response(Some(&refusal), confirmable, Instant::now());
            if confirmable {
                let bytes = refusal.encode(
                    MessageType::Acknowledgement,
                    packet.header.message_id,
                    packet.get_token(),
                );
                self.send_now(&bytes, peer);
            }
            return;
        }
        let key: Key = (peer, packet.header.message_id);
        let seen = self.lock_exchanges().arrive(key, Instant::now());
        match seen {
            Seen::New => {}
            Seen::InFlight => {
                self.metrics.duplicates.inc();
                return;
            }
            Seen::Done(response) => {
                self.metrics.duplicates.inc();
                if let Some(bytes) = response {
                    self.send_now(&bytes, peer);
                }
                return;
            }
        }
        let received = Instant::now();
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            self.metrics.overloaded.inc();
            let busy = Response::error(
                ResponseType::ServiceUnavailable,
                "too many requests in flight",
            )
            .with_max_age(BUSY_RETRY_SECS);
            if let Some(reply) = self.finish(key, &packet, Outcome::Respond(busy), received) {
                for _ in 0..reply.times {
                    self.send_now(&reply.bytes, peer);
                }
            }
            return;
        };
        // The payload's bytes of the ingress budget: a UDP server cannot push back, so a
        // request that finds the budget spent is answered "try again" like a full house.
        let budget = match &self.resources.settings.budget {
            None => None,
            Some(b) => match b.try_take(packet.payload.len()) {
                Some(permit) => Some(permit),
                None => {
                    self.metrics.overloaded.inc();
                    let busy = Response::error(
                        ResponseType::ServiceUnavailable,
                        "ingress byte budget spent",
                    )
                    .with_max_age(BUSY_RETRY_SECS);
                    if let Some(reply) = self.finish(key, &packet, Outcome::Respond(busy), received)
                    {
                        for _ in 0..reply.times {
                            self.send_now(&reply.bytes, peer);
                        }
                    }
                    return;
                }
            },
        };
        let endpoint = Arc::clone(self);
        requests.spawn(async move {
            let _budget = budget; // held until the request is answered
            let outcome = endpoint.resources.handle(&packet, peer).await;
            if let Some(reply) = endpoint.finish(key, &packet, outcome, received) {
                for _ in 0..reply.times {
                    if let Err(e) = endpoint.socket.send_to(&reply.bytes, peer).await {
                        tracing::debug!(
                            %peer,
                            error = %e,
                            "CoAP send failed; the client will retransmit"
                        );
                    }
                }
            }
            drop(permit);
        });
    }

    /// Records the outcome in the exchange table and the metrics; returns what to send, if
    /// anything, and how many times (once per copy of the request that arrived).
    fn finish(
        &self,
        key: Key,
        request: &Packet,
        outcome: Outcome,
        received: Instant,
    ) -> Option<Reply> {
        let confirmable = request.header.get_type() == MessageType::Confirmable;
        let is_get = request.header.code == MessageClass::Request(RequestType::Get);
        let (response, sent) = match outcome {
            Outcome::Respond(r) => {
                // A NON POST/PUT gets no response, success or not (RFC 7252 §5.2.3 allows
                // either); a NON GET gets a NON response, or it would be useless.
                let send = confirmable || is_get;
                (Some(r), send)
            }
            Outcome::Ignore => (None, false),
        };
        self.metrics.response(response.as_ref(), sent, received);
        if let Some(r) = response.as_ref().filter(|r| r.class() != 2) {
            tracing::debug!(
                peer = %key.0,
                code = %r.code_text(),
                diagnostic = %String::from_utf8_lossy(&r.payload),
                "CoAP error response"
            );
        }
        let bytes: Option<Arc<[u8]>> = response.filter(|_| sent).map(|r| {
            let (kind, mid) = if confirmable {
                (MessageType::Acknowledgement, request.header.message_id)
            } else {
                (
                    MessageType::NonConfirmable,
                    self.next_mid.fetch_add(1, Ordering::Relaxed),
                )
            };
            Arc::from(r.encode(kind, mid, request.get_token()))
        });
        // Copies of a CON get the same ACK again; copies of a NON are ignored (RFC 7252 §4.5),
        // so only CON answers are remembered.
        let (remembered, lifetime) = if confirmable {
            (bytes.clone(), EXCHANGE_LIFETIME)
        } else {
            (None, NON_LIFETIME)
        };
        let done = self
            .lock_exchanges()
            .finish(key, remembered, lifetime, Instant::now());
        self.metrics.exchanges_evicted.inc_by(done.evicted);
        // Copies of a NON that arrived in flight are ignored too.
        let times = if confirmable { done.sends } else { 1 };
        bytes.map(|bytes| Reply { bytes, times })
    }

    fn send_now(&self, bytes: &[u8], peer: SocketAddr) {
        if let Err(e) = self.socket.try_send_to(bytes, peer) {
            tracing::debug!(%peer, error = %e, "CoAP send failed; the client will retransmit");
        }
    }

    fn lock_exchanges(&self) -> std::sync::MutexGuard<'_, Exchanges> {
        self.exchanges.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn purge(&self) {
        let now = Instant::now();
        let remembered = {
            let mut exchanges = self.lock_exchanges();
            exchanges.purge(now);
            exchanges.len()
        };
        self.metrics.exchanges.set(remembered as i64);
        self.resources.purge(now);
        let (sends, gone) = self.observers().due(now);
        for send in sends {
            self.metrics.notification_retransmits.inc();
            self.send_now(&send.bytes, send.peer);
        }
        for device in gone {
            tracing::info!(
                device,
                "A command notification went unanswered: no longer observing (the commands stay queued)"
            );
        }
        self.metrics.observers.set(self.observers().len() as i64);
    }
}

/// A response to send `times` times.
struct Reply {
    bytes: Arc<[u8]>,
    times: u32,
}
