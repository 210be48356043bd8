//! The accept loop: plain and TLS listeners, the handshake budget, the connection limit.
//!
//! A socket that has not sent its CONNECT yet holds a *pending handshake*, not a connection:
//! at most `mqtt.max_pending_handshakes` of them at once, each for at most
//! `mqtt.connect_timeout` (TLS handshake and CONNECT together). When the budget is full the
//! **oldest** pending handshake is closed to make room — but only once it is
//! [`EVICTABLE_AFTER`] old; while every pending one is younger, the accept loop waits and new
//! sockets stay in the kernel's backlog. So sockets that send nothing cannot keep a device that
//! connects properly waiting for long (they are closed, oldest first), and a burst of devices
//! connecting at once is not mistaken for them (each gets time to send its CONNECT). Beyond
//! `mqtt.max_pending_per_address` from one IP address, the oldest pending handshake of that
//! address is closed once it is old enough (while it is younger, the new socket is let in
//! over the per-address limit, still inside the budget), so one address cannot hold the whole
//! budget for long and devices behind one NAT reconnecting together are not refused.
//! Only an authenticated CONNECT takes one of `mqtt.max_connections` slots; beyond them the
//! CONNECT is refused (MQTT 5 0x9F, 3.1.1 0x03) instead of waiting.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::connection::{self, ConnError};
use crate::tls::{self, TlsListener};

/// A pending handshake younger than this is never closed to make room for a newer socket.
pub const EVICTABLE_AFTER: Duration = Duration::from_millis(250);

/// The pending handshakes, oldest first.
#[derive(Debug)]
struct Pending {
    max: usize,
    per_address: usize,
    inner: Mutex<PendingInner>,
    /// Told when a pending handshake ends (the accept loop may be waiting for room).
    freed: Notify,
}

#[derive(Debug)]
struct Entry {
    ip: IpAddr,
    since: Instant,
    evicted: CancellationToken,
}

#[derive(Debug, Default)]
struct PendingInner {
    next: u64,
    live: BTreeMap<u64, Entry>,
    by_address: HashMap<IpAddr, usize>,
}

impl PendingInner {
    fn forget(&mut self, id: u64) -> Option<CancellationToken> {
        let entry = self.live.remove(&id)?;
        if let Some(n) = self.by_address.get_mut(&entry.ip) {
            *n -= 1;
            if *n == 0 {
                self.by_address.remove(&entry.ip);
            }
        }
        Some(entry.evicted)
    }

    /// Closes pending handshake `id` (counted).
    fn evict(&mut self, id: u64, count: &Counter) {
        if let Some(token) = self.forget(id) {
            token.cancel();
            count.inc();
        }
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
        self.pending.lock().forget(self.id);
        self.pending.freed.notify_one();
    }
}

impl Pending {
    fn lock(&self) -> MutexGuard<'_, PendingInner> {
        // The maps are consistent between statements: recover from a poisoned lock.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Room for one more socket. With the budget full, closes the oldest pending handshake if
    /// it is old enough; otherwise says how long until it will be (or one ends first).
    fn make_room(&self, evicted_count: &Counter) -> Result<(), Duration> {
        let mut inner = self.lock();
        if inner.live.len() < self.max {
            return Ok(());
        }
        let Some((&oldest, entry)) = inner.live.iter().next() else {
            return Ok(());
        };
        let age = entry.since.elapsed();
        if age < EVICTABLE_AFTER {
            return Err(EVICTABLE_AFTER - age);
        }
        inner.evict(oldest, evicted_count);
        Ok(())
    }

    /// A place for a new socket from `ip` (after [`Pending::make_room`]). Over the per-address
    /// limit, the oldest pending handshake of that address is closed if it is old enough.
    fn admit(self: &Arc<Self>, ip: IpAddr, evicted_count: &Counter) -> Ticket {
        let mut inner = self.lock();
        if inner.by_address.get(&ip).copied().unwrap_or(0) >= self.per_address {
            let oldest = inner
                .live
                .iter()
                .find(|(_, e)| e.ip == ip)
                .filter(|(_, e)| e.since.elapsed() >= EVICTABLE_AFTER)
                .map(|(id, _)| *id);
            if let Some(id) = oldest {
                inner.evict(id, evicted_count);
            }
        }
        inner.next += 1;
        let id = inner.next;
        let evicted = CancellationToken::new();
        inner.live.insert(
            id,
            Entry {
                ip,
                since: Instant::now(),
                evicted: evicted.clone(),
            },
        );
        *inner.by_address.entry(ip).or_default() += 1;
        Ticket {
            pending: Arc::clone(self),
            id,
            evicted,
        }
    }
}

