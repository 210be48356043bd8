//! Per-device publish rate limits (`[mqtt.limits]`): a message bucket and a byte bucket per
//! device, shared by all of its connections.
//!
//! Contract:
//! - A bucket holds `rate × burst` tokens, starts full and refills continuously at `rate` per
//!   second. A publish costs one message token and its payload length in byte tokens; it is
//!   admitted only if both buckets can pay, and a refused publish costs nothing.
//! - A payload larger than the byte bucket is admitted when that bucket is full and drives it
//!   into debt, so it is not refused forever; the device then waits the debt out.
//! - Memory is bounded by the open connections: the map holds weak references, and the last
//!   connection of a device removes its entry when it ends.
//! - New limits (a configuration reload, [`Limiters::set_limits`]) apply to each device from its
//!   next CONNECT: connections open at the reload keep the buckets they have.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};

use outpost_config::MqttLimitsConfig;
use outpost_pacing::TokenBucket;
use tokio::time::Instant;

/// One device's buckets (`None`: that limit is off).
#[derive(Debug)]
pub struct DeviceLimiter {
    messages: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

impl DeviceLimiter {
    fn new(limits: &MqttLimitsConfig, now: Instant) -> Self {
        let burst = limits.burst.as_secs_f64();
        let bucket =
            |rate: f64| (rate > 0.0).then(|| TokenBucket::new(rate, rate * burst, now.into_std()));
        Self {
            messages: bucket(f64::from(limits.messages_per_second)),
            bytes: bucket(limits.bytes_per_second.bytes() as f64),
        }
    }

    /// Takes one message and `payload_len` bytes if both buckets can pay; else takes nothing.
    pub fn admit(&mut self, payload_len: usize, now: Instant) -> bool {
        let len = payload_len as f64;
        for b in [&mut self.messages, &mut self.bytes].into_iter().flatten() {
            b.refill(now.into_std());
        }
        // A full bucket admits even a cost above its capacity (the debt is waited out).
        let pays = |b: &TokenBucket, cost: f64| b.can_pay(cost) || b.is_full();
        let ok = self.messages.as_ref().is_none_or(|b| pays(b, 1.0))
            && self.bytes.as_ref().is_none_or(|b| pays(b, len));
        if ok {
            if let Some(b) = &mut self.messages {
                b.spend(1.0);
            }
            if let Some(b) = &mut self.bytes {
                b.spend(len);
            }
        }
        ok
    }
}

type DeviceMap = Arc<Mutex<HashMap<String, Weak<Mutex<DeviceLimiter>>>>>;

/// The limiters of the devices connected now.
#[derive(Debug)]
pub struct Limiters {
    limits: RwLock<MqttLimitsConfig>,
    devices: DeviceMap,
}

/// A connection's share of its device's limiter; dropping the last one forgets the device.
#[derive(Debug)]
pub struct LimiterHandle {
    devices: DeviceMap,
    device_id: String,
    limiter: Arc<Mutex<DeviceLimiter>>,
}

impl Limiters {
    pub fn new(limits: &MqttLimitsConfig) -> Self {
        Self {
            limits: RwLock::new(limits.clone()),
            devices: Arc::default(),
        }
    }

