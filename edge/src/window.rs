//! Tumbling windows: per (rule, device, topic), the running statistics of each aggregated
//! field, aligned to the epoch. Bounded by a key cap.

use std::sync::Arc;

use hashbrown::{Equivalent, HashMap};

/// (rule index, device id, topic).
pub type Key = (usize, Arc<str>, Arc<str>);

/// A [`Key`] by reference: looked up without cloning the names. Hashes like the key (a
/// tuple's fields in order, `Arc<str>` as its `str`).
#[derive(Hash)]
struct KeyRef<'a>(usize, &'a str, &'a str);

impl Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        self.0 == key.0 && self.1 == &*key.1 && self.2 == &*key.2
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
    open: HashMap<Key, Open>,
    max_keys: usize,
}

impl Windows {
    pub fn new(max_keys: usize) -> Self {
        Self {
            open: HashMap::new(),
            max_keys,
        }
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Adds `values` (field index, value) observed at `at_ms` to the window of (`rule`,
    /// `device`, `topic`); returns the previous window of that key when this reading starts a
    /// new one.
    pub fn add(
        &mut self,
        (rule, device, topic): (usize, &Arc<str>, &Arc<str>),
        window_ms: u64,
        at_ms: u64,
        values: impl Iterator<Item = (usize, f64)>,
    ) -> Result<Option<Closed>, Full> {
        let start_ms = at_ms - at_ms % window_ms.max(1);
        let key = || (rule, Arc::clone(device), Arc::clone(topic));
        if let Some(open) = self.open.get_mut(&KeyRef(rule, device, topic)) {
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
            return Ok(Some(Closed {
                key: key(),
                start_ms: old.start_ms,
                fields: old.fields,
            }));
        }
        if self.open.len() >= self.max_keys {
            return Err(Full);
        }
        let mut fields = Vec::new();
        record(&mut fields, values);
        self.open.insert(key(), Open { start_ms, fields });
        Ok(None)
    }

    /// Closes (and forgets) every window whose end is at or before `now_ms`.
    pub fn close_until(&mut self, now_ms: u64, window_ms: impl Fn(&Key) -> u64) -> Vec<Closed> {
        let due: Vec<Key> = self
            .open
            .iter()
            .filter(|(k, o)| o.start_ms + window_ms(k) <= now_ms)
            .map(|(k, _)| k.clone())
            .collect();
        let mut closed: Vec<Closed> = due
            .into_iter()
            .filter_map(|k| {
                self.open.remove(&k).map(|o| Closed {
                    key: k,
                    start_ms: o.start_ms,
                    fields: o.fields,
                })
            })
            .collect();
        closed.sort_by(|a, b| (a.start_ms, &a.key).cmp(&(b.start_ms, &b.key)));
        closed
    }

    /// Closes every window.
    pub fn close_all(&mut self) -> Vec<Closed> {
        self.close_until(u64::MAX, |_| 0)
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
        let (rule, device, topic) = key(d);
        w.add((rule, &device, &topic), 1000, at_ms, values.iter().copied())
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
}
