//! Capped exponential backoff.

use std::time::Duration;

/// Waits that double per consecutive failure, from `initial` up to `max`, with a count of the
/// failures since the last success. No jitter: the waits here are local (a serial port, a
/// container engine, a subsystem restart) or already jittered by the client library (librdkafka
/// adds ±20 % to its reconnects).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    failures: u32,
}

impl Backoff {
    /// Starts at `initial`, doubling up to `max` (at least `initial`).
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            next: initial,
            failures: 0,
        }
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let wait = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        wait
    }

    /// Consecutive failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A success: the next failure waits `initial` again.
    pub fn reset(&mut self) {
        self.next = self.initial;
        self.failures = 0;
    }

    /// The wait before attempt `failures` (1-based) of a backoff from `initial` to `max`, for
    /// callers that keep the failure count elsewhere (persisted with an app's state, say).
    pub fn nth(initial: Duration, max: Duration, failures: u32) -> Duration {
        initial
            .saturating_mul(1 << failures.saturating_sub(1).min(16))
            .min(max.max(initial))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn waits_double_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(ms(100), ms(350));
        let waits: Vec<_> = (0..5).map(|_| b.failed().as_millis()).collect();
        assert_eq!(waits, [100, 200, 350, 350, 350]);
        assert_eq!(b.failures(), 5);
        b.reset();
        assert_eq!((b.failed().as_millis(), b.failures()), (100, 1));
    }

    #[test]
    fn the_nth_wait_matches_the_sequence() {
        let mut b = Backoff::new(ms(250), ms(5_000));
        for n in 1..=40 {
            assert_eq!(
                Backoff::nth(ms(250), ms(5_000), n),
                b.failed(),
                "failure {n}"
            );
        }
        assert_eq!(Backoff::nth(ms(250), ms(5_000), 0), ms(250));
    }

    #[test]
    fn a_cap_below_the_start_is_the_start() {
        let mut b = Backoff::new(ms(500), ms(100));
        assert_eq!((b.failed(), b.failed()), (ms(500), ms(500)));
    }
}
