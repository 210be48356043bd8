//! MQTT ingestion benchmark on rumqttc: N publishers, QoS 1, fixed-size payloads, against the
//! real `outpost` binary (PUBACK after the durable commit) and, as a reference, Debian's
//! `mosquitto` (no persistence, PUBACK from memory), in the same run. Not a test: figures are
//! written down in docs/BENCHMARKS.md, never asserted.
//!
//! ```sh
//! cargo build --release -p outpost -p outpost-e2e --bins
//! target/release/mqtt-bench --publishers 100 --seconds 10 --runs 3             # max msg/s
//! target/release/mqtt-bench --publishers 100 --seconds 10 --runs 3 --rate 20000 # p99 at 20k/s
//! target/release/mqtt-bench --idle 1000                                         # RSS, idle devices
//! target/release/mqtt-bench --publishers 100 --seconds 10 --runs 3 --watch     # with a subscriber
//! ```
//!
//! `--watch` adds one QoS 0 subscriber to every publisher's topic (`devices/anonymous/+/t`), so
//! each publish is also routed to a client; it reports how many it received in the window.
//!
//! Latency is publish call → PUBACK: it includes the client's own queueing, so at a fixed rate
//! it is what a device would see. Outpost runs with `mqtt.allow_anonymous` (publisher `i` is
//! `anonymous/bench-i` and publishes under `devices/anonymous/bench-i/t`, which is inside its
//! ACL); its data directory is under the current directory (same disk as the project).

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use outpost_e2e::daemon::Daemon;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Options {
    publishers: usize,
    seconds: u64,
    warmup: u64,
    runs: usize,
    threads: usize,
    payload: usize,
    /// Total publishes per second over all publishers; 0: as fast as PUBACKs allow.
    rate: u64,
    /// rumqttc's in-flight window per publisher.
    inflight: u16,
    /// Instead of publishing: hold this many idle connections and report resident memory.
    idle: usize,
    /// Idle connections also subscribe to their commands topic (a broker session each).
    idle_subscribe: bool,
    /// One more client subscribes to all publishers' topics (routing cost included).
    watch: bool,
    /// `outpost`, `mosquitto` or `both`.
    brokers: String,
}

