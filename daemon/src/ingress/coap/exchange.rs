//! De-duplication of retransmitted messages (RFC 7252 §4.5).
//!
//! A message is identified by (source endpoint, message id). The first copy is processed; every
//! later copy within the lifetime is processed **never** again:
//!
//! * a copy of a Confirmable request that is **still in flight** (its outbox commit has not
//!   completed) gets no answer at that moment: the endpoint has no response yet, and an empty
//!   ACK would oblige it to send a separate Confirmable response later with its own
//!   retransmission state. Instead the copy is counted, and when the commit completes the same
//!   piggy-backed response is sent once for the original and once per counted copy (at most
//!   [`MAX_ANSWERED_COPIES`]) — every copy gets the identical ACK, as §4.5 recommends;
//! * a copy of a **finished** Confirmable request gets the cached response bytes again;
//! * a copy of a Non-confirmable request is silently ignored.
//!
//! Finished exchanges are remembered for `EXCHANGE_LIFETIME` (247 s, CON) or `NON_LIFETIME`
//! (145 s, NON) with the default transmission parameters, in a table of at most `max_exchanges`
//! entries. **When it is full the oldest entry is evicted** and counted: a retransmission of an
//! evicted exchange would be processed again (a duplicate record, never a lost one). In-flight
//! exchanges are never evicted; their number is bounded by the endpoint's in-flight permits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashlink::LinkedHashMap;

/// RFC 7252 §4.8.2 with the default parameters: how long a Confirmable message id stays taken.
pub const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);
/// RFC 7252 §4.8.2: how long a Non-confirmable message id stays taken.
pub const NON_LIFETIME: Duration = Duration::from_secs(145);
/// Copies of an in-flight request answered when it completes (beyond the original).
pub const MAX_ANSWERED_COPIES: u8 = 4;

/// Source endpoint and message id.
pub type Key = (SocketAddr, u16);

/// What to do with an arriving message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The first copy: process it. It is now in flight.
    New,
    /// A copy of a message being processed: send nothing now.
    InFlight,
    /// A copy of a finished message: send these bytes again (`None`: it had no response).
    Done(Option<Arc<[u8]>>),
}

#[derive(Debug)]
struct Finished {
    expires: Instant,
    response: Option<Arc<[u8]>>,
}

/// The exchange table. Not synchronized: the endpoint keeps it behind a mutex that is never held
/// across an await.
#[derive(Debug)]
pub struct Exchanges {
    /// Copies seen while in flight, per exchange.
    in_flight: HashMap<Key, u8>,
    /// Finished exchanges in the order they finished (so oldest first).
    done: LinkedHashMap<Key, Finished>,
    capacity: usize,
}

impl Exchanges {
    /// A table remembering at most `capacity` finished exchanges.
    pub fn new(capacity: usize) -> Self {
        Self {
            in_flight: HashMap::new(),
            done: LinkedHashMap::new(),
            capacity,
        }
    }

    /// Looks an arriving message up; a new one is marked in flight.
    pub fn arrive(&mut self, key: Key, now: Instant) -> Seen {
        if let Some(copies) = self.in_flight.get_mut(&key) {
            *copies = copies.saturating_add(1);
            return Seen::InFlight;
        }
        match self.done.get(&key) {
            Some(f) if f.expires > now => return Seen::Done(f.response.clone()),
            Some(_) => {
                self.done.remove(&key);
            }
            None => {}
        }
        self.in_flight.insert(key, 0);
        Seen::New
    }

    /// Records the outcome of an in-flight exchange. Returns how many times to send the response:
    /// once for the original plus once per copy that arrived meanwhile (capped), and how many
    /// older exchanges were evicted to make room.
    pub fn finish(
        &mut self,
        key: Key,
        response: Option<Arc<[u8]>>,
        lifetime: Duration,
        now: Instant,
    ) -> Finish {
        let copies = self.in_flight.remove(&key).unwrap_or(0);
        let mut evicted = 0;
        self.purge(now);
        if self.capacity == 0 {
            evicted += 1;
        } else {
            while self.done.len() >= self.capacity {
                self.done.pop_front();
                evicted += 1;
            }
            self.done.insert(
                key,
                Finished {
                    expires: now + lifetime,
                    response,
                },
            );
        }
        Finish {
            sends: 1 + u32::from(copies.min(MAX_ANSWERED_COPIES)),
            evicted,
        }
    }

