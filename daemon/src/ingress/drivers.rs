//! Driver readings → outbox.
//!
//! One task drains the bounded readings channel that every driver sends into, appends what it
//! finds in groups (one outbox request per group, preserving order), and waits for each commit
//! before taking more. If the outbox refuses (full with `reject`, storage error) the group is kept
//! and retried: drivers then block on the full channel, which slows their polling instead of
//! losing readings. The task ends when every driver has dropped its sender and the channel is
//! empty, so at shutdown every reading a driver produced reaches the outbox before the writer
//! stops — unless the outbox refuses during shutdown: then the readings are dropped with an error
//! log rather than holding the shutdown until the grace period runs out.

use std::sync::Arc;
use std::time::Duration;

use outpost_drivers::Reading;
use outpost_sync::{AppendError, Envelope, Outbox, Source};
use std::collections::HashMap;

use tokio::sync::mpsc;

use crate::registry::{Registry, Traffic};
use tokio_util::sync::CancellationToken;

/// Readings gathered into one append request at most.
const GROUP: usize = 512;
/// Pause before retrying a refused group.
const RETRY: Duration = Duration::from_millis(500);

/// Runs until every sender is gone and the queue is drained. `stopping` is the shutdown signal:
/// once it fires, a refused group is not retried.
pub async fn run(
    mut readings: mpsc::Receiver<Reading>,
    outbox: Outbox,
    registry: Registry,
    stopping: CancellationToken,
) {
    let mut group = Vec::with_capacity(GROUP);
    while readings.recv_many(&mut group, GROUP).await > 0 {
        // Once per device and group: registers unknown devices (source `driver:<name>`) and
        // says whether to take their readings (false: disabled, or an invalid id). In memory for
        // known devices, so disabling one takes effect at its next group.
        let mut enabled: HashMap<String, bool> = HashMap::new();
        for r in &group {
            if !enabled.contains_key(&r.device_id) {
                let source = format!("driver:{}", r.driver);
                let take = registry.register_seen(&r.device_id, &source).await;
                enabled.insert(r.device_id.clone(), take);
            }
        }
        let mut bytes: HashMap<String, u64> = HashMap::new();
        let mut kept = Vec::with_capacity(group.len());
        for r in group.drain(..) {
            if enabled.get(&r.device_id).copied().unwrap_or(false) {
                *bytes.entry(r.device_id.clone()).or_default() += r.payload.len() as u64;
                kept.push(r);
            } else {
                registry.observe(&r.device_id, Traffic::Refused);
            }
        }
        if kept.is_empty() {
            continue;
        }
        let envelopes: Vec<Envelope> = kept.into_iter().map(envelope).collect();
        if append_until_stored(&outbox, envelopes, &stopping).await {
            for (device, bytes) in bytes {
                registry.observe(&device, Traffic::Accepted { bytes });
            }
        }
    }
}

fn envelope(r: Reading) -> Envelope {
    Envelope {
        route: Arc::from(r.route),
        device_id: r.device_id,
        source: Source::Driver,
        topic: r.topic,
        received_at_ms: r.received_at_ms,
        content_type: r.content_type,
        headers: vec![("driver".to_owned(), r.driver)],
        payload: r.payload,
    }
}

async fn append_until_stored(
    outbox: &Outbox,
    envelopes: Vec<Envelope>,
    stopping: &CancellationToken,
) -> bool {
    let mut warned = false;
    loop {
        match outbox.append_all(envelopes.clone()).await {
            Ok(_) => return true,
            Err(AppendError::Closed) => {
                tracing::error!(
                    readings = envelopes.len(),
                    "Outbox closed before driver readings were stored"
                );
                return false;
            }
            Err(AppendError::TooLarge { .. } | AppendError::UnknownRoute(_)) => {
                // These never succeed on retry: store what can be stored, one by one.
                for e in envelopes {
                    if let Err(err) = outbox.append(e).await {
                        tracing::warn!(error = %err, "Driver reading refused by the outbox");
                    }
                }
                return true;
            }
            Err(err @ (AppendError::Full { .. } | AppendError::Storage(_))) => {
                if stopping.is_cancelled() {
                    tracing::error!(error = %err, readings = envelopes.len(), "Outbox refused driver readings during shutdown; dropping them");
                    return false;
                }
                if !warned {
                    tracing::warn!(error = %err, readings = envelopes.len(), "Outbox refused driver readings; holding them and retrying");
                    warned = true;
                }
                tokio::select! {
                    () = tokio::time::sleep(RETRY) => {}
                    () = stopping.cancelled() => {}
                }
            }
        }
    }
}