fn parse_args() -> anyhow::Result<Option<Options>> {
    let mut o = Options {
        publishers: 100,
        seconds: 10,
        warmup: 2,
        runs: 1,
        threads: 1,
        payload: 100,
        rate: 0,
        inflight: 100,
        idle: 0,
        idle_subscribe: false,
        watch: false,
        brokers: "both".to_owned(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut text = || args.next().with_context(|| format!("{flag} needs a value"));
        let mut number = || -> anyhow::Result<u64> {
            let v = text()?;
            v.parse()
                .with_context(|| format!("{flag}: `{v}` is not a number"))
        };
        match flag.as_str() {
            "--publishers" => o.publishers = usize::try_from(number()?)?,
            "--seconds" => o.seconds = number()?,
            "--warmup" => o.warmup = number()?,
            "--runs" => o.runs = usize::try_from(number()?)?,
            "--threads" => o.threads = usize::try_from(number()?)?,
            "--payload" => o.payload = usize::try_from(number()?)?,
            "--rate" => o.rate = number()?,
            "--inflight" => o.inflight = u16::try_from(number()?)?,
            "--idle" => o.idle = usize::try_from(number()?)?,
            "--brokers" => o.brokers = text()?,
            "--idle-subscribe" => o.idle_subscribe = true,
            "--watch" => o.watch = true,
            "-h" | "--help" => {
                println!(
                    "mqtt-bench [--publishers 100] [--seconds 10] [--warmup 2] [--runs 1] \
                     [--threads 1 (client runtime workers)] [--payload 100] \
                     [--rate 0 (total msg/s; 0 = as fast as possible)] [--inflight 100] \
                     [--idle N (RSS with N idle connections instead)] [--idle-subscribe] [--watch] \
                     [--brokers outpost|mosquitto|both]"
                );
                return Ok(None);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if o.publishers == 0 || o.seconds == 0 || o.runs == 0 || o.threads == 0 || o.inflight == 0 {
        bail!("--publishers, --seconds, --runs, --threads and --inflight must be at least 1");
    }
    if !["outpost", "mosquitto", "both"].contains(&o.brokers.as_str()) {
        bail!("--brokers: outpost, mosquitto or both");
    }
    Ok(Some(o))
}

/// A broker under test: where it listens and its process id (for RSS).
enum Server {
    Outpost(Box<Daemon>, tempfile::TempDir),
    Mosquitto(Child, tempfile::TempDir),
}

impl Server {
    /// `watch`: Outpost's ACL also lets a client subscribe to every device's topics.
    fn start(
        kind: &str,
        max_connections: usize,
        watch: bool,
    ) -> anyhow::Result<(Server, SocketAddr)> {
        let dir = tempfile::Builder::new()
            .prefix("mqtt-bench-")
            .tempdir_in(std::env::current_dir()?)?;
        if kind == "outpost" {
            let mut config = format!(
                "[mqtt]\nlisten = \"127.0.0.1:0\"\nallow_anonymous = true\n\
                 max_connections = {max_connections}\n"
            );
            if watch {
                config.push_str("[mqtt.acl]\nsubscribe = [\"devices/#\"]\n");
            }
            let mut daemon = Daemon::start(dir.path(), &config);
            let line = daemon.wait_for_log("MQTT listener bound", Duration::from_secs(10));
            let v: serde_json::Value = serde_json::from_str(&line)?;
            let addr = v["addr"].as_str().context("addr")?.parse()?;
            return Ok((Server::Outpost(Box::new(daemon), dir), addr));
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_connections -1\nlog_dest none\n"
            ),
        )?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("run mosquitto (apt-get install mosquitto)")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                bail!("mosquitto did not listen on {addr}");
            }
            #[allow(clippy::disallowed_methods)] // blocking bench setup, no runtime here
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((Server::Mosquitto(child, dir), addr))
    }

    fn pid(&self) -> u32 {
        match self {
            Server::Outpost(d, _) => d.pid(),
            Server::Mosquitto(c, _) => c.id(),
        }
    }

    /// Stops the server: for Outpost, the records stored.
    fn stop(self) -> anyhow::Result<Option<usize>> {
        match self {
            Server::Outpost(mut d, _dir) => {
                let _ = d.terminate(Duration::from_secs(60));
                let stored = outpost_sync::OutboxReader::open(&d.data_dir.join("outbox.db"))?
                    .read_all()?
                    .len();
                Ok(Some(stored))
            }
            Server::Mosquitto(mut c, _dir) => {
                let _ = c.kill();
                let _ = c.wait();
                Ok(None)
            }
        }
    }
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")
}

/// What one publisher saw in the measured window.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let Some(o) = parse_args()? else {
        return Ok(());
    };
    let brokers: Vec<&str> = match o.brokers.as_str() {
        "both" => vec!["outpost", "mosquitto"],
        one => vec![one],
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.threads)
        .enable_all()
        .build()?;
    if o.idle > 0 {
        for kind in brokers {
            let mut figures = Vec::new();
            for run in 1..=o.runs {
                let (server, addr) = Server::start(kind, o.idle + 16, false)?;
                let before = rss_kib(server.pid())?;
                let held = runtime.block_on(idle_connections(addr, o.idle, o.idle_subscribe))?;
                runtime.block_on(async { tokio::time::sleep(Duration::from_secs(3)).await });
                let rss = rss_kib(server.pid())?;
                println!(
                    "{kind} run {run}: {held} idle connections{}: RSS {:.1} MiB (idle before: {:.1} MiB)",
                    if o.idle_subscribe {
                        " (each subscribed)"
                    } else {
                        ""
                    },
                    rss as f64 / 1024.0,
                    before as f64 / 1024.0
                );
                figures.push(rss as f64 / 1024.0);
                server.stop()?;
            }
            figures.sort_by(f64::total_cmp);
            println!(
                "{kind}: median RSS with {} idle connections: {:.1} MiB",
                o.idle,
                figures[figures.len() / 2]
            );
        }
        return Ok(());
    }
    let mode = if o.rate == 0 {
        "as fast as PUBACKs allow".to_owned()
    } else {
        format!("{} msg/s in total", o.rate)
    };
    println!(
        "mqtt-bench: {} publishers, QoS 1, {}-byte payloads, {mode}, in-flight {} per publisher, \
         {} s measured after {} s warm-up, {} run(s)",
        o.publishers, o.payload, o.inflight, o.seconds, o.warmup, o.runs
    );
    // Runs alternate between the brokers, so a slow phase of the machine hits both.
    let mut figures = vec![Vec::new(); brokers.len()];
    for run in 1..=o.runs {
        for (kind, f) in brokers.iter().zip(&mut figures) {
            f.push(one_run(&o, &runtime, kind, run)?);
        }
    }
    let mut medians = Vec::new();
    for (kind, figures) in brokers.iter().zip(figures) {
        let mut rates: Vec<f64> = figures.iter().map(|f| f.0).collect();
        let mut p99s: Vec<f64> = figures.iter().map(|f| f.2).collect();
        rates.sort_by(f64::total_cmp);
        p99s.sort_by(f64::total_cmp);
        let (rate, p99) = (rates[rates.len() / 2], p99s[p99s.len() / 2]);
        println!(
            "{kind}: median of {} runs: {rate:.0} msg/s PUBACKed, p99 publish->PUBACK {p99:.2} ms",
            o.runs
        );
        medians.push((kind, rate, p99));
    }
    if let [(_, outpost, op99), (_, mosquitto, mp99)] = medians[..] {
        println!(
            "ratio outpost/mosquitto: throughput {:.2}, p99 latency {:.2}",
            outpost / mosquitto,
            op99 / mp99
        );
    }
    Ok(())
}

