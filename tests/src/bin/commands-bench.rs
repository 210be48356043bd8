//! Commands-from-Kafka benchmark (docs/BENCHMARKS.md, "Commands from the cloud"). Not a test:
//! figures are written down, never asserted.
//!
//! ```sh
//! cargo build --release -p outpost -p outpost-e2e --bins
//! target/release/commands-bench [--runs 3] [--latency-commands 2000] [--burst 20000] [--idle 60]
//! ```
//!
//! Each run starts tansu (a real Kafka-protocol broker) and the daemon (`outpost` next to this
//! binary, or `$OUTPOST_BIN`) with `kafka.commands.enabled`, and measures:
//! The latency and throughput daemons set `kafka.commands.fetch_wait = "10ms"` (see [`config`]:
//! tansu holds a fetch for half its wait even when records arrive); the idle ones keep 5 s.
//!
//! * **latency**: an rdkafka producer (`partitioner=murmur2_random`, as a backend would) sends
//!   `--latency-commands` commands at 100/s to one MQTT device, each carrying its send time;
//!   `mosquitto_sub` as the device prints its own receipt time (`%U`). Latency is receipt minus
//!   send: Kafka produce, the gateway's fetch, the registry commit, the MQTT delivery.
//! * **throughput**: with the daemon stopped, `--burst` commands for 200 HTTP devices (100 each,
//!   the queue bound) are produced; the daemon is started and the time from its first stored
//!   command to the last (`outpost_kafka_commands_read_total`, polled every 20 ms) gives the rate
//!   into the device queues.
//! * **idle cost**: the same daemon with commands on and with commands off, each left alone for
//!   `--idle` seconds once ready: CPU share of a core and VmRSS at the end; the difference is
//!   the commands consumer's cost.

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: a blocking bench, no async runtime

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use outpost_e2e::admin::{admin_token_config, create_device};
use outpost_e2e::daemon::{Daemon, cpu_seconds, proc_status_kib};
use outpost_e2e::kafka::Tansu;
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const COMMANDS: &str = "outpost.commands";
const STATUS: &str = "outpost.command-status";
const READINGS: &str = "outpost.readings";

struct Options {
    runs: usize,
    latency_commands: usize,
    burst: usize,
    idle: u64,
}

