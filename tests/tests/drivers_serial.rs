//! Serial line driver end to end: the real `outpost` binary reading three `socat` pseudo-terminal
//! pairs, one per line format (JSON, CSV, key=value), written by the test like a sensor would.
//!
//! Covered: good lines in each format → stored readings with device id, driver header, values,
//! units and timestamps (the line's own, or the receive time); garbage, overlong and split lines;
//! unplug (socat killed: the ptys vanish) → driver down, its devices offline, a partial line
//! discarded; replug on the same link path → the driver reopens by itself, the reopen is counted
//! in `/metrics`, and readings continue.

#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use outpost_e2e::admin::{admin, admin_token_config};
use outpost_e2e::daemon::{Daemon, metric_value};
use outpost_e2e::pty::PtyPair;
use outpost_sync::{OutboxReader, StoredRecord};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn stored(d: &Daemon) -> Vec<StoredRecord> {
    OutboxReader::open(&d.data_dir.join("outbox.db"))
        .unwrap()
        .read_all()
        .unwrap()
}

/// Stored readings by device id, payloads parsed.
fn readings(d: &Daemon) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for r in stored(d) {
        out.entry(r.device_id.clone())
            .or_default()
            .push(serde_json::from_slice(&r.payload).unwrap());
    }
    out
}

fn metric(d: &Daemon, key: &str) -> f64 {
    let (_, body) = d.get("/metrics");
    metric_value(&body, key).unwrap_or(0.0)
}

fn driver_metric(d: &Daemon, name: &str, driver: &str) -> f64 {
    metric(d, &format!("{name}{{driver=\"{driver}\",kind=\"serial\"}}"))
}

fn up(d: &Daemon, driver: &str) -> bool {
    driver_metric(d, "outpost_driver_up", driver) == 1.0
}

fn write(port: &mut std::fs::File, bytes: &[u8]) {
    port.write_all(bytes).unwrap();
    port.flush().unwrap();
}

