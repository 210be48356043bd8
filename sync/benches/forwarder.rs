//! Forwarder benchmark against a real Kafka-protocol broker (`tansu`, memory storage, started
//! here on a loopback port).
//!
//! `cargo bench -p outpost-sync --bench forwarder -- [--runs N] [--records N] [--rate R]
//!  [--seconds S] [--tansu PATH]`
//!
//! Per run:
//! * **ceiling**: a plain rdkafka producer with the forwarder's settings (idempotent, acks=all,
//!   zstd, linger 5 ms) sends `--records` 100-byte records; records/s until the last delivery.
//! * **drain**: an outbox holding `--records` 100-byte records (100 devices) is forwarded with no
//!   backlog rate limit; records/s until the outbox is empty. The process's peak resident memory
//!   during the drain minus its resident memory just before is the forwarder's peak extra memory
//!   (the kernel's high-water mark is reset through /proc/self/clear_refs).
//! * **live**: records are appended at `--rate` per second for `--seconds` while a fresh
//!   forwarder is live; the receipt→Kafka-acknowledgement latency comes from the forwarder's own
//!   histogram (`outpost_kafka_delivery_latency_seconds`), reported as the bucket bound at p50/p99.
//!
//! Each figure is the median of `--runs` runs (a fresh broker and outbox per run). The memory
//! figure is honest only for the first run of a process (the allocator keeps memory freed by an
//! earlier run): `scripts/bench.sh kafka` runs three processes of one run each.

#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::disallowed_methods)] // a bench binary

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_config::KafkaConfig;
use outpost_sync::forwarder::{Forwarder, ForwarderHandle, ForwarderOptions, NoTags};
use outpost_sync::outbox;
use outpost_sync::{Envelope, Outbox, OutboxOptions, Source};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "outpost.readings";
/// `--in-flight`: overrides `kafka.max_in_flight` (default: the config default).
static IN_FLIGHT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

struct Args {
    runs: usize,
    records: usize,
    rate: u64,
    seconds: u64,
    tansu: String,
    in_flight: Option<usize>,
    phases: String,
}

fn args() -> Args {
    let mut a = Args {
        runs: 3,
        records: 1_000_000,
        rate: 10_000,
        seconds: 10,
        tansu: "tansu".into(),
        in_flight: None,
        phases: "ceiling,drain,live".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().expect("flag value");
        match flag.as_str() {
            "--runs" => a.runs = value().parse().unwrap(),
            "--records" => a.records = value().parse().unwrap(),
            "--rate" => a.rate = value().parse().unwrap(),
            "--seconds" => a.seconds = value().parse().unwrap(),
            "--tansu" => a.tansu = value(),
            "--in-flight" => a.in_flight = Some(value().parse().unwrap()),
            "--phases" => a.phases = value(),
            "--bench" => {}
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

struct Broker {
    child: Child,
    bootstrap: String,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_tansu(bin: &str, topics: &[&str]) -> Broker {
    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(bin)
        .args(["broker", "--storage-engine", "memory://tansu/"])
        .args(["--listener-url", &url, "--advertised-listener-url", &url])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {bin}: {e} (run scripts/ensure-tansu.sh)"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "tansu did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    for topic in topics {
        let status = Command::new(bin)
            .args([
                "topic",
                "create",
                topic,
                "--partitions",
                "3",
                "--broker",
                &url,
            ])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "tansu topic create {topic}");
    }
    Broker {
        child,
        bootstrap: format!("127.0.0.1:{port}"),
    }
}

fn envelope(device: usize) -> Envelope {
    Envelope {
        route: Arc::from("default"),
        device_id: format!("dev-{device}"),
        source: Source::Mqtt,
        topic: format!("devices/dev-{device}/telemetry"),
        received_at_ms: outbox::now_unix_ms(),
        content_type: Some("application/json".into()),
        headers: vec![],
        payload: vec![b'x'; 100].into(),
        priority: None,
    }
}

async fn open_outbox(dir: &std::path::Path) -> (Outbox, CancellationToken) {
    let mut options = OutboxOptions::with_path(dir.join("outbox.db"));
    options.max_bytes = 16 << 30;
    options.min_free_disk = 0;
    let (outbox, writer) = outbox::open(options).unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move { writer.run(token).await.unwrap() });
    (outbox, stop)
}

fn options(bootstrap: &str) -> ForwarderOptions {
    let mut kafka = KafkaConfig {
        enabled: true,
        brokers: vec![bootstrap.to_owned()],
        backlog_rate: 10_000_000,
        ..KafkaConfig::default()
    };
    if let Some(n) = IN_FLIGHT.get() {
        kafka.max_in_flight = *n;
    }
    ForwarderOptions {
        kafka,
        gateway_id: "bench".into(),
        client_id: "outpost-bench".into(),
        drain_timeout: Duration::from_secs(5),
    }
}

fn start_forwarder(
    bootstrap: &str,
    outbox: &Outbox,
) -> (
    ForwarderHandle,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let (forwarder, handle) = Forwarder::new(options(bootstrap), outbox.clone(), Arc::new(NoTags));
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { forwarder.run(token).await.unwrap() });
    (handle, stop, task)
}

/// VmRSS and VmHWM of this process, in KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn ceiling(bootstrap: &str, records: usize) -> f64 {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", "zstd")
        .set("linger.ms", "5")
        .set("queue.buffering.max.kbytes", "16384")
        .create()
        .unwrap();
    let payload = vec![b'x'; 100];
    let keys: Vec<String> = (0..100).map(|d| format!("dev-{d}")).collect();
    let started = Instant::now();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    use futures_util::StreamExt;
    for i in 0..records {
        loop {
            let record = FutureRecord::to("ceiling")
                .key(&keys[i % 100])
                .payload(&payload);
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err(_) => {
                    pending.next().await.unwrap().unwrap().unwrap();
                }
            }
        }
        while pending.len() > 20_000 {
            pending.next().await.unwrap().unwrap().unwrap();
        }
    }
    while let Some(r) = pending.next().await {
        r.unwrap().unwrap();
    }
    records as f64 / started.elapsed().as_secs_f64()
}

