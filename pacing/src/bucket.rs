//! A token bucket.

use std::time::{Duration, Instant};

/// Holds up to `capacity` tokens, starts full and refills continuously at `rate` tokens per
/// second. Callers refill with the current time, then ask, spend or compute a wait.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// `rate` tokens per second (at least a millionth), `capacity` at least 1; full at `now`.
    pub fn new(rate: f64, capacity: f64, now: Instant) -> Self {
        let capacity = capacity.max(1.0);
        Self {
            rate: rate.max(1e-6),
            capacity,
            tokens: capacity,
            at: now,
        }
    }

    /// Adds what `rate` earned since the last refill, up to the capacity.
    pub fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        // Never backwards: an earlier `now` must not earn the same time twice later.
        self.at = self.at.max(now);
    }

    /// Tokens now (after the last refill); negative while in debt.
    pub fn tokens(&self) -> f64 {
        self.tokens
    }

    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    /// Whether `cost` tokens are there.
    pub fn can_pay(&self, cost: f64) -> bool {
        self.tokens >= cost
    }

    /// Whether the bucket is full.
    pub fn is_full(&self) -> bool {
        self.tokens >= self.capacity
    }

    /// Takes `cost` tokens; more than it holds leaves it in debt, paid back by the refill.
    pub fn spend(&mut self, cost: f64) {
        self.tokens -= cost;
    }

    /// How long until `cost` tokens are there (zero if they are).
    pub fn wait_for(&self, cost: f64) -> Duration {
        Duration::from_secs_f64(((cost - self.tokens) / self.rate).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_full_refills_at_the_rate_and_never_beyond_the_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, 10.0, t0);
        assert!(b.is_full() && b.can_pay(10.0) && !b.can_pay(10.5));
        b.spend(10.0);
        assert!(!b.can_pay(1.0));
        assert_eq!(b.wait_for(5.0), Duration::from_millis(50));
        b.refill(t0 + Duration::from_millis(50));
        assert!((b.tokens() - 5.0).abs() < 1e-9);
        b.refill(t0 + Duration::from_secs(10));
        assert_eq!(b.tokens(), 10.0);
        assert_eq!(b.wait_for(3.0), Duration::ZERO);
    }

    #[test]
    fn debt_is_paid_back_by_the_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5.0, t0);
        b.spend(25.0);
        assert_eq!(b.tokens(), -20.0);
        assert_eq!(b.wait_for(0.0), Duration::from_secs(2));
        b.refill(t0 + Duration::from_secs(2));
        assert!(b.tokens().abs() < 1e-9);
    }

    #[test]
    fn an_earlier_now_adds_nothing() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5.0, t0 + Duration::from_secs(1));
        b.spend(5.0);
        b.refill(t0);
        assert_eq!(b.tokens(), 0.0);
    }
}
