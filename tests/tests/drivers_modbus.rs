//! Modbus driver end to end: the real `outpost` binary polling real pymodbus slaves
//! (`tests/peers/modbus_slave.py`): two TCP slaves on loopback and two RTU slaves behind one
//! `socat` pseudo-terminal pair.
//!
//! Covered: u16, i16, u32, i32, f32 in both word orders, byte swap, scale/offset, input
//! registers and coils decoded as stored readings with units; a TCP slave that stops answering
//! (SIGSTOP: connected but silent) is counted per slave, reported offline in the registry and in
//! the driver's status reason, while the other slave keeps its poll rate; it comes back online
//! when it answers again; when its process is killed, refused connections take it offline again.

#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use outpost_e2e::admin::{admin, admin_token_config};
use outpost_e2e::daemon::{Daemon, metric_value};
use outpost_e2e::modbus::Slave;
use outpost_e2e::pty::PtyPair;
use outpost_sync::{OutboxReader, StoredRecord};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn stored(d: &Daemon) -> Vec<StoredRecord> {
    OutboxReader::open(&d.data_dir.join("outbox.db"))
        .unwrap()
        .read_all()
        .unwrap()
}

/// The latest stored reading of `device` that has field `field`.
fn latest_with(records: &[StoredRecord], device: &str, field: &str) -> Option<Value> {
    records
        .iter()
        .rev()
        .filter(|r| r.device_id == device)
        .map(|r| serde_json::from_slice::<Value>(&r.payload).unwrap())
        .find(|v| v.get(field).is_some())
}

fn count_with(records: &[StoredRecord], device: &str, field: &str) -> usize {
    records
        .iter()
        .filter(|r| r.device_id == device)
        .filter(|r| {
            serde_json::from_slice::<Value>(&r.payload)
                .unwrap()
                .get(field)
                .is_some()
        })
        .count()
}

fn metric(d: &Daemon, key: &str) -> f64 {
    let (_, body) = d.get("/metrics");
    metric_value(&body, key).unwrap_or(0.0)
}

fn device_state(d: &Daemon, id: &str) -> Value {
    admin(d, "GET", &format!("/api/v1/devices/{id}/status"), "").json()
}

fn close(a: &Value, b: f64) -> bool {
    a.as_f64().is_some_and(|a| (a - b).abs() < 1e-6)
}

/// A Modbus TCP driver `plant` with fast reconnects; its slaves follow.
const PLANT_TCP: &str = r#"
[[drivers]]
kind = "modbus"
name = "plant"
transport = "tcp"
timeout = "200ms"
[drivers.reopen]
backoff_initial = "50ms"
backoff_max = "200ms"
offline_after_failures = 3
"#;

const TEST_POINTS: &str = r#"
[[drivers.slaves.points]]
name = "u16"
address = 0
unit = "W"
[[drivers.slaves.points]]
name = "i16"
address = 1
data_type = "i16"
[[drivers.slaves.points]]
name = "u32_big"
address = 2
data_type = "u32"
[[drivers.slaves.points]]
name = "u32_little"
address = 4
data_type = "u32"
word_order = "little"
[[drivers.slaves.points]]
name = "f32_big"
address = 6
data_type = "f32"
unit = "Cel"
[[drivers.slaves.points]]
name = "f32_little"
address = 8
data_type = "f32"
word_order = "little"
unit = "Cel"
[[drivers.slaves.points]]
name = "scaled"
address = 10
data_type = "i16"
scale = 0.1
offset = 1.0
unit = "bar"
[[drivers.slaves.points]]
name = "i32"
address = 20
data_type = "i32"
[[drivers.slaves.points]]
name = "swapped"
address = 30
byte_order = "little"
[[drivers.slaves.points]]
name = "input"
function = "input"
address = 0
[[drivers.slaves.points]]
name = "valve"
function = "coil"
address = 0
data_type = "bool"
[[drivers.slaves.points]]
name = "pump"
function = "coil"
address = 1
data_type = "bool"
"#;

fn check_test_map(records: &[StoredRecord], device: &str) {
    let holding = latest_with(records, device, "u16").unwrap();
    assert_eq!(holding["u16"], json!(1234), "{holding}");
    assert_eq!(holding["i16"], json!(-42));
    assert_eq!(holding["u32_big"], json!(123_456));
    assert_eq!(holding["u32_little"], json!(123_456));
    assert!(close(&holding["f32_big"], 21.5), "{holding}");
    assert!(close(&holding["f32_little"], 21.5), "{holding}");
    assert!(close(&holding["scaled"], -20.5), "{holding}");
    assert_eq!(holding["i32"], json!(-100_000));
    assert_eq!(holding["swapped"], json!(0x1234));
    assert_eq!(
        holding["units"],
        json!({"u16": "W", "f32_big": "Cel", "f32_little": "Cel", "scaled": "bar"})
    );
    assert!(holding["time_ms"].as_i64().unwrap() > 1_600_000_000_000);
    let input = latest_with(records, device, "input").unwrap();
    assert_eq!(input["input"], json!(500), "{input}");
    let coils = latest_with(records, device, "valve").unwrap();
    assert_eq!(
        (coils["valve"].clone(), coils["pump"].clone()),
        (json!(true), json!(false))
    );
}

