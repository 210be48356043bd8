//! The byte cap, deterministically: `reject` fails appends with the typed error and leaves what is
//! stored untouched; `drop_oldest` evicts exactly the oldest records of its route and counts them.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use outpost_config::{Route, WhenFull};
use outpost_outbox::outbox::{self, RouteReason};
use outpost_outbox::{AppendError, Envelope, FullReason, Outbox, OutboxOptions, Source};
use tokio_util::sync::CancellationToken;

fn envelope(route: &str, n: u32) -> Envelope {
    Envelope {
        route: Arc::from(route),
        device_id: "d".into(),
        source: Source::Coap,
        topic: "t".into(),
        received_at_ms: 0,
        content_type: None,
        headers: vec![],
        payload: format!("{n:08}").repeat(12).into_bytes().into(), // 96 bytes; route names of equal length keep every record the same size
        priority: None,
    }
}

fn open(dir: &std::path::Path, max_bytes: u64) -> (Outbox, CancellationToken) {
    let mut options = OutboxOptions::with_path(dir.join("outbox.db"));
    options.max_bytes = max_bytes;
    options.min_free_disk = 0;
    options.routes = vec![
        Route {
            name: "keep".into(),
            priority: 1,
            when_full: WhenFull::Reject,
        },
        Route {
            name: "lose".into(),
            priority: 0,
            when_full: WhenFull::DropOldest,
        },
    ];
    let (outbox, writer) = outbox::open(options).unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(writer.run(stop.clone()));
    (outbox, stop)
}

fn payload_numbers(outbox: &Outbox, route: &str) -> Vec<u32> {
    outbox
        .reader()
        .unwrap()
        .read_all()
        .unwrap()
        .into_iter()
        .filter(|r| r.route == route)
        .map(|r| {
            String::from_utf8(r.payload[..8].to_vec())
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn reject_refuses_with_typed_error_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let size = envelope("keep", 0).accounted_size();
    let (outbox, _stop) = open(dir.path(), size * 10);
    for n in 0..10 {
        outbox.append(envelope("keep", n)).await.unwrap();
    }
    let before = outbox.reader().unwrap().read_all().unwrap();
    for n in 10..15 {
        let err = outbox.append(envelope("keep", n)).await.unwrap_err();
        assert_eq!(
            err,
            AppendError::Full {
                route: "keep".into(),
                reason: FullReason::ByteCap
            }
        );
    }
    // A batch that would cross the cap is refused whole.
    let err = outbox
        .append_all(vec![envelope("keep", 20), envelope("keep", 21)])
        .await;
    assert!(matches!(err, Err(AppendError::Full { .. })));
    assert_eq!(
        outbox.reader().unwrap().read_all().unwrap(),
        before,
        "stored records untouched"
    );
    let rejected = outbox
        .metrics()
        .rejected_records
        .get_or_create(&RouteReason {
            route: "keep".into(),
            reason: "byte_cap",
        })
        .get();
    assert_eq!(rejected, 7);
    // Acking makes room again.
    outbox.ack(vec![before[0].seq]).await.unwrap();
    outbox.append(envelope("keep", 30)).await.unwrap();
}

#[tokio::test]
async fn drop_oldest_evicts_the_oldest_of_its_route_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let size = envelope("lose", 0).accounted_size();
    let (outbox, _stop) = open(dir.path(), size * 10);
    for n in 0..4 {
        outbox.append(envelope("keep", n)).await.unwrap();
    }
    for n in 0..6 {
        outbox.append(envelope("lose", n)).await.unwrap();
    }
    // Full now. Each new lossy record evicts the oldest lossy one.
    for n in 6..9 {
        outbox.append(envelope("lose", n)).await.unwrap();
    }
    assert_eq!(payload_numbers(&outbox, "lose"), vec![3, 4, 5, 6, 7, 8]);
    assert_eq!(
        payload_numbers(&outbox, "keep"),
        vec![0, 1, 2, 3],
        "other routes untouched"
    );
    // A batch of three evicts three.
    outbox
        .append_all(vec![
            envelope("lose", 9),
            envelope("lose", 10),
            envelope("lose", 11),
        ])
        .await
        .unwrap();
    assert_eq!(payload_numbers(&outbox, "lose"), vec![6, 7, 8, 9, 10, 11]);
    let dropped = outbox
        .metrics()
        .dropped_records
        .get_or_create(&RouteReason {
            route: "lose".into(),
            reason: "byte_cap",
        })
        .get();
    assert_eq!(dropped, 6, "drop counter equals the number dropped");
    // The reject route still refuses rather than evicting the lossy route's records.
    assert!(matches!(
        outbox.append(envelope("keep", 4)).await,
        Err(AppendError::Full { .. })
    ));
    assert_eq!(outbox.figures().0, 10);
}