fn one_run(
    o: &Options,
    runtime: &tokio::runtime::Runtime,
    kind: &str,
    run: usize,
) -> anyhow::Result<(f64, f64, f64, f64)> {
    let (server, addr) = Server::start(kind, o.publishers + 16, o.watch)?;
    let measure = Duration::from_secs(o.seconds);
    let warmup = Duration::from_secs(o.warmup);
    let payload = bytes::Bytes::from(vec![b'x'; o.payload]);
    let (tallies, watched) = runtime.block_on(async {
        let start = Instant::now() + Duration::from_millis(500);
        let window = (start + warmup, start + warmup + measure);
        let watcher = if o.watch {
            let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(watcher(addr, window, subscribed_tx));
            subscribed.await.context("the watcher's SUBACK")?;
            Some(task)
        } else {
            None
        };
        let mut tasks = Vec::new();
        for i in 0..o.publishers {
            // Spread the publishers' ticks over one period.
            let period =
                (o.rate > 0).then(|| Duration::from_secs_f64(o.publishers as f64 / o.rate as f64));
            let offset = period.map_or(Duration::ZERO, |p| {
                p.mul_f64(i as f64 / o.publishers as f64)
            });
            tasks.push(tokio::spawn(publisher(
                i,
                addr,
                o.inflight,
                payload.clone(),
                period,
                start + offset,
                window,
            )));
        }
        let mut tallies = Vec::new();
        for t in tasks {
            tallies.push(t.await??);
        }
        let watched = match watcher {
            Some(w) => Some(w.await??),
            None => None,
        };
        anyhow::Ok((tallies, watched))
    })?;
    let mut latencies: Vec<u32> = tallies
        .iter()
        .flat_map(|t| t.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let errors: Vec<&String> = tallies.iter().flat_map(|t| &t.errors).collect();
    let acked = latencies.len();
    let rate = acked as f64 / measure.as_secs_f64();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        f64::from(latencies[i]) / 1000.0
    };
    let (p50, p99, max) = (pct(0.50), pct(0.99), pct(1.0));
    let stored = server.stop()?;
    println!(
        "{kind} run {run}: {acked} PUBACKs in {:.0} s = {rate:.0} msg/s; publish->PUBACK p50 \
         {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms; {} errors{}",
        measure.as_secs_f64(),
        errors.len(),
        stored.map_or(String::new(), |n| format!(
            "; {n} records in the outbox (warm-up included)"
        )),
    );
    if let Some(first) = errors.first() {
        println!("  first error: {first}");
    }
    if let Some(n) = watched {
        println!(
            "  watcher: {n} messages received in the window = {:.0} msg/s",
            n as f64 / measure.as_secs_f64()
        );
    }
    Ok((rate, p50, p99, max))
}

/// The `--watch` subscriber: QoS 0 on every publisher's topic; counts the messages that arrive
/// inside the window. Tells `subscribed` once the SUBACK is in.
async fn watcher(
    addr: SocketAddr,
    (from, until): (Instant, Instant),
    subscribed: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<u64> {
    let mut options = MqttOptions::new("bench-watch", addr.ip().to_string(), addr.port());
    options
        .set_keep_alive(Duration::from_secs(60))
        .set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client
        .subscribe("devices/anonymous/+/t", QoS::AtMostOnce)
        .await?;
    let mut subscribed = Some(subscribed);
    let mut received = 0u64;
    loop {
        let event = match tokio::time::timeout_at(until.into(), eventloop.poll()).await {
            Err(_) => return Ok(received),
            Ok(e) => e.context("watcher")?,
        };
        match event {
            Event::Incoming(Packet::SubAck(ack)) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure))
                {
                    bail!("the watcher's subscription was refused");
                }
                if let Some(s) = subscribed.take() {
                    let _ = s.send(());
                }
            }
            Event::Incoming(Packet::Publish(_)) if Instant::now() >= from => received += 1,
            _ => {}
        }
    }
}

