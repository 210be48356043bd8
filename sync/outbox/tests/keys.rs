//! Idempotency keys: an append under a key stores its record once, across groups and a reopen,
//! until the key is released (one by one or by prefix).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use outpost_outbox::outbox;
use outpost_outbox::{Outbox, OutboxOptions};
use tokio_util::sync::CancellationToken;

mod common;
use common::reading;

fn open(dir: &std::path::Path) -> (Outbox, CancellationToken, tokio::task::JoinHandle<()>) {
    let (outbox, writer) = outbox::open(OutboxOptions::with_path(dir.join("outbox.db"))).unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            writer.run(stop).await.unwrap();
        }
    });
    (outbox, stop, task)
}

fn count(outbox: &Outbox) -> usize {
    outbox.reader().unwrap().read_all().unwrap().len()
}

#[tokio::test]
async fn a_keyed_append_is_stored_once_until_released_even_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, stop, task) = open(dir.path());
    let first = outbox
        .append_once(reading(1), "s|c|7".into())
        .await
        .unwrap();
    // The same key in the same group and in a later one: no new record, the same sequence.
    let (a, b) = tokio::join!(
        outbox.append_once(reading(2), "s|c|7".into()),
        outbox.append_once(reading(3), "s|c|8".into())
    );
    assert_eq!(a.unwrap(), first);
    assert_ne!(b.unwrap(), first);
    assert_eq!(count(&outbox), 2);
    assert_eq!(outbox.held_keys("s|c|").unwrap(), ["s|c|7", "s|c|8"]);
    assert!(outbox.held_keys("s|other|").unwrap().is_empty());
    stop.cancel();
    task.await.unwrap();

    let (outbox, stop, task) = open(dir.path());
    assert_eq!(
        outbox
            .append_once(reading(4), "s|c|7".into())
            .await
            .unwrap(),
        first,
        "the key survived the reopen"
    );
    assert_eq!(count(&outbox), 2);
    // Released: the next append under it is a new record.
    outbox
        .release_keys(vec!["s|c|7".into()], None)
        .await
        .unwrap();
    let again = outbox
        .append_once(reading(5), "s|c|7".into())
        .await
        .unwrap();
    assert!(again > first);
    assert_eq!(count(&outbox), 3);
    // Released by prefix: every key of the session, no other.
    outbox
        .append_once(reading(6), "t|c|1".into())
        .await
        .unwrap();
    outbox
        .release_keys(vec![], Some("s|c|".into()))
        .await
        .unwrap();
    assert!(outbox.held_keys("s|").unwrap().is_empty());
    assert_eq!(outbox.held_keys("t|").unwrap(), ["t|c|1"]);
    // Keys do not follow the records: acknowledging a record leaves its key.
    outbox.ack(vec![1, 2, 3, 4, 5, 6, 7]).await.unwrap();
    assert_eq!(outbox.held_keys("t|").unwrap(), ["t|c|1"]);
    stop.cancel();
    task.await.unwrap();
}
