//! The cache of successful secret verifications, so that argon2 (tens of ms) runs once per
//! device and secret rather than once per request.
//!
//! Invariants:
//! - Only successes are cached; a wrong secret is verified (slowly) every time.
//! - Keys are (device id, SHA-256 of the presented secret): the clear secret is never kept.
//! - Every entry remembers the device's *credential epoch* at verification time. Each change to a
//!   device (update, enable/disable, rotate, delete) gives it a new epoch and drops its entries,
//!   so a hit counts only while the epoch still matches: an old secret stops working at once,
//!   even if a verification that started before the rotation finishes after it.
//! - Bounded by [`CAPACITY`] entries; when full, an arbitrary entry is evicted (the cost of a
//!   miss is one argon2 run).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use super::secrets::Sha256Digest;

/// Most cached verifications.
pub const CAPACITY: usize = 4096;

#[derive(Debug, Default)]
pub struct AuthCache {
    entries: Mutex<HashMap<(String, Sha256Digest), u64>>,
}

impl AuthCache {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<(String, Sha256Digest), u64>) -> R) -> R {
        // The map is always consistent between statements: recover from a poisoned lock.
        f(&mut self.entries.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Whether `digest` was verified for `device` at credential epoch `epoch`.
    pub fn hit(&self, device: &str, digest: &Sha256Digest, epoch: u64) -> bool {
        self.with(|m| m.get(&(device.to_owned(), *digest)) == Some(&epoch))
    }

    /// Records a successful verification.
    pub fn insert(&self, device: &str, digest: Sha256Digest, epoch: u64) {
        self.with(|m| {
            if m.len() >= CAPACITY
                && !m.contains_key(&(device.to_owned(), digest))
                && let Some(victim) = m.keys().next().cloned()
            {
                m.remove(&victim);
            }
            m.insert((device.to_owned(), digest), epoch);
        });
    }

    /// Drops every entry of `device`.
    pub fn invalidate(&self, device: &str) {
        self.with(|m| m.retain(|(id, _), _| id != device));
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.with(|m| m.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_and_invalidation() {
        let c = AuthCache::default();
        let d = [1u8; 32];
        assert!(!c.hit("a", &d, 1));
        c.insert("a", d, 1);
        assert!(c.hit("a", &d, 1));
        assert!(!c.hit("a", &d, 2), "a new epoch invalidates");
        assert!(!c.hit("b", &d, 1));
        c.insert("b", d, 1);
        c.invalidate("a");
        assert!(!c.hit("a", &d, 1));
        assert!(c.hit("b", &d, 1));
    }

    #[test]
    fn bounded() {
        let c = AuthCache::default();
        for i in 0..CAPACITY + 100 {
            c.insert(&format!("dev-{i}"), [0; 32], 1);
        }
        assert_eq!(c.len(), CAPACITY);
    }
}
