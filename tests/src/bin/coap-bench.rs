//! CoAP ingestion benchmark: N concurrent clients, each with its own UDP socket and device,
//! sending Confirmable POSTs of one JSON reading back to back (the next request after the ACK).
//! Reports committed records per second (2.01 ACKs, which the daemon sends only after the
//! outbox commit) and the request→ACK latency percentiles. Not a test: figures are written down
//! in docs/BENCHMARKS.md, never asserted.
//!
//! ```sh
//! cargo build --release -p outpost -p outpost-e2e --bins
//! target/release/coap-bench --clients 100 --seconds 10 --runs 3
//! ```
//!
//! The bench starts the `outpost` binary next to itself (or `$OUTPOST_BIN`) on a fresh data
//! directory under the current one (same disk as the project), registers one device per client
//! through the REST API, and measures after a warm-up.

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use outpost_e2e::coap::{self, Message};
use outpost_e2e::daemon::Daemon;
use outpost_e2e::http::request;
use outpost_sync::OutboxReader;
use tokio::net::UdpSocket;

const ADMIN_TOKEN: &str = "coap-bench-admin-token-0123456789";
/// First retransmission timeout (RFC 7252 ACK_TIMEOUT is 2 s; the bench is on loopback).
const RETRANSMIT_AFTER: Duration = Duration::from_secs(2);

struct Options {
    clients: usize,
    seconds: u64,
    warmup: u64,
    runs: usize,
    threads: usize,
    payload: usize,
}

