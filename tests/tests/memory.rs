//! Memory bounded in fact: the ingress byte budget (`gateway.max_ingress_bytes`) under hostile
//! load. Many MQTT connections pipeline maximum-size QoS 1 publishes without waiting for their
//! acknowledgements, against an outbox slowed to one commit a second (`batch_max_delay = 1s`);
//! the daemon's RSS must stay within the budget plus what each connection may hold outside it
//! (its read buffer and one decoded packet) plus a fixed allowance. Without the budget the same
//! load pins every connection's whole in-flight window: 32 × 64 × 200 KiB = 400 MiB.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use outpost_e2e::admin::{admin_token_config, create_device};
use outpost_e2e::daemon::{Daemon, proc_status_kib};
use outpost_e2e::mqtt_raw::{long_packet, mqtt_str, read_exact_n};
use outpost_e2e::require_command;

const CONNECTIONS: usize = 32;
const PAYLOAD: usize = 200 * 1024;
const BUDGET_MIB: u64 = 8;

/// Connects (MQTT 3.1.1) as client `n`.
fn connect(addr: SocketAddr, n: usize, secret: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&outpost_e2e::mqtt_raw::connect_311(
        &format!("flood-{n}"),
        "flooder",
        secret,
        0,
    ))
    .unwrap();
    assert_eq!(read_exact_n(&mut s, 4), [0x20, 2, 0, 0], "CONNACK accepted");
    s
}

/// Publishes QoS 1 maximum-size messages back to back, never reading the PUBACKs; a write
/// blocks while the server does not read (back-pressure). Returns when the test shuts the
/// socket down.
fn flood(mut s: TcpStream, stop: &AtomicBool) {
    let payload = vec![b'x'; PAYLOAD];
    for n in 0u32.. {
        let mut body = Vec::with_capacity(PAYLOAD + 64);
        mqtt_str(&mut body, "devices/flooder/bulk");
        body.extend_from_slice(&u16::try_from(n % 65_000 + 1).unwrap().to_be_bytes());
        body.extend_from_slice(&payload);
        if let Err(e) = s.write_all(&long_packet(0x32, &body)) {
            assert!(
                stop.load(Ordering::Relaxed),
                "publish failed under load: {e}"
            );
            return;
        }
    }
}

#[test]
fn serial_the_ingress_budget_bounds_memory_under_hostile_mqtt_load() {
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "{}\n[outbox]\nbatch_max_delay = \"1s\"\nbatch_max_records = 100000\n",
        admin_token_config()
    );
    let mut d = Daemon::start(dir.path(), &extra);
    // The default budget is 64 MiB; this test runs with a smaller one.
    let config = std::fs::read_to_string(&d.config_path).unwrap().replacen(
        "[gateway]\n",
        &format!("[gateway]\nmax_ingress_bytes = \"{BUDGET_MIB}MiB\"\n"),
        1,
    );
    std::fs::write(&d.config_path, config).unwrap();
    let secret = create_device(&d, "flooder", None);
    d.terminate(Duration::from_secs(15));
    let mut d = Daemon::start_with(&d.config_path.clone(), d.data_dir.clone());
    let line = d.wait_for_log("MQTT listener bound", Duration::from_secs(10));
    let addr: SocketAddr = serde_json::from_str::<serde_json::Value>(&line).unwrap()["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        d.metric("outpost_ingress_budget_bytes"),
        (BUDGET_MIB * 1024 * 1024) as f64
    );
    std::thread::sleep(Duration::from_millis(500));
    let baseline = proc_status_kib(d.pid(), "VmRSS");

    let stop = Arc::new(AtomicBool::new(false));
    let sockets: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|n| connect(addr, n, &secret))
        .collect();
    let clients: Vec<_> = sockets
        .iter()
        .map(|s| {
            let (stop, s) = (Arc::clone(&stop), s.try_clone().unwrap());
            std::thread::spawn(move || flood(s, &stop))
        })
        .collect();
    let started = Instant::now();
    let mut peak = baseline;
    let mut peak_used = 0.0f64;
    while started.elapsed() < Duration::from_secs(8) {
        peak = peak.max(proc_status_kib(d.pid(), "VmRSS"));
        peak_used = peak_used.max(d.metric("outpost_ingress_budget_used_bytes"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let waits = d.metric("outpost_mqtt_budget_waits_total");
    let stored = d.metric("outpost_outbox_records");
    stop.store(true, Ordering::Relaxed);
    for s in &sockets {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    for c in clients {
        c.join().unwrap();
    }
    let growth_mib = (peak - baseline) as f64 / 1024.0;
    // What the budget allows, plus per connection its read buffer and one decoded packet held
    // outside the budget (2 × 256 KiB), plus 32 MiB for SQLite's cache, the allocator's slack
    // and the runtime.
    let allowed_mib = BUDGET_MIB as f64 + CONNECTIONS as f64 * 0.5 + 32.0;
    eprintln!(
        "RSS baseline {} MiB, peak {} MiB (+{growth_mib:.1} MiB, allowed {allowed_mib}); \
         budget used at most {:.1} MiB; {waits} waits; {stored} records stored",
        baseline / 1024,
        peak / 1024,
        peak_used / 1024.0 / 1024.0
    );
    assert!(waits > 0.0, "the load never reached the budget");
    assert!(stored > 0.0, "nothing was stored");
    assert!(
        peak_used <= (BUDGET_MIB * 1024 * 1024) as f64,
        "budget overrun: {peak_used}"
    );
    assert!(
        growth_mib <= allowed_mib,
        "RSS grew by {growth_mib:.1} MiB under load, more than {allowed_mib} MiB"
    );
    // Still serving: a well-behaved client publishes and is acknowledged.
    let out = std::process::Command::new(require_command("mosquitto_pub"))
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-u", "flooder", "-P", &secret, "-q", "1", "-i", "after"])
        .args(["-t", "devices/flooder/after", "-m", "ok"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(d.is_running());
}
