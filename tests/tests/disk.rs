//! A full disk: appends fail cleanly, the daemon keeps running (and starts) while it is full, the
//! forwarder still frees space, and appends resume by themselves when space returns; the
//! free-disk floor refuses appends before the disk is actually full.
//!
//! The data directory is a small tmpfs mounted by the test (the test command runs as root; a
//! non-root run fails here with mount's error, it does not skip).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code, no async runtime here

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outpost_e2e::admin::basic;
use outpost_e2e::admin::{admin_token_config, create_device};
use outpost_e2e::daemon::Daemon;
use outpost_e2e::http::request;
use outpost_e2e::kafka::{MockKafka, consume};
use outpost_sync::OutboxReader;

/// A tmpfs mounted for the test's lifetime.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

const LOAD: &str = "[[drivers]]\nkind = \"simulator\"\nname = \"fill\"\ndevices = 20\ninterval = \"1ms\"\npayload_bytes = 2000\n";

fn readings_gap_free(data: &Path) -> usize {
    let stored = OutboxReader::open(&data.join("outbox.db"))
        .unwrap()
        .read_all()
        .unwrap();
    let mut next = std::collections::HashMap::new();
    for r in &stored {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        let n = v["n"].as_u64().unwrap();
        let expected = next.entry(r.device_id.clone()).or_insert(0u64);
        assert_eq!(
            n, *expected,
            "device {}: reading lost or reordered",
            r.device_id
        );
        *expected += 1;
    }
    stored.len()
}

/// Without a disk reserve (`disk_reserve = "0B"`): commits fail on ENOSPC, cleanly.
#[test]
fn serial_disk_full_fails_cleanly_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("data"), "4m");
    let mut d = Daemon::start(
        dir.path(),
        &format!("[outbox]\nmin_free_disk = \"0\"\ndisk_reserve = \"0B\"\n\n{LOAD}"),
    );
    d.wait_until("a commit failing on ENOSPC", Duration::from_secs(30), |d| {
        d.metric("outpost_outbox_commit_errors_total") >= 1.0
    });
    // The failure is logged with its cause (the log is read by another thread: wait for it).
    d.wait_until(
        "the failure logged with its cause",
        Duration::from_secs(5),
        |d| {
            d.logs()
                .iter()
                .any(|l| l.contains("Outbox commit failed") && l.contains("full"))
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.is_running(), "the daemon survives a full disk");
    assert_eq!(d.get("/healthz").0, 200);
    let stuck = d.metric("outpost_outbox_records");

    fs.resize("64m");
    d.wait_until(
        "appends resuming after space returned",
        Duration::from_secs(30),
        |d| d.metric("outpost_outbox_records") > stuck + 1000.0,
    );
    let (status, _) = d.terminate(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", d.logs().join("\n"));
    // Readings refused while the disk was full were held and retried: none is missing.
    assert!(readings_gap_free(&d.data_dir) > 1000);
}

#[test]
fn serial_disk_floor_refuses_before_the_disk_fills() {
    let dir = tempfile::tempdir().unwrap();
    let _fs = Tmpfs::mount(&dir.path().join("data"), "6m");
    let mut d = Daemon::start(
        dir.path(),
        &format!("[outbox]\nmin_free_disk = \"3MiB\"\ndisk_reserve = \"512KiB\"\n\n{LOAD}"),
    );
    let floor = "outpost_outbox_rejected_records_total{route=\"default\",reason=\"disk_floor\"}";
    d.wait_until(
        "the disk floor refusing appends",
        Duration::from_secs(30),
        |d| d.metric(floor) >= 1.0,
    );
    assert_eq!(
        d.metric("outpost_outbox_commit_errors_total"),
        0.0,
        "refused before ENOSPC"
    );
    d.wait_for_log("Outbox full: refusing appends", Duration::from_secs(5));
    assert!(d.is_running());
    let (status, _) = d.terminate(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", d.logs().join("\n"));
    assert!(readings_gap_free(&d.data_dir) > 100);
}

/// Fills the filesystem holding `path` to the last byte with the file `path`, as another program
/// would (an app, the journal).
fn fill_disk(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    for chunk in [1 << 20, 64 << 10, 4 << 10, 512, 1] {
        let buf = vec![0x55u8; chunk];
        while file.write_all(&buf).is_ok() {}
    }
    let _ = file.sync_all();
}

/// The `{"n":…}` counters of records read back from Kafka, in the order read.
fn counters(records: &[outpost_e2e::kafka::Consumed]) -> Vec<u64> {
    records
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
            v["n"].as_u64().unwrap()
        })
        .collect()
}

