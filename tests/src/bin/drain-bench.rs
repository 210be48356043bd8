//! Backlog drain benchmark: what the daemon's CPU costs while the forwarder drains a backlog at
//! `kafka.backlog_rate`. Not a test: figures are written down in docs/BENCHMARKS.md, never
//! asserted.
//!
//! ```sh
//! cargo build --release -p outpost -p outpost-e2e --bins
//! target/release/drain-bench --records 300000 --runs 3 [--rate 20000] [--brokers outpost,before]
//! ```
//!
//! Once: a daemon with Kafka off stores `--records` readings of one device (HTTP ingestion,
//! 1,000 per request, ~40-byte JSON payloads) and stops; that data directory is the template.
//! Each run copies the template into a fresh directory, starts a librdkafka mock cluster and the
//! daemon (`outpost` next to this binary, or `$OUTPOST_BIN`; `before` is `$OUTPOST_BEFORE_BIN`)
//! with Kafka on and everything else default, and measures from the daemon's readiness until
//! the outbox is empty: wall time, and the daemon's CPU (user + system, all threads) over it.
//! "% of a core" is CPU over wall time. The status is polled every 100 ms (its cost is included).
//! With `--idle N`, each run then leaves the drained daemon connected to the mock cluster for
//! N seconds and measures its idle CPU the same way (nothing is polled meanwhile).

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: a blocking bench, no async runtime

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use outpost_e2e::admin::{admin_token_config, create_device};
use outpost_e2e::daemon::{Daemon, cpu_seconds, thread_cpu_seconds};
use outpost_e2e::http::request;
use outpost_e2e::kafka::MockKafka;

const TOPIC: &str = "outpost.readings";

struct Options {
    records: usize,
    runs: usize,
    rate: Option<u32>,
    brokers: Vec<String>,
    /// Seconds of idle measurement after each drain (0: none).
    idle: u64,
}

fn parse_args() -> anyhow::Result<Option<Options>> {
    let mut o = Options {
        records: 300_000,
        runs: 3,
        rate: None,
        brokers: vec!["outpost".to_owned()],
        idle: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--records" => o.records = value()?.parse()?,
            "--runs" => o.runs = value()?.parse()?,
            "--rate" => o.rate = Some(value()?.parse()?),
            "--brokers" => o.brokers = value()?.split(',').map(str::to_owned).collect(),
            "--idle" => o.idle = value()?.parse()?,
            "-h" | "--help" => {
                println!(
                    "drain-bench [--records 300000] [--runs 3] [--rate N (kafka.backlog_rate; \
                     default: the daemon's default)] [--brokers outpost[,before]] \
                     [--idle SECONDS (idle CPU after each drain)]"
                );
                return Ok(None);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if o.records == 0 || o.runs == 0 {
        bail!("--records and --runs must be at least 1");
    }
    Ok(Some(o))
}

fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let var = match name {
        "outpost" => "OUTPOST_BIN",
        "before" => "OUTPOST_BEFORE_BIN",
        other => bail!("unknown --brokers entry {other}: outpost or before"),
    };
    if let Some(bin) = std::env::var_os(var) {
        return Ok(PathBuf::from(bin));
    }
    if name == "before" {
        bail!("`before` needs OUTPOST_BEFORE_BIN");
    }
    let exe = std::env::current_exe()?;
    Ok(exe.with_file_name("outpost"))
}

/// Stores `records` readings with Kafka off, with `bin` (each binary fills its own: an older one
/// refuses a newer outbox schema); returns the stopped daemon's data directory.
fn fill(bin: &Path, dir: &Path, records: usize) -> anyhow::Result<PathBuf> {
    let mut d = Daemon::start_other(bin, dir, &admin_token_config());
    let secret = create_device(&d, "drain-1", None);
    let auth = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("drain-1:{secret}")
        )
    );
    let mut n = 0;
    while n < records {
        let batch = (records - n).min(1000);
        let body: Vec<String> = (n..n + batch)
            .map(|i| format!("{{\"n\":{i},\"t\":21.5,\"unit\":\"C\"}}"))
            .collect();
        let r = request(
            d.admin,
            "POST",
            "/api/v1/ingest/t",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            format!("[{}]", body.join(",")).as_bytes(),
        );
        if r.status != 201 {
            bail!("ingest: {} {}", r.status, r.text());
        }
        n += batch;
    }
    let (exit, _) = d.terminate(Duration::from_secs(30));
    if !exit.success() {
        bail!("the filling daemon did not stop cleanly");
    }
    Ok(dir.join("data"))
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// Each thread's CPU seconds since `before` (the threads that used at least 1 % of `total`),
/// most first.
fn thread_breakdown(
    pid: u32,
    before: &std::collections::BTreeMap<String, f64>,
    total: f64,
) -> anyhow::Result<String> {
    let mut threads: Vec<(String, f64)> = thread_cpu_seconds(pid)?
        .into_iter()
        .map(|(name, c)| {
            let used = c - before.get(&name).copied().unwrap_or(0.0);
            (name, used)
        })
        .filter(|(_, used)| *used >= total / 100.0)
        .collect();
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    let threads: Vec<String> = threads
        .iter()
        .map(|(name, c)| format!("{name} {c:.2}"))
        .collect();
    Ok(threads.join(", "))
}