/// The options, or `None` after printing the usage.
fn parse_args() -> anyhow::Result<Option<Options>> {
    let mut o = Options {
        clients: 100,
        seconds: 10,
        warmup: 2,
        runs: 1,
        threads: 1,
        payload: 64,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || -> anyhow::Result<usize> {
            let v = args
                .next()
                .with_context(|| format!("{flag} needs a value"))?;
            v.parse()
                .with_context(|| format!("{flag}: `{v}` is not a number"))
        };
        match flag.as_str() {
            "--clients" => o.clients = value()?,
            "--seconds" => o.seconds = value()? as u64,
            "--warmup" => o.warmup = value()? as u64,
            "--runs" => o.runs = value()?,
            "--threads" => o.threads = value()?,
            "--payload" => o.payload = value()?,
            "-h" | "--help" => {
                println!(
                    "coap-bench [--clients 100] [--seconds 10] [--warmup 2] [--runs 1] \
                     [--threads 1 (client runtime workers)] [--payload 64 (JSON bytes)]"
                );
                return Ok(None);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if o.clients == 0 || o.seconds == 0 || o.runs == 0 || o.threads == 0 {
        bail!("--clients, --seconds, --runs and --threads must be at least 1");
    }
    Ok(Some(o))
}

/// What one client saw during the measured window.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: Vec<String>,
    retransmissions: u64,
}

fn main() -> anyhow::Result<()> {
    let Some(o) = parse_args()? else {
        return Ok(());
    };
    println!(
        "coap-bench: {} clients, {} s measured after {} s warm-up, {} run(s), {}-byte JSON payloads",
        o.clients, o.seconds, o.warmup, o.runs, o.payload
    );
    let mut figures = Vec::new();
    for run in 1..=o.runs {
        let (rate, p50, p99, max) = one_run(&o, run)?;
        figures.push((rate, p50, p99, max));
    }
    if o.runs > 1 {
        let mut rates: Vec<f64> = figures.iter().map(|f| f.0).collect();
        let mut p99s: Vec<f64> = figures.iter().map(|f| f.2).collect();
        rates.sort_by(f64::total_cmp);
        p99s.sort_by(f64::total_cmp);
        println!(
            "median of {} runs: {:.0} committed records/s, p99 request->ACK {:.2} ms",
            o.runs,
            rates[rates.len() / 2],
            p99s[p99s.len() / 2]
        );
    }
    Ok(())
}

fn one_run(o: &Options, run: usize) -> anyhow::Result<(f64, f64, f64, f64)> {
    let base = std::env::current_dir()?;
    let dir = tempfile::Builder::new()
        .prefix("coap-bench-")
        .tempdir_in(&base)?;
    let config = format!(
        "[[api.tokens]]\nname = \"bench\"\nsha256 = \"{}\"\nscopes = [\"admin\"]\n",
        sha256_hex(ADMIN_TOKEN)
    );
    let mut daemon = Daemon::start(dir.path(), &config);
    let server = coap::coap_addr(&mut daemon);
    let auth = format!("Bearer {ADMIN_TOKEN}");
    for i in 0..o.clients {
        let r = request(
            daemon.admin,
            "POST",
            "/api/v1/devices",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            format!(r#"{{"id":"bench-{i}","protocols":["coap"]}}"#).as_bytes(),
        );
        if r.status != 201 {
            bail!("registering bench-{i}: {} {}", r.status, r.text());
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.threads)
        .enable_all()
        .build()?;
    let measure = Duration::from_secs(o.seconds);
    let warmup = Duration::from_secs(o.warmup);
    let payload = Arc::new(json_payload(o.payload));
    let (tallies, elapsed) = runtime.block_on(async {
        let start = Instant::now();
        let window = (start + warmup, start + warmup + measure);
        let mut tasks = Vec::new();
        for i in 0..o.clients {
            tasks.push(tokio::spawn(client(
                i,
                server,
                Arc::clone(&payload),
                window,
            )));
        }
        let mut tallies = Vec::new();
        for t in tasks {
            tallies.push(t.await??);
        }
        anyhow::Ok((tallies, measure))
    })?;

    let mut latencies: Vec<u32> = tallies
        .iter()
        .flat_map(|t| t.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let errors: Vec<&String> = tallies.iter().flat_map(|t| &t.errors).collect();
    let retransmissions: u64 = tallies.iter().map(|t| t.retransmissions).sum();
    let acked = latencies.len();
    let rate = acked as f64 / elapsed.as_secs_f64();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        f64::from(latencies[i]) / 1000.0
    };
    let (p50, p99, max) = (pct(0.50), pct(0.99), pct(1.0));

    // Cross-check: every 2.01 is a committed record.
    let (status, _) = daemon.terminate(Duration::from_secs(30));
    let stored = OutboxReader::open(&daemon.data_dir.join("outbox.db"))?
        .read_all()?
        .len();
    println!(
        "run {run}: {acked} records ACKed (2.01) in {:.1} s = {rate:.0} committed records/s; \
         request->ACK p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms; {} errors, {} retransmissions; \
         {stored} records in the outbox after the run (warm-up included); daemon exit {status}",
        elapsed.as_secs_f64(),
        errors.len(),
        retransmissions,
    );
    if let Some(first) = errors.first() {
        println!("  first error: {first}");
    }
    Ok((rate, p50, p99, max))
}

/// One client: back-to-back CON POSTs until the end of the window. Only requests started inside
/// the measured window count.
async fn client(
    i: usize,
    server: SocketAddr,
    payload: Arc<Vec<u8>>,
    (from, until): (Instant, Instant),
) -> anyhow::Result<Tally> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(server).await?;
    let device = format!("bench-{i}");
    let topic = format!("bench/{i}");
    let mut tally = Tally::default();
    let mut mid: u16 = (i as u16).wrapping_mul(613);
    let mut buf = vec![0u8; 2048];
    loop {
        let started = Instant::now();
        if started >= until {
            return Ok(tally);
        }
        mid = mid.wrapping_add(1);
        let bytes = Message::post(mid, &topic, &device, 50, &payload).encode();
        let mut timeout = RETRANSMIT_AFTER;
        let answer = 'attempts: {
            for attempt in 0..5 {
                if attempt > 0 {
                    tally.retransmissions += 1;
                }
                socket.send(&bytes).await?;
                let deadline = tokio::time::Instant::now() + timeout;
                loop {
                    match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                        Err(_) => break,
                        Ok(Err(e)) => bail!("client {i}: {e}"),
                        Ok(Ok(n)) => {
                            if let Some(m) = Message::decode(&buf[..n]).filter(|m| m.mid == mid) {
                                break 'attempts Some(m);
                            }
                        }
                    }
                }
                timeout *= 2;
            }
            None
        };
        let counted = started >= from;
        match answer {
            Some(m) if m.code_text() == "2.01" => {
                if counted {
                    tally
                        .latencies_us
                        .push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                }
            }
            Some(m) => {
                if counted {
                    tally.errors.push(format!("{} {}", m.code_text(), m.text()));
                }
                // Back off as told (Max-Age), like a device would.
                let wait = m.uint_option(coap::MAX_AGE).unwrap_or(1).min(5);
                tokio::time::sleep(Duration::from_millis(u64::from(wait) * 100)).await;
            }
            None => tally
                .errors
                .push(format!("message {mid}: no answer after 5 transmissions")),
        }
    }
}

/// A JSON object of about `size` bytes.
fn json_payload(size: usize) -> Vec<u8> {
    let base = r#"{"temp":21.5,"hum":40.2,"pad":""}"#;
    let pad = size.saturating_sub(base.len());
    format!(r#"{{"temp":21.5,"hum":40.2,"pad":"{}"}}"#, "x".repeat(pad)).into_bytes()
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
