//! Driver readings → outbox.
//!
//! One task drains the bounded readings channel that every driver sends into, appends what it
//! finds in groups (one outbox request per group, preserving order), and waits for each commit
//! before taking more. If the outbox refuses (full with `reject`, storage error) the group is kept
//! and retried: drivers then block on the full channel, which slows their polling instead of
//! losing readings. The task ends when every driver has dropped its sender and the channel is
//! empty, so at shutdown every reading a driver produced reaches the outbox before the writer
//! stops — unless the outbox refuses during shutdown: then the readings are dropped with an error
//! log rather than holding the shutdown until the grace period runs out, and so is every reading
//! queued after them, so what is stored stays gap-free per device (a later group could otherwise
//! be stored after an earlier one was dropped, once the outbox takes appends again).

use std::sync::Arc;
use std::time::Duration;

use outpost_drivers::Reading;
use outpost_sync::{AppendError, Envelope, Source};
use std::collections::HashMap;

use tokio::sync::mpsc;

use super::Ingest;
use crate::registry::{Admission, Registry, Traffic};
use tokio_util::sync::CancellationToken;

/// Readings gathered into one append request at most.
const GROUP: usize = 512;
/// Pause before retrying a refused group.
const RETRY: Duration = Duration::from_millis(500);

/// Runs until every sender is gone and the queue is drained. `stopping` is the shutdown signal:
/// once it fires, a refused group is not retried.
pub async fn run(
    mut readings: mpsc::Receiver<Reading>,
    ingest: Ingest,
    stopping: CancellationToken,
) {
    let registry = ingest.registry().clone();
    let mut group = Vec::with_capacity(GROUP);
    // Readings dropped after a group could not be stored (at shutdown, or the outbox closed).
    let mut cut: Option<usize> = None;
    while readings.recv_many(&mut group, GROUP).await > 0 {
        if let Some(dropped) = cut.as_mut() {
            *dropped += group.len();
            group.clear();
            continue;
        }
        // Once per device and group: registers unknown devices (source `driver:<name>`) and
        // says whether to take their readings (refused: disabled, or an invalid id; taken
        // unregistered: beyond devices.max_automatic). In memory for known devices, so
        // disabling one takes effect at its next group.
        let mut admission: HashMap<String, Admission> = HashMap::new();
        for r in &group {
            if !admission.contains_key(&r.device_id) {
                let source = format!("driver:{}", r.driver);
                let admitted = registry.register_seen(&r.device_id, &source).await;
                admission.insert(r.device_id.clone(), admitted);
            }
        }
        let mut bytes: HashMap<String, u64> = HashMap::new();
        let mut unregistered: HashMap<String, u64> = HashMap::new();
        let mut kept = Vec::with_capacity(group.len());
        for r in group.drain(..) {
            match admission.get(&r.device_id) {
                Some(Admission::Take) => {
                    *bytes.entry(r.device_id.clone()).or_default() += r.payload.len() as u64;
                    kept.push(r);
                }
                Some(Admission::TakeUnregistered) => {
                    *unregistered.entry(r.device_id.clone()).or_default() += 1;
                    kept.push(r);
                }
                Some(Admission::Refuse) | None => {
                    registry.observe(&r.device_id, Traffic::Refused);
                }
            }
        }
        if kept.is_empty() {
            continue;
        }
        let envelopes: Vec<Envelope> = kept.into_iter().map(envelope).collect();
        if !append_until_stored(&ingest, envelopes, &stopping).await {
            cut = Some(0);
            continue;
        }
        for (device, bytes) in bytes {
            registry.observe(&device, Traffic::Accepted { bytes });
        }
        for (device, readings) in unregistered {
            registry.stored_unregistered(&device, readings);
        }
    }
    if let Some(dropped) = cut.filter(|n| *n > 0) {
        tracing::error!(
            readings = dropped,
            "Dropped the driver readings queued after a group that could not be stored"
        );
    }
}

/// The drivers' [`DeviceHealth`](outpost_drivers::DeviceHealth) hook: a device a driver
/// reports unreachable is shown offline in the registry until it is seen again.
#[derive(Debug, Clone)]
pub struct RegistryHealth(pub Registry);

impl outpost_drivers::DeviceHealth for RegistryHealth {
    fn offline(&self, driver: &str, device_id: &str, reason: &str) {
        tracing::info!(
            driver,
            device = device_id,
            reason,
            "Driver reports device offline"
        );
        self.0.mark_offline(device_id, reason);
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
        payload: r.payload.into(),
        priority: None,
    }
}