#[test]
fn line_driver_three_formats_garbage_unplug_and_replug() {
    let dir = tempfile::tempdir().unwrap();
    let mut json_pty = PtyPair::start(dir.path(), "json");
    let csv_pty = PtyPair::start(dir.path(), "csv");
    let kv_pty = PtyPair::start(dir.path(), "kv");
    let config = format!(
        r#"{tokens}
[[drivers]]
kind = "serial"
name = "json"
format = "json"
device_field = "id"
timestamp_field = "ts"
max_line_bytes = "256B"
[drivers.serial]
path = "{json}"
baud = 115200
[drivers.units]
temp = "Cel"
hum = "%RH"
[drivers.reopen]
backoff_initial = "50ms"
backoff_max = "200ms"
offline_after_failures = 2

[[drivers]]
kind = "serial"
name = "csv"
format = "csv"
device_field = "id"
timestamp_field = "ts"
columns = ["id", "ts", "temp", "state"]
topic = "lab/{{device}}"
[drivers.serial]
path = "{csv}"
[drivers.units]
temp = "Cel"

[[drivers]]
kind = "serial"
name = "kv"
format = "kv"
device_id = "kv-fixed"
timestamp_field = "ts"
[drivers.serial]
path = "{kv}"
[drivers.units]
pressure = "hPa"
"#,
        tokens = admin_token_config(),
        json = json_pty.dev.display(),
        csv = csv_pty.dev.display(),
        kv = kv_pty.dev.display(),
    );
    let mut d = Daemon::start(dir.path(), &config);
    d.wait_until("three serial drivers up", WAIT, |d| {
        up(d, "json") && up(d, "csv") && up(d, "kv")
    });

    let mut json_port = json_pty.open_peer();
    let mut csv_port = csv_pty.open_peer();
    let mut kv_port = kv_pty.open_peer();
    let before_ms = outpost_drivers_now_ms();
    write(
        &mut json_port,
        b"{\"id\":\"j1\",\"ts\":1700000000,\"temp\":21.5,\"hum\":40}\r\n\
          this is not json\n\
          [1,2,3]\n\
          {\"id\":\"bad id\",\"temp\":1}\n",
    );
    // An overlong line (dropped), then a line split across two writes (reassembled).
    let long = format!("{{\"id\":\"j1\",\"pad\":\"{}\"}}\n", "x".repeat(400));
    write(&mut json_port, long.as_bytes());
    write(&mut json_port, b"{\"id\":\"j2\",\"te");
    std::thread::sleep(Duration::from_millis(150));
    write(&mut json_port, b"mp\":-3.5}\n");

    write(
        &mut csv_port,
        b"c1,1700000000123,19.5,open\nc1,not enough\nc2,,7,closed,extra\n",
    );
    write(
        &mut kv_port,
        b"pressure=1013.25 ts=2024-05-01T12:00:00Z\nno pairs here\nn=1;ok=true\n",
    );

    d.wait_until("all good lines stored", WAIT, |d| stored(d).len() >= 6);
    std::thread::sleep(Duration::from_millis(300));
    let all = stored(&d);
    assert_eq!(all.len(), 6, "{:#?}", readings(&d));
    for r in &all {
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        let driver = r
            .headers
            .iter()
            .find(|(k, _)| k == "driver")
            .map(|(_, v)| v);
        assert!(driver.is_some(), "driver header on {r:?}");
    }
    let by_device = readings(&d);
    assert_eq!(
        by_device["j1"],
        [
            json!({"temp": 21.5, "hum": 40, "time_ms": 1_700_000_000_000_i64,
                "units": {"temp": "Cel", "hum": "%RH"}})
        ]
    );
    let j2 = &by_device["j2"][0];
    assert_eq!(j2["temp"], json!(-3.5));
    assert_eq!(j2["units"], json!({"temp": "Cel"}));
    // No timestamp on the line: the receive time.
    assert!(j2["time_ms"].as_i64().unwrap() >= before_ms, "{j2}");
    assert_eq!(
        by_device["c1"],
        [
            json!({"temp": 19.5, "state": "open", "time_ms": 1_700_000_000_123_i64,
                "units": {"temp": "Cel"}})
        ]
    );
    let c2 = &by_device["c2"][0];
    assert_eq!(
        (c2["temp"].clone(), c2["state"].clone()),
        (json!(7), json!("closed"))
    );
    assert!(c2["time_ms"].as_i64().unwrap() >= before_ms);
    let kv = &by_device["kv-fixed"];
    assert_eq!(
        kv[0],
        json!({"pressure": 1013.25, "time_ms": 1_714_564_800_000_i64,
               "units": {"pressure": "hPa"}})
    );
    assert_eq!(
        (kv[1]["n"].clone(), kv[1]["ok"].clone()),
        (json!(1), json!(true))
    );
    let topics: Vec<_> = all.iter().map(|r| r.topic.as_str()).collect();
    assert!(
        topics.contains(&"serial/j1") && topics.contains(&"lab/c1"),
        "{topics:?}"
    );
    let header_of = |device: &str| {
        let r = all.iter().find(|r| r.device_id == device).unwrap();
        r.headers
            .iter()
            .find(|(k, _)| k == "driver")
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header_of("c1").as_deref(), Some("csv"));

    assert_eq!(
        driver_metric(&d, "outpost_driver_frames_ok_total", "json"),
        2.0
    );
    assert_eq!(
        driver_metric(&d, "outpost_driver_frames_bad_total", "json"),
        3.0
    );
    assert_eq!(
        driver_metric(&d, "outpost_driver_frames_dropped_total", "json"),
        1.0
    );
    assert_eq!(
        driver_metric(&d, "outpost_driver_frames_bad_total", "csv"),
        1.0
    );
    assert_eq!(
        driver_metric(&d, "outpost_driver_frames_bad_total", "kv"),
        1.0
    );
    // Devices found on the line are registered as driver devices.
    let j1 = admin(&d, "GET", "/api/v1/devices/j1", "").json();
    assert_eq!(j1["source"], json!("driver:json"), "{j1}");

    // Unplug mid-line: the partial line is discarded, the driver goes down, and once the port
    // stays away its devices are reported offline.
    write(&mut json_port, b"{\"id\":\"j1\",\"temp\":99");
    std::thread::sleep(Duration::from_millis(100));
    drop(json_port);
    json_pty.unplug();
    d.wait_until("json driver down", WAIT, |d| !up(d, "json"));
    d.wait_until("j1 offline", WAIT, |d| {
        admin(d, "GET", "/api/v1/devices/j1/status", "").json()["state"] == json!("offline")
    });
    let status = d.status();
    let subsystem = status["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == json!("driver/json"))
        .cloned()
        .unwrap();
    assert_eq!(subsystem["state"], json!("INACTIVE"), "{subsystem}");
    assert!(
        subsystem["reason"].as_str().unwrap().contains("json-dev"),
        "{subsystem}"
    );
    // The other ports are unaffected.
    assert!(up(&d, "csv") && up(&d, "kv"));

    // Replug on the same path: the driver reopens by itself and reads on.
    json_pty.plug();
    d.wait_until("json driver reopened", WAIT, |d| {
        up(d, "json") && driver_metric(d, "outpost_driver_reopens_total", "json") >= 1.0
    });
    let mut json_port = json_pty.open_peer();
    write(&mut json_port, b"{\"id\":\"j1\",\"temp\":22}\n");
    d.wait_until("reading after replug", WAIT, |d| {
        readings(d).get("j1").is_some_and(|r| r.len() == 2)
    });
    let j1 = &readings(&d)["j1"];
    assert_eq!(
        j1[1]["temp"],
        json!(22),
        "the partial line before the unplug was discarded"
    );
    assert_eq!(
        driver_metric(&d, "outpost_driver_frames_dropped_total", "json"),
        2.0
    );
    d.wait_until("j1 online again", WAIT, |d| {
        admin(d, "GET", "/api/v1/devices/j1/status", "").json()["state"] == json!("online")
    });
    let (status, _) = d.terminate(Duration::from_secs(15));
    assert!(status.success(), "{status}");
}

fn outpost_drivers_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// `devices.max_automatic`: a line driver reporting more device ids than the cap registers only
/// up to the cap; the readings of the others are stored all the same (nothing lost), counted,
/// and the status shows a `registry` alarm; deleting a device makes room for the next one.
#[test]
fn devices_beyond_max_automatic_are_stored_but_not_registered() {
    let dir = tempfile::tempdir().unwrap();
    let pty = PtyPair::start(dir.path(), "json");
    let config = format!(
        r#"{tokens}
[devices]
max_automatic = 2

[[drivers]]
kind = "serial"
name = "line"
format = "json"
device_field = "id"
[drivers.serial]
path = "{path}"
"#,
        tokens = admin_token_config(),
        path = pty.dev.display(),
    );
    let mut d = Daemon::start(dir.path(), &config);
    d.wait_until("the serial driver up", WAIT, |d| {
        metric(d, "outpost_driver_up{driver=\"line\",kind=\"serial\"}") == 1.0
    });
    let mut port = pty.open_peer();
    // One device at a time, so the registration order is the line order.
    for (n, id) in ["d1", "d2", "d3", "d4"].into_iter().enumerate() {
        write(
            &mut port,
            format!("{{\"id\":\"{id}\",\"n\":{n}}}\n").as_bytes(),
        );
        d.wait_until("the reading stored", WAIT, |d| readings(d).contains_key(id));
    }
    write(&mut port, b"{\"id\":\"d4\",\"n\":4}\n");
    d.wait_until("every reading stored", WAIT, |d| {
        readings(d).values().map(Vec::len).sum::<usize>() == 5
    });
    for (id, registered) in [("d1", true), ("d2", true), ("d3", false), ("d4", false)] {
        let code = admin(&d, "GET", &format!("/api/v1/devices/{id}"), "").status;
        assert_eq!(code, if registered { 200 } else { 404 }, "{id}");
    }
    assert_eq!(metric(&d, "outpost_devices_automatic"), 2.0);
    assert_eq!(
        metric(&d, "outpost_devices_unregistered_readings_total"),
        3.0
    );
    let alarms = d.status()["alarms"].clone();
    assert!(
        alarms
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["subsystem"] == "registry"
                && a["message"].as_str().unwrap().contains("max_automatic (2)")),
        "{alarms}"
    );
    // Room again: the next reading of d3 registers it, and the alarm clears.
    assert_eq!(admin(&d, "DELETE", "/api/v1/devices/d1", "").status, 204);
    write(&mut port, b"{\"id\":\"d3\",\"n\":5}\n");
    d.wait_until("d3 registered", WAIT, |d| {
        admin(d, "GET", "/api/v1/devices/d3", "").status == 200
    });
    let alarms = d.status()["alarms"].clone();
    assert!(
        !alarms
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["subsystem"] == "registry"),
        "{alarms}"
    );
    assert_eq!(readings(&d).values().map(Vec::len).sum::<usize>(), 6);
}

