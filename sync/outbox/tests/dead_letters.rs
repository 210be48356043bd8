//! The dead-letter table: records Kafka refused for good, moved aside without loss.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use outpost_outbox::OutboxOptions;
use outpost_outbox::outbox::{self, DeadLetterCause};
use tokio_util::sync::CancellationToken;

mod common;
use common::reading;

fn cause(reason: &'static str) -> DeadLetterCause {
    DeadLetterCause {
        reason,
        error: "Message production error: MessageSizeTooLarge".into(),
        kafka_topic: "outpost.readings".into(),
        attempts: 1,
    }
}

/// A buried record leaves the backlog (figures, reads) and is listed with why; retried, it is
/// back under its own sequence and the forwarder is told; dropped, it is gone. Every step
/// survives a reopen (the moves are committed in one transaction each).
#[tokio::test]
async fn dead_letters_are_moved_listed_retried_and_dropped_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let (outbox, writer) = outbox::open(OutboxOptions::with_path(&path)).unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer.run(stop.clone()));
    for n in 1..=3 {
        outbox.append(reading(n)).await.unwrap();
    }
    let (_, bytes_before, _) = outbox.figures();

    assert!(outbox.dead_letter(2, cause("too_large")).await.unwrap());
    assert!(
        !outbox.dead_letter(2, cause("too_large")).await.unwrap(),
        "a record is buried once"
    );
    assert!(!outbox.dead_letter(99, cause("too_large")).await.unwrap());
    let (records, bytes, _) = outbox.figures();
    assert_eq!(records, 2);
    let (dead, dead_bytes) = outbox.dead_letter_figures();
    assert_eq!((dead, bytes + dead_bytes), (1, bytes_before));
    let seqs: Vec<u64> = outbox
        .reader()
        .unwrap()
        .read_all()
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, [1, 3], "the forwarder no longer reads it");
    let listed = outbox.list_dead_letters(0, 10).unwrap();
    assert_eq!(listed.len(), 1);
    let d = &listed[0];
    assert_eq!((d.seq, d.reason.as_str(), d.attempts), (2, "too_large", 1));
    assert_eq!((d.device_id.as_str(), d.topic.as_str()), ("d", "t"));
    assert!(d.error.contains("MessageSizeTooLarge") && d.kafka_topic == "outpost.readings");
    assert!(d.dead_at_ms > 0);
    assert_eq!(outbox.metrics().dead_letters.get(), 1);

    // A restart keeps it and its count.
    stop.cancel();
    task.await.unwrap().unwrap();
    drop(outbox);
    let (outbox, writer) = outbox::open(OutboxOptions::with_path(&path)).unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer.run(stop.clone()));
    assert_eq!(outbox.dead_letter_figures().0, 1);
    assert_eq!(outbox.list_dead_letters(0, 10).unwrap().len(), 1);

    let mut revived_after = outbox.revived();
    assert_eq!(
        outbox.retry_dead_letters(Some(vec![2, 7])).await.unwrap(),
        1
    );
    assert!(
        revived_after.has_changed().unwrap(),
        "the forwarder is told"
    );
    revived_after.mark_unchanged();
    let back = outbox.reader().unwrap().read_all().unwrap();
    let seqs: Vec<u64> = back.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2, 3], "back under its own sequence");
    assert_eq!(back[1].payload, b"2", "unchanged");
    assert_eq!(outbox.figures().0, 3);
    assert_eq!(outbox.dead_letter_figures(), (0, 0));

    for seq in [1, 3] {
        assert!(
            outbox
                .dead_letter(seq, cause("unknown_topic"))
                .await
                .unwrap()
        );
    }
    assert_eq!(outbox.drop_dead_letters(None).await.unwrap(), 2);
    assert_eq!(outbox.dead_letter_figures(), (0, 0));
    assert!(outbox.list_dead_letters(0, 10).unwrap().is_empty());
    assert_eq!(outbox.figures().0, 1);
    assert!(
        !revived_after.has_changed().unwrap(),
        "only a retry wakes the forwarder"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Dead letters are on the same disk: they count against `outbox.max_bytes` until dropped.
#[tokio::test]
async fn dead_letters_count_against_the_byte_cap() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = OutboxOptions::with_path(dir.path().join("outbox.db"));
    let one = reading(1).accounted_size();
    options.max_bytes = one * 2;
    options.routes[0].when_full = outpost_config::WhenFull::Reject;
    let (outbox, writer) = outbox::open(options).unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer.run(stop.clone()));
    outbox.append(reading(1)).await.unwrap();
    outbox.append(reading(2)).await.unwrap();
    outbox.dead_letter(1, cause("too_large")).await.unwrap();
    outbox.dead_letter(2, cause("too_large")).await.unwrap();
    assert_eq!(outbox.figures().0, 0);
    assert!(
        outbox.append(reading(3)).await.is_err(),
        "the cap is full of dead letters"
    );
    outbox.drop_dead_letters(Some(vec![1])).await.unwrap();
    outbox.append(reading(3)).await.unwrap();
    stop.cancel();
    task.await.unwrap().unwrap();
}
