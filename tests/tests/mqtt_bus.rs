//! The local MQTT bus against the real binary, watched with Debian's `mosquitto_sub`: readings
//! committed over HTTP and CoAP appear on the documented topics (MQTT readings once, not twice),
//! and API commands reach a device subscribed to its command topic.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code, no async runtime here

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outpost_e2e::admin::basic;
use outpost_e2e::admin::{admin, admin_token_config, create_device};
use outpost_e2e::coap::{self, Message};
use outpost_e2e::daemon::{Daemon, signal, write_config};
use outpost_e2e::http::request;

/// Starts the daemon (admin token + `extra`) with devices `sensor-1` and `watcher`:
/// (daemon, MQTT address, sensor-1's secret, watcher's secret).
fn start(dir: &Path, extra: &str) -> (Daemon, SocketAddr, String, String) {
    start_with_env(dir, extra, &[])
}

/// [`start`] with environment variables for the daemon.
fn start_with_env(
    dir: &Path,
    extra: &str,
    env: &[(&str, &str)],
) -> (Daemon, SocketAddr, String, String) {
    let config_path = write_config(dir, &format!("{}\n{extra}", admin_token_config()));
    let mut d = Daemon::start_with_env(&config_path, dir.join("data"), env);
    let line = d.wait_for_log("MQTT listener bound", Duration::from_secs(10));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let addr = v["addr"].as_str().unwrap().parse().unwrap();
    let sensor = create_device(&d, "sensor-1", None);
    let watcher = create_device(&d, "watcher", None);
    (d, addr, sensor, watcher)
}

