//! Serial line parsing throughput: the driver's whole per-line path (framing, parsing, payload
//! encoding, building the `Reading`) on one core, for each format.
//!
//! Run: `cargo bench -p outpost-drivers --bench line_parse` (release profile). Prints lines/s.
//! Target (issue 6): JSON lines >= 100,000 lines/s on one core.

use std::time::Instant;

use outpost_config::{LineFormat, SerialLineConfig};
use outpost_drivers::line::parse_buffer;

const LINES: usize = 200_000;
const ROUNDS: usize = 5;

fn config(format: LineFormat) -> SerialLineConfig {
    SerialLineConfig {
        name: "bench".into(),
        format,
        device_field: Some("id".into()),
        timestamp_field: Some("ts".into()),
        columns: ["id", "ts", "temp", "hum", "battery", "state"]
            .map(String::from)
            .to_vec(),
        units: [("temp", "Cel"), ("hum", "%RH"), ("battery", "V")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into(),
        ..SerialLineConfig::default()
    }
}

fn line(format: LineFormat, i: usize) -> String {
    let (id, ts, temp, hum) = (
        i % 50,
        1_700_000_000 + i,
        15.0 + (i % 200) as f64 / 10.0,
        40 + i % 30,
    );
    match format {
        LineFormat::Json => format!(
            "{{\"id\":\"sensor-{id}\",\"ts\":{ts},\"temp\":{temp},\"hum\":{hum},\"battery\":3.01,\"state\":\"ok\"}}\n"
        ),
        LineFormat::Csv => format!("sensor-{id},{ts},{temp},{hum},3.01,ok\n"),
        LineFormat::Kv => {
            format!("id=sensor-{id} ts={ts} temp={temp} hum={hum} battery=3.01 state=ok\n")
        }
    }
}

fn main() {
    for format in [LineFormat::Json, LineFormat::Csv, LineFormat::Kv] {
        let config = config(format);
        let data: String = (0..LINES).map(|i| line(format, i)).collect();
        let mut best = f64::MAX;
        for _ in 0..ROUNDS {
            let t0 = Instant::now();
            let readings = parse_buffer(&config, data.as_bytes(), 0);
            let elapsed = t0.elapsed().as_secs_f64();
            assert_eq!(readings.len(), LINES);
            std::hint::black_box(&readings);
            drop(readings);
            best = best.min(elapsed);
        }
        println!(
            "{:<5} {LINES} lines ({:.1} MB): best of {ROUNDS} {:.1} ms = {:.0} lines/s ({:.0} MB/s)",
            format!("{format:?}").to_lowercase(),
            data.len() as f64 / 1e6,
            best * 1e3,
            LINES as f64 / best,
            data.len() as f64 / best / 1e6
        );
    }
}
