//! Outbox benchmark: append throughput and append→commit latency at a fixed rate.
//!
//! `cargo bench -p outpost-sync --bench outbox_append -- [--runs N] [--appenders N]
//!  [--records N] [--rate R] [--seconds S] [--sync full|normal] [--dir PATH]`
//!
//! * throughput: `--appenders` tasks each append single 100-byte records back to back until
//!   `--records` are committed; records/s = records / elapsed.
//! * latency: records are offered open-loop at `--rate` per second for `--seconds`, each as its own
//!   task; the time from offering a record to its append completing is recorded, p50/p99/max.
//!
//! Each figure is the median of `--runs` runs (a fresh outbox per run).

#![allow(clippy::unwrap_used, clippy::print_stdout)] // a bench binary: panics are reports

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_config::Synchronous;
use outpost_outbox::outbox;
use outpost_outbox::{Envelope, Outbox, OutboxOptions, Source};
use tokio_util::sync::CancellationToken;

struct Args {
    runs: usize,
    appenders: usize,
    records: usize,
    rate: u64,
    seconds: u64,
    sync: Synchronous,
    dir: Option<std::path::PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        runs: 5,
        appenders: 512,
        records: 1_000_000,
        rate: 50_000,
        seconds: 5,
        sync: Synchronous::Full,
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().expect("flag value");
        match flag.as_str() {
            "--runs" => a.runs = value().parse().unwrap(),
            "--appenders" => a.appenders = value().parse().unwrap(),
            "--records" => a.records = value().parse().unwrap(),
            "--rate" => a.rate = value().parse().unwrap(),
            "--seconds" => a.seconds = value().parse().unwrap(),
            "--sync" => {
                a.sync = match value().as_str() {
                    "normal" => Synchronous::Normal,
                    _ => Synchronous::Full,
                }
            }
            "--dir" => a.dir = Some(value().into()),
            "--bench" => {}
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn envelope(device: usize) -> Envelope {
    Envelope {
        route: Arc::from("default"),
        device_id: format!("dev-{device}"),
        source: Source::Mqtt,
        topic: format!("devices/dev-{device}/telemetry"),
        received_at_ms: outbox::now_unix_ms(),
        content_type: None,
        headers: vec![],
        payload: vec![b'x'; 100].into(),
        priority: None,
    }
}

async fn open(
    args: &Args,
) -> (
    Outbox,
    CancellationToken,
    tokio::task::JoinHandle<()>,
    tempfile::TempDir,
) {
    let dir = match &args.dir {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir_in(".").unwrap(),
    };
    let mut options = OutboxOptions::with_path(dir.path().join("outbox.db"));
    options.synchronous = args.sync;
    options.max_bytes = 16 << 30;
    options.min_free_disk = 0;
    let (outbox, writer) = outbox::open(options).unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { writer.run(token).await.unwrap() });
    (outbox, stop, task, dir)
}

async fn throughput(args: &Args) -> f64 {
    let (outbox, stop, task, _dir) = open(args).await;
    let per = args.records / args.appenders;
    let started = Instant::now();
    let mut handles = Vec::new();
    for a in 0..args.appenders {
        let outbox = outbox.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..per {
                outbox.append(envelope(a)).await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let elapsed = started.elapsed();
    stop.cancel();
    task.await.unwrap();
    (per * args.appenders) as f64 / elapsed.as_secs_f64()
}

async fn latency(args: &Args) -> (f64, f64, f64, f64) {
    let (outbox, stop, task, _dir) = open(args).await;
    let total = args.rate * args.seconds;
    // Offer records in 1 ms ticks of rate/1000 each.
    let per_tick = (args.rate / 1000).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Duration>(total as usize);
    let started = Instant::now();
    let mut offered = 0u64;
    while offered < total {
        tick.tick().await;
        for _ in 0..per_tick {
            let outbox = outbox.clone();
            let tx = tx.clone();
            let device = (offered % 100) as usize;
            tokio::spawn(async move {
                let t0 = Instant::now();
                outbox.append(envelope(device)).await.unwrap();
                let _ = tx.send(t0.elapsed()).await;
            });
            offered += 1;
        }
    }
    drop(tx);
    let mut lat = Vec::with_capacity(total as usize);
    while let Some(d) = rx.recv().await {
        lat.push(d);
    }
    let achieved = lat.len() as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    task.await.unwrap();
    lat.sort_unstable();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    (
        achieved,
        pct(0.50),
        pct(0.99),
        lat[lat.len() - 1].as_secs_f64() * 1e3,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut tputs = Vec::new();
    for run in 0..args.runs {
        let t = rt.block_on(throughput(&args));
        println!(
            "run {run}: throughput {t:.0} records/s ({} appenders)",
            args.appenders
        );
        tputs.push(t);
    }
    let (mut p50s, mut p99s, mut maxs, mut rates) = (vec![], vec![], vec![], vec![]);
    for run in 0..args.runs {
        let (rate, p50, p99, max) = rt.block_on(latency(&args));
        println!(
            "run {run}: offered {} /s achieved {rate:.0} /s  p50 {p50:.2} ms  p99 {p99:.2} ms  max {max:.2} ms",
            args.rate
        );
        p50s.push(p50);
        p99s.push(p99);
        maxs.push(max);
        rates.push(rate);
    }
    println!(
        "median of {} runs: throughput {:.0} records/s; at {} records/s offered: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        args.runs,
        median(tputs),
        args.rate,
        median(p50s),
        median(p99s),
        median(maxs)
    );
}
