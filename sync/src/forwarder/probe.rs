//! Whether Kafka answers when no acknowledgement can tell (both forwarder modes use it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::sink::Probe;

/// Whether Kafka answers while nothing is in flight, or while records in flight get no
/// acknowledgement (a partition without a leader holds them while the brokers answer): a
/// metadata request for one topic (small on any cluster; it proves a broker answers), sent every
/// `offline_after / 2` (at least 50 ms) with a 2 s timeout. An outage is then reported within
/// `offline_after` + one interval + the timeout (12 s with the default 10 s). The price is one
/// small request every interval on an idle link: raise `offline_after` on a metered uplink.
pub(super) struct IdleProbe {
    /// The last sign of a reachable Kafka: an acknowledgement, a commit or a successful probe.
    last_contact: Instant,
    next: Instant,
    running: Option<JoinHandle<bool>>,
}

impl IdleProbe {
    pub(super) fn new() -> Self {
        Self {
            last_contact: Instant::now(),
            next: Instant::now(),
            running: None,
        }
    }

    /// Kafka answered (an acknowledgement or a commit).
    pub(super) fn contact(&mut self) {
        self.contact_at(Instant::now());
    }

    /// Kafka answered at `now` (a batch of acknowledgements read the clock once).
    pub(super) fn contact_at(&mut self, now: Instant) {
        self.last_contact = now;
    }

    pub(super) fn silent_for(&self) -> Duration {
        self.last_contact.elapsed()
    }

    /// Starts a probe when one is due; the outcome of one that finished since the last call.
    pub(super) fn poll<P: Probe + ?Sized + 'static>(
        &mut self,
        probe: &Arc<P>,
        topic: &str,
        offline_after: Duration,
    ) -> Option<bool> {
        let mut outcome = None;
        if self.running.as_ref().is_some_and(JoinHandle::is_finished) {
            let ok = self
                .running
                .take()
                .and_then(futures_util::FutureExt::now_or_never)
                .is_some_and(|r| matches!(r, Ok(true)));
            if ok {
                self.contact();
            }
            outcome = Some(ok);
        }
        if self.running.is_none() && Instant::now() >= self.next {
            let (probe, topic) = (Arc::clone(probe), topic.to_owned());
            self.next = Instant::now() + (offline_after / 2).max(Duration::from_millis(50));
            self.running = Some(tokio::task::spawn_blocking(move || {
                probe.probe(&topic, Duration::from_secs(2))
            }));
        }
        outcome
    }
}
