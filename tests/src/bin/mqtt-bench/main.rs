//! MQTT benchmarks against the real `outpost` binary and, as the reference, Debian's `mosquitto`
//! (no persistence: PUBACK from memory), in the same run. Not a test: figures are written down
//! in docs/BENCHMARKS.md, never asserted. The load client is rumqttc (3.1.1 and 5).
//!
//! ```sh
//! cargo build --release -p outpost -p outpost-e2e --bins
//! B=target/release/mqtt-bench
//! $B --publishers 100 --seconds 10 --runs 5                   # QoS 1 msg/s, no subscriber
//! $B --publishers 100 --seconds 10 --runs 3 --rate 20000      # p99 publish->PUBACK at 20k/s
//! $B --publishers 100 --seconds 10 --runs 3 --watch --protocol both
//!                                      # one subscriber to every topic; 3.1.1 vs MQTT 5 + properties
//! $B --idle 1000 --runs 3 [--idle-subscribe | --idle-persistent]   # RSS with idle devices
//! $B --queued 10000 --sessions 100 --runs 3   # RSS growth with messages queued for offline sessions
//! $B --storm 1000 --runs 3                    # CONNACK latency when 1,000 devices connect at once
//! $B ... --client-cpus 0 --broker-cpus 1      # load client and broker on separate cores
//! ```
//!
//! On a small machine the load client takes a share of the cores the broker needs, and a
//! protocol that costs the client more (MQTT 5 properties) then looks slower on the broker's
//! side too. `--client-cpus` / `--broker-cpus` (`taskset` CPU lists) keep them apart, so a
//! figure is what the broker alone can do on those cores.
//!
//! Outpost runs with `mqtt.allow_anonymous` (client `c` is the identity `anonymous/c`, whose
//! default ACL covers `devices/anonymous/c/#`), except for `--storm`, which registers real devices
//! with secrets (argon2). Its data directory is under the current directory (same disk as the
//! project). `OUTPOST_BIN` picks another `outpost` binary; `--brokers` may also name `before`,
//! the `outpost` binary in `OUTPOST_BEFORE_BIN` (an older build), run alternating with the
//! others for a before/after in the same run.

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking setup outside the runtime

mod load;
mod memory;
mod storm;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use outpost_e2e::daemon::Daemon;

/// The wire protocol of the load clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1, no properties.
    V3,
    /// MQTT 5; each publish carries a content type and two user properties.
    V5,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::V3 => "3.1.1",
            Protocol::V5 => "5 + properties",
        }
    }
}

