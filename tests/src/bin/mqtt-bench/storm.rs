//! Reconnect storm (Outpost only): `--storm N` registered devices, each with its own secret and
//! its own loopback source address, send their CONNECT at the same instant; the figure is the
//! time from each device's TCP connect to its CONNACK. Per run:
//!
//! - **after a restart**: the daemon has just started (every device reconnects at once, as after
//!   an upgrade or a power cut);
//! - **gateway running**: the same devices again, as after a network outage that dropped them
//!   all while the gateway kept running;
//! - **after a restart, digests unknown**: as the first, with `registry.db`'s secret digests
//!   cleared first, as in a registry written before they existed (schema v2): every CONNECT
//!   costs one argon2 verification (`VERIFY_CONCURRENCY` at a time). Skipped for a build
//!   without digests (an older `OUTPOST_BIN`), whose every restart is like this.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use outpost_e2e::admin::{admin_token_config, create_device};
use outpost_e2e::daemon::Daemon;
use outpost_e2e::mqtt_wire::Connect;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Options, median, mqtt_addr, quantile_ms};

/// The distinct source address of device `i` (any 127/8 address is local on Linux), so the
/// per-address handshake limit sees what a field of real devices would look like.
fn source(i: usize) -> SocketAddr {
    let i = u32::try_from(i).expect("device index");
    let [_, a, b, c] = (i + 1).to_be_bytes();
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 1 + a, b, c.max(1)), 0))
}

pub fn run(o: &Options, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let n = o.storm;
    println!("mqtt-bench: reconnect storm, {n} registered devices connecting at once");
    let dir = tempfile::Builder::new()
        .prefix("mqtt-bench-")
        .tempdir_in(std::env::current_dir()?)?;
    let config = format!(
        "[mqtt]\nlisten = \"127.0.0.1:0\"\nmax_connections = {}\n{}",
        n + 16,
        admin_token_config()
    );
    let mut daemon = Daemon::start(dir.path(), &config);
    let created = Instant::now();
    let devices = register(&daemon, n);
    println!(
        "registered {n} devices in {:.1} s",
        created.elapsed().as_secs_f64()
    );
    let registry = daemon.data_dir.join("registry.db");
    let has_digests = rusqlite::Connection::open(&registry)?
        .prepare("SELECT secret_digest FROM devices LIMIT 1")
        .is_ok();
    let phases: &[&str] = if has_digests {
        &[
            "after a restart",
            "gateway running",
            "after a restart, digests unknown",
        ]
    } else {
        &["after a restart", "gateway running"]
    };
    let mut figures = vec![Vec::new(); phases.len()];
    for run in 1..=o.runs {
        for (phase, p99s) in phases.iter().zip(&mut figures) {
            if phase.starts_with("after a restart") {
                daemon.terminate(Duration::from_secs(60));
                if phase.ends_with("digests unknown") {
                    rusqlite::Connection::open(&registry)?
                        .execute("UPDATE devices SET secret_digest = NULL", [])?;
                }
                daemon = Daemon::start_with(&daemon.config_path, daemon.data_dir.clone());
            }
            let addr = mqtt_addr(&mut daemon)?;
            let latencies = runtime.block_on(storm(addr, &devices))?;
            let p99 = quantile_ms(&latencies, 0.99);
            println!(
                "run {run}, {phase}: {} CONNACKs, p50 {:.0} ms, p99 {p99:.0} ms, max {:.0} ms; \
                 handshakes evicted so far {}, connects refused so far {}",
                latencies.len(),
                quantile_ms(&latencies, 0.5),
                quantile_ms(&latencies, 1.0),
                daemon.metric("outpost_mqtt_handshakes_evicted_total"),
                daemon.metric("outpost_mqtt_connects_refused_total"),
            );
            p99s.push(p99);
        }
    }
    daemon.terminate(Duration::from_secs(60));
    for (phase, p99s) in phases.iter().zip(figures) {
        println!(
            "median of {} runs, {phase}: CONNACK p99 {:.0} ms",
            o.runs,
            median(p99s)
        );
    }
    Ok(())
}

/// Creates `storm-0` … `storm-{n-1}` through the API (argon2 hashing: a few at a time) and
/// returns (id, secret) pairs.
fn register(daemon: &Daemon, n: usize) -> Vec<(String, String)> {
    let ids: Vec<String> = (0..n).map(|i| format!("storm-{i}")).collect();
    std::thread::scope(|s| {
        let workers: Vec<_> = ids
            .chunks(n.div_ceil(4).max(1))
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|id| (id.clone(), create_device(daemon, id, None)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("register worker"))
            .collect()
    })
}

/// Every device connects at once; returns the sorted connect→CONNACK times (µs). Fails unless
/// every device got CONNACK 0. The connections stay open until all are in, then disconnect.
async fn storm(addr: SocketAddr, devices: &[(String, String)]) -> anyhow::Result<Vec<u32>> {
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for (i, (id, secret)) in devices.iter().enumerate() {
        let connect = Connect::v311(id).login(id, secret).keep_alive(600).encode();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start).await;
            let began = Instant::now();
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(source(i))?;
            let mut s = socket.connect(addr).await?;
            s.write_all(&connect).await?;
            let mut connack = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(60), s.read_exact(&mut connack))
                .await
                .context("no CONNACK within 60 s")??;
            ensure!(connack == [0x20, 2, 0, 0], "CONNACK {connack:?}");
            let us = u32::try_from(began.elapsed().as_micros()).unwrap_or(u32::MAX);
            anyhow::Ok((us, s))
        }));
    }
    let mut latencies = Vec::new();
    let mut open = Vec::new();
    for t in tasks {
        let (us, s) = t.await??;
        latencies.push(us);
        open.push(s);
    }
    for s in &mut open {
        s.write_all(&[0xE0, 0x00]).await?;
    }
    drop(open);
    tokio::time::sleep(Duration::from_secs(1)).await;
    latencies.sort_unstable();
    Ok(latencies)
}
