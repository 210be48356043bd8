//! The cost of edge rules per reading, in one thread, without the daemon: the 20 rules of
//! `scripts/bench/edge-rules.toml` (5 conditions, 5 transforms, 5 aggregates, 5 alerts) on
//! JSON readings, `prepare` + `observe` as ingestion runs them. Median of 5 runs.
//!
//!     cargo bench -p outpost-edge --bench rules [-- --readings 200000 --runs 5]

use std::time::Instant;

use outpost_edge::{DeviceFacts, Engine, Facts, Reading, Verdict};

/// The daemon's allocator: the rules' allocations cost what they cost there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Registry;

impl Facts for Registry {
    fn facts(&self, _device_id: &str) -> Option<DeviceFacts> {
        Some(DeviceFacts {
            name: Some("Bench".into()),
            tags: vec!["bench".into()],
            ..DeviceFacts::default()
        })
    }
}

fn main() {
    let (mut readings, mut runs) = (200_000usize, 5usize);
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.windows(2) {
        let number = || {
            pair[1]
                .parse()
                .unwrap_or_else(|_| panic!("{} needs a number", pair[0]))
        };
        match pair[0].as_str() {
            "--readings" => readings = number(),
            "--runs" => runs = number(),
            _ => {}
        }
    }
    let rules_file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/bench/edge-rules.toml"
    );
    let text = std::fs::read_to_string(rules_file).expect("scripts/bench/edge-rules.toml");
    let config = outpost_config::from_toml_str(&text).expect("valid rules");
    let payloads: Vec<Vec<u8>> = (0..100)
        .map(|i| {
            format!(
                r#"{{"temperature":{},"humidity":48.2,"battery":3.71,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#,
                20 + i % 30
            )
            .into_bytes()
        })
        .collect();
    println!(
        "edge rules bench: {} rules, {readings} readings per run, {runs} runs",
        config.edge.rules.len()
    );
    let mut per_reading = Vec::new();
    for run in 1..=runs {
        let engine = Engine::compile(&config.edge).expect("rules compile");
        let start = Instant::now();
        for n in 0..readings {
            let reading = Reading {
                device_id: "bench-device",
                source: "http",
                topic: "devices/bench-device/telemetry",
                content_type: Some("application/json"),
                payload: &payloads[n % payloads.len()],
                received_at_ms: 1_765_000_000_000 + n as u64,
            };
            match engine.prepare(&reading, &Registry) {
                Verdict::Store(p) => {
                    if let Some(o) = p.observation {
                        std::hint::black_box(engine.observe(o));
                    }
                    std::hint::black_box(p.payload);
                }
                Verdict::Refuse(r) => panic!("refused: {r:?}"),
            }
        }
        let ns = start.elapsed().as_nanos() as f64 / readings as f64;
        println!(
            "run {run}: {ns:.0} ns per reading ({:.0} readings/s on one core)",
            1e9 / ns
        );
        per_reading.push(ns);
    }
    per_reading.sort_by(f64::total_cmp);
    let median = per_reading[per_reading.len() / 2];
    println!(
        "median: {median:.0} ns per reading ({:.0} readings/s on one core)",
        1e9 / median
    );
}
