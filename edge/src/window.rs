//! Tumbling windows: per (rule, device, topic), the running statistics of each aggregated
//! field, aligned to the epoch. Bounded by a key cap. Kept per (device, topic): a reading finds
//! the windows of every aggregate rule with one lookup.

use std::sync::Arc;

use hashbrown::hash_map::EntryRef;
use hashbrown::{Equivalent, HashMap};
use smallvec::SmallVec;

/// (rule index, device id, topic).
pub type Key = (usize, Arc<str>, Arc<str>);

/// A (device, topic) a window is kept under.
#[derive(Debug, Hash, PartialEq, Eq)]
struct Names(Arc<str>, Arc<str>);

/// [`Names`] by reference: looked up without making the names. Hashes like them (`Arc<str>`
/// as its `str`).
#[derive(Hash)]
struct NamesRef<'a>(&'a str, &'a str);

impl Equivalent<Names> for NamesRef<'_> {
    fn equivalent(&self, key: &Names) -> bool {
        self.0 == &*key.0 && self.1 == &*key.1
    }
}

/// Running statistics of one field in one window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub last: f64,
}

impl Stats {
    fn new(v: f64) -> Self {
        Self {
            count: 1,
            min: v,
            max: v,
            sum: v,
            last: v,
        }
    }

    fn add(&mut self, v: f64) {
        self.count += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += v;
        self.last = v;
    }
}

#[derive(Debug)]
struct Open {
    start_ms: u64,
    /// Indexed like the rule's `fields`; `None` until the field is seen in this window.
    fields: Vec<Option<Stats>>,
}

/// A window that is over.
#[derive(Debug, Clone, PartialEq)]
pub struct Closed {
    pub key: Key,
    pub start_ms: u64,
    pub fields: Vec<Option<Stats>>,
}

/// The key cap was reached: the reading is not aggregated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// Every open window.
#[derive(Debug, Default)]
pub struct Windows {
    /// Per (device, topic), the open window of each rule (by rule index); one inline.
    open: HashMap<Names, Rules>,
    /// Windows open, across all names.
    count: usize,
    max_keys: usize,
}

/// The open windows of one (device, topic), by rule index.
type Rules = SmallVec<[(usize, Open); 1]>;

/// The windows of one (device, topic), for one reading ([`Windows::of`]).
pub struct Group<'w> {
    /// `None`: none open, and no room for one.
    windows: Option<&'w mut Rules>,
    count: &'w mut usize,
    max_keys: usize,
    device: &'w str,
    topic: &'w str,
}

impl Windows {
    pub fn new(max_keys: usize) -> Self {
        Self {
            open: HashMap::new(),
            count: 0,
            max_keys,
        }
    }

    /// Windows open now.
    pub fn len(&self) -> usize {
        self.count
    }

    /// The windows of (`device`, `topic`).
    pub fn of<'w>(&'w mut self, device: &'w str, topic: &'w str) -> Group<'w> {
        let room = self.count < self.max_keys;
        let windows = match self.open.entry_ref(&NamesRef(device, topic)) {
            EntryRef::Occupied(o) => Some(o.into_mut()),
            EntryRef::Vacant(v) if room => {
                let names = Names(Arc::from(device), Arc::from(topic));
                Some(v.insert_with_key(names, Rules::new()))
            }
            EntryRef::Vacant(_) => None,
        };
        Group {
            windows,
            count: &mut self.count,
            max_keys: self.max_keys,
            device,
            topic,
        }
    }

    /// Closes (and forgets) every window whose end is at or before `now_ms`; `window_ms` gives
    /// a rule's window length.
    pub fn close_until(&mut self, now_ms: u64, window_ms: impl Fn(usize) -> u64) -> Vec<Closed> {
        let mut closed = Vec::new();
        self.open.retain(|Names(device, topic), windows| {
            let mut i = 0;
            while i < windows.len() {
                let (rule, open) = &windows[i];
                if open.start_ms + window_ms(*rule) > now_ms {
                    i += 1;
                    continue;
                }
                let (rule, open) = windows.swap_remove(i);
                closed.push(Closed {
                    key: (rule, Arc::clone(device), Arc::clone(topic)),
                    start_ms: open.start_ms,
                    fields: open.fields,
                });
            }
            !windows.is_empty()
        });
        self.count -= closed.len();
        closed.sort_by(|a, b| (a.start_ms, &a.key).cmp(&(b.start_ms, &b.key)));
        closed
    }

    /// Closes every window.
    pub fn close_all(&mut self) -> Vec<Closed> {
        self.close_until(u64::MAX, |_| 0)
    }
}

