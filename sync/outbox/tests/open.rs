//! Opening the outbox: corrupt files are quarantined, healthy ones keep their data and sequence,
//! and a file from a newer schema is refused without being touched.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;

use outpost_outbox::outbox::{self, OpenError};
use outpost_outbox::{Envelope, OutboxOptions, Source};
use tokio_util::sync::CancellationToken;

fn envelope(n: u32) -> Envelope {
    Envelope {
        route: Arc::from("default"),
        device_id: "dev".into(),
        source: Source::Driver,
        topic: "t".into(),
        received_at_ms: 7,
        content_type: Some("text/plain".into()),
        headers: vec![("k".into(), "v".into())],
        payload: format!("reading {n} {}", "x".repeat(200))
            .into_bytes()
            .into(),
        priority: None,
    }
}

/// Appends `n` records and closes the outbox cleanly; returns their sequence numbers.
async fn fill(options: &OutboxOptions, n: u32) -> Vec<u64> {
    let (outbox, writer) = outbox::open(options.clone()).unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer.run(stop.clone()));
    let seqs = outbox
        .append_all((0..n).map(envelope).collect())
        .await
        .unwrap();
    stop.cancel();
    task.await.unwrap().unwrap();
    seqs
}

#[tokio::test]
async fn garbage_file_is_quarantined_and_a_fresh_outbox_starts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    std::fs::write(
        &path,
        b"this is not a database, just bytes that look like nothing".repeat(100),
    )
    .unwrap();
    let floor = outbox::now_unix_ms() as u64 * 1_000;
    let (outbox, writer) = outbox::open(OutboxOptions::with_path(&path)).unwrap();
    let q = outbox.quarantine().expect("quarantine reported").clone();
    assert!(
        q.moved_to
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("outbox.db.corrupt-")
    );
    assert!(q.moved_to.exists(), "corrupt file kept for inspection");
    assert_eq!(outbox.metrics().corruption_alarm.get(), 1);
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer.run(stop.clone()));
    // The old file cannot be read: the new one starts from the clock-derived floor, above
    // anything the old one can have given (it started at 1, or at an earlier floor).
    let seq = outbox.append(envelope(1)).await.unwrap();
    assert!(
        (floor..floor + 60_000_000).contains(&seq),
        "sequence {seq} continues from the clock floor {floor}"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_new_outbox_continues_above_the_quarantined_ones_and_has_its_own_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let options = OutboxOptions::with_path(&path);
    assert_eq!(fill(&options, 10).await, (1..=10).collect::<Vec<_>>());
    let (first, _writer) = outbox::open(options.clone()).unwrap();
    let first_id = first.id().to_owned();
    assert_eq!(first_id.len(), 32, "128 random bits in hex: {first_id}");
    drop((first, _writer));
    let (again, _writer) = outbox::open(options.clone()).unwrap();
    assert_eq!(again.id(), first_id, "the id lives in the file");
    drop((again, _writer));
    // Set aside as a quarantine does (the file is readable: it continues above its sequences).
    for suffix in ["", "-wal", "-shm"] {
        let from = format!("{}{suffix}", path.display());
        if std::path::Path::new(&from).exists() {
            std::fs::rename(
                &from,
                format!("{}.corrupt-1700000000{suffix}", path.display()),
            )
            .unwrap();
        }
    }
    assert_eq!(
        fill(&options, 3).await,
        vec![11, 12, 13],
        "sequences never restart: (gateway, outbox seq) stays unique for consumers"
    );
    let (second, _writer) = outbox::open(options).unwrap();
    assert_ne!(second.id(), first_id, "a new file is a new outbox");
}

#[tokio::test]
async fn damaged_pages_are_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let options = OutboxOptions::with_path(&path);
    fill(&options, 2000).await;
    // Scribble over a stretch of b-tree pages in the middle of the file.
    let len = std::fs::metadata(&path).unwrap().len();
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(len / 2 / 4096 * 4096)).unwrap();
    f.write_all(&[0xA5; 4096 * 4]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let (outbox, writer) = outbox::open(options).unwrap();
    let q = outbox.quarantine().expect("damaged file detected");
    assert!(!q.reason.is_empty());
    assert_eq!(outbox.figures().0, 0, "fresh outbox");
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer.run(stop.clone()));
    let seq = outbox.append(envelope(1)).await.unwrap();
    assert!(
        seq > 2000,
        "sequence {seq} continues above the damaged file's 2,000"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn healthy_file_keeps_records_and_sequence_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let options = OutboxOptions::with_path(dir.path().join("outbox.db"));
    let first = fill(&options, 10).await;
    let second = fill(&options, 5).await;
    assert_eq!(first, (1..=10).collect::<Vec<_>>());
    assert_eq!(second, (11..=15).collect::<Vec<_>>());
    let (outbox, _writer) = outbox::open(options).unwrap();
    assert!(outbox.quarantine().is_none());
    let all = outbox.reader().unwrap().read_all().unwrap();
    assert_eq!(all.len(), 15);
    assert_eq!(all[0].headers, vec![("k".to_owned(), "v".to_owned())]);
    assert_eq!(all[0].content_type.as_deref(), Some("text/plain"));
    assert_eq!(all[0].source, Source::Driver);
    assert_ne!(all[0].boot_id.len(), 0);
}

#[tokio::test]
async fn newer_schema_is_refused_not_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    fill(&OutboxOptions::with_path(&path), 1).await;
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 999).unwrap();
    drop(conn);
    let err = outbox::open(OutboxOptions::with_path(&path)).unwrap_err();
    assert!(matches!(err, OpenError::Schema { .. }), "{err}");
    assert!(path.exists(), "file left in place");
}