/// `SIGHUP` with changed `[[drivers]]`: the driver whose port changed stops, lets go of the old
/// port and reads the new one; a removed driver stops and leaves the status and `/metrics`; an
/// added one starts; an unchanged one runs on untouched (never stopped, its counters continue).
#[test]
fn a_reload_restarts_only_the_drivers_whose_settings_changed() {
    let dir = tempfile::tempdir().unwrap();
    let (old_pty, new_pty) = (
        PtyPair::start(dir.path(), "old"),
        PtyPair::start(dir.path(), "new"),
    );
    let (kept_pty, gone_pty, added_pty) = (
        PtyPair::start(dir.path(), "kept"),
        PtyPair::start(dir.path(), "gone"),
        PtyPair::start(dir.path(), "added"),
    );
    let driver = |name: &str, pty: &PtyPair| {
        format!(
            "[[drivers]]\nkind = \"serial\"\nname = \"{name}\"\nformat = \"json\"\n\
             device_field = \"id\"\n[drivers.serial]\npath = \"{}\"\n",
            pty.dev.display()
        )
    };
    let config_path = outpost_e2e::daemon::write_config(
        dir.path(),
        &format!(
            "{}\n{}\n{}\n{}",
            admin_token_config(),
            driver("moved", &old_pty),
            driver("kept", &kept_pty),
            driver("gone", &gone_pty)
        ),
    );
    let mut d = Daemon::start_with(&config_path, dir.path().join("data"));
    d.wait_until("three serial drivers up", WAIT, |d| {
        up(d, "moved") && up(d, "kept") && up(d, "gone")
    });
    let mut kept_port = kept_pty.open_peer();
    write(&mut kept_port, b"{\"id\":\"k\",\"n\":1}\n");
    d.wait_until("the first reading", WAIT, |d| {
        readings(d).get("k").map(Vec::len) == Some(1)
    });

    let text = std::fs::read_to_string(&config_path).unwrap();
    let edited = text
        .replace(&driver("moved", &old_pty), &driver("moved", &new_pty))
        .replace(&driver("gone", &gone_pty), &driver("added", &added_pty));
    assert_ne!(edited, text);
    std::fs::write(&config_path, edited).unwrap();
    outpost_e2e::daemon::signal(d.pid(), rustix::process::Signal::HUP);
    d.wait_until("the reload", WAIT, |d| d.status()["config"]["reloads"] == 1);
    let report = d.status()["config"].clone();
    assert_eq!(report["applied"], json!(["drivers"]), "{report}");
    assert_eq!(report["needs_restart"], json!([]), "{report}");

    d.wait_until("the moved and added drivers up", WAIT, |d| {
        up(d, "moved") && up(d, "added")
    });
    // The old port is no longer read; the new one, the added one and the kept one are.
    write(&mut old_pty.open_peer(), b"{\"id\":\"stale\",\"n\":1}\n");
    write(&mut new_pty.open_peer(), b"{\"id\":\"m\",\"n\":2}\n");
    write(&mut added_pty.open_peer(), b"{\"id\":\"a\",\"n\":3}\n");
    write(&mut kept_port, b"{\"id\":\"k\",\"n\":4}\n");
    d.wait_until("readings of the new set", WAIT, |d| {
        let r = readings(d);
        r.get("m").map(Vec::len) == Some(1)
            && r.get("a").map(Vec::len) == Some(1)
            && r.get("k").map(Vec::len) == Some(2)
    });
    assert!(
        !readings(&d).contains_key("stale"),
        "the old port is still read"
    );
    // The kept driver was never stopped: its counter continued, no stop was logged for it.
    assert_eq!(
        driver_metric(&d, "outpost_driver_frames_ok_total", "kept"),
        2.0
    );
    let stopped: Vec<String> = d
        .logs()
        .into_iter()
        .filter(|l| l.contains("Stopping driver for the reload"))
        .collect();
    assert_eq!(stopped.len(), 2, "{stopped:?}");
    assert!(
        stopped.iter().all(|l| !l.contains("\"kept\"")),
        "{stopped:?}"
    );
    // The removed driver is gone from the status and the metrics.
    let status = d.status();
    let names: Vec<&str> = status["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .filter(|n| n.starts_with("driver/"))
        .collect();
    assert_eq!(
        names,
        ["driver/added", "driver/kept", "driver/moved"],
        "{status}"
    );
    let (_, body) = d.get("/metrics");
    assert!(!body.contains("driver=\"gone\""), "{body}");
    assert!(d.terminate(Duration::from_secs(15)).0.success());
}