impl Group<'_> {
    /// Adds `values` (field index, value) observed at `at_ms` to `rule`'s window; returns the
    /// previous window when this reading starts a new one.
    pub fn add(
        &mut self,
        rule: usize,
        window_ms: u64,
        at_ms: u64,
        values: impl Iterator<Item = (usize, f64)>,
    ) -> Result<Option<Closed>, Full> {
        let start_ms = at_ms - at_ms % window_ms.max(1);
        let Some(windows) = self.windows.as_deref_mut() else {
            return Err(Full);
        };
        if let Some((_, open)) = windows.iter_mut().find(|(r, _)| *r == rule) {
            if open.start_ms == start_ms || start_ms < open.start_ms {
                // A late reading (clock stepped back) counts in the open window.
                record(&mut open.fields, values);
                return Ok(None);
            }
            let old = std::mem::replace(
                open,
                Open {
                    start_ms,
                    fields: Vec::new(),
                },
            );
            record(&mut open.fields, values);
            // Owned names only for a closed window's record: not per reading.
            return Ok(Some(Closed {
                key: (rule, Arc::from(self.device), Arc::from(self.topic)),
                start_ms: old.start_ms,
                fields: old.fields,
            }));
        }
        if *self.count >= self.max_keys {
            return Err(Full);
        }
        let mut fields = Vec::new();
        record(&mut fields, values);
        windows.push((rule, Open { start_ms, fields }));
        *self.count += 1;
        Ok(None)
    }
}

fn record(fields: &mut Vec<Option<Stats>>, values: impl Iterator<Item = (usize, f64)>) {
    for (i, v) in values {
        if fields.len() <= i {
            fields.resize(i + 1, None);
        }
        match &mut fields[i] {
            Some(s) => s.add(v),
            slot @ None => *slot = Some(Stats::new(v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(d: &str) -> Key {
        (0, Arc::from(d), Arc::from("t"))
    }

    fn add(
        w: &mut Windows,
        d: &str,
        at_ms: u64,
        values: &[(usize, f64)],
    ) -> Result<Option<Closed>, Full> {
        w.of(d, "t").add(0, 1000, at_ms, values.iter().copied())
    }

    #[test]
    fn windows_tumble_on_epoch_boundaries_and_respect_the_cap() {
        let mut w = Windows::new(2);
        assert_eq!(add(&mut w, "a", 1_500, &[(0, 2.0)]), Ok(None));
        assert_eq!(add(&mut w, "a", 1_999, &[(0, 4.0), (1, 1.0)]), Ok(None));
        assert_eq!(add(&mut w, "b", 1_100, &[(0, 1.0)]), Ok(None));
        assert_eq!(add(&mut w, "c", 1_100, &[(0, 1.0)]), Err(Full));
        // The next window of `a` closes the first.
        let closed = add(&mut w, "a", 2_000, &[(0, 9.0)]).unwrap().unwrap();
        assert_eq!(closed.start_ms, 1_000);
        let s = closed.fields[0].unwrap();
        assert_eq!(
            (s.count, s.min, s.max, s.sum, s.last),
            (2, 2.0, 4.0, 6.0, 4.0)
        );
        assert_eq!(closed.fields[1].unwrap().count, 1);
        // `b`'s window [1000, 2000) is over at 2000; `a`'s [2000, 3000) is not.
        let due = w.close_until(2_000, |_| 1000);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].key, key("b"));
        assert_eq!(w.len(), 1);
        assert_eq!(w.close_all().len(), 1);
        assert_eq!(w.len(), 0);
    }

    /// Each rule has its own window under the same (device, topic); the cap counts windows.
    #[test]
    fn rules_keep_their_own_windows_under_the_same_names() {
        let mut w = Windows::new(2);
        let mut a = w.of("a", "t");
        assert_eq!(a.add(0, 1000, 1_500, [(0, 1.0)].into_iter()), Ok(None));
        assert_eq!(a.add(3, 5000, 1_500, [(0, 7.0)].into_iter()), Ok(None));
        assert_eq!(w.len(), 2);
        assert_eq!(
            w.of("b", "t").add(0, 1000, 1_500, [].into_iter()),
            Err(Full)
        );
        assert_eq!(
            w.of("a", "t").add(2, 1000, 1_500, [].into_iter()),
            Err(Full)
        );
        // Rule 0's one-second window is over at 2000; rule 3's five-second one is not.
        let due = w.close_until(2_000, |rule| if rule == 0 { 1000 } else { 5000 });
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].key, key("a"));
        assert_eq!(w.len(), 1);
        let s = w.close_all()[0].fields[0].unwrap();
        assert_eq!((s.count, s.last), (1, 7.0));
    }
}
