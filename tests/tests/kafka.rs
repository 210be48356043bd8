//! Cloud sync end to end: the real `outpost` binary forwards to a Kafka-protocol broker over TCP
//! and the records are read back with an rdkafka consumer.
//!
//! Brokers: librdkafka's mock cluster (`kafka-mock`, fault injection: brokers down, request
//! errors) for most tests; `tansu`, a real broker, for the `tansu_` tests. docs/KAFKA.md says
//! which broker covers what.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code, no async runtime here

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use outpost_e2e::admin::{ADMIN_TOKEN, Device, admin_token_config, create_device};
use outpost_e2e::daemon::{Daemon, outpost_cli, outpost_cli_env, write_config};
use outpost_e2e::kafka::{Consumed, MockKafka, Tansu, consume, produce_plain};

const TOPIC: &str = "outpost.readings";
/// `max_in_flight` of the tests that allow duplicates: the at-least-once window.
const WINDOW: u64 = 200;

/// `[kafka]` pointing at `bootstrap`, plus the admin token and `extra` config.
fn config(bootstrap: &str, kafka_extra: &str, extra: &str) -> String {
    let brokers: Vec<String> = bootstrap.split(',').map(|b| format!("\"{b}\"")).collect();
    format!(
        "{}\n[kafka]\nenabled = true\nbrokers = [{}]\nlinger = \"2ms\"\n\
         reconnect_backoff_min = \"100ms\"\nreconnect_backoff_max = \"1s\"\n{kafka_extra}\n{extra}\n",
        admin_token_config(),
        brokers.join(", ")
    )
}

/// The counter of a `{"n":…}` payload.
fn counter(record: &Consumed) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&record.payload)
        .unwrap_or_else(|e| panic!("payload {:?}: {e}", record.payload_str()));
    v["n"].as_u64().unwrap()
}

/// Each device's counters in the order Kafka has them (one partition per device: key = id).
fn per_device(records: &[Consumed]) -> BTreeMap<String, Vec<u64>> {
    let mut by_partition: BTreeMap<i32, Vec<&Consumed>> = BTreeMap::new();
    for r in records {
        by_partition.entry(r.partition).or_default().push(r);
    }
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (_, mut records) in by_partition {
        records.sort_by_key(|r| r.offset);
        for r in records {
            let device = r.header("outpost-device").unwrap();
            out.entry(device).or_default().push(counter(r));
        }
    }
    out
}

/// Every counter `0..sent` is there and the first occurrences are in order; at most
/// `max_duplicates` records repeat an already delivered one (at-least-once: only records that
/// were in flight when a delivery failed or the daemon stopped can be sent twice, so the
/// documented window is `kafka.max_in_flight`).
fn assert_complete_in_order(device: &str, got: &[u64], sent: u64, max_duplicates: u64) {
    let mut seen = HashSet::new();
    let mut firsts = Vec::new();
    for n in got {
        if seen.insert(*n) {
            firsts.push(*n);
        }
    }
    let expected: Vec<u64> = (0..sent).collect();
    assert_eq!(
        firsts,
        expected,
        "{device}: records missing or out of order (got {} records)",
        got.len()
    );
    let duplicates = got.len() as u64 - sent;
    assert!(
        duplicates <= max_duplicates,
        "{device}: {duplicates} duplicates, more than {max_duplicates}"
    );
}

/// Reads `TOPIC` back and checks every device's records: all there, in order, at most
/// `max_duplicates` repeated. With `read_committed`, only committed transactions count.
fn assert_topic_holds(
    bootstrap: &str,
    devices: &[Device],
    max_duplicates: u64,
    read_committed: bool,
) {
    let total: u64 = devices.iter().map(|dv| dv.next).sum();
    // Ask for one more than can arrive: the read then runs to its timeout and sees extras too.
    let got = consume(
        bootstrap,
        TOPIC,
        (total + max_duplicates) as usize + 1,
        Duration::from_secs(5),
        read_committed,
    );
    let by_device = per_device(&got);
    for dev in devices {
        let records = by_device.get(&dev.id).map_or(&[][..], Vec::as_slice);
        assert_complete_in_order(&dev.id, records, dev.next, max_duplicates);
    }
}

fn wait_delivered(d: &mut Daemon, what: &str, timeout: Duration) {
    d.wait_until(what, timeout, |d| {
        d.metric("outpost_outbox_records") == 0.0
            && d.status()["kafka"]["in_flight"].as_u64() == Some(0)
    });
}

#[test]
fn records_reach_kafka_keyed_by_device_with_headers_in_receive_order() {
    let kafka = MockKafka::start(1, &[(TOPIC, 3)]);
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &config(kafka.bootstrap(), "", ""));
    let mut devices = [Device::new(&d, "pump-1"), Device::new(&d, "valve-2")];
    for round in 0..10 {
        for dev in &mut devices {
            dev.send(&d, &format!("devices/{}/telemetry", dev.id), 20 + round);
        }
    }
    let total: u64 = devices.iter().map(|dv| dv.next).sum();
    let got = consume(
        kafka.bootstrap(),
        TOPIC,
        total as usize,
        Duration::from_secs(30),
        false,
    );
    assert_eq!(got.len() as u64, total, "every record arrives");
    for r in &got {
        let device = r.header("outpost-device").unwrap();
        assert_eq!(r.key.as_deref(), Some(device.as_bytes()), "key = device id");
        assert_eq!(r.header("outpost-source").as_deref(), Some("http"));
        assert_eq!(
            r.header("outpost-topic"),
            Some(format!("devices/{device}/telemetry"))
        );
        assert_eq!(
            r.header("outpost-content-type").as_deref(),
            Some("application/json")
        );
        assert!(r.header("outpost-gateway").is_some_and(|g| !g.is_empty()));
        assert!(r.header("outpost-boot").is_some_and(|b| b.len() >= 32));
        let seq: u64 = r.header("outpost-seq").unwrap().parse().unwrap();
        assert!(seq >= 1);
        let outbox = r.header("outpost-outbox").unwrap_or_default();
        assert!(
            outbox.len() == 32 && outbox.bytes().all(|b| b.is_ascii_hexdigit()),
            "outpost-outbox: {outbox:?}"
        );
        let received: i64 = r.header("outpost-received-at").unwrap().parse().unwrap();
        assert_eq!(
            r.timestamp,
            Some(received),
            "Kafka timestamp = receipt time"
        );
        assert!(r.payload.starts_with(b"{\"n\":"), "payload unchanged");
    }
    let by_device = per_device(&got);
    for dev in &devices {
        assert_complete_in_order(&dev.id, &by_device[&dev.id], dev.next, 0);
    }
    // The same records through a client nobody here wrote: kcat (librdkafka's CLI).
    let kcat = std::process::Command::new("kcat")
        .args([
            "-C",
            "-b",
            kafka.bootstrap(),
            "-t",
            TOPIC,
            "-o",
            "beginning",
            "-e",
            "-q",
        ])
        .args(["-f", "%k %h\n"])
        .output()
        .expect("kcat (apt install kcat; scripts/setup-test-deps.sh installs it)");
    assert!(kcat.status.success(), "{kcat:?}");
    let lines: Vec<String> = String::from_utf8_lossy(&kcat.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len() as u64, total, "kcat reads every record");
    for line in &lines {
        let (key, headers) = line.split_once(' ').unwrap();
        assert!(
            headers.contains(&format!("outpost-device={key}")),
            "kcat: key and device header disagree: {line}"
        );
    }
    wait_delivered(&mut d, "outbox empty", Duration::from_secs(10));
    let status = d.status();
    assert_eq!(status["kafka"]["state"], "live", "{status}");
    assert_eq!(status["kafka"]["delivered"].as_u64(), Some(total));
    assert_eq!(
        d.metric("outpost_kafka_delivered_records_total"),
        total as f64
    );
    let cloud = status["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "cloud")
        .cloned()
        .unwrap();
    assert_eq!(cloud["state"], "ACTIVE", "{cloud}");
    let (exit, _) = d.terminate(Duration::from_secs(15));
    assert!(exit.success());
}

