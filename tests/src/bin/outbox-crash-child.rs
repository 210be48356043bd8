//! Child process for the kill -9 test: appends to an outbox as fast as it can from many tasks
//! and prints one line per *completed* append — `<appender> <counter> <seq>` — on stdout.
//! The parent kills it with SIGKILL at a random moment and checks the file.
//!
//! Usage: `outbox-crash-child <outbox.db> <appenders> <run id>`; payloads are `<run> <appender>
//! <counter> <padding>`.

#![allow(clippy::unwrap_used)] // test harness: a panic is the report

use std::io::Write;
use std::sync::Arc;

use outpost_sync::outbox;
use outpost_sync::{Envelope, OutboxOptions, Source};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("outbox path");
    let appenders: u32 = args.next().expect("appenders").parse().unwrap();
    let run: u32 = args.next().expect("run id").parse().unwrap();
    let mut options = OutboxOptions::with_path(path);
    options.min_free_disk = 0;
    let (outbox, writer) = outbox::open(options).unwrap();
    tokio::spawn(writer.run(CancellationToken::new()));

    // Completed appends go to one printer so lines never interleave. Printing late is fine (the
    // parent only checks what was printed); printing before completion would be the bug.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<(u32, u64, u64)>(65_536);
    for a in 0..appenders {
        let outbox = outbox.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            for counter in 0u64.. {
                let envelope = Envelope {
                    route: Arc::from("default"),
                    device_id: format!("appender-{a}"),
                    source: Source::Driver,
                    topic: format!("crash/{a}"),
                    received_at_ms: 0,
                    content_type: None,
                    headers: vec![],
                    payload: format!("{run} {a} {counter} {}", "p".repeat(80))
                        .into_bytes()
                        .into(),
                    priority: None,
                };
                let seq = outbox.append(envelope).await.unwrap();
                done.send((a, counter, seq)).await.unwrap();
            }
        });
    }
    drop(done_tx);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    let mut batch = Vec::with_capacity(1024);
    while done_rx.recv_many(&mut batch, 1024).await > 0 {
        for (a, counter, seq) in batch.drain(..) {
            writeln!(out, "{a} {counter} {seq}").unwrap();
        }
        out.flush().unwrap();
    }
}
