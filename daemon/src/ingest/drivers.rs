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
use tokio::sync::mpsc;
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
    stopping: CancellationToken,
) {
    let mut group = Vec::with_capacity(GROUP);
    while readings.recv_many(&mut group, GROUP).await > 0 {
        let envelopes: Vec<Envelope> = group.drain(..).map(envelope).collect();
        append_until_stored(&outbox, envelopes, &stopping).await;
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
) {
    let mut warned = false;
    loop {
        match outbox.append_all(envelopes.clone()).await {
            Ok(_) => return,
            Err(AppendError::Closed) => {
                tracing::error!(
                    readings = envelopes.len(),
                    "Outbox closed before driver readings were stored"
                );
                return;
            }
            Err(AppendError::TooLarge { .. } | AppendError::UnknownRoute(_)) => {
                // These never succeed on retry: store what can be stored, one by one.
                for e in envelopes {
                    if let Err(err) = outbox.append(e).await {
                        tracing::warn!(error = %err, "Driver reading refused by the outbox");
                    }
                }
                return;
            }
            Err(err @ (AppendError::Full { .. } | AppendError::Storage(_))) => {
                if stopping.is_cancelled() {
                    tracing::error!(error = %err, readings = envelopes.len(), "Outbox refused driver readings during shutdown; dropping them");
                    return;
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