#[test]
fn rules_choose_topic_and_key_and_drop_or_sample() {
    let kafka = MockKafka::start(1, &[(TOPIC, 1), ("alerts", 1), ("meters", 1)]);
    let dir = tempfile::tempdir().unwrap();
    let rules = r#"
[[kafka.rules]]
name = "debug-noise"
topic = "devices/+/debug/#"
action = "drop"

[[kafka.rules]]
topic = "devices/+/alerts"
kafka_topic = "alerts"
key = "topic"
priority = 9

[[kafka.rules]]
name = "meter-sample"
device = "meter-*"
action = "sample"
sample_every = 4
kafka_topic = "meters"
"#;
    let mut d = Daemon::start(dir.path(), &config(kafka.bootstrap(), rules, ""));
    let mut pump = Device::new(&d, "pump-1");
    let mut meter = Device::new(&d, "meter-1");
    pump.send(&d, "devices/pump-1/debug/trace", 10);
    pump.send(&d, "devices/pump-1/alerts", 5);
    pump.send(&d, "devices/pump-1/telemetry", 7);
    meter.send(&d, "devices/meter-1/telemetry", 40);
    wait_delivered(
        &mut d,
        "every record forwarded or dropped",
        Duration::from_secs(20),
    );

    let alerts = consume(
        kafka.bootstrap(),
        "alerts",
        6,
        Duration::from_secs(3),
        false,
    );
    assert_eq!(alerts.len(), 5, "alerts topic");
    assert!(
        alerts
            .iter()
            .all(|r| r.key.as_deref() == Some(&b"devices/pump-1/alerts"[..]))
    );
    let readings = consume(kafka.bootstrap(), TOPIC, 8, Duration::from_secs(3), false);
    assert_eq!(
        readings.len(),
        7,
        "unmatched records go to the default topic"
    );
    let counters: Vec<u64> = readings.iter().map(counter).collect();
    assert_eq!(counters, (15..22).collect::<Vec<_>>(), "no debug record");
    let meters = consume(
        kafka.bootstrap(),
        "meters",
        41,
        Duration::from_secs(3),
        false,
    );
    assert_eq!(meters.len(), 10, "one meter record in four");
    for r in &meters {
        let seq: u64 = r.header("outpost-seq").unwrap().parse().unwrap();
        assert_eq!(seq % 4, 0, "sampled by gateway sequence");
    }
    assert_eq!(
        d.metric("outpost_kafka_dropped_records_total{rule=\"debug-noise\"}"),
        10.0
    );
    assert_eq!(
        d.metric("outpost_kafka_dropped_records_total{rule=\"meter-sample\"}"),
        30.0
    );
}

/// `SIGHUP` replaces `[[kafka.rules]]`: records sent before the reload went where the old rule
/// said, the next ones go where the new one says (no restart, the forwarder keeps its
/// connection), and the status lists `kafka.rules` as applied, not as needing a restart.
#[test]
fn a_reload_applies_changed_rules_to_the_next_record() {
    let kafka = MockKafka::start(1, &[(TOPIC, 1), ("alerts", 1), ("meters", 1)]);
    let dir = tempfile::tempdir().unwrap();
    let before = "[[kafka.rules]]\ntopic = \"devices/+/alerts\"\nkafka_topic = \"alerts\"\n";
    let after = "[[kafka.rules]]\ntopic = \"devices/+/alerts\"\nkafka_topic = \"meters\"\n\n\
                 [[kafka.rules]]\nname = \"mute\"\ntopic = \"devices/+/debug\"\naction = \"drop\"\n";
    let config_path = write_config(dir.path(), &config(kafka.bootstrap(), before, ""));
    let mut d = Daemon::start_with(&config_path, dir.path().join("data"));
    let mut pump = Device::new(&d, "pump-1");
    pump.send(&d, "devices/pump-1/alerts", 3);
    pump.send(&d, "devices/pump-1/debug", 2);
    wait_delivered(&mut d, "the first records", Duration::from_secs(20));

    let text = std::fs::read_to_string(&config_path).unwrap();
    assert!(text.contains(before));
    std::fs::write(&config_path, text.replace(before, after)).unwrap();
    outpost_e2e::daemon::signal(d.pid(), rustix::process::Signal::HUP);
    d.wait_until("the reload", Duration::from_secs(10), |d| {
        d.status()["config"]["reloads"] == 1
    });
    let report = d.status()["config"].clone();
    assert_eq!(
        report["applied"],
        serde_json::json!(["kafka.rules"]),
        "{report}"
    );
    assert_eq!(report["needs_restart"], serde_json::json!([]), "{report}");

    pump.send(&d, "devices/pump-1/alerts", 4);
    pump.send(&d, "devices/pump-1/debug", 5);
    wait_delivered(
        &mut d,
        "the records after the reload",
        Duration::from_secs(20),
    );
    let alerts = consume(
        kafka.bootstrap(),
        "alerts",
        8,
        Duration::from_secs(3),
        false,
    );
    assert_eq!(alerts.iter().map(counter).collect::<Vec<_>>(), [0, 1, 2]);
    let meters = consume(
        kafka.bootstrap(),
        "meters",
        8,
        Duration::from_secs(3),
        false,
    );
    assert_eq!(meters.iter().map(counter).collect::<Vec<_>>(), [5, 6, 7, 8]);
    let readings = consume(kafka.bootstrap(), TOPIC, 8, Duration::from_secs(3), false);
    assert_eq!(
        readings.iter().map(counter).collect::<Vec<_>>(),
        [3, 4],
        "debug records before the reload went to the default topic, none after"
    );
    assert_eq!(
        d.metric("outpost_kafka_dropped_records_total{rule=\"mute\"}"),
        5.0
    );
}