async fn drain(bootstrap: &str, records: usize) -> (f64, f64) {
    let dir = tempfile::tempdir_in(".").unwrap();
    let (outbox, writer_stop) = open_outbox(dir.path()).await;
    let mut batch = Vec::with_capacity(1000);
    for i in 0..records {
        batch.push(envelope(i % 100));
        if batch.len() == 1000 {
            outbox.append_all(std::mem::take(&mut batch)).await.unwrap();
        }
    }
    if !batch.is_empty() {
        outbox.append_all(batch).await.unwrap();
    }
    // Reset the high-water mark, then measure from here.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let (before, _) = memory_kib();
    let started = Instant::now();
    let (_handle, stop, task) = start_forwarder(bootstrap, &outbox);
    while outbox.figures().0 > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = records as f64 / started.elapsed().as_secs_f64();
    let (_, peak) = memory_kib();
    stop.cancel();
    task.await.unwrap();
    writer_stop.cancel();
    (rate, (peak.saturating_sub(before)) as f64 / 1024.0)
}

/// The upper bound of the histogram bucket holding quantile `q`, in ms.
fn quantile_ms(handle: &ForwarderHandle, q: f64) -> f64 {
    let mut registry = prometheus_client::registry::Registry::default();
    handle.metrics().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    let mut count = 0.0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("outpost_kafka_delivery_latency_seconds_bucket{le=\"")
        {
            let (le, value) = rest.split_once("\"} ").unwrap();
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            buckets.push((le, value.parse().unwrap()));
        }
        if let Some(v) = line.strip_prefix("outpost_kafka_delivery_latency_seconds_count ") {
            count = v.parse().unwrap();
        }
    }
    let target = count * q;
    buckets
        .iter()
        .find(|(_, c)| *c >= target)
        .map_or(f64::INFINITY, |(le, _)| le * 1000.0)
}

async fn live(bootstrap: &str, rate: u64, seconds: u64) -> (f64, f64, f64) {
    let dir = tempfile::tempdir_in(".").unwrap();
    let (outbox, writer_stop) = open_outbox(dir.path()).await;
    let (handle, stop, task) = start_forwarder(bootstrap, &outbox);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let total = rate * seconds;
    let per_tick = (rate / 1000).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut offered = 0u64;
    while offered < total {
        tick.tick().await;
        let batch: Vec<Envelope> = (0..per_tick)
            .map(|i| envelope(((offered + i) % 100) as usize))
            .collect();
        offered += per_tick;
        let outbox = outbox.clone();
        tokio::spawn(async move { outbox.append_all(batch).await.unwrap() });
    }
    let achieved = offered as f64 / started.elapsed().as_secs_f64();
    while outbox.figures().0 > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (p50, p99) = (quantile_ms(&handle, 0.5), quantile_ms(&handle, 0.99));
    stop.cancel();
    task.await.unwrap();
    writer_stop.cancel();
    (achieved, p50, p99)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args = args();
    if let Some(n) = args.in_flight {
        let _ = IN_FLIGHT.set(n);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut ceilings, mut drains, mut memories, mut p50s, mut p99s) =
        (vec![], vec![], vec![], vec![], vec![]);
    for run in 0..args.runs {
        let broker = start_tansu(&args.tansu, &[TOPIC, "ceiling"]);
        let phase = |name: &str| args.phases.split(',').any(|p| p == name);
        let c = if phase("ceiling") {
            rt.block_on(ceiling(&broker.bootstrap, args.records))
        } else {
            0.0
        };
        let (d, mem) = if phase("drain") {
            rt.block_on(drain(&broker.bootstrap, args.records))
        } else {
            (0.0, 0.0)
        };
        let (achieved, p50, p99) = if phase("live") {
            rt.block_on(live(&broker.bootstrap, args.rate, args.seconds))
        } else {
            (0.0, 0.0, 0.0)
        };
        println!(
            "run {run}: plain producer {c:.0} rec/s | drain {d:.0} rec/s, peak extra memory \
             {mem:.1} MiB | live at {achieved:.0} rec/s: p50 <= {p50} ms, p99 <= {p99} ms"
        );
        ceilings.push(c);
        drains.push(d);
        memories.push(mem);
        p50s.push(p50);
        p99s.push(p99);
    }
    println!(
        "median of {} runs, {} records of 100 bytes: plain producer {:.0} rec/s, drain {:.0} \
         rec/s, peak extra memory {:.1} MiB; live {} rec/s: p50 <= {} ms, p99 <= {} ms",
        args.runs,
        args.records,
        median(ceilings),
        median(drains),
        median(memories),
        args.rate,
        median(p50s),
        median(p99s)
    );
}