    /// Drops expired finished exchanges from the old end. Entries with a shorter lifetime behind
    /// a longer-lived one expire lazily, on lookup or eviction.
    pub fn purge(&mut self, now: Instant) -> usize {
        let mut removed = 0;
        while self.done.front().is_some_and(|(_, f)| f.expires <= now) {
            self.done.pop_front();
            removed += 1;
        }
        removed
    }

    /// Finished exchanges currently remembered.
    pub fn len(&self) -> usize {
        self.done.len()
    }

    /// Exchanges in flight.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// The result of [`Exchanges::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finish {
    /// Times to send the response (≥ 1).
    pub sends: u32,
    /// Finished exchanges evicted to make room.
    pub evicted: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16, mid: u16) -> Key {
        (SocketAddr::from(([127, 0, 0, 1], port)), mid)
    }

    fn bytes(b: &[u8]) -> Option<Arc<[u8]>> {
        Some(Arc::from(b))
    }

    #[test]
    fn first_copy_is_new_then_in_flight_then_cached() {
        let t0 = Instant::now();
        let mut x = Exchanges::new(16);
        assert_eq!(x.arrive(key(1, 7), t0), Seen::New);
        assert_eq!(x.arrive(key(1, 7), t0), Seen::InFlight);
        assert_eq!(x.arrive(key(1, 7), t0), Seen::InFlight);
        // Same id from another endpoint is another exchange.
        assert_eq!(x.arrive(key(2, 7), t0), Seen::New);
        let f = x.finish(key(1, 7), bytes(b"ack"), EXCHANGE_LIFETIME, t0);
        assert_eq!(
            f,
            Finish {
                sends: 3,
                evicted: 0
            }
        );
        assert_eq!(x.arrive(key(1, 7), t0), Seen::Done(bytes(b"ack")));
        assert_eq!(x.in_flight(), 1);
    }

    #[test]
    fn copies_answered_are_capped() {
        let t0 = Instant::now();
        let mut x = Exchanges::new(16);
        x.arrive(key(1, 1), t0);
        for _ in 0..300 {
            x.arrive(key(1, 1), t0);
        }
        let f = x.finish(key(1, 1), None, NON_LIFETIME, t0);
        assert_eq!(f.sends, 1 + u32::from(MAX_ANSWERED_COPIES));
    }

    #[test]
    fn expiry_makes_an_id_new_again() {
        let t0 = Instant::now();
        let mut x = Exchanges::new(16);
        x.arrive(key(1, 1), t0);
        x.finish(key(1, 1), None, NON_LIFETIME, t0);
        assert_eq!(
            x.arrive(key(1, 1), t0 + NON_LIFETIME - Duration::from_secs(1)),
            Seen::Done(None)
        );
        assert_eq!(x.arrive(key(1, 1), t0 + NON_LIFETIME), Seen::New);
    }

    #[test]
    fn full_table_evicts_the_oldest_finished() {
        let t0 = Instant::now();
        let mut x = Exchanges::new(3);
        for mid in 0..3 {
            x.arrive(key(1, mid), t0);
            assert_eq!(
                x.finish(key(1, mid), bytes(&[mid as u8]), EXCHANGE_LIFETIME, t0)
                    .evicted,
                0
            );
        }
        // In flight entries do not count against the capacity and are never evicted.
        assert_eq!(x.arrive(key(9, 9), t0), Seen::New);
        x.arrive(key(1, 3), t0);
        assert_eq!(
            x.finish(key(1, 3), bytes(&[3]), EXCHANGE_LIFETIME, t0)
                .evicted,
            1
        );
        assert_eq!(x.len(), 3);
        assert_eq!(x.arrive(key(1, 0), t0), Seen::New, "the oldest was evicted");
        assert_eq!(x.arrive(key(1, 1), t0), Seen::Done(bytes(&[1])));
        assert_eq!(x.arrive(key(9, 9), t0), Seen::InFlight);
    }

    #[test]
    fn purge_drops_expired_from_the_front() {
        let t0 = Instant::now();
        let mut x = Exchanges::new(100);
        for mid in 0..10 {
            x.arrive(key(1, mid), t0);
            x.finish(
                key(1, mid),
                None,
                EXCHANGE_LIFETIME,
                t0 + Duration::from_secs(u64::from(mid)),
            );
        }
        assert_eq!(
            x.purge(t0 + EXCHANGE_LIFETIME + Duration::from_millis(4500)),
            5
        );
        assert_eq!(x.len(), 5);
    }
}