fn parse_args() -> anyhow::Result<Option<Options>> {
    let mut o = Options {
        runs: 3,
        latency_commands: 2000,
        burst: 20_000,
        idle: 60,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--runs" => o.runs = value()?.parse()?,
            "--latency-commands" => o.latency_commands = value()?.parse()?,
            "--burst" => o.burst = value()?.parse()?,
            "--idle" => o.idle = value()?.parse()?,
            "-h" | "--help" => {
                println!(
                    "commands-bench [--runs 3] [--latency-commands 2000] [--burst 20000 (at most \
                     20000)] [--idle 60]"
                );
                return Ok(None);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if o.runs == 0 || o.burst == 0 || o.burst > 20_000 || o.latency_commands == 0 {
        bail!("--runs, --latency-commands and --burst (at most 20000) must be at least 1");
    }
    Ok(Some(o))
}

fn binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("OUTPOST_BIN") {
        return Ok(PathBuf::from(bin));
    }
    Ok(std::env::current_exe()?.with_file_name("outpost"))
}

/// The daemon's config. `busy` lowers `kafka.commands.fetch_wait` to its minimum (10 ms) for
/// the latency and throughput figures: tansu 0.6 does not answer a fetch when a record arrives
/// but looks again after half the remaining wait (tansu-storage `service/fetch.rs`), so at the
/// default 5 s it would add up to 2.5 s to every command. Apache Kafka answers at once; the
/// idle figure keeps the default.
fn config(kafka: &Tansu, commands: bool, busy: bool) -> String {
    let fetch_wait = if busy { "10ms" } else { "5s" };
    format!(
        "{}\n[kafka]\nenabled = true\nbrokers = [\"{}\"]\n\n[kafka.commands]\n\
         enabled = {commands}\nfetch_wait = \"{fetch_wait}\"\n",
        admin_token_config(),
        kafka.bootstrap()
    )
}

fn producer(kafka: &Tansu) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "0")
        .create()
        .unwrap()
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Latencies in ms of `n` commands at 100/s to an online MQTT device: (p50, p99, max).
fn latency(bin: &Path, n: usize) -> anyhow::Result<(f64, f64, f64)> {
    let kafka = Tansu::start(&[(COMMANDS, 4), (STATUS, 1), (READINGS, 1)]);
    let dir = tempfile::tempdir()?;
    let mut d = Daemon::start_other(bin, dir.path(), &config(&kafka, true, true));
    let line = d.wait_for_log("MQTT listener bound", Duration::from_secs(10));
    let v: serde_json::Value = serde_json::from_str(&line)?;
    let addr: std::net::SocketAddr = v["addr"].as_str().unwrap().parse()?;
    let gateway = d.status()["gateway_id"].as_str().unwrap().to_owned();
    let secret = create_device(&d, "valve-1", Some(r#"["mqtt"]"#));
    d.wait_for_log("Reading commands", Duration::from_secs(30));
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args([
            "-V",
            "5",
            "-u",
            "valve-1",
            "-P",
            &secret,
            "-i",
            "valve-1-bench",
        ])
        .args(["-q", "1", "-t", "devices/valve-1/commands/#", "-F", "%U %p"])
        .args(["-C", &n.to_string(), "-W", &(n / 100 + 60).to_string()])
        .stdout(Stdio::piped())
        .spawn()?;
    // Read the device's output while producing: a full pipe would stop mosquitto_sub reading
    // its socket, and the commands would pile up in the gateway instead.
    let stdout = sub.stdout.take().unwrap();
    let reader = std::thread::spawn(move || -> anyhow::Result<Vec<String>> {
        BufReader::new(stdout)
            .lines()
            .collect::<Result<Vec<_>, _>>()
            .map_err(Into::into)
    });
    std::thread::sleep(Duration::from_secs(1));
    let p = producer(&kafka);
    let start = Instant::now();
    for i in 0..n {
        let due = start + Duration::from_millis(10 * i as u64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let value = serde_json::json!({
            "id": format!("lat-{i}"), "device": "valve-1", "name": "set",
            "payload": {"sent_ns": now_ns().to_string()}, "ttl_s": 600
        })
        .to_string();
        p.send(BaseRecord::to(COMMANDS).key(&gateway).payload(&value))
            .map_err(|(e, _)| e)?;
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(30))?;
    let mut lat = Vec::with_capacity(n);
    let lines = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reader panicked"))??;
    for line in lines {
        let (at, payload) = line.split_once(' ').context("mosquitto_sub line")?;
        let (secs, nanos) = at.split_once('.').context("%U")?;
        let received = secs.parse::<u128>()? * 1_000_000_000 + nanos.parse::<u128>()?;
        let v: serde_json::Value = serde_json::from_str(payload)?;
        let sent: u128 = v["sent_ns"].as_str().unwrap().parse()?;
        lat.push((received.saturating_sub(sent)) as f64 / 1e6);
    }
    sub.wait()?;
    if lat.len() < n {
        // What became of the others: the registry's view and the daemon's warnings.
        let listed =
            outpost_e2e::admin::admin(&d, "GET", "/api/v1/devices/valve-1/commands?limit=1000", "");
        let mut states = std::collections::BTreeMap::<String, usize>::new();
        for c in listed.json()["commands"].as_array().into_iter().flatten() {
            *states.entry(c["state"].to_string()).or_default() += 1;
        }
        let read = d.metric("outpost_kafka_commands_read_total");
        let warnings: Vec<String> = d
            .logs()
            .into_iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(20)
            .collect();
        d.terminate(Duration::from_secs(30));
        bail!(
            "only {} of {n} commands arrived; read from Kafka: {}; registry: {states:?}; \
             warnings: {warnings:#?}",
            lat.len(),
            read
        );
    }
    d.terminate(Duration::from_secs(30));
    lat.sort_by(f64::total_cmp);
    Ok((
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat[lat.len() - 1],
    ))
}

/// Commands per second into the device queues, reading a backlog of `n`.
fn throughput(bin: &Path, n: usize) -> anyhow::Result<f64> {
    let kafka = Tansu::start(&[(COMMANDS, 4), (STATUS, 1), (READINGS, 1)]);
    let dir = tempfile::tempdir()?;
    let config = config(&kafka, true, true);
    let mut d = Daemon::start_other(bin, dir.path(), &config);
    let gateway = d.status()["gateway_id"].as_str().unwrap().to_owned();
    let devices = n.div_ceil(100);
    for i in 0..devices {
        create_device(&d, &format!("d-{i}"), Some(r#"["http"]"#));
    }
    d.wait_for_log("Reading commands", Duration::from_secs(30));
    d.terminate(Duration::from_secs(30));
    let p = producer(&kafka);
    for i in 0..n {
        let value = serde_json::json!({
            "id": format!("tp-{i}"), "device": format!("d-{}", i % devices), "name": "set",
            "payload": {"i": i}, "ttl_s": 3600
        })
        .to_string();
        loop {
            match p.send(BaseRecord::to(COMMANDS).key(&gateway).payload(&value)) {
                Ok(()) => break,
                Err(_) => {
                    p.poll(Duration::from_millis(10));
                }
            }
        }
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(60))?;
    let d = Daemon::start_other(bin, dir.path(), &config);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut first: Option<Instant> = None;
    loop {
        let read = d.metric("outpost_kafka_commands_read_total");
        if read > 0.0 && first.is_none() {
            first = Some(Instant::now());
        }
        if read >= n as f64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {read} of {n} commands stored in 5 min");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = first.unwrap().elapsed().as_secs_f64().max(0.001);
    let mut d = d;
    d.terminate(Duration::from_secs(30));
    Ok(n as f64 / wall)
}

/// (CPU % of a core, VmRSS MiB) of a daemon left idle for `idle` seconds.
fn idle(bin: &Path, commands: bool, idle: u64) -> anyhow::Result<(f64, f64)> {
    let kafka = Tansu::start(&[(COMMANDS, 4), (STATUS, 1), (READINGS, 1)]);
    let dir = tempfile::tempdir()?;
    let mut d = Daemon::start_other(bin, dir.path(), &config(&kafka, commands, false));
    if commands {
        d.wait_for_log("Reading commands", Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_secs(5));
    let pid = d.pid();
    let (t0, cpu0) = (Instant::now(), cpu_seconds(pid)?);
    std::thread::sleep(Duration::from_secs(idle));
    let share = (cpu_seconds(pid)? - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let rss = proc_status_kib(pid, "VmRSS") as f64 / 1024.0;
    d.terminate(Duration::from_secs(30));
    Ok((share, rss))
}

fn main() -> anyhow::Result<()> {
    let Some(o) = parse_args()? else {
        return Ok(());
    };
    let bin = binary()?;
    println!(
        "commands-bench: {} run(s); latency over {} commands at 100/s; a burst of {}; idle {} s",
        o.runs, o.latency_commands, o.burst, o.idle
    );
    let (mut p50s, mut p99s, mut rates) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cpu_on, mut cpu_off, mut rss_on, mut rss_off) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=o.runs {
        let (p50, p99, max) = latency(&bin, o.latency_commands)?;
        println!("run {run}: latency p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms");
        let rate = throughput(&bin, o.burst)?;
        println!("run {run}: {rate:.0} commands/s into the device queues");
        let (on_cpu, on_rss) = idle(&bin, true, o.idle)?;
        let (off_cpu, off_rss) = idle(&bin, false, o.idle)?;
        println!(
            "run {run}: idle with commands {on_cpu:.2} % of a core, {on_rss:.1} MiB; without \
             {off_cpu:.2} %, {off_rss:.1} MiB"
        );
        p50s.push(p50);
        p99s.push(p99);
        rates.push(rate);
        cpu_on.push(on_cpu);
        cpu_off.push(off_cpu);
        rss_on.push(on_rss);
        rss_off.push(off_rss);
    }
    let (on_cpu, off_cpu, on_rss, off_rss) = (
        median(cpu_on),
        median(cpu_off),
        median(rss_on),
        median(rss_off),
    );
    println!(
        "median of {} runs: latency p50 {:.1} ms, p99 {:.1} ms; {:.0} commands/s; idle: commands \
         on {on_cpu:.2} % / {on_rss:.1} MiB, off {off_cpu:.2} % / {off_rss:.1} MiB, the consumer \
         {:.2} % of a core and {:.1} MiB",
        o.runs,
        median(p50s),
        median(p99s),
        median(rates),
        on_cpu - off_cpu,
        on_rss - off_rss
    );
    Ok(())
}
