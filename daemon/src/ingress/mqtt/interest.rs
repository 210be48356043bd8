//! Which topics someone at the broker can receive, so the front forwards only those publishes.
//!
//! Every subscription at the embedded broker arrives through the front (devices and apps alike;
//! the local bus only publishes), so the front can mirror the broker's subscriptions: a publish
//! that no subscription matches and that is not retained would be routed to nobody, and the
//! front skips the broker hop for it. That hop is most of the broker's CPU on a gateway whose
//! readings go to the cloud and not to local subscribers.
//!
//! The mirror may hold more than the broker (a filter the broker refused, a session the broker
//! has already dropped), never less: a publish it wrongly thinks unwanted would be lost for a
//! subscriber. So it follows the broker's session rules:
//! - a broker session that starts clean replaces whatever its client id held;
//! - a SUBSCRIBE adds its allowed filters when it is sent, an UNSUBSCRIBE removes them;
//! - when the connection ends, a clean session's filters go; a persistent session's stay, since
//!   the broker keeps queueing for it (until the same client id starts clean again);
//! - a retained publish is always forwarded (later subscribers get it).
//!
//! Matching is a tree of topic levels, so a publish costs one walk down its own levels (a binary
//! search per level) however many devices subscribe; with no subscription at all it costs one
//! atomic load. The tree and the session lists use exactly sized vectors: with a filter per
//! device it costs a few hundred bytes per device, which counts at 1,000 idle devices.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The front's mirror of the broker's subscriptions.
#[derive(Debug, Default)]
pub struct Interest {
    /// Filters in the tree (with repetitions): lets a publish skip the lock when none exist.
    filters: AtomicUsize,
    state: RwLock<State>,
}

#[derive(Debug, Default)]
struct State {
    tree: Node,
    /// Broker client id → the session holding its filters.
    sessions: HashMap<Box<str>, SessionFilters>,
}

#[derive(Debug, Default)]
struct SessionFilters {
    /// The front connection that started this broker session (see `Front::sessions`).
    generation: u64,
    /// Distinct filters (a session has few: a linear search is the cheapest).
    filters: Vec<Box<str>>,
}

/// One topic level; `+` and `#` are children like any other level.
#[derive(Debug, Default)]
struct Node {
    /// Filters ending at this level.
    ending: usize,
    /// Sorted by level name (binary search).
    children: Vec<(Box<str>, Node)>,
}

impl Node {
    fn child(&self, level: &str) -> Option<&Node> {
        self.children
            .binary_search_by(|(l, _)| (**l).cmp(level))
            .ok()
            .map(|i| &self.children[i].1)
    }

    fn child_or_insert(&mut self, level: &str) -> &mut Node {
        let i = match self.children.binary_search_by(|(l, _)| (**l).cmp(level)) {
            Ok(i) => i,
            Err(i) => {
                reserve_doubling(&mut self.children);
                self.children.insert(i, (Box::from(level), Node::default()));
                i
            }
        };
        &mut self.children[i].1
    }
}

/// Grows a full vector to twice its length (1, 2, 4, …) instead of `Vec`'s minimum of 4: most
/// nodes and sessions hold one entry.
fn reserve_doubling<T>(v: &mut Vec<T>) {
    if v.len() == v.capacity() {
        v.reserve_exact(v.len().max(1));
    }
}

impl Interest {
    /// A broker session for `key` started (the front's connection `generation`). A clean one
    /// drops what the client id held before; a persistent one resumes it.
    pub fn session_started(&self, key: &str, generation: u64, clean: bool) {
        let mut state = self.write();
        let old = state.sessions.remove(key).unwrap_or_default();
        let filters = if clean {
            for f in &old.filters {
                self.remove_filter(&mut state.tree, f);
            }
            Vec::new()
        } else {
            old.filters
        };
        state.sessions.insert(
            Box::from(key),
            SessionFilters {
                generation,
                filters,
            },
        );
    }