/// One drain: (wall seconds, CPU seconds, idle share of a core in % if measured).
fn one_run(bin: &Path, template: &Path, o: &Options) -> anyhow::Result<(f64, f64, Option<f64>)> {
    let dir = tempfile::Builder::new()
        .prefix("drain-bench-")
        .tempdir_in(std::env::current_dir()?)?;
    copy_dir(template, &dir.path().join("data"))?;
    let kafka = MockKafka::start(1, &[(TOPIC, 3)]);
    let brokers: Vec<String> = kafka
        .bootstrap()
        .split(',')
        .map(|b| format!("\"{b}\""))
        .collect();
    let rate = o
        .rate
        .map(|r| format!("backlog_rate = {r}\n"))
        .unwrap_or_default();
    let config = format!(
        "{}\n[kafka]\nenabled = true\nbrokers = [{}]\n{rate}",
        admin_token_config(),
        brokers.join(", ")
    );
    let mut d = Daemon::start_other(bin, dir.path(), &config);
    let pid = d.pid();
    let (t0, cpu0) = (Instant::now(), cpu_seconds(pid)?);
    let (threads0, commits0) = (
        thread_cpu_seconds(pid)?,
        d.metric("outpost_outbox_commits_total"),
    );
    let deadline = t0 + Duration::from_secs(1800);
    loop {
        let status = d.status();
        if status["outbox"]["records"].as_u64() == Some(0)
            && status["kafka"]["in_flight"].as_u64() == Some(0)
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the backlog did not drain in 30 min: {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds(pid)? - cpu0);
    // Where the CPU went (the threads that used at least 1 % of it) and how many outbox
    // commits (appends and deletes) the drain took: the first things to look at when the share
    // moves.
    println!(
        "  threads (CPU s): {}; outbox commits: {:.0}",
        thread_breakdown(pid, &threads0, cpu)?,
        d.metric("outpost_outbox_commits_total") - commits0
    );
    let status = d.status();
    let delivered = status["kafka"]["delivered"].as_u64().unwrap_or(0);
    if delivered < o.records as u64 {
        bail!(
            "only {delivered} of {} records delivered: {status}",
            o.records
        );
    }
    let idle = if o.idle > 0 {
        // Let the last deletes and reports settle, then measure without touching the daemon.
        std::thread::sleep(Duration::from_secs(2));
        let (t0, cpu0, threads0) = (Instant::now(), cpu_seconds(pid)?, thread_cpu_seconds(pid)?);
        std::thread::sleep(Duration::from_secs(o.idle));
        let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds(pid)? - cpu0);
        println!(
            "  idle {wall:.0} s: CPU {cpu:.3} s = {:.2} % of a core; threads (CPU s): {}",
            cpu / wall * 100.0,
            thread_breakdown(pid, &threads0, cpu)?
        );
        Some(cpu / wall * 100.0)
    } else {
        None
    };
    d.terminate(Duration::from_secs(30));
    Ok((wall, cpu, idle))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let Some(o) = parse_args()? else {
        return Ok(());
    };
    let rate = o.rate.map_or("the default backlog_rate".to_owned(), |r| {
        format!("backlog_rate {r}")
    });
    println!(
        "drain-bench: {} records of one device, {rate}, {} run(s) per binary",
        o.records, o.runs
    );
    let bins: Vec<(String, PathBuf)> = o
        .brokers
        .iter()
        .map(|name| Ok((name.clone(), binary(name)?)))
        .collect::<anyhow::Result<_>>()?;
    let mut templates = Vec::new();
    for (name, bin) in &bins {
        let dir = tempfile::Builder::new()
            .prefix("drain-bench-template-")
            .tempdir_in(std::env::current_dir()?)?;
        let started = Instant::now();
        let data = fill(bin, dir.path(), o.records)?;
        println!("{name}: filled in {:.1} s", started.elapsed().as_secs_f64());
        templates.push((dir, data));
    }
    let mut figures: Vec<Vec<(f64, f64, Option<f64>)>> = vec![Vec::new(); bins.len()];
    for run in 1..=o.runs {
        for (i, (name, bin)) in bins.iter().enumerate() {
            let (wall, cpu, idle) = one_run(bin, &templates[i].1, &o)?;
            println!(
                "{name} run {run}: drained in {wall:.2} s = {:.0} records/s; CPU {cpu:.2} s = \
                 {:.1} % of a core",
                o.records as f64 / wall,
                cpu / wall * 100.0
            );
            figures[i].push((wall, cpu, idle));
        }
    }
    for ((name, _), runs) in bins.iter().zip(figures) {
        let share: Vec<f64> = runs.iter().map(|(w, c, _)| c / w * 100.0).collect();
        let walls: Vec<f64> = runs.iter().map(|(w, _, _)| *w).collect();
        let cpus: Vec<f64> = runs.iter().map(|(_, c, _)| *c).collect();
        let idle: Vec<f64> = runs.iter().filter_map(|(_, _, i)| *i).collect();
        let idle = if idle.is_empty() {
            String::new()
        } else {
            format!("; idle {:.2} % of a core", median(idle))
        };
        println!(
            "{name}: median of {} runs: drained in {:.2} s, CPU {:.2} s, {:.1} % of a core{idle}",
            o.runs,
            median(walls),
            median(cpus),
            median(share)
        );
    }
    Ok(())
}