#[test]
fn a_broker_outage_loses_nothing_and_keeps_device_order() {
    let kafka = MockKafka::start(1, &[(TOPIC, 2)]);
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        dir.path(),
        &config(
            kafka.bootstrap(),
            "offline_after = \"1s\"\nmax_in_flight = 200\n",
            "",
        ),
    );
    let mut devices = [Device::new(&d, "a-1"), Device::new(&d, "b-2")];
    for dev in &mut devices {
        dev.send(&d, "t", 100);
    }
    kafka.down(1);
    // Records keep arriving during the outage; they are acknowledged to the devices (committed)
    // and wait in the outbox.
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(8) {
        for dev in &mut devices {
            dev.send(&d, "t", 50);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    d.wait_until("forwarder offline", Duration::from_secs(10), |d| {
        d.status()["kafka"]["state"] == "offline"
    });
    let status = d.status();
    assert!(
        status["kafka"]["offline_since_ms"].as_i64().is_some(),
        "{status}"
    );
    assert!(status["kafka"]["backlog_records"].as_u64().unwrap() > 1000);
    assert!(d.metric("outpost_kafka_offline_since_timestamp_seconds") > 0.0);
    kafka.up(1);
    for dev in &mut devices {
        dev.send(&d, "t", 10);
    }
    wait_delivered(&mut d, "backlog delivered", Duration::from_secs(60));
    assert_topic_holds(kafka.bootstrap(), &devices, WINDOW, false);
    let status = d.status();
    assert_eq!(status["kafka"]["offline_since_ms"], serde_json::Value::Null);
    assert_eq!(
        status["kafka"]["last_error"],
        serde_json::Value::Null,
        "the outage's error is cleared by the recovery: {status}"
    );
    // 200 records were in flight when the broker came back: one recovery, one line.
    let recoveries = d.count_log_lines("Kafka is reachable again", 1, Duration::from_secs(5));
    assert_eq!(recoveries, 1, "one outage, one recovery line");
}

/// With nothing in flight no acknowledgement can tell that Kafka is gone: the forwarder probes
/// it and reports an outage, and the recovery, within 15 s — after a start with the broker
/// already unreachable, and when it goes away while the gateway is idle; in both delivery modes.
#[test]
fn alone_an_idle_forwarder_reports_an_outage_and_the_recovery_within_15_s() {
    for extra in ["", "exactly_once = true\n"] {
        let kafka = MockKafka::start(1, &[(TOPIC, 1), ("outpost.checkpoints", 1)]);
        kafka.down(1);
        let dir = tempfile::tempdir().unwrap();
        let mut d = Daemon::start(dir.path(), &config(kafka.bootstrap(), extra, ""));
        d.wait_until(
            "offline after a start without Kafka",
            Duration::from_secs(15),
            |d| d.status()["kafka"]["state"] == "offline",
        );
        kafka.up(1);
        d.wait_until("live once Kafka is there", Duration::from_secs(15), |d| {
            d.status()["kafka"]["state"] == "live"
        });
        let mut dev = Device::new(&d, "idle-1");
        dev.send(&d, "t", 3);
        wait_delivered(&mut d, "delivered", Duration::from_secs(30));
        kafka.down(1);
        d.wait_until("offline while idle", Duration::from_secs(15), |d| {
            d.status()["kafka"]["state"] == "offline"
        });
        kafka.up(1);
        d.wait_until("live again", Duration::from_secs(15), |d| {
            d.status()["kafka"]["state"] == "live"
        });
        let status = d.status();
        assert_eq!(
            status["kafka"]["last_error"],
            serde_json::Value::Null,
            "{extra}: {status}"
        );
        dev.send(&d, "t", 2);
        wait_delivered(
            &mut d,
            "delivered after the outage",
            Duration::from_secs(30),
        );
        let (exit, _) = d.terminate(Duration::from_secs(15));
        assert!(exit.success());
    }
}

/// A record the producer refuses outright (here: larger than librdkafka's `message.max.bytes`,
/// which `max_record_bytes = "2MiB"` lets into the outbox) counts as a failed record.
/// Posts one JSON record `{"n":0,"blob":"xxx…"}` of about `size` bytes for `dev` on `topic`.
fn post_big(d: &Daemon, dev: &Device, topic: &str, size: usize) {
    let body = format!("{{\"n\":0,\"blob\":\"{}\"}}", "x".repeat(size));
    dev.post(d, topic, "application/json", body.as_bytes());
}

/// Kafka settings for the poison-record tests: a dead-letter topic, and a rule that sends
/// `locked/#` to a topic the broker refuses.
const POISON_KAFKA: &str = "[kafka.dead_letter]\ntopic = \"outpost.dead\"\n\n\
    [[kafka.rules]]\ntopic = \"locked/#\"\nkafka_topic = \"forbidden\"\n";
/// Records up to 2 MiB accepted from devices: more than Kafka takes by default (a warning).
const LARGE_RECORDS: &str =
    "[outbox]\nmax_record_bytes = \"2MiB\"\n[http_ingest]\nmax_body = \"2MiB\"\n";

/// One bad record never blocks the others (docs/KAFKA.md, "Poison records"). A 1.5 MB record
/// (accepted: `max_record_bytes` is 2 MiB) that Kafka's client refuses as too large, and a record
/// for a topic the broker refuses (TopicAuthorizationFailed): before, each failure made the
/// forwarder stop and plan again forever, and another device's 31 records waited behind them.
/// Now the refused-topic record goes to the dead-letter topic with its error headers, the too-large
/// one (which the dead-letter topic refuses too) to the local dead-letter table, and the rest flows.
#[test]
fn poison_records_are_moved_aside_and_never_block_the_others() {
    let kafka = MockKafka::start(1, &[(TOPIC, 1), ("forbidden", 1), ("outpost.dead", 1)]);
    kafka.topic_error("forbidden", "TopicAuthorizationFailed");
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        dir.path(),
        &config(kafka.bootstrap(), POISON_KAFKA, LARGE_RECORDS),
    );
    let big = Device::new(&d, "big-1");
    post_big(&d, &big, "t", 1_500_000);
    let mut locked = Device::new(&d, "locked-1");
    locked.send(&d, "locked/a", 1);
    let mut other = Device::new(&d, "other-1");
    other.send(&d, "t", 31);
    wait_delivered(
        &mut d,
        "every record forwarded or moved aside",
        Duration::from_secs(30),
    );
    other.send(&d, "t", 9);
    wait_delivered(&mut d, "later records", Duration::from_secs(10));

    let poison = |reason: &str, to: &str| {
        d.metric(&format!(
            "outpost_kafka_poison_records_total{{reason=\"{reason}\",to=\"{to}\"}}"
        ))
    };
    assert_eq!(poison("too_large", "local"), 1.0);
    assert_eq!(poison("topic_authorization", "topic"), 1.0);
    assert_eq!(d.metric("outpost_outbox_dead_letters"), 1.0);
    assert!(d.metric("outpost_kafka_failed_records_total") >= 2.0);
    let status = d.status();
    assert_eq!(status["kafka"]["poison"].as_u64(), Some(2), "{status}");

    let got = consume(kafka.bootstrap(), TOPIC, 41, Duration::from_secs(3), false);
    assert_complete_in_order(&other.id, &per_device(&got)[&other.id], other.next, 0);
    assert!(
        got.iter()
            .all(|r| r.header("outpost-device").as_deref() == Some("other-1"))
    );

    let dead = consume(
        kafka.bootstrap(),
        "outpost.dead",
        2,
        Duration::from_secs(3),
        false,
    );
    assert_eq!(
        dead.len(),
        1,
        "only the refused-topic record reached the dead-letter topic"
    );
    let r = &dead[0];
    assert_eq!(r.key.as_deref(), Some(&b"locked-1"[..]));
    assert_eq!(counter(r), 0, "the original payload");
    for (header, want) in [
        ("outpost-device", "locked-1"),
        ("outpost-topic", "locked/a"),
        ("outpost-error-reason", "topic_authorization"),
        ("outpost-error-topic", "forbidden"),
        ("outpost-error-attempts", "1"),
    ] {
        assert_eq!(r.header(header).as_deref(), Some(want), "{header}");
    }
    assert!(r.header("outpost-error").unwrap().contains("uthorization"));
}