/// `mosquitto_sub` as `user` on `filter` (QoS 1, `-v`), expecting `count` messages within 10 s.
fn subscribe(
    d: &mut Daemon,
    addr: SocketAddr,
    user: &str,
    password: &str,
    filter: &str,
    count: usize,
) -> Child {
    let before = d.metric("outpost_mqtt_subacks_total");
    let child = Command::new("mosquitto_sub")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-u", user, "-P", password, "-i", &format!("{user}-sub")])
        .args(["-q", "1", "-t", filter, "-v", "-W", "10"])
        .args(["-C", &count.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mosquitto_sub");
    // Its SUBACK is counted once the filter is in effect (even when what it waits for was
    // there at once and it is already done).
    d.wait_until("the subscription", Duration::from_secs(5), |d| {
        d.metric("outpost_mqtt_subacks_total") > before
    });
    child
}

fn lines(child: Child) -> Vec<String> {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "mosquitto_sub: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().map(str::to_owned).collect()
}

fn http_post(d: &Daemon, auth: &str, topic: &str, body: &str) {
    let r = request(
        d.admin,
        "POST",
        &format!("/api/v1/ingest/{topic}"),
        &[
            ("Authorization", auth),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 201, "{}", r.text());
}

/// The state of sensor-1's command `id` as the API reports it.
fn command_state(d: &Daemon, id: i64) -> serde_json::Value {
    let path = format!("/api/v1/devices/sensor-1/commands/{id}");
    admin(d, "GET", &path, "").json()["state"].clone()
}

#[test]
fn http_coap_and_mqtt_readings_reach_local_subscribers_once_on_documented_topics() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, addr, sensor, watcher) = start(
        dir.path(),
        "[mqtt.acl]\nsubscribe = [\"devices/{id}/commands/#\", \"devices/+/#\"]\n",
    );
    let coap_addr = coap::coap_addr(&mut d);
    let sub = subscribe(&mut d, addr, "watcher", &watcher, "devices/+/#", 4);
    let auth = basic("sensor-1", &sensor);
    // Not under the device's prefix: devices/<id>/http/<topic>.
    http_post(&d, &auth, "room/temp", r#"{"t":21.5}"#);
    // Already under devices/<id>/: unchanged.
    http_post(&d, &auth, "devices/sensor-1/hum", r#"{"h":40}"#);
    // Content-Format 50: application/json.
    let coap = Message::post(7, "room/co2", "sensor-1", 50, br#"{"ppm":600}"#);
    let reply = coap::Client::new(coap_addr).exchange(&coap);
    assert_eq!(reply.code, 0x41, "CoAP 2.01: {reply:?}");
    // MQTT: the front forwards it; the bus must not publish it a second time.
    let out = Command::new("mosquitto_pub")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-u", "sensor-1", "-P", &sensor, "-i", "sensor-1-pub"])
        .args(["-q", "1", "-t", "devices/sensor-1/mqtt-topic", "-m", "m1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let got = lines(sub);
    assert_eq!(
        got,
        [
            r#"devices/sensor-1/http/room/temp {"t":21.5}"#,
            r#"devices/sensor-1/hum {"h":40}"#,
            r#"devices/sensor-1/coap/room/co2 {"ppm":600}"#,
            "devices/sensor-1/mqtt-topic m1",
        ]
    );
    // Exactly once: nothing more arrives for the MQTT publish.
    let again = Command::new("mosquitto_sub")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-u", "watcher", "-P", &watcher, "-i", "watcher-2"])
        .args(["-t", "devices/+/#", "-v", "-W", "1"])
        .output()
        .unwrap();
    assert!(again.stdout.is_empty(), "{again:?}");
    d.wait_until("counted", Duration::from_secs(5), |d| {
        d.metric("outpost_mqtt_bus_published_total") == 3.0
    });
    assert_eq!(d.metric("outpost_mqtt_bus_lagged_total"), 0.0);
    d.terminate(Duration::from_secs(15));
}

/// The bus runs under the supervisor: forced to fail once (the debug fault hook), it is
/// restarted with the same broker link and publishes again.
#[test]
fn the_bus_restarted_by_the_supervisor_publishes_again() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, addr, sensor, watcher) = start_with_env(
        dir.path(),
        "[mqtt.acl]\nsubscribe = [\"devices/+/#\"]\n",
        &[("OUTPOST_DEBUG_FAIL", "mqtt-bus")],
    );
    d.wait_until("mqtt-bus restarted", Duration::from_secs(15), |d| {
        d.status()["subsystems"]
            .as_array()
            .is_some_and(|subsystems| {
                subsystems.iter().any(|s| {
                    s["name"] == "mqtt-bus" && s["restarts"] == 1 && s["state"] == "ACTIVE"
                })
            })
    });
    let sub = subscribe(&mut d, addr, "watcher", &watcher, "devices/+/#", 1);
    http_post(&d, &basic("sensor-1", &sensor), "room/temp", r#"{"t":1}"#);
    assert_eq!(lines(sub), [r#"devices/sensor-1/http/room/temp {"t":1}"#]);
    d.terminate(Duration::from_secs(15));
}

#[test]
fn api_commands_reach_the_device_subscribed_to_its_command_topic() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, addr, sensor, _) = start(dir.path(), "");
    let sub = subscribe(
        &mut d,
        addr,
        "sensor-1",
        &sensor,
        "devices/sensor-1/commands/#",
        1,
    );
    let r = admin(
        &d,
        "POST",
        "/api/v1/devices/sensor-1/commands",
        r#"{"payload":{"reboot":true,"delay_s":5}}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_i64().unwrap();
    assert_eq!(
        lines(sub),
        [format!(
            r#"devices/sensor-1/commands/{id} {{"delay_s":5,"reboot":true}}"#
        )]
    );
    // The counter is bumped right after the hand-over to the broker, which may deliver first.
    d.wait_until("counted", Duration::from_secs(5), |d| {
        d.metric("outpost_mqtt_bus_commands_published_total") == 1.0
    });
    d.wait_until("delivered", Duration::from_secs(5), |d| {
        command_state(d, id) == "delivered"
    });
    d.terminate(Duration::from_secs(15));
}

#[test]
fn commands_queued_while_away_go_out_at_subscribe_and_are_marked_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, addr, sensor, _) = start(dir.path(), "");
    // Queued while the device is not connected: it stays queued.
    let r = admin(
        &d,
        "POST",
        "/api/v1/devices/sensor-1/commands",
        r#"{"payload":{"open":true}}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_i64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(command_state(&d, id), "queued");
    // The device subscribes: the command goes out and is marked delivered.
    let sub = subscribe(
        &mut d,
        addr,
        "sensor-1",
        &sensor,
        "devices/sensor-1/commands/#",
        1,
    );
    assert_eq!(
        lines(sub),
        [format!(r#"devices/sensor-1/commands/{id} {{"open":true}}"#)]
    );
    d.wait_until("delivered", Duration::from_secs(5), |d| {
        command_state(d, id) == "delivered"
    });
    // Delivered at most once: a poll finds nothing.
    let auth = basic("sensor-1", &sensor);
    let poll = request(
        d.admin,
        "GET",
        "/api/v1/device/commands",
        &[("Authorization", auth.as_str())],
        b"",
    );
    assert_eq!(poll.json()["commands"], serde_json::json!([]));
    d.terminate(Duration::from_secs(15));
}

#[test]
fn a_stalled_subscriber_never_slows_ingestion_and_every_reading_is_accounted_for() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, addr, sensor, watcher) = start(
        dir.path(),
        "[mqtt.acl]\nsubscribe = [\"devices/{id}/commands/#\", \"devices/+/#\"]\n",
    );
    // A subscriber that reads nothing at all (stopped), its socket buffers filling up.
    let mut sub = subscribe(&mut d, addr, "watcher", &watcher, "devices/+/#", 1_000_000);
    signal(sub.id(), rustix::process::Signal::STOP);
    let auth = basic("sensor-1", &sensor);
    let batch = format!(
        "[{}]",
        (0..1000)
            .map(|i| format!(r#"{{"i":{i},"pad":"{}"}}"#, "x".repeat(100)))
            .collect::<Vec<_>>()
            .join(",")
    );
    let started = std::time::Instant::now();
    for _ in 0..20 {
        http_post(&d, &auth, "load", &batch);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "20,000 readings took {took:?}"
    );
    // Every committed reading was either published, skipped by a lagging bus, or dropped at
    // the link: none is unaccounted for, and none held up its HTTP request.
    d.wait_until("all accounted for", Duration::from_secs(10), |d| {
        d.metric("outpost_mqtt_bus_published_total")
            + d.metric("outpost_mqtt_bus_lagged_total")
            + d.metric("outpost_mqtt_bus_dropped_total")
            == 20_000.0
    });
    eprintln!(
        "published {}, lagged {}, dropped {}",
        d.metric("outpost_mqtt_bus_published_total"),
        d.metric("outpost_mqtt_bus_lagged_total"),
        d.metric("outpost_mqtt_bus_dropped_total")
    );
    let _ = sub.kill();
    let _ = sub.wait();
    d.terminate(Duration::from_secs(15));
}