#[test]
fn modbus_tcp_and_rtu_slaves_are_decoded_and_a_dead_slave_is_isolated() {
    let dir = tempfile::tempdir().unwrap();
    let (port_a, port_b) = (free_port(), free_port());
    let tcp_a = Slave::start(&["--tcp", &format!("127.0.0.1:{port_a}"), "--units", "1"]);
    let tcp_b = Slave::start(&["--tcp", &format!("127.0.0.1:{port_b}"), "--units", "1"]);
    let pty = PtyPair::start(dir.path(), "rtu");
    let peer: PathBuf = pty.peer.clone();
    let _rtu = Slave::start(&["--rtu", peer.to_str().unwrap(), "--units", "1,2"]);

    let config = format!(
        r#"{tokens}
{plant}[[drivers.slaves]]
device_id = "meter-a"
unit = 1
address = "127.0.0.1:{port_a}"
{points}
[[drivers.slaves]]
device_id = "meter-b"
unit = 1
address = "127.0.0.1:{port_b}"
[[drivers.slaves.points]]
name = "u16"
address = 0
interval = "100ms"

[[drivers]]
kind = "modbus"
name = "line"
transport = "rtu"
timeout = "300ms"
[drivers.serial]
path = "{rtu}"
baud = 19200
[[drivers.slaves]]
device_id = "rtu-1"
unit = 1
{points}
[[drivers.slaves]]
device_id = "rtu-2"
unit = 2
[[drivers.slaves.points]]
name = "f32_little"
address = 8
data_type = "f32"
word_order = "little"
"#,
        tokens = admin_token_config(),
        plant = PLANT_TCP,
        points = TEST_POINTS.replace("address = ", "interval = \"100ms\"\naddress = "),
        rtu = pty.dev.display(),
    );
    let mut d = Daemon::start(dir.path(), &config);
    d.wait_until("readings of every slave", WAIT, |d| {
        let records = stored(d);
        ["meter-a", "meter-b", "rtu-1", "rtu-2"]
            .iter()
            .all(|dev| records.iter().any(|r| r.device_id == *dev))
            && latest_with(&records, "rtu-1", "valve").is_some()
            && latest_with(&records, "meter-a", "valve").is_some()
    });
    let records = stored(&d);
    check_test_map(&records, "meter-a");
    check_test_map(&records, "rtu-1");
    let rtu2 = latest_with(&records, "rtu-2", "f32_little").unwrap();
    assert!(close(&rtu2["f32_little"], 21.5), "{rtu2}");
    let r = records.iter().find(|r| r.device_id == "rtu-1").unwrap();
    assert_eq!(r.topic, "modbus/rtu-1");
    assert!(
        r.headers
            .contains(&("driver".to_owned(), "line".to_owned()))
    );

    // Baseline poll rate of meter-a's holding group (interval 100 ms).
    let window = Duration::from_secs(2);
    let rate = |d: &Daemon| {
        let before = count_with(&stored(d), "meter-a", "u16");
        let t0 = Instant::now();
        std::thread::sleep(window);
        let after = count_with(&stored(d), "meter-a", "u16");
        (after - before) as f64 / t0.elapsed().as_secs_f64()
    };
    let baseline = rate(&d);
    assert!(
        baseline > 6.0,
        "meter-a polled at {baseline}/s, expected about 10/s"
    );

    // meter-b stops answering: its connection stays open but nothing comes back.
    tcp_b.signal(rustix::process::Signal::STOP);
    d.wait_until("meter-b offline", WAIT, |d| {
        device_state(d, "meter-b")["state"] == json!("offline")
    });
    let status = device_state(&d, "meter-b");
    assert!(
        status["offline_reason"]
            .as_str()
            .unwrap()
            .contains("meter-b"),
        "{status}"
    );
    let timeouts = metric(
        &d,
        "outpost_driver_device_errors_total{driver=\"plant\",device=\"meter-b\",kind=\"timeout\"}",
    );
    assert!(timeouts >= 3.0, "timeouts counted: {timeouts}");
    let during = rate(&d);
    assert!(
        during >= baseline * 0.8,
        "meter-a slowed down while meter-b was dead: {during}/s vs {baseline}/s"
    );
    assert_eq!(device_state(&d, "meter-a")["state"], json!("online"));
    // The driver is still up (meter-a answers); its reason names the failing slave.
    let subsystem = d.status()["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == json!("driver/plant"))
        .cloned()
        .unwrap();
    assert_eq!(subsystem["state"], json!("ACTIVE"), "{subsystem}");
    assert!(
        subsystem["reason"].as_str().unwrap().contains("meter-b"),
        "{subsystem}"
    );
    assert_eq!(
        metric(&d, "outpost_driver_up{driver=\"plant\",kind=\"modbus\"}"),
        1.0
    );

    // It answers again: back online, with a reconnect counted.
    tcp_b.signal(rustix::process::Signal::CONT);
    d.wait_until("meter-b online again", WAIT, |d| {
        device_state(d, "meter-b")["state"] == json!("online")
    });
    assert!(
        metric(
            &d,
            "outpost_driver_reopens_total{driver=\"plant\",kind=\"modbus\"}"
        ) >= 1.0
    );
    // The process dies: connections are refused, counted as transport errors; offline again.
    drop(tcp_b);
    d.wait_until("meter-b offline after its process died", WAIT, |d| {
        device_state(d, "meter-b")["state"] == json!("offline")
    });
    let refused = metric(
        &d,
        "outpost_driver_device_errors_total{driver=\"plant\",device=\"meter-b\",kind=\"transport\"}",
    );
    assert!(refused >= 1.0, "transport errors counted: {refused}");
    assert_eq!(device_state(&d, "meter-a")["state"], json!("online"));
    drop(tcp_a);
    let (status, _) = d.terminate(Duration::from_secs(15));
    assert!(status.success(), "{status}");
}

/// Configured slaves are in the registry from the start (source `driver:<name>`), offline with
/// a reason until first heard: one with no listener at its address, one that answers every
/// poll with an exception (illegal address). The driver's own offline report then replaces the
/// "not heard from yet" reason, and a restart keeps them registered and offline.
#[test]
fn configured_slaves_never_heard_from_are_registered_offline_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let port_a = free_port();
    let _slave = Slave::start(&["--tcp", &format!("127.0.0.1:{port_a}"), "--units", "1"]);
    // Nothing listens here: the port was free a moment ago.
    let nobody = free_port();
    let config = format!(
        r#"{tokens}
{plant}[[drivers.slaves]]
device_id = "meter-3"
unit = 1
address = "127.0.0.1:{nobody}"
[[drivers.slaves.points]]
name = "u16"
address = 0
interval = "100ms"
[[drivers.slaves]]
device_id = "meter-exc"
unit = 1
address = "127.0.0.1:{port_a}"
[[drivers.slaves.points]]
name = "beyond_the_map"
address = 9000
interval = "100ms"
"#,
        tokens = admin_token_config(),
        plant = PLANT_TCP,
    );
    let mut d = Daemon::start(dir.path(), &config);
    for id in ["meter-3", "meter-exc"] {
        let device = admin(&d, "GET", &format!("/api/v1/devices/{id}"), "");
        assert_eq!(device.status, 200, "{id}: {}", device.text());
        assert_eq!(device.json()["source"], json!("driver:plant"));
        let status = device_state(&d, id);
        assert_eq!(status["state"], json!("offline"), "{status}");
        assert!(
            !status["offline_reason"].as_str().unwrap().is_empty(),
            "{status}"
        );
    }
    // The driver's reasons (they name the slave) replace "not heard from yet".
    for id in ["meter-3", "meter-exc"] {
        d.wait_until(
            &format!("the driver's offline reason for {id}"),
            WAIT,
            |d| {
                device_state(d, id)["offline_reason"]
                    .as_str()
                    .is_some_and(|r| r.contains(id))
            },
        );
        assert_eq!(device_state(&d, id)["state"], json!("offline"));
    }
    assert!(
        metric(
            &d,
            "outpost_driver_device_errors_total{driver=\"plant\",device=\"meter-exc\",kind=\"exception\"}"
        ) >= 3.0
    );
    assert!(
        !stored(&d).iter().any(|r| r.device_id.starts_with("meter-")),
        "nothing was read, nothing is stored"
    );
    let (status, _) = d.terminate(Duration::from_secs(15));
    assert!(status.success(), "{status}");

    // Across a restart: still registered, still offline, with the reason.
    let d = Daemon::start_with(&d.config_path.clone(), d.data_dir.clone());
    let status = device_state(&d, "meter-3");
    assert_eq!(status["state"], json!("offline"), "{status}");
    assert!(
        status["offline_reason"]
            .as_str()
            .is_some_and(|r| r.contains("not heard from yet") || r.contains("meter-3")),
        "{status}"
    );
}