/// The local dead-letter table through the real CLI: with no dead-letter topic, records for a
/// topic the broker refuses are moved to the table (an alarm in the status); `outpost
/// dead-letters list` shows them with why; once the broker accepts the topic, `retry` sends one
/// again under its own sequence and it reaches Kafka; `drop --all` deletes the rest for good.
#[test]
fn dead_letters_are_listed_retried_and_dropped_with_the_cli() {
    let kafka = MockKafka::start(1, &[(TOPIC, 1), ("forbidden", 1)]);
    kafka.topic_error("forbidden", "TopicAuthorizationFailed");
    let dir = tempfile::tempdir().unwrap();
    let rules = "[[kafka.rules]]\ntopic = \"locked/#\"\nkafka_topic = \"forbidden\"\n";
    let mut d = Daemon::start(dir.path(), &config(kafka.bootstrap(), rules, ""));
    let mut locked = Device::new(&d, "locked-1");
    locked.send(&d, "locked/a", 3);
    d.wait_until("three dead letters", Duration::from_secs(20), |d| {
        d.metric("outpost_outbox_dead_letters") == 3.0
    });
    let status = d.status();
    assert!(
        status["alarms"].to_string().contains("3 dead letter(s)"),
        "{status}"
    );
    let url = format!("http://{}", d.admin);
    let cli = |args: &[&str]| {
        let mut all = vec!["dead-letters"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--url", &url]);
        outpost_cli_env(&all, &[("OUTPOST_API_TOKEN", ADMIN_TOKEN)])
    };
    let (code, out, err) = cli(&["list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let listed = listed
        .as_array()
        .or_else(|| listed["dead_letters"].as_array())
        .unwrap()
        .clone();
    assert_eq!(listed.len(), 3, "{listed:?}");
    for l in &listed {
        assert_eq!(l["reason"], "topic_authorization");
        assert_eq!(l["kafka_topic"], "forbidden");
        assert_eq!(l["device_id"], "locked-1");
    }
    let first = listed[0]["seq"].as_u64().unwrap();
    let (code, out, err) = cli(&["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("topic_authorization") && out.contains("locked-1"),
        "{out}"
    );

    // The broker accepts the topic again. librdkafka learns it at its next metadata refresh: a
    // retry before that is refused again and comes back to the table, so retry until it goes,
    // as an operator would.
    kafka.topic_error("forbidden", "NoError");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, out, err) = cli(&["retry", &first.to_string()]);
        assert_eq!(code, 0, "{out}{err}");
        std::thread::sleep(Duration::from_secs(1));
        if d.metric("outpost_kafka_delivered_records_total") >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the retried record never went");
    }
    d.wait_until("the retried record deleted", Duration::from_secs(10), |d| {
        d.metric("outpost_outbox_records") == 0.0 && d.metric("outpost_outbox_dead_letters") == 2.0
    });
    let got = consume(
        kafka.bootstrap(),
        "forbidden",
        2,
        Duration::from_secs(5),
        false,
    );
    assert_eq!(got.len(), 1);
    assert_eq!(counter(&got[0]), 0);
    assert_eq!(
        got[0].header("outpost-seq"),
        Some(first.to_string()),
        "its own sequence"
    );

    let (code, out, err) = cli(&["drop", "--all"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(d.metric("outpost_outbox_dead_letters"), 0.0);
    let status = d.status();
    assert!(
        !status["alarms"].to_string().contains("dead letter"),
        "{status}"
    );
}

/// A topic the cluster does not have: librdkafka holds its records for
/// `dead_letter.unknown_topic_timeout` (a new topic may take a moment to appear), then they are
/// poison (`unknown_topic`) and go to the local table; another topic's records flow meanwhile.
#[test]
fn records_for_a_topic_the_cluster_lacks_are_poison_after_the_unknown_topic_timeout() {
    let kafka = MockKafka::start(1, &[(TOPIC, 1)]);
    kafka.topic_error("ghost", "UnknownTopicOrPart");
    let dir = tempfile::tempdir().unwrap();
    let rules = "[kafka.dead_letter]\nunknown_topic_timeout = \"3s\"\n\n\
                 [[kafka.rules]]\ntopic = \"ghost/#\"\nkafka_topic = \"ghost\"\n";
    let mut d = Daemon::start(dir.path(), &config(kafka.bootstrap(), rules, ""));
    let mut ghost = Device::new(&d, "ghost-1");
    let mut other = Device::new(&d, "other-1");
    let sent = Instant::now();
    ghost.send(&d, "ghost/a", 2);
    other.send(&d, "t", 20);
    let unknown = "outpost_kafka_poison_records_total{reason=\"unknown_topic\",to=\"local\"}";
    d.wait_until(
        "the unknown topic's records moved aside",
        Duration::from_secs(30),
        |d| d.metric(unknown) == 2.0,
    );
    assert!(
        sent.elapsed() >= Duration::from_secs(3),
        "held for the timeout first ({:?})",
        sent.elapsed()
    );
    wait_delivered(&mut d, "the other topic's records", Duration::from_secs(10));
    let got = consume(kafka.bootstrap(), TOPIC, 21, Duration::from_secs(3), false);
    assert_complete_in_order(&other.id, &per_device(&got)[&other.id], other.next, 0);
    assert_eq!(d.metric("outpost_outbox_dead_letters"), 2.0);
}

/// Waits until the gateway's startup heartbeat is in Kafka. The mock's injected errors hit the
/// next Produce requests of *any* producer: before this, the heartbeat producer's first request
/// could take one meant for the forwarder (seen as a flaky test). After it, that producer sends
/// nothing until its next tick (`kafka.heartbeat_interval`, 30 s by default).
fn wait_startup_heartbeat(kafka: &MockKafka) {
    let heartbeats = consume(
        kafka.bootstrap(),
        "outpost.heartbeats",
        1,
        Duration::from_secs(20),
        false,
    );
    assert_eq!(heartbeats.len(), 1, "the startup heartbeat reached Kafka");
}

/// An error neither known to be permanent nor an outage is retried, counting the record's
/// attempts: after `dead_letter.max_attempts` failures the record is poison (reason `attempts`)
/// and goes to the dead-letter topic; the records after it are delivered.
#[test]
fn a_record_that_keeps_failing_is_moved_aside_after_its_attempts() {
    let kafka = MockKafka::start(1, &[(TOPIC, 1), ("outpost.dead", 1)]);
    let dir = tempfile::tempdir().unwrap();
    let kafka_extra = "[kafka.dead_letter]\ntopic = \"outpost.dead\"\nmax_attempts = 2\n";
    let mut d = Daemon::start(dir.path(), &config(kafka.bootstrap(), kafka_extra, ""));
    let mut dev = Device::new(&d, "a-1");
    dev.send(&d, "t", 1);
    wait_delivered(&mut d, "the first record", Duration::from_secs(20));
    wait_startup_heartbeat(&kafka);
    kafka.errors("Produce", 2, "InvalidRequiredAcks");
    dev.send(&d, "t", 1);
    d.wait_until("moved aside", Duration::from_secs(20), |d| {
        d.metric("outpost_kafka_poison_records_total{reason=\"attempts\",to=\"topic\"}") == 1.0
    });
    dev.send(&d, "t", 3);
    wait_delivered(&mut d, "the records after it", Duration::from_secs(20));
    let dead = consume(
        kafka.bootstrap(),
        "outpost.dead",
        2,
        Duration::from_secs(3),
        false,
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(counter(&dead[0]), 1);
    assert_eq!(
        dead[0].header("outpost-error-reason").as_deref(),
        Some("attempts")
    );
    assert_eq!(
        dead[0].header("outpost-error-attempts").as_deref(),
        Some("2")
    );
    let got = consume(kafka.bootstrap(), TOPIC, 5, Duration::from_secs(3), false);
    let counters: Vec<u64> = got.iter().map(counter).collect();
    assert_eq!(
        counters,
        [0, 2, 3, 4],
        "all but the poison record, in order"
    );
}

/// A topic whose partition has no leader holds only its share of the window
/// (`max_in_flight_per_topic`, half of `max_in_flight` by default): another topic's records keep
/// flowing. Before, the stuck topic's records filled the whole window and nothing else moved. When
/// the leader is back, the stuck records arrive complete and in order. Stuck records held for
/// longer than `offline_after` while the brokers answer are not an outage: the forwarder stays
/// live (before, it went offline and the next acknowledgement started a rewind that waited for
/// the stuck records, so the other topic stopped too).
#[test]
fn a_stuck_partition_holds_only_its_topics_share_of_the_window() {
    let kafka = MockKafka::start(1, &[(TOPIC, 1), ("slow", 1)]);
    kafka.leader("slow", 0, None);
    let dir = tempfile::tempdir().unwrap();
    // `offline_after` 3 s (probes every 1.5 s): short enough to pass it twice here, long
    // enough that a probe slowed by a loaded machine still answers in time.
    let rules = "max_in_flight = 100\noffline_after = \"3s\"\n[[kafka.rules]]\n\
                 topic = \"slow/#\"\nkafka_topic = \"slow\"\n";
    let mut d = Daemon::start(dir.path(), &config(kafka.bootstrap(), rules, ""));
    let mut slow = Device::new(&d, "slow-1");
    slow.send(&d, "slow/a", 150);
    d.wait_until(
        "the stuck topic's share in flight",
        Duration::from_secs(10),
        |d| d.status()["kafka"]["in_flight"].as_u64() == Some(50),
    );
    // No condition can show "stayed live": let two `offline_after`s pass.
    std::thread::sleep(Duration::from_secs(7));
    let status = d.status();
    assert_eq!(status["kafka"]["state"], "live", "{status}");
    let mut fast = Device::new(&d, "fast-1");
    fast.send(&d, "t", 60);
    fast.send(&d, "t", 60);
    let got = consume(
        kafka.bootstrap(),
        TOPIC,
        120,
        Duration::from_secs(20),
        false,
    );
    assert_complete_in_order(&fast.id, &per_device(&got)[&fast.id], fast.next, 0);
    assert_eq!(
        d.status()["kafka"]["in_flight"].as_u64(),
        Some(50),
        "the stuck topic never took more than its share"
    );

    kafka.leader("slow", 0, Some(1));
    slow.send(&d, "slow/a", 10);
    wait_delivered(
        &mut d,
        "the stuck topic after its leader is back",
        Duration::from_secs(60),
    );
    let got = consume(
        kafka.bootstrap(),
        "slow",
        161,
        Duration::from_secs(5),
        false,
    );
    assert_complete_in_order(&slow.id, &per_device(&got)[&slow.id], slow.next, 0);
}

#[test]
fn produce_errors_and_a_fatal_idempotence_error_lose_nothing() {
    let kafka = MockKafka::start(1, &[(TOPIC, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        dir.path(),
        &config(kafka.bootstrap(), "max_in_flight = 200\n", ""),
    );
    let mut dev = Device::new(&d, "s-1");
    dev.send(&d, "t", 50);
    wait_delivered(&mut d, "first records", Duration::from_secs(20));
    wait_startup_heartbeat(&kafka);
    // Retriable errors: librdkafka retries them itself, in order.
    kafka.errors("Produce", 5, "NotLeaderForPartition");
    dev.send(&d, "t", 50);
    wait_delivered(&mut d, "after retriable errors", Duration::from_secs(20));
    // A sequence desynchronisation on the head-of-line request is fatal for an idempotent
    // producer: the forwarder recreates it and sends the undelivered records again.
    kafka.errors("Produce", 1, "OutOfOrderSequenceNumber");
    dev.send(&d, "t", 50);
    wait_delivered(&mut d, "after the fatal error", Duration::from_secs(30));
    dev.send(&d, "t", 50);
    wait_delivered(&mut d, "with the new producer", Duration::from_secs(20));
    assert!(d.metric("outpost_kafka_producer_restarts_total") >= 1.0);
    let got = consume(
        kafka.bootstrap(),
        TOPIC,
        dev.next as usize * 2,
        Duration::from_secs(5),
        false,
    );
    assert_complete_in_order(&dev.id, &per_device(&got)[&dev.id], dev.next, WINDOW);
}

/// A daemon whose only broker is down, draining a backlog at 500 records/s once it comes back,
/// with `order` (the backlog tests).
fn backlog_daemon(order: &str) -> (MockKafka, tempfile::TempDir, Daemon) {
    let kafka = MockKafka::start(1, &[(TOPIC, 1)]);
    kafka.down(1);
    let dir = tempfile::tempdir().unwrap();
    let kafka_extra = format!(
        "order = \"{order}\"\nbacklog_rate = 500\nmax_in_flight = 200\noffline_after = \"1s\"\n"
    );
    let d = Daemon::start(dir.path(), &config(kafka.bootstrap(), &kafka_extra, ""));
    (kafka, dir, d)
}

/// Waits until the forwarder reports the outage, brings the broker back, and waits for the
/// backlog drain to start.
fn recover(kafka: &MockKafka, d: &mut Daemon) {
    d.wait_until("offline", Duration::from_secs(10), |d| {
        d.status()["kafka"]["state"] == "offline"
    });
    kafka.up(1);
    d.wait_until("backfill", Duration::from_secs(10), |d| {
        d.status()["kafka"]["state"] == "backfill"
    });
}

#[test]
fn alone_live_records_go_first_while_a_backlog_drains_at_its_rate() {
    let (kafka, _dir, mut d) = backlog_daemon("per_device");
    let mut backlogged = Device::new(&d, "old-1");
    let mut fresh = Device::new(&d, "new-2");
    for _ in 0..6 {
        backlogged.send(&d, "t", 1000);
    }
    recover(&kafka, &mut d);
    // A fresh record of a device without a backlog reaches Kafka within 2 s although ~6000
    // records are ahead of it in the outbox (12 s of backlog at 500/s).
    let t0 = Instant::now();
    fresh.send(&d, "t", 1);
    let got = consume(
        kafka.bootstrap(),
        TOPIC,
        100_000,
        Duration::from_secs(2),
        false,
    );
    assert!(
        got.iter()
            .any(|r| r.header("outpost-device").as_deref() == Some("new-2")),
        "the live record did not arrive within 2 s"
    );
    assert!(t0.elapsed() < Duration::from_secs(3));
    let drained_so_far = got.len();
    assert!(
        drained_so_far < 6000,
        "the backlog drained faster than its rate: {drained_so_far} records"
    );
    // A live record of the backlogged device waits behind its own backlog (per-device order).
    backlogged.send(&d, "t", 1);
    wait_delivered(&mut d, "backlog drained", Duration::from_secs(60));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(8),
        "6000 records at 500/s took only {took:?}"
    );
    let got = consume(
        kafka.bootstrap(),
        TOPIC,
        100_000,
        Duration::from_secs(3),
        false,
    );
    let by_device = per_device(&got);
    assert_complete_in_order("old-1", &by_device["old-1"], backlogged.next, WINDOW);
    assert_complete_in_order("new-2", &by_device["new-2"], fresh.next, WINDOW);
    assert_eq!(d.status()["kafka"]["state"], "live");
}

/// Priority is the one deliberate exception to per-device order (docs/KAFKA.md, "Order"): during
/// a backlog a device's higher-priority records (here from a rule) go before its older
/// lower-priority ones; within a priority the receive order holds, and `outpost-seq` restores the
/// receive order across priorities.
#[test]
fn a_devices_higher_priority_records_overtake_its_backlog_and_seq_restores_the_order() {
    let kafka = MockKafka::start(1, &[(TOPIC, 1)]);
    kafka.down(1);
    let dir = tempfile::tempdir().unwrap();
    let rules = "[[kafka.rules]]\ntopic = \"alarms\"\npriority = 9\n";
    let config_path = write_config(dir.path(), &config(kafka.bootstrap(), "", rules));
    let data_dir = dir.path().join("data");
    let mut d = Daemon::start_with(&config_path, data_dir.clone());
    let mut dev = Device::new(&d, "p-1");
    dev.send(&d, "t", 3); // counters 0, 1, 2: priority 0
    dev.send(&d, "alarms", 2); // counters 3, 4: priority 9
    // Committed, never acknowledged by Kafka: after a restart all five are the backlog.
    d.kill9();
    kafka.up(1);
    let mut d = Daemon::start_with(&config_path, data_dir);
    wait_delivered(&mut d, "backlog drained", Duration::from_secs(30));
    let got = consume(kafka.bootstrap(), TOPIC, 6, Duration::from_secs(3), false);
    let arrival: Vec<u64> = got.iter().map(counter).collect();
    assert_eq!(
        arrival,
        [3, 4, 0, 1, 2],
        "alarms first, each priority in receive order"
    );
    let mut by_seq: Vec<(u64, u64)> = got
        .iter()
        .map(|r| {
            (
                r.header("outpost-seq").unwrap().parse().unwrap(),
                counter(r),
            )
        })
        .collect();
    by_seq.sort_unstable();
    let restored: Vec<u64> = by_seq.into_iter().map(|(_, n)| n).collect();
    assert_eq!(
        restored,
        [0, 1, 2, 3, 4],
        "outpost-seq restores the receive order"
    );
}

/// `order = "live_first"`: a fresh record of a device that has a backlog jumps ahead of that
/// backlog; `outpost-seq` restores the receive order.
#[test]
fn alone_live_first_order_sends_a_backlogged_devices_fresh_record_at_once() {
    let (kafka, _dir, mut d) = backlog_daemon("live_first");
    let mut dev = Device::new(&d, "lf-1");
    for _ in 0..6 {
        dev.send(&d, "t", 1000);
    }
    recover(&kafka, &mut d);
    let t0 = Instant::now();
    dev.send(&d, "t", 1); // counter 6000
    let got = consume(
        kafka.bootstrap(),
        TOPIC,
        100_000,
        Duration::from_secs(2),
        false,
    );
    assert!(
        got.iter().any(|r| counter(r) == 6000),
        "the fresh record did not arrive within 2 s"
    );
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(
        got.len() < 6000,
        "the backlog was already drained: {}",
        got.len()
    );
    wait_delivered(&mut d, "backlog drained", Duration::from_secs(60));
    let got = consume(
        kafka.bootstrap(),
        TOPIC,
        100_000,
        Duration::from_secs(3),
        false,
    );
    // Kafka order: the fresh record is ahead of part of its device's backlog...
    let kafka_order: Vec<u64> = got.iter().map(counter).collect();
    let fresh_at = kafka_order.iter().position(|n| *n == 6000).unwrap();
    assert!(kafka_order[fresh_at + 1..].iter().any(|n| *n < 6000));
    // ... and the gateway sequence restores the receive order.
    let mut by_seq: Vec<(u64, u64)> = got
        .iter()
        .map(|r| {
            (
                r.header("outpost-seq").unwrap().parse().unwrap(),
                counter(r),
            )
        })
        .collect();
    by_seq.sort_unstable();
    by_seq.dedup();
    let counters: Vec<u64> = by_seq.iter().map(|(_, n)| *n).collect();
    assert_complete_in_order("lf-1", &counters, dev.next, 0);
}

// librdkafka's mock cluster has no transaction isolation: its EndTxn changes nothing and its
// fetches report no aborted transactions, so a `read_committed` consumer sees every record that
// reached it, committed or not. The exactly-once tests below are built around that: where every
// record of a transaction reached the broker before the fault, zero duplicates means the
// forwarder did not produce them again; where a fault can leave records of an uncommitted
// transaction behind, the mock shows them, and the bound says how many that can be.

/// The files of an exactly-once daemon on `kafka` reading `read_batch` records per transaction:
/// the directory (dropping it removes them), the config and the data directory.
fn exactly_once_files(kafka: &MockKafka, read_batch: u64) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        kafka.bootstrap(),
        &format!("exactly_once = true\nread_batch = {read_batch}\n"),
        "",
    );
    let config_path = write_config(dir.path(), &text);
    let data_dir = dir.path().join("data");
    (dir, config_path, data_dir)
}

/// A commit that fails after its records reached the broker, and a crash right after a commit
/// (before the records leave the outbox): in both, only the checkpoint tells the forwarder that
/// the records were sent, and nothing is sent twice.
#[test]
fn exactly_once_sends_nothing_twice_after_a_failed_commit_or_a_crash_after_a_commit() {
    let kafka = MockKafka::start(1, &[(TOPIC, 2), ("outpost.checkpoints", 1)]);
    let (_dir, config_path, data_dir) = exactly_once_files(&kafka, 100);
    // The first commit fails: the broker answers EndTxn with an error.
    kafka.errors("EndTxn", 1, "KafkaStorageError");
    let mut d = Daemon::start_with_env(
        &config_path,
        data_dir.clone(),
        &[("OUTPOST_DEBUG_FAIL", "kafka-commit-crash")],
    );
    let mut devices = [Device::new(&d, "e-1"), Device::new(&d, "e-2")];
    for dev in &mut devices {
        dev.send(&d, "t", 40);
    }
    wait_delivered(&mut d, "first records committed", Duration::from_secs(30));
    d.wait_for_log("Kafka transaction commit failed", Duration::from_secs(1));
    assert!(d.metric("outpost_kafka_transaction_aborts_total") >= 1.0);
    // The debug fault hook kills the daemon right after its third committed transaction. One
    // request puts 500 records in the outbox at once (five transactions of 100), so no request
    // is in flight when it dies.
    devices[0].send(&d, "t", 500);
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.is_running() {
        assert!(
            Instant::now() < deadline,
            "the fault hook did not fire:\n{}",
            d.logs().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        d.logs()
            .iter()
            .any(|l| l.contains("killing the process after a commit")),
        "the daemon died of something else:\n{}",
        d.logs().join("\n")
    );
    // Other writers' records after the last checkpoint (on a real broker: other gateways'
    // checkpoints, not yet compacted): recovery must look further back than its first window.
    produce_plain(kafka.bootstrap(), "outpost.checkpoints", 1000, 40);
    let mut d = Daemon::start_with(&config_path, data_dir);
    let recovered = d.wait_for_log(
        "records of the last committed transaction removed",
        Duration::from_secs(30),
    );
    let recovered: serde_json::Value = serde_json::from_str(&recovered).unwrap();
    assert_eq!(recovered["deleted"].as_u64(), Some(100), "{recovered}");
    for dev in &mut devices {
        dev.send(&d, "t", 30);
    }
    wait_delivered(&mut d, "all committed", Duration::from_secs(60));
    assert_topic_holds(kafka.bootstrap(), &devices, 0, true);
}

/// A new outbox (here: the data directory's outbox wiped, as a reinstall does) starts its
/// sequences again, and the last checkpoint in Kafka names the *old* outbox's sequences. Recovery
/// must not take it for its own: before outboxes had ids it deleted the new file's unsent records
/// that reused those numbers.
#[test]
fn exactly_once_ignores_the_checkpoint_of_another_outbox() {
    let kafka = MockKafka::start(1, &[(TOPIC, 2), ("outpost.checkpoints", 1)]);
    let (_dir, config_path, data_dir) = exactly_once_files(&kafka, 100);
    let mut d = Daemon::start_with(&config_path, data_dir.clone());
    let mut devices = [Device::new(&d, "e-1"), Device::new(&d, "e-2")];
    for dev in &mut devices {
        dev.send(&d, "t", 40);
    }
    wait_delivered(
        &mut d,
        "the first outbox's records committed",
        Duration::from_secs(30),
    );
    let (status, _) = d.terminate(Duration::from_secs(20));
    assert!(status.success());
    for entry in std::fs::read_dir(&data_dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("outbox.db")
        {
            std::fs::remove_file(path).unwrap();
        }
    }
    // Kafka is away while the new outbox fills: recovery reads the checkpoint only once the
    // broker is back, with 100 unsent records (sequences 1 to 100) waiting.
    kafka.down(1);
    let mut d = Daemon::start_with(&config_path, data_dir);
    for dev in &mut devices {
        dev.send(&d, "t", 50);
    }
    kafka.up(1);
    wait_delivered(
        &mut d,
        "the new outbox's records committed",
        Duration::from_secs(60),
    );
    assert!(
        !d.logs()
            .iter()
            .any(|l| l.contains("records of the last committed transaction removed")),
        "the old outbox's checkpoint was taken for this one's:\n{}",
        d.logs().join("\n")
    );
    assert_topic_holds(kafka.bootstrap(), &devices, 0, true);
}

/// A broker outage mid-stream, then `kill -9` mid-stream: nothing is lost and device order holds.
/// On a broker with isolation, `read_committed` consumers would see no duplicates; the mock (see
/// above) also shows the records of transactions that were aborted or left open, so duplicates
/// are bounded by one batch per aborted transaction plus one for the transaction open at the kill.
/// Exactly-once mode with a poison record: the transaction holding it is aborted, the record
/// moved aside (its dead letter is refused by the dead-letter topic too: too large), and the
/// others are committed exactly once. Before, the transaction failed and was retried forever.
#[test]
fn exactly_once_moves_a_poison_record_aside_and_commits_the_rest() {
    let kafka = MockKafka::start(
        1,
        &[(TOPIC, 1), ("outpost.checkpoints", 1), ("outpost.dead", 1)],
    );
    let dir = tempfile::tempdir().unwrap();
    let kafka_extra = format!("exactly_once = true\nread_batch = 100\n{POISON_KAFKA}");
    let mut d = Daemon::start(
        dir.path(),
        &config(kafka.bootstrap(), &kafka_extra, LARGE_RECORDS),
    );
    let big = Device::new(&d, "big-1");
    post_big(&d, &big, "t", 1_500_000);
    let mut other = Device::new(&d, "other-1");
    other.send(&d, "t", 40);
    wait_delivered(&mut d, "committed or moved aside", Duration::from_secs(30));
    other.send(&d, "t", 10);
    wait_delivered(&mut d, "later records", Duration::from_secs(20));
    assert_eq!(
        d.metric("outpost_kafka_poison_records_total{reason=\"too_large\",to=\"local\"}"),
        1.0
    );
    assert_eq!(d.metric("outpost_outbox_dead_letters"), 1.0);
    assert_topic_holds(kafka.bootstrap(), &[other], 0, true);
}

#[test]
fn exactly_once_loses_nothing_across_an_outage_and_kill_9() {
    const READ_BATCH: u64 = 200;
    let kafka = MockKafka::start(1, &[(TOPIC, 2), ("outpost.checkpoints", 1)]);
    let (_dir, config_path, data_dir) = exactly_once_files(&kafka, READ_BATCH);
    let mut d = Daemon::start_with(&config_path, data_dir.clone());
    let mut devices = [Device::new(&d, "e-1"), Device::new(&d, "e-2")];
    for _ in 0..10 {
        for dev in &mut devices {
            dev.send(&d, "t", 100);
        }
    }
    // An outage mid-stream: open transactions fail and are aborted, records wait in the outbox.
    kafka.down(1);
    for _ in 0..5 {
        for dev in &mut devices {
            dev.send(&d, "t", 100);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    kafka.up(1);
    wait_delivered(&mut d, "the backlog committed", Duration::from_secs(60));
    let aborts = d.metric("outpost_kafka_transaction_aborts_total") as u64;
    for _ in 0..5 {
        for dev in &mut devices {
            dev.send(&d, "t", 100);
        }
    }
    // Kill mid-stream: some transactions are committed, one may be open, some records not read.
    d.kill9();
    let mut d = Daemon::start_with(&config_path, data_dir);
    for dev in &mut devices {
        dev.send(&d, "t", 100);
    }
    wait_delivered(&mut d, "all committed", Duration::from_secs(60));
    assert_topic_holds(kafka.bootstrap(), &devices, (aborts + 1) * READ_BATCH, true);
    assert!(d.metric("outpost_kafka_transactions_total") >= 1.0);
}

#[test]
fn tansu_records_arrive_in_a_real_broker() {
    let tansu = Tansu::start(&[(TOPIC, 2)]);
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &config(&tansu.bootstrap(), "", ""));
    let mut devices = [Device::new(&d, "t-1"), Device::new(&d, "t-2")];
    for _ in 0..5 {
        for dev in &mut devices {
            dev.send(&d, "devices/x/t", 200);
        }
    }
    wait_delivered(&mut d, "delivered to tansu", Duration::from_secs(60));
    let total: u64 = devices.iter().map(|dv| dv.next).sum();
    let got = consume(
        &tansu.bootstrap(),
        TOPIC,
        total as usize,
        Duration::from_secs(20),
        false,
    );
    assert_eq!(got.len() as u64, total, "{}", tansu.log());
    let by_device = per_device(&got);
    for dev in &devices {
        assert_complete_in_order(&dev.id, &by_device[&dev.id], dev.next, 0);
    }
    let keys: HashMap<String, Option<Vec<u8>>> = got
        .iter()
        .map(|r| (r.header("outpost-device").unwrap(), r.key.clone()))
        .collect();
    for (device, key) in keys {
        assert_eq!(key.as_deref(), Some(device.as_bytes()));
    }
}

/// librdkafka's default `message.timeout.ms` is 300 s: a producer on defaults would have expired
/// (and lost) every record of this outage. A real broker's network is cut for 305 s while
/// records keep arriving; afterwards every record is in Kafka, in order per device.
#[test]
fn tansu_slow_outage_longer_than_librdkafka_default_timeouts_loses_nothing() {
    let tansu = Tansu::start(&[(TOPIC, 2)]);
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        dir.path(),
        &config(
            &tansu.bootstrap(),
            "offline_after = \"2s\"\nmax_in_flight = 100\n",
            "",
        ),
    );
    let mut devices = [Device::new(&d, "o-1"), Device::new(&d, "o-2")];
    for dev in &mut devices {
        dev.send(&d, "t", 50);
    }
    wait_delivered(&mut d, "before the outage", Duration::from_secs(30));
    tansu.block();
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(305) {
        for dev in &mut devices {
            dev.send(&d, "t", 10);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(d.status()["kafka"]["state"], "offline");
    tansu.unblock();
    wait_delivered(&mut d, "after the outage", Duration::from_secs(120));
    assert_topic_holds(&tansu.bootstrap(), &devices, WINDOW, false);
}

/// Heartbeats and inventory reach their topics; `outpost fleet watch` lists the gateways, tells
/// a clean stop from a gateway that went silent, and exits 1 when one is silent.
#[test]
fn fleet_heartbeats_inventory_and_watch() {
    let kafka = MockKafka::start(
        1,
        &[
            (TOPIC, 1),
            ("outpost.heartbeats", 1),
            ("outpost.inventory", 1),
        ],
    );
    let fleet = "heartbeat_interval = \"1s\"\n";
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    // Two gateways with their own ids (the default id is the host name, shared here).
    let start = |dir: &std::path::Path, id: &str| {
        let path = write_config(dir, &config(kafka.bootstrap(), fleet, ""));
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replacen("[gateway]\n", &format!("[gateway]\nid = \"{id}\"\n"), 1),
        )
        .unwrap();
        Daemon::start_with(&path, dir.join("data"))
    };
    let mut a = start(dir_a.path(), "gw-a");
    let mut b = start(dir_b.path(), "gw-b");
    create_device(&a, "inv-1", None);
    let watch = |expect_code: i32| -> Vec<serde_json::Value> {
        let (code, out, err) = outpost_cli(&[
            "fleet",
            "watch",
            "--once",
            "--json",
            "--brokers",
            kafka.bootstrap(),
        ]);
        assert_eq!(code, expect_code, "fleet watch: {out}\n{err}");
        serde_json::from_str(&out).unwrap()
    };
    // Both gateways report.
    a.wait_until("two gateways heard", Duration::from_secs(15), |_| {
        let (_, out, _) = outpost_cli(&[
            "fleet",
            "watch",
            "--once",
            "--json",
            "--brokers",
            kafka.bootstrap(),
        ]);
        serde_json::from_str::<Vec<serde_json::Value>>(&out).is_ok_and(|v| v.len() == 2)
    });
    let views = watch(0);
    assert!(views.iter().all(|v| v["verdict"] == "ok"), "{views:?}");
    let inventory = consume(
        kafka.bootstrap(),
        "outpost.inventory",
        1,
        Duration::from_secs(10),
        false,
    );
    assert_eq!(inventory[0].key.as_deref(), Some(&b"inv-1"[..]));
    let device: serde_json::Value = serde_json::from_slice(&inventory[0].payload).unwrap();
    assert_eq!(device["id"], "inv-1");

    // A clean stop says goodbye; a kill -9 goes silent (3 missed intervals).
    let (exit, _) = a.terminate(Duration::from_secs(15));
    assert!(exit.success());
    b.kill9();
    std::thread::sleep(Duration::from_secs(4));
    let views = watch(1);
    let verdicts: Vec<&str> = views
        .iter()
        .map(|v| v["verdict"].as_str().unwrap())
        .collect();
    let gateways: Vec<&str> = views
        .iter()
        .map(|v| v["heartbeat"]["gateway"].as_str().unwrap())
        .collect();
    assert_eq!(gateways, ["gw-a", "gw-b"]);
    assert_eq!(verdicts, ["stopped", "silent"], "{views:?}");
}

/// A rule's `priority` is given to matching records when they are stored (the outbox drains
/// highest priority first); forwarding can be off.
#[test]
fn rule_priority_is_stored_with_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let rules = "[kafka]\n\n[[kafka.rules]]\ntopic = \"devices/+/alarms\"\npriority = 9\n";
    let mut d = Daemon::start(dir.path(), &format!("{}\n{rules}", admin_token_config()));
    let mut dev = Device::new(&d, "p-1");
    dev.send(&d, "devices/p-1/telemetry", 3);
    dev.send(&d, "devices/p-1/alarms", 2);
    let (exit, _) = d.terminate(Duration::from_secs(15));
    assert!(exit.success());
    let stored = outpost_sync::OutboxReader::open(&d.data_dir.join("outbox.db"))
        .unwrap()
        .read_all()
        .unwrap();
    let order: Vec<(String, u8)> = stored
        .iter()
        .map(|r| (r.topic.clone(), r.priority))
        .collect();
    assert_eq!(
        order,
        [
            ("devices/p-1/alarms".to_owned(), 9),
            ("devices/p-1/alarms".to_owned(), 9),
            ("devices/p-1/telemetry".to_owned(), 0),
            ("devices/p-1/telemetry".to_owned(), 0),
            ("devices/p-1/telemetry".to_owned(), 0),
        ],
        "alarms first: read order is priority, then sequence"
    );
}
