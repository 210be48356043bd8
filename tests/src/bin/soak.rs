//! The soak: many `kill -9` cycles of the real daemon under MQTT QoS 1 and 2, HTTP and CoAP load,
//! with a Kafka broker (tansu) whose network comes and goes; at the end every acknowledgement
//! is counted against what Kafka holds. Not part of the test suite (it runs for about an hour);
//! its results are in docs/RELIABILITY.md.
//!
//! ```text
//! cargo build --workspace --bins
//! target/debug/soak --cycles 1000 [--report soak.json]
//! ```
//!
//! Each cycle starts `outpost run` on the same data directory, runs seven clients for a random
//! 0.3 to 3 s — two MQTT 3.1.1 connections publishing QoS 1, two QoS 2 (one message at a time,
//! counting PUBACK / PUBREC), two HTTP clients posting batches of 5 (counting 201), one CoAP
//! client posting Confirmable requests (counting 2.01) — then SIGKILLs the daemon. Meanwhile a
//! thread cuts and restores the broker's network at random (1 to 12 s each way), so the
//! forwarder is killed mid-drain, mid-outage and mid-recovery. At the end the network stays up,
//! the daemon drains its outbox and stops, and the topic is read back with an rdkafka consumer.
//!
//! Counted: acknowledged records per protocol; *lost* (acknowledged, not in Kafka); records
//! sent again by the forwarder after a kill (the same outbox sequence twice: at-least-once
//! mode's documented duplicates); records *stored* twice (one message under two sequences);
//! per-client order violations (first copies out of order); the daemon's peak RSS (VmHWM) over
//! all cycles. Exits 1 if anything acknowledged was lost, stored twice or out of order.

#![allow(clippy::unwrap_used)] // a soak tool: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking clients, no async runtime

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use outpost_e2e::admin::{admin_token_config, create_device};
use outpost_e2e::coap::{self, Message};
use outpost_e2e::daemon::{Daemon, proc_status_kib};
use outpost_e2e::http::try_request;
use outpost_e2e::kafka::{Tansu, consume_everything};
use outpost_e2e::mqtt_raw::publish_until_closed;
use rand::RngExt;

const TOPIC: &str = "outpost.readings";
/// Pause between two messages of one client: about 50 messages per second each.
const PACE: Duration = Duration::from_millis(20);

/// What the clients were told was stored, per protocol.
#[derive(Default)]
struct Acked {
    mqtt_qos1: Mutex<Vec<String>>,
    mqtt_qos2: Mutex<Vec<String>>,
    http: Mutex<Vec<String>>,
    coap: Mutex<Vec<String>>,
}

struct Args {
    cycles: u32,
    report: Option<PathBuf>,
}

fn args() -> Args {
    let mut args = Args {
        cycles: 1000,
        report: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--cycles" => args.cycles = it.next().and_then(|v| v.parse().ok()).unwrap_or(1000),
            "--report" => args.report = it.next().map(PathBuf::from),
            other => {
                eprintln!("usage: soak [--cycles N] [--report FILE.json]  (unknown: {other})");
                std::process::exit(2);
            }
        }
    }
    args
}

fn listener_addr(d: &mut Daemon, what: &str) -> SocketAddr {
    let line = d.wait_for_log(what, Duration::from_secs(30));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    v["addr"].as_str().unwrap().parse().unwrap()
}

/// Posts batches of 5 `{"k":"<prefix>-<n>"}` records until `stop` or the daemon dies.
fn http_client(admin: SocketAddr, auth: &str, prefix: &str, acked: &Acked, stop: &AtomicBool) {
    for batch in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let keys: Vec<String> = (0..5)
            .map(|i| format!("{prefix}-{}", batch * 5 + i))
            .collect();
        let body: Vec<String> = keys.iter().map(|k| format!("{{\"k\":\"{k}\"}}")).collect();
        let Ok(r) = try_request(
            admin,
            "POST",
            "/api/v1/ingest/soak/http",
            &[
                ("Authorization", auth),
                ("Content-Type", "application/json"),
            ],
            format!("[{}]", body.join(",")).as_bytes(),
        ) else {
            return; // killed mid-request: not acknowledged
        };
        match r.status {
            201 => acked.http.lock().unwrap().extend(keys),
            503 => {} // full: not stored, the client would retry later
            other => panic!("HTTP ingest answered {other}: {}", r.text()),
        }
        std::thread::sleep(PACE * 5);
    }
}

