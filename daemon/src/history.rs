//! The last hour of the gateway's traffic, for the web console's charts
//! (`GET /api/v1/status/history`): every [`INTERVAL`] a sample of the outbox's counters (records
//! appended, records acknowledged by Kafka and deleted), its backlog and the process's resident
//! memory; [`CAPACITY`] samples are kept (one hour), in memory only (a restart starts afresh).
//! Rates are the differences between samples, computed by the reader.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use outpost_sync::Outbox;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Time between samples.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Samples kept: one hour.
pub const CAPACITY: usize = 360;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    pub at_ms: i64,
    /// Records appended to the outbox since start (every protocol and driver).
    pub appended: u64,
    /// Records Kafka acknowledged and the outbox deleted since start.
    pub forwarded: u64,
    /// Records in the outbox.
    pub backlog: u64,
    pub rss_bytes: u64,
}

/// The samples, shared by the sampling task and the API.
#[derive(Debug, Clone, Default)]
pub struct History(Arc<Mutex<VecDeque<Sample>>>);

impl History {
    fn push(&self, sample: Sample) {
        let mut samples = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if samples.len() == CAPACITY {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// `{interval_seconds, samples: [...]}`, oldest first.
    pub fn document(&self) -> serde_json::Value {
        let samples: Vec<Sample> = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect();
        serde_json::json!({ "interval_seconds": INTERVAL.as_secs(), "samples": samples })
    }

    /// Samples `outbox` now and every [`INTERVAL`] until `stop`.
    pub async fn run(self, outbox: Outbox, stop: CancellationToken) {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let metrics = outbox.metrics();
            self.push(Sample {
                at_ms: outpost_sync::outbox::now_unix_ms(),
                appended: metrics.appended_records.get(),
                forwarded: metrics.acked_records.get(),
                backlog: outbox.figures().0,
                rss_bytes: resident_bytes().unwrap_or(0),
            });
        }
    }
}

/// The process's resident memory (`/proc/self/statm`).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

/// (free, total) bytes of the filesystem holding `path`.
pub fn disk_bytes(path: &std::path::Path) -> Option<(u64, u64)> {
    let stat = rustix::fs::statvfs(path).ok()?;
    Some((
        stat.f_bavail.saturating_mul(stat.f_frsize),
        stat.f_blocks.saturating_mul(stat.f_frsize),
    ))
}