    /// The connection `generation` of `key` ended. A clean session's filters go with it unless a
    /// newer connection already took the session over.
    pub fn session_ended(&self, key: &str, generation: u64, clean: bool) {
        if !clean {
            return;
        }
        let mut state = self.write();
        if state
            .sessions
            .get(key)
            .is_none_or(|s| s.generation != generation)
        {
            return;
        }
        if let Some(old) = state.sessions.remove(key) {
            for f in &old.filters {
                self.remove_filter(&mut state.tree, f);
            }
        }
    }

    /// `key` subscribes to `filter` (a repeated SUBSCRIBE of the same filter counts once).
    pub fn subscribe(&self, key: &str, filter: &str) {
        let mut state = self.write();
        let session = state.sessions.entry(Box::from(key)).or_default();
        if session.filters.iter().all(|f| **f != *filter) {
            reserve_doubling(&mut session.filters);
            session.filters.push(Box::from(filter));
            let mut node = &mut state.tree;
            for level in levels(filter) {
                node = node.child_or_insert(level);
            }
            node.ending += 1;
            self.filters.fetch_add(1, Ordering::Release);
        }
    }

    /// `key` unsubscribes from `filter`.
    pub fn unsubscribe(&self, key: &str, filter: &str) {
        let mut state = self.write();
        let removed = state.sessions.get_mut(key).is_some_and(|s| {
            let before = s.filters.len();
            s.filters.retain(|f| **f != *filter);
            s.filters.len() < before
        });
        if removed {
            self.remove_filter(&mut state.tree, filter);
        }
    }

    /// Can a subscriber at the broker receive a publish to `topic`?
    pub fn wanted(&self, topic: &str) -> bool {
        if self.filters.load(Ordering::Acquire) == 0 {
            return false;
        }
        let state = self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        matches(&state.tree, Some(topic))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remove_filter(&self, tree: &mut Node, filter: &str) {
        if remove(tree, &levels(filter).collect::<Vec<_>>()) {
            self.filters.fetch_sub(1, Ordering::Release);
        }
    }
}

/// A filter's levels as the broker matches them: a shared subscription `$share/<group>/<filter>`
/// receives what `<filter>` matches.
fn levels(filter: &str) -> std::str::Split<'_, char> {
    let plain = filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_group, f)| f);
    plain.split('/')
}

/// Does a filter in `node`'s subtree match the rest of the topic (`None`: no levels left)?
/// (`#` also matches the parent level itself: `a/#` matches `a`.) `$`-topics are matched like
/// others: more than the broker delivers, which only costs a forward.
fn matches(node: &Node, rest: Option<&str>) -> bool {
    if node.child("#").is_some_and(|n| n.ending > 0) {
        return true;
    }
    let Some(rest) = rest else {
        return node.ending > 0;
    };
    let (level, tail) = match rest.split_once('/') {
        Some((level, tail)) => (level, Some(tail)),
        None => (rest, None),
    };
    node.child(level).is_some_and(|n| matches(n, tail))
        || node.child("+").is_some_and(|n| matches(n, tail))
}