/// Posts Confirmable `{"k":"<prefix>-<n>"}` requests one at a time until `stop` or the daemon
/// dies. No retransmission across a kill (a new process has no memory of the exchange and would
/// store it again, as RFC 7252 allows): an unanswered request counts as not acknowledged.
fn coap_client(addr: SocketAddr, device: &str, prefix: &str, acked: &Acked, stop: &AtomicBool) {
    let client = coap::Client::new(addr);
    for n in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let key = format!("{prefix}-{n}");
        #[allow(clippy::cast_possible_truncation)] // message ids wrap
        let mid = (n % 65_000) as u16 + 1;
        let request = Message::post(
            mid,
            "soak/coap",
            device,
            50,
            format!("{{\"k\":\"{key}\"}}").as_bytes(),
        );
        client.send(&request.encode());
        let answer = loop {
            match client.recv_within(Duration::from_secs(2)) {
                None => return, // the daemon died
                Some(bytes) => match Message::decode(&bytes) {
                    Some(m) if m.mid == mid => break m,
                    _ => {} // an answer to an earlier exchange
                },
            }
        };
        match answer.code_text().as_str() {
            "2.01" => acked.coap.lock().unwrap().push(key),
            "5.03" => {}
            other => panic!("CoAP answered {other}: {}", answer.text()),
        }
        std::thread::sleep(PACE);
    }
}

/// One cycle's load: seven clients until `stop`.
fn start_load(
    d: &mut Daemon,
    cycle: u32,
    secrets: &HashMap<&'static str, String>,
    acked: &Arc<Acked>,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let mqtt = listener_addr(d, "MQTT listener bound");
    let coap_at = listener_addr(d, "CoAP listener bound");
    let admin = d.admin;
    let mut clients = Vec::new();
    for (n, qos) in [1u8, 1, 2, 2].into_iter().enumerate() {
        let (acked, stop) = (Arc::clone(acked), Arc::clone(stop));
        let secret = secrets["mqtt"].clone();
        clients.push(std::thread::spawn(move || {
            let list = if qos == 1 {
                &acked.mqtt_qos1
            } else {
                &acked.mqtt_qos2
            };
            publish_until_closed(
                mqtt,
                "soak-mqtt",
                &secret,
                &format!("m{qos}c{cycle}n{n}"),
                "devices/soak-mqtt/soak",
                qos,
                PACE,
                list,
                &stop,
            );
        }));
    }
    for n in 0..2 {
        let (acked, stop) = (Arc::clone(acked), Arc::clone(stop));
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(format!("soak-http:{}", secrets["http"]))
        );
        clients.push(std::thread::spawn(move || {
            http_client(admin, &auth, &format!("hc{cycle}n{n}"), &acked, &stop);
        }));
    }
    let (acked, stop) = (Arc::clone(acked), Arc::clone(stop));
    clients.push(std::thread::spawn(move || {
        coap_client(coap_at, "soak-coap", &format!("cc{cycle}"), &acked, &stop);
    }));
    clients
}

/// The key a client sent: the MQTT payload itself, or the `k` of an HTTP / CoAP JSON record.
fn key_of(payload: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v["k"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(payload).into_owned())
}

/// `m1c12n0-345` → (`m1c12n0`, 345).
fn client_and_counter(key: &str) -> Option<(&str, u64)> {
    let (client, n) = key.rsplit_once('-')?;
    Some((client, n.parse().ok()?))
}

fn main() {
    let args = args();
    let started = Instant::now();
    let tansu = Arc::new(Tansu::start(&[(TOPIC, 2)]));
    let dir = tempfile::Builder::new()
        .prefix("outpost-soak-")
        .tempdir()
        .unwrap();
    let config = format!(
        "{}\n[kafka]\nenabled = true\nbrokers = [\"{}\"]\nlinger = \"5ms\"\n\
         reconnect_backoff_min = \"100ms\"\nreconnect_backoff_max = \"1s\"\n",
        admin_token_config(),
        tansu.bootstrap()
    );
    let mut d = Daemon::start(dir.path(), &config);
    let (config_path, data_dir) = (d.config_path.clone(), d.data_dir.clone());
    let secrets: HashMap<&'static str, String> = [
        ("mqtt", create_device(&d, "soak-mqtt", None)),
        ("http", create_device(&d, "soak-http", None)),
        ("coap", create_device(&d, "soak-coap", None)),
    ]
    .into_iter()
    .collect();

    // The broker's network comes and goes until the cycles are over.
    let cycles_done = Arc::new(AtomicBool::new(false));
    let outages = Arc::new(AtomicU32::new(0));
    let network = {
        let (tansu, done, outages) = (
            Arc::clone(&tansu),
            Arc::clone(&cycles_done),
            Arc::clone(&outages),
        );
        std::thread::spawn(move || {
            let mut rng = rand::rng();
            let mut up = true;
            while !done.load(Ordering::Relaxed) {
                let until = Instant::now() + Duration::from_millis(rng.random_range(1000..12_000));
                while Instant::now() < until && !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                up = !up;
                if up {
                    tansu.unblock();
                } else {
                    tansu.block();
                    outages.fetch_add(1, Ordering::Relaxed);
                }
            }
            tansu.unblock();
        })
    };

    let acked = Arc::new(Acked::default());
    let mut peak_kib = 0u64;
    let mut rng = rand::rng();
    for cycle in 0..args.cycles {
        if cycle > 0 {
            d = Daemon::start_with(&config_path, data_dir.clone());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let clients = start_load(&mut d, cycle, &secrets, &acked, &stop);
        std::thread::sleep(Duration::from_millis(rng.random_range(300..3000)));
        peak_kib = peak_kib.max(proc_status_kib(d.pid(), "VmHWM"));
        d.kill9();
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join().unwrap();
        }
        if cycle % 50 == 49 {
            eprintln!(
                "cycle {}: {:?} elapsed, {} acknowledged so far, outbox {}",
                cycle + 1,
                started.elapsed(),
                total(&acked),
                outbox_size(&data_dir)
            );
        }
    }
    cycles_done.store(true, Ordering::Relaxed);
    network.join().unwrap();

    // The network is up for good: drain, stop cleanly, read everything back.
    let mut d = Daemon::start_with(&config_path, data_dir.clone());
    d.wait_until("the outbox drained", Duration::from_secs(900), |d| {
        d.metric("outpost_outbox_records") == 0.0
            && d.status()["kafka"]["in_flight"].as_u64() == Some(0)
    });
    peak_kib = peak_kib.max(proc_status_kib(d.pid(), "VmHWM"));
    d.terminate(Duration::from_secs(30));
    let (records, watermarks) =
        consume_everything(&tansu.bootstrap(), TOPIC, Duration::from_secs(600));

    let mut report = analyse(
        &args,
        &acked,
        &records,
        peak_kib,
        &outages,
        started.elapsed(),
    );
    report["kafka_high_watermarks"] = watermarks.into();
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    }
    let failed = ["lost", "stored_twice", "order_violations"]
        .iter()
        .any(|k| report[k].as_u64() != Some(0));
    std::process::exit(i32::from(failed));
}