async fn append_until_stored(
    ingest: &Ingest,
    envelopes: Vec<Envelope>,
    stopping: &CancellationToken,
) -> bool {
    let mut warned = false;
    loop {
        match ingest.append(envelopes.clone()).await {
            Ok(_) => return true,
            Err(AppendError::Closed) => {
                tracing::error!(
                    readings = envelopes.len(),
                    "Outbox closed before driver readings were stored"
                );
                return false;
            }
            Err(
                AppendError::TooLarge { .. }
                | AppendError::UnknownRoute(_)
                | AppendError::Invalid { .. },
            ) => {
                // These never succeed on retry: store what can be stored, one by one.
                for e in envelopes {
                    if let Err(err) = ingest.append(vec![e]).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_sync::OutboxOptions;
    use outpost_sync::outbox::RouteReason;
    use tokio::sync::broadcast;

    fn reading(n: u64) -> Reading {
        Reading {
            driver: "sim".into(),
            device_id: "sim-1".into(),
            topic: "sim/sim-1".into(),
            route: "default".into(),
            content_type: Some("application/json".into()),
            payload: format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(200)).into_bytes(),
            received_at_ms: 5,
        }
    }

    /// A group the outbox refuses while the gateway stops is dropped, and so is every reading
    /// queued after it, even once the outbox takes appends again: what is stored has no gap.
    /// (Before, a later group was stored after the dropped one: seen under load as a gap in
    /// `serial_disk_floor_refuses_before_the_disk_fills`.)
    #[tokio::test]
    async fn after_a_group_dropped_at_shutdown_no_later_reading_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = OutboxOptions::with_path(dir.path().join("outbox.db"));
        options.max_bytes = 4096;
        let (outbox, writer) = outpost_sync::outbox::open(options).unwrap();
        let stop_writer = CancellationToken::new();
        let writer = tokio::spawn(writer.run(stop_writer.clone()));
        let registry = Registry::open(dir.path(), Duration::from_secs(60)).unwrap();
        let ingest = Ingest::new(outbox.clone(), registry, broadcast::channel(16).0);
        let mut n = 0;
        while ingest.append(vec![envelope(reading(n))]).await.is_ok() {
            n += 1;
        }
        let refused = || {
            outbox
                .metrics()
                .rejected_records
                .get_or_create(&RouteReason {
                    route: "default".into(),
                    reason: "byte_cap",
                })
                .get()
        };
        let before = refused();
        let stopping = CancellationToken::new();
        stopping.cancel();
        let (tx, rx) = mpsc::channel(8);
        let task = tokio::spawn(run(rx, ingest, stopping));
        tx.send(reading(n)).await.unwrap();
        let refusal = async {
            while refused() == before {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), refusal)
            .await
            .expect("the outbox refuses the reading");
        // Room again (the forwarder delivered everything), then the next reading arrives.
        let stored = outbox.reader().unwrap().read_all().unwrap();
        outbox
            .ack(stored.iter().map(|r| r.seq).collect())
            .await
            .unwrap();
        tx.send(reading(n + 1)).await.unwrap();
        drop(tx);
        task.await.unwrap();
        assert!(
            outbox.reader().unwrap().read_all().unwrap().is_empty(),
            "reading {} stored after {n} was dropped",
            n + 1
        );
        stop_writer.cancel();
        writer.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn driver_readings_are_stored_registered_and_published_locally() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, writer) =
            outpost_sync::outbox::open(OutboxOptions::with_path(dir.path().join("outbox.db")))
                .unwrap();
        let stop_writer = CancellationToken::new();
        let writer = tokio::spawn(writer.run(stop_writer.clone()));
        let registry = Registry::open(dir.path(), Duration::from_secs(60)).unwrap();
        let (local, mut subscriber) = broadcast::channel(16);
        let ingest = Ingest::new(outbox.clone(), registry.clone(), local);
        let (tx, rx) = mpsc::channel(8);
        let task = tokio::spawn(run(rx, ingest, CancellationToken::new()));
        tx.send(Reading {
            driver: "bench".into(),
            device_id: "meter-1".into(),
            topic: "modbus/meter-1".into(),
            route: "default".into(),
            content_type: Some("application/json".into()),
            payload: br#"{"v":230.1,"units":{"v":"V"}}"#.to_vec(),
            received_at_ms: 5,
        })
        .await
        .unwrap();
        drop(tx);
        task.await.unwrap();
        let published = subscriber.recv().await.unwrap();
        assert_eq!(
            (published.device_id.as_str(), published.source),
            ("meter-1", Source::Driver)
        );
        let device = registry
            .get("meter-1")
            .expect("registered by the driver-ingest task");
        assert_eq!(device.source, "driver:bench");
        let stored = outbox.reader().unwrap().read_all().unwrap();
        assert_eq!(
            stored[0].headers,
            vec![("driver".to_owned(), "bench".to_owned())]
        );
        stop_writer.cancel();
        writer.await.unwrap().unwrap();
    }
}
