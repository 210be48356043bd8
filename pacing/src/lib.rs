//! Pacing shared by every subsystem: [`Backoff`] (how long to wait before trying again after
//! consecutive failures) and [`TokenBucket`] (how fast to go). One implementation each, so a
//! fix or a tuning applies everywhere: the supervisor's restarts, the app engine's reconnects and
//! restarts, the drivers' reopen loops and the Kafka forwarder's rewinds use [`Backoff`]; the
//! forwarder's backlog rate and the MQTT per-device publish limits use [`TokenBucket`].
//!
//! Both are plain values with no clock of their own: the caller passes `now`, so tests with a
//! paused clock (`tokio::time::Instant::into_std`) drive them exactly.

mod backoff;
mod bucket;

pub use backoff::Backoff;
pub use bucket::TokenBucket;