/// Posts `n` JSON readings `{"n":…}` for `device`: the HTTP status and body.
fn post(d: &Daemon, auth: &str, from: u64, n: u64) -> (u16, String) {
    let body: Vec<String> = (from..from + n).map(|i| format!("{{\"n\":{i}}}")).collect();
    let r = request(
        d.admin,
        "POST",
        "/api/v1/ingest/t",
        &[
            ("Authorization", auth),
            ("Content-Type", "application/json"),
        ],
        format!("[{}]", body.join(",")).as_bytes(),
    );
    (r.status, r.text())
}

/// docs/RELIABILITY.md, "A full disk": another program fills the data directory's filesystem to
/// the last byte while 300 readings wait for Kafka (down). Every protocol gets its "try later"
/// (HTTP 503, MQTT 5 PUBACK 0x97 Quota exceeded, CoAP 5.03) and an alarm is raised; a restart
/// while full starts (before, the start's first write failed and the daemon exited, so systemd
/// restarted it until it gave up, and the forwarder that could free space never ran); Kafka back,
/// the backlog is delivered and deleted although the disk is still full; space back, appends
/// resume by themselves.
#[test]
fn serial_a_full_disk_never_stops_the_daemon_and_the_forwarder_still_frees_it() {
    let kafka = MockKafka::start(1, &[("outpost.readings", 1)]);
    kafka.down(1);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _fs = Tmpfs::mount(&data, "16m");
    let extra = format!(
        "{}\n[outbox]\nmin_free_disk = \"0\"\ndisk_reserve = \"1MiB\"\n\n\
         [kafka]\nenabled = true\nbrokers = [\"{}\"]\nreconnect_backoff_min = \"100ms\"\n\
         reconnect_backoff_max = \"1s\"\n",
        admin_token_config(),
        kafka.bootstrap()
    );
    let mut d = Daemon::start(dir.path(), &extra);
    assert!(data.join("outbox.reserve").exists(), "the reserve is taken");
    let secret = create_device(&d, "sensor-1", None);
    let auth = basic("sensor-1", &secret);
    for i in 0..3 {
        let (status, body) = post(&d, &auth, i * 100, 100);
        assert_eq!(status, 201, "{body}");
    }

    let filler = data.join("filler");
    fill_disk(&filler);
    d.wait_until("the disk-full alarm", Duration::from_secs(10), |d| {
        d.metric("outpost_outbox_disk_full") == 1.0
    });
    assert!(
        !data.join("outbox.reserve").exists(),
        "the reserve is released"
    );
    let (status, body) = post(&d, &auth, 1000, 1);
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("outbox_full") && body.contains("disk_full"),
        "{body}"
    );
    let line = d.wait_for_log("MQTT listener bound", Duration::from_secs(1));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let mqtt: std::net::SocketAddr = v["addr"].as_str().unwrap().parse().unwrap();
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &mqtt.port().to_string(),
            "-V",
            "mqttv5",
        ])
        .args(["-u", "sensor-1", "-P", &secret, "-i", "sensor-1", "-q", "1"])
        .args(["-t", "devices/sensor-1/t", "-m", "{\"n\":1001}"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Quota exceeded"), "mosquitto_pub: {stderr}");
    let coap = outpost_e2e::coap::coap_addr(&mut d);
    let out = Command::new(outpost_e2e::coap::coap_client())
        .args(["-B", "5", "-m", "post", "-t", "50", "-e", "{\"n\":1002}"])
        .arg(format!("coap://127.0.0.1:{}/t/a?d=sensor-1", coap.port()))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("5.03"), "coap-client: {said}");

    // A restart while the disk is full.
    let (status, _) = d.terminate(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", d.logs().join("\n"));
    let mut d = Daemon::start_with(&d.config_path, data.clone());
    assert_eq!(d.get("/healthz").0, 200);
    assert_eq!(d.metric("outpost_outbox_disk_full"), 1.0);
    assert_eq!(post(&d, &auth, 1000, 1).0, 503);

    // Kafka back: the backlog leaves the full disk.
    kafka.up(1);
    d.wait_until(
        "the backlog delivered and deleted on a full disk",
        Duration::from_secs(60),
        |d| d.metric("outpost_outbox_records") == 0.0,
    );
    let got = consume(
        kafka.bootstrap(),
        "outpost.readings",
        301,
        Duration::from_secs(5),
        false,
    );
    let mut counters = counters(&got);
    counters.dedup();
    assert_eq!(
        counters,
        (0..300).collect::<Vec<_>>(),
        "every stored reading, in order"
    );

    // Space back: appends resume by themselves.
    std::fs::remove_file(&filler).unwrap();
    d.wait_until("the alarm cleared", Duration::from_secs(10), |d| {
        d.metric("outpost_outbox_disk_full") == 0.0
    });
    assert_eq!(d.status()["alarms"], serde_json::json!([]));
    assert!(
        data.join("outbox.reserve").exists(),
        "the reserve is taken back"
    );
    let (status, body) = post(&d, &auth, 2000, 1);
    assert_eq!(status, 201, "{body}");
}

/// When deleting delivered records fails (here: a full disk with no reserve to release), the
/// forwarder stops producing until deleting works again. Before, it went on producing the whole
/// outbox: every record Kafka had but the outbox still held stayed in the forwarder's memory, and
/// all of them would be sent again after a restart. Nothing is lost once space returns.
#[test]
fn serial_the_forwarder_pauses_while_deleting_delivered_records_fails() {
    let kafka = MockKafka::start(1, &[("outpost.readings", 1)]);
    kafka.down(1);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _fs = Tmpfs::mount(&data, "16m");
    let extra = format!(
        "{}\n[outbox]\nmin_free_disk = \"0\"\ndisk_reserve = \"0B\"\n\n\
         [kafka]\nenabled = true\nbrokers = [\"{}\"]\nmax_in_flight = 100\n\
         reconnect_backoff_min = \"100ms\"\nreconnect_backoff_max = \"1s\"\n",
        admin_token_config(),
        kafka.bootstrap()
    );
    let mut d = Daemon::start(dir.path(), &extra);
    let secret = create_device(&d, "sensor-1", None);
    let auth = basic("sensor-1", &secret);
    for i in 0..20 {
        let (status, body) = post(&d, &auth, i * 100, 100);
        assert_eq!(status, 201, "{body}");
    }
    let filler = data.join("filler");
    fill_disk(&filler);
    kafka.up(1);
    d.wait_for_log("Deleting delivered records failed", Duration::from_secs(30));
    // Paused: nothing more produced while deleting fails, and what Kafka has but the outbox
    // still holds stays within the window.
    std::thread::sleep(Duration::from_secs(1));
    let produced = d.metric("outpost_kafka_produced_records_total");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        d.metric("outpost_kafka_produced_records_total"),
        produced,
        "still producing while deletes fail"
    );
    let deleted = 2000.0 - d.metric("outpost_outbox_records");
    assert!(produced < 2000.0, "the whole outbox was produced");
    assert!(
        produced - deleted <= 200.0,
        "{produced} produced, {deleted} deleted: more than the window held"
    );
    let status = d.status();
    assert!(
        status["kafka"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("deleting delivered records")),
        "{status}"
    );

    std::fs::remove_file(&filler).unwrap();
    d.wait_until(
        "everything delivered and deleted",
        Duration::from_secs(60),
        |d| d.metric("outpost_outbox_records") == 0.0,
    );
    let got = consume(
        kafka.bootstrap(),
        "outpost.readings",
        2100,
        Duration::from_secs(5),
        false,
    );
    let mut counters = counters(&got);
    counters.sort_unstable();
    counters.dedup();
    assert_eq!(counters, (0..2000).collect::<Vec<_>>(), "nothing lost");
}
