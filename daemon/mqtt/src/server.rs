//! The accept loop: plain and TLS listeners, the handshake budget, the connection limit.
//!
//! A socket that has not sent its CONNECT yet holds a *pending handshake*, not a connection:
//! at most `mqtt.max_pending_handshakes` of them at once and `mqtt.max_pending_per_address`
//! from one IP address — beyond either, the **oldest** pending one (of all, or of that address)
//! is closed, so sockets that send nothing cannot keep a device that connects properly waiting
//! — each for at most `mqtt.connect_timeout` (TLS handshake and CONNECT together). Only an
//! authenticated CONNECT takes one of `mqtt.max_connections` slots; beyond them the CONNECT is
//! refused (MQTT 5 0x9F, 3.1.1 0x03) instead of waiting.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::connection::{self, ConnError};
use crate::tls::{self, TlsListener};

/// The pending handshakes, oldest first.
#[derive(Debug)]
struct Pending {
    max: usize,
    per_address: usize,
    inner: Mutex<PendingInner>,
}

#[derive(Debug, Default)]
struct PendingInner {
    next: u64,
    live: BTreeMap<u64, (IpAddr, CancellationToken)>,
    by_address: HashMap<IpAddr, usize>,
}

impl PendingInner {
    fn forget(&mut self, id: u64) -> Option<CancellationToken> {
        let (ip, token) = self.live.remove(&id)?;
        if let Some(n) = self.by_address.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.by_address.remove(&ip);
            }
        }
        Some(token)
    }
}

/// A socket's place among the pending handshakes; cancelled when evicted.
#[derive(Debug)]
struct Ticket {
    pending: Arc<Pending>,
    id: u64,
    evicted: CancellationToken,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.pending
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forget(self.id);
    }
}

impl Pending {
    /// A place for a new socket from `ip`. Over the per-address limit the oldest pending socket
    /// *of that address* is evicted; over the budget, the oldest of all. Evicted sockets have
    /// their token cancelled and are counted. A new socket always gets in: a client that sends
    /// its CONNECT at once never loses to sockets that send nothing, even from its own address.
    fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        evicted_count: &prometheus_client::metrics::counter::Counter,
    ) -> Ticket {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.by_address.get(&ip).copied().unwrap_or(0) >= self.per_address {
            let oldest = inner
                .live
                .iter()
                .find(|(_, (addr, _))| *addr == ip)
                .map(|(id, _)| *id);
            if let Some(token) = oldest.and_then(|id| inner.forget(id)) {
                token.cancel();
                evicted_count.inc();
            }
        }
        while inner.live.len() >= self.max {
            let Some(oldest) = inner.live.keys().next().copied() else {
                break;
            };
            if let Some(token) = inner.forget(oldest) {
                token.cancel();
                evicted_count.inc();
            }
        }
        inner.next += 1;
        let id = inner.next;
        let evicted = CancellationToken::new();
        inner.live.insert(id, (ip, evicted.clone()));
        *inner.by_address.entry(ip).or_default() += 1;
        Ticket {
            pending: Arc::clone(self),
            id,
            evicted,
        }
    }
}

/// Accepts connections on `plain` (and `tls`) until `stop`, then waits for every connection to
/// end. Runs the broker's housekeeping (wills, expiry) meanwhile.
pub async fn run(
    broker: Arc<Broker>,
    plain: TcpListener,
    tls: Option<TlsListener>,
    stop: CancellationToken,
) {
    let settings = &broker.settings;
    let connections = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let pending = Arc::new(Pending {
        max: settings.max_pending_handshakes,
        per_address: settings.max_pending_per_address,
        inner: Mutex::default(),
    });
    let housekeeping_stop = CancellationToken::new();
    let housekeeping = tokio::spawn(Arc::clone(&broker).housekeeping(housekeeping_stop.clone()));
    loop {
        let (accepted, acceptor) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = plain.accept() => (accepted, None),
            (accepted, acceptor) = tls::accept(tls.as_ref()) => (accepted, Some(acceptor)),
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "MQTT accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ticket = pending.admit(peer.ip(), &broker.metrics.handshakes_evicted);
        let (broker, slots, stop) = (Arc::clone(&broker), Arc::clone(&slots), stop.clone());
        connections.spawn(async move {
            let span = tracing::debug_span!("mqtt", peer = %peer);
            let result = tracing::Instrument::instrument(
                accept_one(stream, peer, acceptor, ticket, &broker, &slots, stop),
                span,
            )
            .await;
            match result {
                Ok(()) => {}
                Err(ConnError::Malformed(reason)) => {
                    broker.metrics.malformed.inc();
                    tracing::warn!(peer = %peer, reason = %reason, "Closed MQTT connection: malformed input");
                }
                Err(e) => tracing::debug!(peer = %peer, error = %e, "MQTT connection closed"),
            }
        });
    }
    connections.close();
    connections.wait().await;
    housekeeping_stop.cancel();
    let _ = housekeeping.await;
}

async fn accept_one(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    ticket: Ticket,
    broker: &Arc<Broker>,
    slots: &Arc<Semaphore>,
    stop: CancellationToken,
) -> Result<(), ConnError> {
    let _ = stream.set_nodelay(true);
    let timeout = broker.settings.connect_timeout;
    match acceptor {
        None => {
            let (rd, wr) = stream.into_split();
            handshake_then_serve(rd, wr, Vec::new(), peer, ticket, broker, slots, stop).await
        }
        Some(acceptor) => {
            let evicted = ticket.evicted.clone();
            let shaken = tokio::select! {
                () = evicted.cancelled() => return Err(ConnError::Closed("pending handshake evicted".into())),
                r = tls::handshake(acceptor, stream, timeout) => r?,
            };
            let (stream, names) = shaken;
            let (rd, wr) = tokio::io::split(stream);
            handshake_then_serve(rd, wr, names, peer, ticket, broker, slots, stop).await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn handshake_then_serve(
    mut rd: impl AsyncRead + Unpin,
    mut wr: impl AsyncWrite + Unpin,
    cert_names: Vec<String>,
    peer: SocketAddr,
    ticket: Ticket,
    broker: &Arc<Broker>,
    slots: &Arc<Semaphore>,
    stop: CancellationToken,
) -> Result<(), ConnError> {
    let mut buf = BytesMut::new();
    let max = broker.settings.max_packet;
    let connect = tokio::select! {
        () = ticket.evicted.cancelled() => {
            return Err(ConnError::Closed("pending handshake evicted".into()));
        }
        r = tokio::time::timeout(
            broker.settings.connect_timeout,
            connection::read_first(&mut rd, &mut wr, &mut buf, max),
        ) => match r {
            Err(_) => return Err(ConnError::Closed("no CONNECT in time".into())),
            Ok(r) => match r? {
                Some(c) => c,
                None => return Ok(()),
            },
        },
    };
    drop(ticket);
    let slot = Arc::clone(slots).try_acquire_owned().ok();
    tracing::trace!(peer = %peer, version = ?connect.version, "CONNECT");
    let result = connection::serve(
        connect,
        rd,
        wr,
        buf,
        &cert_names,
        broker,
        slot.is_some(),
        stop,
    )
    .await;
    drop(slot);
    result
}