/// One publisher: QoS 1 publishes back to back (or every `period`) until the end of the
/// window; PUBACKs whose publish was made inside the window count.
async fn publisher(
    i: usize,
    addr: SocketAddr,
    inflight: u16,
    payload: bytes::Bytes,
    period: Option<Duration>,
    start: Instant,
    (from, until): (Instant, Instant),
) -> anyhow::Result<Tally> {
    let id = format!("bench-{i}");
    let topic = format!("devices/anonymous/{id}/t");
    let mut options = MqttOptions::new(&id, addr.ip().to_string(), addr.port());
    options
        .set_keep_alive(Duration::from_secs(60))
        .set_inflight(inflight)
        .set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(options, usize::from(inflight));
    // Publish call times, in call order: rumqttc sends them in that order.
    let called: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
    let producer = {
        let called = Arc::clone(&called);
        tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let mut ticks = period.map(|p| {
                let mut t = tokio::time::interval(p);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            loop {
                if let Some(t) = &mut ticks {
                    t.tick().await;
                }
                let now = Instant::now();
                if now >= until {
                    return;
                }
                called.lock().unwrap().push_back(now);
                if client
                    .publish_bytes(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    let mut sent: Vec<Option<Instant>> = vec![None; usize::from(u16::MAX) + 1];
    let mut outstanding = 0usize;
    let mut tally = Tally::default();
    let drain_until = until + Duration::from_secs(5);
    loop {
        let event = match tokio::time::timeout_at(drain_until.into(), eventloop.poll()).await {
            Err(_) => break,
            Ok(Ok(e)) => e,
            Ok(Err(e)) => {
                tally.errors.push(format!("publisher {i}: {e}"));
                break;
            }
        };
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                sent[usize::from(pkid)] = called.lock().unwrap().pop_front();
                outstanding += 1;
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let t = sent[usize::from(ack.pkid)].take();
                outstanding -= usize::from(t.is_some());
                if let Some(t) = t
                    && t >= from
                    && t < until
                {
                    let us = t.elapsed().as_micros();
                    tally
                        .latencies_us
                        .push(u32::try_from(us).unwrap_or(u32::MAX));
                }
            }
            _ => {}
        }
        if outstanding == 0 && producer.is_finished() {
            break;
        }
    }
    producer.abort();
    Ok(tally)
}

/// Opens `n` MQTT 3.1.1 connections (raw CONNECT, keep-alive 600 s; with `subscribe` each then
/// subscribes to `devices/anonymous/idle-<i>/commands/#`) and keeps them open in background
/// tasks; returns how many got CONNACK 0 (and SUBACK 0).
async fn idle_connections(addr: SocketAddr, n: usize, subscribe: bool) -> anyhow::Result<usize> {
    let mut ok = 0;
    for i in 0..n {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let id = format!("idle-{i}");
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0x02, 0x58];
        body.extend_from_slice(&u16::try_from(id.len())?.to_be_bytes());
        body.extend_from_slice(id.as_bytes());
        let mut packet = vec![0x10, u8::try_from(body.len())?];
        packet.extend(body);
        s.write_all(&packet).await?;
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).await?;
        let mut good = ack == [0x20, 2, 0, 0];
        if subscribe {
            let filter = format!("devices/anonymous/{id}/commands/#");
            let mut body = vec![0, 1];
            body.extend_from_slice(&u16::try_from(filter.len())?.to_be_bytes());
            body.extend_from_slice(filter.as_bytes());
            body.push(1);
            let mut packet = vec![0x82, u8::try_from(body.len())?];
            packet.extend(body);
            s.write_all(&packet).await?;
            let mut suback = [0u8; 5];
            s.read_exact(&mut suback).await?;
            good &= suback == [0x90, 3, 0, 1, 1];
        }
        if good {
            ok += 1;
        }
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        });
    }
    Ok(ok)
}