pub struct Options {
    pub publishers: usize,
    pub seconds: u64,
    pub warmup: u64,
    pub runs: usize,
    pub threads: usize,
    pub payload: usize,
    /// Total publishes per second over all publishers; 0: as fast as PUBACKs allow.
    pub rate: u64,
    /// The client's in-flight window per publisher.
    pub inflight: u16,
    /// Instead of publishing: hold this many idle connections and report resident memory.
    pub idle: usize,
    /// Idle connections also subscribe to their commands topic.
    pub idle_subscribe: bool,
    /// Idle connections have persistent sessions (clean session 0) and subscribe.
    pub idle_persistent: bool,
    /// One more client subscribes to all publishers' topics (routing cost included).
    pub watch: bool,
    pub protocols: Vec<Protocol>,
    /// Instead of publishing: queue this many messages for offline sessions, report RSS growth.
    pub queued: usize,
    /// The offline sessions `--queued` spreads its messages over.
    pub sessions: usize,
    /// Instead of publishing: this many registered devices connect at once; CONNACK latency.
    pub storm: usize,
    /// Servers under test, in the order runs alternate: `outpost`, `mosquitto`, `before`,
    /// `edge` (this build with OUTPOST_BENCH_EDGE_CONFIG's rules), `before-edge` (the `before`
    /// build with them).
    pub brokers: Vec<&'static str>,
    /// CPUs (a `taskset` list) for the bench's own threads.
    pub client_cpus: Option<String>,
    /// CPUs (a `taskset` list) for every thread of the broker under test.
    pub broker_cpus: Option<String>,
    /// Publish a JSON object (`{"temperature":…,"pad":"xx…"}` of `payload` bytes) instead of
    /// `x` bytes: what edge rules can work on.
    pub json: bool,
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
        idle_persistent: false,
        watch: false,
        protocols: vec![Protocol::V3],
        queued: 0,
        sessions: 100,
        storm: 0,
        brokers: vec!["outpost", "mosquitto"],
        client_cpus: None,
        broker_cpus: None,
        json: false,
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
            "--queued" => o.queued = usize::try_from(number()?)?,
            "--sessions" => o.sessions = usize::try_from(number()?)?,
            "--storm" => o.storm = usize::try_from(number()?)?,
            "--idle-subscribe" => o.idle_subscribe = true,
            "--idle-persistent" => o.idle_persistent = true,
            "--watch" => o.watch = true,
            "--json" => o.json = true,
            "--client-cpus" => o.client_cpus = Some(text()?),
            "--broker-cpus" => o.broker_cpus = Some(text()?),
            "--protocol" => {
                o.protocols = match text()?.as_str() {
                    "v3" => vec![Protocol::V3],
                    "v5" => vec![Protocol::V5],
                    "both" => vec![Protocol::V3, Protocol::V5],
                    other => bail!("--protocol: v3, v5 or both, not {other}"),
                }
            }
            "--brokers" => {
                o.brokers = Vec::new();
                for name in text()?.split(',') {
                    match name {
                        "outpost" => o.brokers.push("outpost"),
                        "mosquitto" => o.brokers.push("mosquitto"),
                        "before" => o.brokers.push("before"),
                        "edge" => o.brokers.push("edge"),
                        "before-edge" => o.brokers.push("before-edge"),
                        "both" => o.brokers.extend(["outpost", "mosquitto"]),
                        other => bail!(
                            "--brokers: a comma-separated list of outpost, mosquitto, before, \
                             edge, before-edge (or both), not {other}"
                        ),
                    }
                }
            }
            "-h" | "--help" => {
                println!(
                    "mqtt-bench [--publishers 100] [--seconds 10] [--warmup 2] [--runs 1] \
                     [--threads 1 (client runtime workers)] [--payload 100] \
                     [--rate 0 (total msg/s; 0 = as fast as possible)] [--inflight 100] \
                     [--watch] [--protocol v3|v5|both] [--brokers outpost,mosquitto,before,edge,before-edge] \
                     [--json (a JSON object payload)] \
                     [--client-cpus LIST] [--broker-cpus LIST]\n\
                     mqtt-bench --idle N [--idle-subscribe | --idle-persistent] [--runs 1]\n\
                     mqtt-bench --queued N [--sessions 100] [--runs 1]\n\
                     mqtt-bench --storm N [--runs 1]   (Outpost only)"
                );
                return Ok(None);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if o.publishers == 0 || o.seconds == 0 || o.runs == 0 || o.threads == 0 || o.inflight == 0 {
        bail!("--publishers, --seconds, --runs, --threads and --inflight must be at least 1");
    }
    if o.queued > 0 && o.sessions == 0 {
        bail!("--sessions must be at least 1");
    }
    Ok(Some(o))
}

/// A broker under test: where it listens and its process id (for RSS).
pub enum Server {
    /// Outpost: this build's (or `OUTPOST_BIN`), or the `before` build.
    Outpost(Box<Daemon>, tempfile::TempDir),
    Mosquitto(Child, tempfile::TempDir),
}

impl Server {
    /// Starts `kind` on a loopback port. `outpost_extra` is appended to Outpost's config (after
    /// its `[mqtt]` table: `[mqtt.*]` tables or top-level ones); Mosquitto allows everything.
    pub fn start(
        kind: &str,
        max_connections: usize,
        outpost_extra: &str,
    ) -> anyhow::Result<(Server, SocketAddr)> {
        let dir = tempfile::Builder::new()
            .prefix("mqtt-bench-")
            .tempdir_in(std::env::current_dir()?)?;
        if matches!(kind, "outpost" | "before" | "edge" | "before-edge") {
            // `edge`: this build with the `[edge]` rules of OUTPOST_BENCH_EDGE_CONFIG added;
            // `before-edge`: the `before` build with them.
            let edge = if kind.ends_with("edge") {
                let file = std::env::var_os("OUTPOST_BENCH_EDGE_CONFIG")
                    .context("--brokers edge needs OUTPOST_BENCH_EDGE_CONFIG=<toml file>")?;
                std::fs::read_to_string(&file)?
            } else {
                String::new()
            };
            let config = format!(
                "[mqtt]\nlisten = \"127.0.0.1:0\"\nallow_anonymous = true\n\
                 max_connections = {max_connections}\n{outpost_extra}\n{edge}"
            );
            let mut daemon = if kind.starts_with("before") {
                let bin = std::env::var_os("OUTPOST_BEFORE_BIN")
                    .context("--brokers before needs OUTPOST_BEFORE_BIN=<outpost binary>")?;
                Daemon::start_other(std::path::Path::new(&bin), dir.path(), &config)
            } else {
                Daemon::start(dir.path(), &config)
            };
            let addr = mqtt_addr(&mut daemon)?;
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
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((Server::Mosquitto(child, dir), addr))
    }

    pub fn pid(&self) -> u32 {
        match self {
            Server::Outpost(d, _) => d.pid(),
            Server::Mosquitto(c, _) => c.id(),
        }
    }

    pub fn daemon(&self) -> Option<&Daemon> {
        match self {
            Server::Outpost(d, _) => Some(d),
            Server::Mosquitto(..) => None,
        }
    }

    /// Stops the server: for Outpost, the records stored.
    pub fn stop(self) -> anyhow::Result<Option<usize>> {
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

/// Moves every thread of process `pid` onto `cpus` (a `taskset` list such as `1` or `0,2-3`).
/// Threads it starts later inherit the affinity of the thread that starts them.
pub fn pin(pid: u32, cpus: &str) -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args(["--all-tasks", "--pid", "--cpu-list", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .context("run taskset (util-linux)")?;
    if !status.success() {
        bail!("taskset --cpu-list {cpus} for process {pid}: {status}");
    }
    Ok(())
}

/// The MQTT listener's address, from the daemon's log.
pub fn mqtt_addr(daemon: &mut Daemon) -> anyhow::Result<SocketAddr> {
    let line = daemon.wait_for_log("MQTT listener bound", Duration::from_secs(10));
    let v: serde_json::Value = serde_json::from_str(&line)?;
    Ok(v["addr"].as_str().context("addr")?.parse()?)
}

pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")
}

/// The median of `figures` (the upper one of an even count).
pub fn median(mut figures: Vec<f64>) -> f64 {
    figures.sort_by(f64::total_cmp);
    figures.get(figures.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The `p` quantile (0..=1) of sorted microsecond samples, in milliseconds.
pub fn quantile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 * p).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    f64::from(sorted_us[i]) / 1000.0
}

fn main() -> anyhow::Result<()> {
    let Some(o) = parse_args()? else {
        return Ok(());
    };
    // Before the runtime starts its workers, so they inherit it.
    if let Some(cpus) = &o.client_cpus {
        pin(std::process::id(), cpus)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.threads)
        .enable_all()
        .build()?;
    if o.idle > 0 {
        memory::idle(&o)
    } else if o.queued > 0 {
        memory::queued(&o)
    } else if o.storm > 0 {
        storm::run(&o, &runtime)
    } else {
        load::run(&o, &runtime)
    }
}