/// Removes one count of the filter with these levels, pruning emptied nodes; false if absent.
fn remove(node: &mut Node, filter: &[&str]) -> bool {
    let Some((level, rest)) = filter.split_first() else {
        if node.ending == 0 {
            return false;
        }
        node.ending -= 1;
        return true;
    };
    let Ok(i) = node.children.binary_search_by(|(l, _)| (**l).cmp(level)) else {
        return false;
    };
    let child = &mut node.children[i].1;
    let removed = remove(child, rest);
    if child.ending == 0 && child.children.is_empty() {
        node.children.remove(i);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_wanted_without_subscriptions() {
        let i = Interest::default();
        assert!(!i.wanted("devices/a/t"));
        i.session_started("a|1", 1, true);
        assert!(!i.wanted("devices/a/t"));
    }

    #[test]
    fn filters_match_like_the_broker_with_wildcards() {
        let i = Interest::default();
        i.session_started("s|1", 1, true);
        i.subscribe("s|1", "devices/+/temp");
        i.subscribe("s|1", "site/#");
        i.subscribe("s|1", "exact/topic");
        for wanted in [
            "devices/a/temp",
            "devices/b/temp",
            "site",
            "site/x/y/z",
            "exact/topic",
        ] {
            assert!(i.wanted(wanted), "{wanted}");
        }
        for unwanted in [
            "devices/a/humidity",
            "devices/a/temp/x",
            "devices/temp",
            "sites/x",
            "exact",
            "exact/topic/more",
            "",
        ] {
            assert!(!i.wanted(unwanted), "{unwanted}");
        }
        i.subscribe("s|1", "#");
        assert!(i.wanted("anything/at/all"));
    }

    #[test]
    fn many_devices_each_with_its_own_filter() {
        let i = Interest::default();
        // Inserted out of order, so the sorted levels are exercised.
        let ids: Vec<u32> = (0..300).map(|n| (n * 7919) % 300).collect();
        for id in &ids {
            i.session_started(&format!("d{id}|c"), u64::from(*id), true);
            i.subscribe(&format!("d{id}|c"), &format!("devices/d{id}/commands/#"));
        }
        for id in 0..300 {
            assert!(i.wanted(&format!("devices/d{id}/commands/7")), "{id}");
            assert!(!i.wanted(&format!("devices/d{id}/telemetry")), "{id}");
        }
        for id in (0..300u32).filter(|id| id % 2 == 0) {
            i.session_ended(&format!("d{id}|c"), u64::from(id), true);
        }
        for id in 0..300 {
            assert_eq!(
                i.wanted(&format!("devices/d{id}/commands/7")),
                id % 2 == 1,
                "{id}"
            );
        }
        assert_eq!(i.filters.load(Ordering::Acquire), 150);
    }

    #[test]
    fn shared_subscriptions_match_their_filter() {
        let i = Interest::default();
        i.subscribe("s|1", "$share/workers/jobs/+");
        assert!(i.wanted("jobs/1"));
        assert!(!i.wanted("$share/workers/jobs/1"));
        i.unsubscribe("s|1", "$share/workers/jobs/+");
        assert!(!i.wanted("jobs/1"));
    }

    #[test]
    fn unsubscribe_and_a_clean_session_s_end_remove_only_their_own_filters() {
        let i = Interest::default();
        i.session_started("a|1", 1, true);
        i.session_started("b|1", 2, true);
        i.subscribe("a|1", "t/#");
        i.subscribe("a|1", "t/#"); // repeated: counts once
        i.subscribe("b|1", "t/#");
        i.unsubscribe("a|1", "t/#");
        assert!(i.wanted("t/x"), "b still subscribes");
        i.unsubscribe("a|1", "t/#"); // not subscribed any more: no effect
        assert!(i.wanted("t/x"));
        i.session_ended("b|1", 2, true);
        assert!(!i.wanted("t/x"));
        assert_eq!(i.filters.load(Ordering::Acquire), 0);
        assert!(i.write().tree.children.is_empty(), "pruned");
    }

    #[test]
    fn a_persistent_session_keeps_its_filters_until_it_starts_clean() {
        let i = Interest::default();
        i.session_started("p|1", 1, false);
        i.subscribe("p|1", "cmd/#");
        i.session_ended("p|1", 1, false);
        assert!(
            i.wanted("cmd/x"),
            "the broker queues for the absent session"
        );
        i.session_started("p|1", 2, false);
        assert!(i.wanted("cmd/x"), "resumed");
        i.session_ended("p|1", 2, false);
        i.session_started("p|1", 3, true);
        assert!(!i.wanted("cmd/x"), "a clean start drops the old session");
    }

    #[test]
    fn a_taken_over_connection_s_end_leaves_the_new_session_alone() {
        let i = Interest::default();
        i.session_started("a|1", 1, true);
        i.subscribe("a|1", "x");
        i.session_started("a|1", 2, true);
        i.subscribe("a|1", "y");
        i.session_ended("a|1", 1, true);
        assert!(i.wanted("y"));
        assert!(!i.wanted("x"), "the clean start replaced the first session");
    }
}