/// Binds an MQTT listener whose accept backlog can hold a storm of devices reconnecting at
/// once (`backlog`: the caller passes `max_connections` plus the pending-handshake budget; the
/// kernel caps it at `net.core.somaxconn`). With a short backlog, connections beyond it are
/// dropped by the kernel and the devices retry only after a SYN timeout (1 s, then 3 s, ...).
pub fn bind(addr: SocketAddr, backlog: usize) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(u32::try_from(backlog.clamp(1024, 65_535)).unwrap_or(65_535))
}

/// The accept backlog for `settings` (see [`bind`]).
pub fn backlog(max_connections: usize, max_pending_handshakes: usize) -> usize {
    max_connections.saturating_add(max_pending_handshakes)
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
        freed: Notify::new(),
    });
    let housekeeping_stop = CancellationToken::new();
    let housekeeping = tokio::spawn(Arc::clone(&broker).housekeeping(housekeeping_stop.clone()));
    loop {
        // Room first: while the budget is full of young handshakes, new sockets wait in the
        // listen backlog rather than push out devices that are about to send their CONNECT.
        if let Err(wait) = pending.make_room(&broker.metrics.handshakes_evicted) {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
                () = pending.freed.notified() => {}
            }
            continue;
        }
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
            // Biased: progress made before the eviction was seen still counts.
            let shaken = tokio::select! {
                biased;
                r = tls::handshake(acceptor, stream, timeout) => r?,
                () = evicted.cancelled() => return Err(ConnError::Closed("pending handshake evicted".into())),
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
    // Biased: a CONNECT that has already arrived is served even if the socket was just
    // evicted (its task may run only after the eviction).
    let connect = tokio::select! {
        biased;
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
        () = ticket.evicted.cancelled() => {
            return Err(ConnError::Closed("pending handshake evicted".into()));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(max: usize, per_address: usize) -> Arc<Pending> {
        Arc::new(Pending {
            max,
            per_address,
            inner: Mutex::default(),
            freed: Notify::new(),
        })
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[tokio::test(start_paused = true)]
    async fn a_full_budget_of_young_handshakes_makes_the_accept_loop_wait_then_evicts_the_oldest() {
        let (p, count) = (pending(2, 10), Counter::default());
        assert_eq!(p.make_room(&count), Ok(()));
        let first = p.admit(A, &count);
        tokio::time::advance(Duration::from_millis(100)).await;
        let second = p.admit(B, &count);
        // Full, and the oldest is 100 ms old: wait the rest of its grace, close nobody.
        assert_eq!(
            p.make_room(&count),
            Err(EVICTABLE_AFTER - Duration::from_millis(100))
        );
        assert_eq!(count.get(), 0);
        tokio::time::advance(EVICTABLE_AFTER).await;
        assert_eq!(p.make_room(&count), Ok(()));
        assert!(first.evicted.is_cancelled(), "the oldest is closed");
        assert!(!second.evicted.is_cancelled());
        assert_eq!(count.get(), 1);
        // A handshake that ends frees its place at once.
        drop(second);
        assert_eq!(p.make_room(&count), Ok(()));
        assert_eq!(p.lock().live.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn one_address_over_its_limit_loses_its_oldest_once_it_is_old_enough() {
        let (p, count) = (pending(100, 2), Counter::default());
        let a1 = p.admit(A, &count);
        let a2 = p.admit(A, &count);
        let b1 = p.admit(B, &count);
        // A third from A while A's are young: admitted over the limit, nobody closed.
        let a3 = p.admit(A, &count);
        assert_eq!(count.get(), 0);
        tokio::time::advance(EVICTABLE_AFTER).await;
        // Now A's oldest is old enough: it goes, not B's (older than a2, a3, but another address).
        let _a4 = p.admit(A, &count);
        assert!(a1.evicted.is_cancelled());
        assert!(!b1.evicted.is_cancelled() && !a2.evicted.is_cancelled());
        assert!(!a3.evicted.is_cancelled());
        assert_eq!(count.get(), 1);
        assert_eq!(p.lock().by_address.get(&A), Some(&3));
    }
}
