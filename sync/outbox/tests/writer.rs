//! The writer's own thread and the durability it really runs with.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: on a blocking-pool thread, on purpose

use std::time::{Duration, Instant};

use outpost_config::Synchronous;
use outpost_outbox::OutboxOptions;
use outpost_outbox::outbox;
use tokio_util::sync::CancellationToken;

mod common;
use common::reading;

/// Commits run on the writer's own thread: with the runtime's whole blocking pool busy (here one
/// thread, held for 10 s — on a gateway: registry jobs queued behind a slow one), an append
/// still commits at once. Before, every commit waited for a blocking-pool thread.
#[test]
fn appends_commit_while_the_blocking_pool_is_busy() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, writer) =
            outbox::open(OutboxOptions::with_path(dir.path().join("outbox.db"))).unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(writer.run(stop.clone()));
        let blocker = tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let seq = tokio::time::timeout(Duration::from_secs(5), outbox.append(reading(1)))
            .await
            .expect("the append waited for the blocking pool")
            .unwrap();
        assert_eq!(seq, 1);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!blocker.is_finished(), "the pool was busy the whole time");
        stop.cancel();
        task.await.unwrap().unwrap();
    });
    // Not waiting for the sleeping blocker.
    runtime.shutdown_background();
}

/// The durability the live writer connection reports, read back on its thread: `FULL` by
/// default, `NORMAL` when configured. A regression that left the connection at SQLite's default
/// would show here, where every other test would still pass.
#[tokio::test]
async fn the_running_writer_reports_the_synchronous_mode_it_really_has() {
    for (mode, want) in [(Synchronous::Full, "full"), (Synchronous::Normal, "normal")] {
        let dir = tempfile::tempdir().unwrap();
        let mut options = OutboxOptions::with_path(dir.path().join("outbox.db"));
        options.synchronous = mode;
        let (outbox, writer) = outbox::open(options).unwrap();
        assert_eq!(
            outbox.synchronous(),
            None,
            "not known before the writer runs"
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(writer.run(stop.clone()));
        outbox.append(reading(1)).await.unwrap();
        assert_eq!(outbox.synchronous(), Some(want));
        stop.cancel();
        task.await.unwrap().unwrap();
    }
}
