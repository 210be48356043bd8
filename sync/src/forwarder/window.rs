//! The per-topic share of the forwarder's in-flight window.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A Kafka topic's index in [`TopicWindow`].
pub(super) type TopicId = usize;

/// The window per Kafka topic: a topic holds at most `cap` records in flight unless Kafka
/// acknowledged one of its records within [`RECENT_DELIVERY`], so one whose partition is stuck
/// (no leader, a slow broker) cannot take the whole window from the others, while a topic that
/// flows may use all of it (one busy topic is the common case, and skipping costs reads).
///
/// A record of a topic over its cap is skipped, and its topic stays *closed* (every later record
/// of it skipped too, so the topic's records still go in sequence order) until its in-flight
/// count has fallen to half the cap; then the cursors read again from the first skipped record
/// (records already in flight are unsettled and skipped). The hysteresis keeps a slowly
/// recovering topic from costing a rescan per acknowledgement.
#[derive(Debug, Default)]
pub(super) struct TopicWindow {
    cap: usize,
    /// Per topic, by [`TopicId`]: its name, records in flight, and whether it is closed.
    names: Vec<Arc<str>>,
    in_flight: Vec<usize>,
    closed: Vec<bool>,
    /// When Kafka last acknowledged a record of the topic.
    delivered_at: Vec<Option<Instant>>,
    index: HashMap<Arc<str>, TopicId>,
    /// The topic of the last record: most records go where the one before went, and comparing
    /// the name is cheaper than hashing it.
    last: Option<TopicId>,
    /// The live cursor skipped records from this sequence on.
    live_from: Option<u64>,
    /// The backlog cursor skipped records.
    pub(super) backlog: bool,
    /// A closed topic has room again: rescan at the next fill.
    due: bool,
}

impl TopicWindow {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            ..Self::default()
        }
    }

    /// The topic's id, and whether a record of it may be produced now.
    pub(super) fn admit(&mut self, topic: &str) -> (TopicId, bool) {
        let id = match self.last {
            Some(id) if &*self.names[id] == topic => id,
            _ => match self.index.get(topic) {
                Some(&id) => id,
                None => {
                    // Topics come from the configuration (rules, the dead-letter topic): few.
                    let name: Arc<str> = Arc::from(topic);
                    let id = self.names.len();
                    self.names.push(Arc::clone(&name));
                    self.in_flight.push(0);
                    self.closed.push(false);
                    self.delivered_at.push(None);
                    self.index.insert(name, id);
                    id
                }
            },
        };
        self.last = Some(id);
        let flowing = self.in_flight[id] < self.cap
            || self.delivered_at[id].is_some_and(|at| at.elapsed() < RECENT_DELIVERY);
        (id, !self.closed[id] && flowing)
    }

    pub(super) fn name(&self, id: TopicId) -> Arc<str> {
        Arc::clone(&self.names[id])
    }

    pub(super) fn produced(&mut self, id: TopicId) {
        self.in_flight[id] += 1;
    }

    /// A record of topic `id` was skipped by the live cursor (`Some(seq)`) or the backlog's.
    pub(super) fn skipped(&mut self, id: TopicId, live_seq: Option<u64>) {
        self.closed[id] = true;
        match live_seq {
            Some(seq) => self.live_from = Some(self.live_from.map_or(seq, |s| s.min(seq))),
            None => self.backlog = true,
        }
    }

    /// A record of topic `id` settled; `delivered`: Kafka has it.
    pub(super) fn settled(&mut self, id: TopicId, delivered: bool) {
        let n = &mut self.in_flight[id];
        *n = n.saturating_sub(1);
        if delivered {
            self.delivered_at[id] = Some(Instant::now());
        }
        // A closed topic flows again (a delivery) or has room: read its skipped records.
        if self.closed[id] && (delivered || *n <= self.cap / 2) {
            self.due = true;
        }
    }

    /// Something other than a topic's share made the cursors skip records (the client's queue
    /// was full): read them again at the next fill.
    pub(super) fn rescan_due(&mut self) {
        self.due = true;
    }

    /// Takes a due rescan: where the live cursor restarts and whether the backlog's does.
    pub(super) fn rescan(&mut self) -> Option<(Option<u64>, bool)> {
        if !self.due {
            return None;
        }
        self.due = false;
        self.closed.fill(false);
        Some((self.live_from.take(), std::mem::take(&mut self.backlog)))
    }

    /// A new plan reads everything again anyway.
    pub(super) fn reset(&mut self) {
        self.closed.fill(false);
        self.live_from = None;
        self.backlog = false;
        self.due = false;
    }
}

/// A topic with an acknowledgement this recent is flowing: [`TopicWindow`] does not cap it.
const RECENT_DELIVERY: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    /// A topic without a recent acknowledgement holds at most its cap; one that flows may use
    /// the whole window; a closed topic is read again once it flows or has room.
    #[test]
    fn the_topic_window_caps_only_topics_that_do_not_flow() {
        let mut w = TopicWindow::new(2);
        let (a, open) = w.admit("a");
        assert!(open);
        w.produced(a);
        w.produced(a);
        assert!(!w.admit("a").1, "at its cap, nothing delivered yet");
        w.skipped(a, Some(7));
        let (b, open) = w.admit("b");
        assert!(open && b != a, "another topic is not held up");
        w.produced(a);
        w.settled(a, true);
        assert_eq!(w.rescan(), Some((Some(7), false)), "a delivery reopens it");
        assert_eq!(w.rescan(), None);
        assert!(w.admit("a").1, "flowing: over its cap");
        let mut stuck = TopicWindow::new(4);
        let (s, _) = stuck.admit("s");
        for _ in 0..4 {
            stuck.produced(s);
        }
        stuck.skipped(s, None);
        stuck.settled(s, false);
        assert_eq!(stuck.rescan(), None, "3 of 4 still in flight");
        stuck.settled(s, false);
        assert_eq!(
            stuck.rescan(),
            Some((None, true)),
            "half its cap: room again"
        );
    }
}