fn total(acked: &Acked) -> usize {
    [&acked.mqtt_qos1, &acked.mqtt_qos2, &acked.http, &acked.coap]
        .iter()
        .map(|l| l.lock().unwrap().len())
        .sum()
}

fn outbox_size(data_dir: &Path) -> String {
    std::fs::metadata(data_dir.join("outbox.db"))
        .map(|m| format!("{} KiB", m.len() / 1024))
        .unwrap_or_default()
}

fn analyse(
    args: &Args,
    acked: &Acked,
    records: &[outpost_e2e::kafka::Consumed],
    peak_kib: u64,
    outages: &AtomicU32,
    elapsed: Duration,
) -> serde_json::Value {
    // Every copy in Kafka, per key: (outbox id, sequence) of each copy, in partition order.
    let mut copies: HashMap<String, Vec<(String, String)>> = HashMap::new();
    let mut by_partition: Vec<&outpost_e2e::kafka::Consumed> = records.iter().collect();
    by_partition.sort_by_key(|r| (r.partition, r.offset));
    let mut order_violations = 0u64;
    let mut last_seen: HashMap<String, u64> = HashMap::new();
    for r in &by_partition {
        let key = key_of(&r.payload);
        let identity = (
            r.header("outpost-outbox").unwrap_or_default(),
            r.header("outpost-seq").unwrap_or_default(),
        );
        let seen = copies.entry(key.clone()).or_default();
        let first_copy = seen.is_empty();
        seen.push(identity);
        // Each client's messages go to one device, so one partition: their first copies must
        // come in the order the client sent them.
        if first_copy
            && let Some((client, n)) = client_and_counter(&key)
            && let Some(previous) = last_seen.insert(client.to_owned(), n)
            && previous > n
        {
            order_violations += 1;
            eprintln!("order: {client} {n} after {previous}");
        }
    }
    let mut lost = 0u64;
    let mut per_protocol = serde_json::Map::new();
    for (name, list) in [
        ("mqtt_qos1", &acked.mqtt_qos1),
        ("mqtt_qos2", &acked.mqtt_qos2),
        ("http", &acked.http),
        ("coap", &acked.coap),
    ] {
        let list = list.lock().unwrap();
        let missing: Vec<&String> = list.iter().filter(|k| !copies.contains_key(*k)).collect();
        for k in missing.iter().take(20) {
            eprintln!("lost: {k}");
        }
        lost += missing.len() as u64;
        per_protocol.insert(
            name.into(),
            serde_json::json!({"acknowledged": list.len(), "lost": missing.len()}),
        );
    }
    let mut resent = 0u64;
    let mut stored_twice = 0u64;
    for (key, ids) in &copies {
        let mut distinct = ids.clone();
        distinct.sort();
        distinct.dedup();
        resent += (ids.len() - distinct.len()) as u64;
        if distinct.len() > 1 {
            stored_twice += 1;
            eprintln!("stored twice: {key} as {distinct:?}");
        }
    }
    serde_json::json!({
        "cycles": args.cycles,
        "elapsed_s": elapsed.as_secs(),
        "broker_outages": outages.load(Ordering::Relaxed),
        "acknowledged": total(acked),
        "per_protocol": per_protocol,
        "kafka_records": records.len(),
        "distinct_in_kafka": copies.len(),
        "lost": lost,
        "resent_by_forwarder": resent,
        "stored_twice": stored_twice,
        "order_violations": order_violations,
        "peak_rss_mib": format!("{:.1}", peak_kib as f64 / 1024.0),
    })
}