    /// Replaces the limits: each device gets buckets of the new ones at its next CONNECT.
    pub fn set_limits(&self, limits: &MqttLimitsConfig) {
        *self.limits.write().unwrap_or_else(PoisonError::into_inner) = limits.clone();
        // Forget the shared buckets: the next connection of a device starts new ones (open
        // connections keep theirs; their handles remove only their own entry, see `Drop`).
        self.devices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// The limiter of `device_id`, shared with its other connections; `None` while no limit is
    /// configured.
    pub fn for_device(&self, device_id: &str) -> Option<LimiterHandle> {
        let limits = self.limits.read().unwrap_or_else(PoisonError::into_inner);
        if limits.messages_per_second == 0 && limits.bytes_per_second.bytes() == 0 {
            return None;
        }
        let mut devices = self.devices.lock().unwrap_or_else(PoisonError::into_inner);
        let limiter = match devices.get(device_id).and_then(Weak::upgrade) {
            Some(l) => l,
            None => {
                let l = Arc::new(Mutex::new(DeviceLimiter::new(&limits, Instant::now())));
                devices.insert(device_id.to_owned(), Arc::downgrade(&l));
                l
            }
        };
        Some(LimiterHandle {
            devices: Arc::clone(&self.devices),
            device_id: device_id.to_owned(),
            limiter,
        })
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.devices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl LimiterHandle {
    /// See [`DeviceLimiter::admit`].
    pub fn admit(&self, payload_len: usize, now: Instant) -> bool {
        self.limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(payload_len, now)
    }
}

impl Drop for LimiterHandle {
    fn drop(&mut self) {
        let mut devices = self.devices.lock().unwrap_or_else(PoisonError::into_inner);
        // Under the map's lock no other connection can take a new share meanwhile. The entry
        // may be a newer limiter of the same device (after `set_limits`): leave that one.
        let own = devices
            .get(&self.device_id)
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&self.limiter)));
        if own && Arc::strong_count(&self.limiter) == 1 {
            devices.remove(&self.device_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use outpost_config::ByteSize;

    use super::*;

    fn limits(messages: u32, bytes: u64, burst_secs: u64) -> MqttLimitsConfig {
        MqttLimitsConfig {
            messages_per_second: messages,
            bytes_per_second: ByteSize(bytes),
            burst: Duration::from_secs(burst_secs),
        }
    }

    #[test]
    fn no_limit_configured_means_no_limiter() {
        let limited = |l: &MqttLimitsConfig| Limiters::new(l).for_device("d").is_some();
        assert!(!limited(&MqttLimitsConfig::default()));
        assert!(limited(&limits(1, 0, 1)));
        assert!(limited(&limits(0, 1, 1)));
    }

    #[test]
    fn the_message_bucket_allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut l = DeviceLimiter::new(&limits(2, 0, 3), t0);
        let admitted = (0..10).filter(|_| l.admit(10, t0)).count();
        assert_eq!(admitted, 6, "rate 2/s × burst 3 s");
        assert!(!l.admit(10, t0 + Duration::from_millis(400)));
        assert!(
            l.admit(10, t0 + Duration::from_millis(500)),
            "one token per 0.5 s"
        );
        assert!(!l.admit(10, t0 + Duration::from_millis(600)));
        // Quiet for long: back to the full burst, not more.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| l.admit(10, later)).count(), 6);
    }

    #[test]
    fn the_byte_bucket_counts_payload_bytes_and_a_refusal_costs_nothing() {
        let t0 = Instant::now();
        let mut l = DeviceLimiter::new(&limits(0, 100, 2), t0);
        assert!(l.admit(150, t0));
        assert!(!l.admit(100, t0), "50 bytes left");
        assert!(l.admit(50, t0), "the refusal took nothing");
        assert!(!l.admit(1, t0));
        assert!(l.admit(100, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn a_payload_larger_than_the_burst_passes_only_from_a_full_bucket() {
        let t0 = Instant::now();
        let mut l = DeviceLimiter::new(&limits(0, 100, 1), t0);
        assert!(l.admit(300, t0), "full bucket: admitted into debt");
        assert!(
            !l.admit(1, t0 + Duration::from_secs(2)),
            "debt of 200 bytes"
        );
        assert!(!l.admit(300, t0 + Duration::from_millis(2900)));
        assert!(l.admit(300, t0 + Duration::from_secs(3)), "full again");
    }

    #[test]
    fn both_limits_must_admit() {
        let t0 = Instant::now();
        let mut l = DeviceLimiter::new(&limits(10, 100, 1), t0);
        assert!(l.admit(100, t0));
        assert!(!l.admit(1, t0), "bytes exhausted, messages left");
        let mut l = DeviceLimiter::new(&limits(1, 1000, 1), t0);
        assert!(l.admit(1, t0));
        assert!(!l.admit(1, t0), "messages exhausted, bytes left");
    }

    #[test]
    fn connections_of_a_device_share_its_buckets_and_the_last_one_forgets_it() {
        let limiters = Limiters::new(&limits(1, 0, 2));
        let now = Instant::now();
        let take = |id: &str| limiters.for_device(id).unwrap_or_else(|| unreachable!());
        let a = take("d");
        let b = take("d");
        let other = take("e");
        assert!(a.admit(1, now) && b.admit(1, now));
        assert!(!a.admit(1, now) && !b.admit(1, now), "one bucket of 2");
        assert!(other.admit(1, now));
        assert_eq!(limiters.tracked(), 2);
        drop(a);
        assert_eq!(limiters.tracked(), 2);
        drop((b, other));
        assert_eq!(limiters.tracked(), 0);
    }

    #[test]
    fn new_limits_apply_from_the_next_connection_and_old_handles_leave_new_entries_alone() {
        let limiters = Limiters::new(&limits(0, 0, 1));
        assert!(limiters.for_device("d").is_none(), "no limit configured");
        limiters.set_limits(&limits(1, 0, 1));
        let now = Instant::now();
        let old = limiters.for_device("d").unwrap_or_else(|| unreachable!());
        assert!(old.admit(1, now) && !old.admit(1, now), "a bucket of 1");
        limiters.set_limits(&limits(3, 0, 1));
        let new = limiters.for_device("d").unwrap_or_else(|| unreachable!());
        assert!(new.admit(1, now) && new.admit(1, now) && new.admit(1, now));
        assert!(!new.admit(1, now), "a bucket of 3");
        assert!(!old.admit(1, now), "the open connection keeps its bucket");
        drop(old);
        assert_eq!(limiters.tracked(), 1, "the old handle left the new entry");
        drop(new);
        assert_eq!(limiters.tracked(), 0);
        limiters.set_limits(&limits(0, 0, 1));
        assert!(limiters.for_device("d").is_none());
    }
}
