//! Edge rules (`[[edge.rules]]`) against the real binary: schema refusals as each protocol's
//! own answer (paho-mqtt MQTT 5 PUBACK 0x99, HTTP 422, libcoap's `coap-client` 4.00),
//! dead letters and enriched records read back from a real Kafka-protocol broker (tansu) with
//! an rdkafka consumer, an alert that commands a device over MQTT (`mosquitto_sub`) while Kafka
//! is cut off, aggregates of a batch, what a clean stop and a crash do to an open window, and a
//! rule changed by a reload.
//!
//! Mosquitto, the MQTT reference, has no payload validation: there is no peer case to run.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code, no async runtime here

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use outpost_e2e::admin::basic;
use outpost_e2e::admin::{ADMIN_TOKEN, admin, admin_token_config, create_device};
use outpost_e2e::daemon::{Daemon, outpost_cli_env, write_config};
use outpost_e2e::http::request;
use outpost_e2e::kafka::{Consumed, Tansu, consume};
use serde_json::{Value, json};

const READINGS: &str = "outpost.readings";
const INVALID: &str = "outpost.invalid";
const ALERTS: &str = "outpost.alerts";
const AGGREGATES: &str = "outpost.aggregates";

fn kafka_config(kafka: &Tansu) -> String {
    format!(
        "{}\n[kafka]\nenabled = true\nbrokers = [\"{}\"]\nlinger = \"2ms\"\n",
        admin_token_config(),
        kafka.bootstrap()
    )
}

/// HTTP ingestion of `body` (JSON) on `topic`: (status, response JSON).
fn post(d: &Daemon, auth: &str, topic: &str, body: &str) -> (u16, Value) {
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
    (r.status, r.json())
}

fn payload(r: &Consumed) -> Value {
    serde_json::from_slice(&r.payload).unwrap_or_else(|_| panic!("not JSON: {}", r.payload_str()))
}

/// Publishes `payloads` with QoS 1 as an MQTT 5 client (paho-mqtt) and returns the PUBACK
/// reason codes, in order.
fn paho_publish(
    addr: SocketAddr,
    user: &str,
    password: &str,
    topic: &str,
    payloads: &[&str],
) -> Vec<u64> {
    const SCRIPT: &str = r#"
import sys, json, threading
import paho.mqtt.client as mqtt
host, port, user, password, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
payloads = json.loads(sys.argv[6])
codes, done = {}, threading.Event()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-" + user, protocol=mqtt.MQTTv5)
c.username_pw_set(user, password)
def on_publish(cl, ud, mid, rc, props):
    codes[mid] = rc.value
    if len(codes) == len(payloads):
        done.set()
c.on_publish = on_publish
c.connect(host, port)
c.loop_start()
mids = [c.publish(topic, p, qos=1).mid for p in payloads]
done.wait(10)
c.disconnect(); c.loop_stop()
print(json.dumps([codes.get(m) for m in mids]))
"#;
    let out = Command::new("python3")
        .args([
            "-c",
            SCRIPT,
            &addr.ip().to_string(),
            &addr.port().to_string(),
        ])
        .args([
            user,
            password,
            topic,
            &serde_json::to_string(payloads).unwrap(),
        ])
        .output()
        .expect("run python3 (paho-mqtt)");
    let text = String::from_utf8_lossy(&out.stdout);
    let codes: Vec<Option<u64>> = serde_json::from_str(text.trim())
        .unwrap_or_else(|_| panic!("paho: {text} {}", String::from_utf8_lossy(&out.stderr)));
    codes
        .into_iter()
        .map(|c| c.expect("every publish acknowledged"))
        .collect()
}

fn coap_post(addr: SocketAddr, path: &str, body: &str) -> String {
    let out = Command::new(outpost_e2e::coap::coap_client())
        .args(["-B", "5", "-m", "post", "-t", "50", "-e", body])
        .arg(format!("coap://{addr}/{path}"))
        .output()
        .expect("run coap-client");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn schema_refusals_answer_in_each_protocol_and_dead_letters_reach_kafka() {
    let kafka = Tansu::start(&[(READINGS, 1), (INVALID, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let rules = r#"
[[edge.rules]]
name = "strict"
topic = "devices/+/strict"
schema = { type = "object", required = ["temperature"], properties = { temperature = { type = "number" } } }

[[edge.rules]]
name = "lenient"
topic = "devices/+/lenient"
schema = { type = "object", required = ["temperature"] }
on_invalid = "dead_letter"
"#;
    let mut d = Daemon::start(dir.path(), &format!("{}{rules}", kafka_config(&kafka)));
    let mqtt = d.listener("MQTT");
    let coap = outpost_e2e::coap::coap_addr(&mut d);
    let secret = create_device(&d, "sensor-1", None);
    let auth = basic("sensor-1", &secret);

    // MQTT 5: 0x99 for the invalid payload, 0 for the valid ones.
    let codes = paho_publish(
        mqtt,
        "sensor-1",
        &secret,
        "devices/sensor-1/strict",
        &[
            r#"{"temperature":21.5}"#,
            r#"{"temperature":"hot"}"#,
            "not json",
            r#"{"temperature":22}"#,
        ],
    );
    assert_eq!(codes, [0, 0x99, 0x99, 0]);
    // HTTP: 422 naming the rule and the field at fault; nothing of the batch is stored.
    let (status, body) = post(
        &d,
        &auth,
        "devices/sensor-1/strict",
        r#"[{"temperature":1},{"temperature":"warm"}]"#,
    );
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["field"], "body", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("strict")
            && message.contains("record 1")
            && message.contains("/temperature"),
        "{message}"
    );
    // CoAP: 4.00 with the reason as diagnostic payload.
    let err = coap_post(
        coap,
        "t/devices/sensor-1/strict?d=sensor-1",
        r#"{"humidity":3}"#,
    );
    assert!(err.trim_start().starts_with("4.00"), "{err}");
    assert!(err.contains("temperature"), "{err}");
    assert_eq!(d.metric("outpost_edge_refused_total{rule=\"strict\"}"), 4.0);
    // Counted for the device too (its traffic figures: refused readings are dropped ones).
    let status = admin(&d, "GET", "/api/v1/devices/sensor-1/status", "").json();
    assert_eq!(status["errors"]["dropped"], 4, "{status}");
    assert_eq!(
        d.metric("outpost_mqtt_refused_total{reason=\"invalid_payload\"}"),
        2.0
    );

    // A dead-lettering rule stores the record (201) and sends it to the invalid topic.
    let (status, body) = post(&d, &auth, "devices/sensor-1/lenient", r#"{"t":5}"#);
    assert_eq!(status, 201, "{body}");
    let (status, _) = post(
        &d,
        &auth,
        "devices/sensor-1/lenient",
        r#"{"temperature":5}"#,
    );
    assert_eq!(status, 201);

    let dead = consume(
        &kafka.bootstrap(),
        INVALID,
        1,
        Duration::from_secs(30),
        false,
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(payload(&dead[0]), json!({"t": 5}));
    assert_eq!(
        dead[0].header("outpost-invalid-rule").as_deref(),
        Some("lenient")
    );
    assert_eq!(
        dead[0].header("outpost-original-topic").as_deref(),
        Some("devices/sensor-1/lenient")
    );
    assert_eq!(
        dead[0].header("outpost-original-source").as_deref(),
        Some("http")
    );
    assert!(
        dead[0]
            .header("outpost-invalid-error")
            .unwrap()
            .contains("temperature")
    );
    // Only the accepted readings on the readings topic: 2 over MQTT, 1 valid lenient one.
    let readings = consume(
        &kafka.bootstrap(),
        READINGS,
        4,
        Duration::from_secs(5),
        false,
    );
    let values: Vec<Value> = readings.iter().map(payload).collect();
    assert_eq!(
        values,
        [
            json!({"temperature": 21.5}),
            json!({"temperature": 22}),
            json!({"temperature": 5})
        ]
    );
    assert_eq!(
        d.metric("outpost_edge_dead_lettered_total{rule=\"lenient\"}"),
        1.0
    );
}

#[test]
fn enrichment_and_transforms_reach_kafka_and_a_reload_changes_the_next_reading() {
    let kafka = Tansu::start(&[(READINGS, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let rules = |factor: &str| {
        format!(
            r#"
[[edge.rules]]
name = "celsius"
topic = "devices/+/temp"
when = "'boiler' in device.tags"
rename = {{ t = "temperature_f" }}
drop = ["debug"]
set = {{ temperature_c = "(t - 32.0) * {factor}" }}

[[edge.rules]]
name = "facts"
topic = "devices/#"
enrich = ["name", "model", "tags"]

[[edge.rules]]
name = "where"
topic = "devices/#"
enrich = ["location"]
enrich_into = "payload"
"#
        )
    };
    let path = write_config(
        dir.path(),
        &format!("{}{}", kafka_config(&kafka), rules("5.0 / 9.0")),
    );
    let mut d = Daemon::start_with(&path, dir.path().join("data"));
    let secret = create_device(&d, "boiler-1", None);
    let r = admin(
        &d,
        "PATCH",
        "/api/v1/devices/boiler-1",
        r#"{"name":"Boiler one","model":"BX-2","location":"hall 2","tags":["boiler","hall-2"]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let auth = basic("boiler-1", &secret);
    let (status, body) = post(
        &d,
        &auth,
        "devices/boiler-1/temp",
        r#"{"t":212.0,"debug":"x"}"#,
    );
    assert_eq!(status, 201, "{body}");

    let got = consume(
        &kafka.bootstrap(),
        READINGS,
        1,
        Duration::from_secs(30),
        false,
    );
    assert_eq!(
        payload(&got[0]),
        json!({"temperature_f": 212.0, "temperature_c": 100.0, "device": {"location": "hall 2"}})
    );
    assert_eq!(
        got[0].header("outpost-device-name").as_deref(),
        Some("Boiler one")
    );
    assert_eq!(
        got[0].header("outpost-device-model").as_deref(),
        Some("BX-2")
    );
    assert_eq!(
        got[0].header("outpost-device-tags").as_deref(),
        Some("boiler,hall-2")
    );

    // The dry run shows the same without storing anything.
    let r = admin(
        &d,
        "POST",
        "/api/v1/edge/test",
        r#"{"device":"boiler-1","topic":"devices/boiler-1/temp","payload":{"t":32.0}}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let dry = r.json();
    assert_eq!(dry["verdict"], "stored", "{dry}");
    assert_eq!(dry["payload"]["temperature_c"], 0.0, "{dry}");
    assert_eq!(dry["rules"][0]["transformed"], true, "{dry}");

    // The same from the command line, with a payload file.
    let sample = dir.path().join("sample.json");
    std::fs::write(&sample, r#"{"t": 50.0, "debug": 1}"#).unwrap();
    let url = format!("http://{}", d.admin);
    let (code, out, err) = outpost_cli_env(
        &[
            "rules",
            "test",
            "--file",
            sample.to_str().unwrap(),
            "--device",
            "boiler-1",
            "--topic",
            "devices/boiler-1/temp",
            "--url",
            &url,
        ],
        &[("OUTPOST_API_TOKEN", ADMIN_TOKEN)],
    );
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("verdict: stored"), "{out}");
    assert!(out.contains("rule celsius: transformed"), "{out}");
    assert!(out.contains("header outpost-device-model: BX-2"), "{out}");
    assert!(out.contains(r#""temperature_c":10.0"#), "{out}");
    assert_eq!(
        consume(
            &kafka.bootstrap(),
            READINGS,
            2,
            Duration::from_secs(2),
            false
        )
        .len(),
        1
    );

    // A reload changes the rule: the next reading gets the new conversion (Kelvin offset).
    write_config(
        dir.path(),
        &format!("{}{}", kafka_config(&kafka), rules("5.0 / 9.0 + 273.15")),
    );
    let before = d.status()["config"]["reloads"].as_u64().unwrap_or(0);
    Command::new("kill")
        .args(["-HUP", &d.pid().to_string()])
        .status()
        .unwrap();
    d.wait_until("the reload", Duration::from_secs(10), |d| {
        d.status()["config"]["reloads"].as_u64().unwrap_or(0) > before
    });
    assert_eq!(
        d.status()["config"]["applied"],
        json!(["edge"]),
        "{}",
        d.status()["config"]
    );
    let (status, _) = post(&d, &auth, "devices/boiler-1/temp", r#"{"t":32.0}"#);
    assert_eq!(status, 201);
    let got = consume(
        &kafka.bootstrap(),
        READINGS,
        2,
        Duration::from_secs(30),
        false,
    );
    assert_eq!(
        payload(&got[1])["temperature_c"],
        273.15,
        "{}",
        got[1].payload_str()
    );
}

fn mosquitto_pub(addr: SocketAddr, device: &str, secret: &str, topic: &str, message: &str) {
    let status = Command::new("mosquitto_pub")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args([
            "-u",
            device,
            "-P",
            secret,
            "-i",
            &format!("{device}-pub"),
            "-q",
            "1",
        ])
        .args(["-t", topic, "-m", message])
        .status()
        .expect("run mosquitto_pub");
    assert!(status.success());
}

#[test]
fn an_alert_commands_a_device_with_kafka_cut_off_and_reaches_kafka_afterwards() {
    let kafka = Tansu::start(&[(READINGS, 1), (ALERTS, 1)]);
    kafka.block();
    let dir = tempfile::tempdir().unwrap();
    let rules = r#"
[[edge.rules]]
name = "overheat"
topic = "devices/+/temp"
[edge.rules.alert]
raise = "temperature > 80"
clear = "temperature < 75"
for_readings = 3
severity = "critical"
[edge.rules.alert.command]
device = "valve-1"
payload = { action = "close" }
clear_payload = { action = "open" }

[mqtt.acl]
subscribe = ["devices/{id}/commands/#", "devices/+/gateway/#"]
"#;
    let mut d = Daemon::start(dir.path(), &format!("{}{rules}", kafka_config(&kafka)));
    let mqtt = d.listener("MQTT");
    let sensor = create_device(&d, "boiler-1", None);
    let valve = create_device(&d, "valve-1", Some(r#"["mqtt"]"#));
    let sub = outpost_e2e::mosquitto::subscribe_commands(&mut d, mqtt, "valve-1", &valve, 2, "%p");
    // A local consumer of the gateway's own records on the bus (a dashboard, an app).
    let panel = create_device(&d, "panel-1", Some(r#"["mqtt"]"#));
    let bus = outpost_e2e::mosquitto::subscribe(
        &mut d,
        mqtt,
        ("panel-1", &panel),
        "devices/boiler-1/gateway/#",
        2,
        "%t %p",
    );

    let send = |t: f64| {
        mosquitto_pub(
            mqtt,
            "boiler-1",
            &sensor,
            "devices/boiler-1/temp",
            &format!(r#"{{"temperature":{t:.1}}}"#),
        );
    };
    // Two hot readings are not enough (debounce), a cool one breaks the streak.
    for t in [85.0, 86.0, 70.0, 81.0, 82.0] {
        send(t);
    }
    let alerts = admin(&d, "GET", "/api/v1/alerts", "").json();
    assert_eq!(alerts["alerts"], json!([]), "{alerts}");
    send(83.0);
    d.wait_until("the alert", Duration::from_secs(5), |d| {
        admin(d, "GET", "/api/v1/alerts", "").json()["alerts"]
            .as_array()
            .is_some_and(|a| a.len() == 1)
    });
    let alerts = admin(&d, "GET", "/api/v1/alerts", "").json();
    let alert = &alerts["alerts"][0];
    assert_eq!(
        (alert["rule"].as_str(), alert["device"].as_str()),
        (Some("overheat"), Some("boiler-1"))
    );
    assert_eq!(alert["severity"], "critical");
    assert_eq!(alert["reading"], json!({"temperature": 83.0}));
    assert_eq!(d.status()["edge"]["alerts_active"], 1);
    // Between the thresholds nothing changes; three cool readings clear it.
    for t in [78.0, 70.0, 71.0, 72.0] {
        send(t);
    }
    d.wait_until("the clear", Duration::from_secs(5), |d| {
        d.metric("outpost_edge_alerts_cleared_total{rule=\"overheat\"}") == 1.0
    });
    // The valve got both commands over MQTT while Kafka was unreachable.
    let out = sub.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "mosquitto_sub: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let commands: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        commands,
        [json!({"action": "close"}), json!({"action": "open"})]
    );
    // The alert records were published on the local bus too.
    let out = bus.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "mosquitto_sub: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let published: Vec<(&str, Value)> = text
        .lines()
        .map(|l| {
            let (topic, body) = l.split_once(' ').unwrap();
            (topic, serde_json::from_str(body).unwrap())
        })
        .collect();
    assert_eq!(published.len(), 2, "{text}");
    assert!(
        published
            .iter()
            .all(|(t, _)| *t == "devices/boiler-1/gateway/outpost.alerts"),
        "{text}"
    );
    assert_eq!(
        (
            published[0].1["state"].as_str(),
            published[1].1["state"].as_str()
        ),
        (Some("raised"), Some("cleared"))
    );
    assert_eq!(d.metric("outpost_kafka_delivered_records_total"), 0.0);

    // Kafka back: the alert records arrive, raised then cleared.
    kafka.unblock();
    let got = consume(
        &kafka.bootstrap(),
        ALERTS,
        2,
        Duration::from_secs(60),
        false,
    );
    let states: Vec<Value> = got.iter().map(|r| payload(r)["state"].clone()).collect();
    assert_eq!(states, [json!("raised"), json!("cleared")]);
    let raised = payload(&got[0]);
    assert_eq!(raised["device"], "boiler-1");
    assert_eq!(raised["reading"], json!({"temperature": 83.0}));
    assert_eq!(got[0].header("outpost-alert").as_deref(), Some("overheat"));
    assert_eq!(
        got[1].header("outpost-alert-state").as_deref(),
        Some("cleared")
    );
}

#[test]
fn aggregates_are_exact_and_a_clean_stop_keeps_an_open_window_a_crash_loses_it() {
    let kafka = Tansu::start(&[(READINGS, 1), (AGGREGATES, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let rules = |window: &str| {
        format!(
            r#"
[[edge.rules]]
name = "stats"
topic = "devices/+/level"
[edge.rules.aggregate]
window = "{window}"
fields = ["level"]
functions = ["count", "min", "max", "mean", "sum", "last"]
"#
        )
    };
    let config = |window: &str| format!("{}{}", kafka_config(&kafka), rules(window));
    let path = write_config(dir.path(), &config("2s"));
    let data = dir.path().join("data");
    let mut d = Daemon::start_with(&path, data.clone());
    let secret = create_device(&d, "tank-1", None);
    let auth = basic("tank-1", &secret);
    // One batch: one arrival time, so one window.
    let batch: Vec<String> = (1..=10).map(|v| format!(r#"{{"level":{v}}}"#)).collect();
    let (status, _) = post(
        &d,
        &auth,
        "devices/tank-1/level",
        &format!("[{}]", batch.join(",")),
    );
    assert_eq!(status, 201);
    let got = consume(
        &kafka.bootstrap(),
        AGGREGATES,
        1,
        Duration::from_secs(30),
        false,
    );
    let agg = payload(&got[0]);
    assert_eq!(
        agg["fields"]["level"],
        json!({"count": 10, "min": 1.0, "max": 10.0, "mean": 5.5, "sum": 55.0, "last": 10.0}),
        "{agg}"
    );
    assert_eq!(
        (agg["complete"].as_bool(), agg["device"].as_str()),
        (Some(true), Some("tank-1"))
    );
    let start = agg["window_start_ms"].as_u64().unwrap();
    assert_eq!(agg["window_end_ms"].as_u64().unwrap() - start, 2000);
    assert_eq!(start % 2000, 0);
    // The raw readings are forwarded too.
    assert_eq!(
        consume(
            &kafka.bootstrap(),
            READINGS,
            10,
            Duration::from_secs(30),
            false
        )
        .len(),
        10
    );

    // An hour-long window: a clean stop stores it, marked incomplete, and it is forwarded
    // after the restart.
    write_config(dir.path(), &config("1h"));
    d.terminate(Duration::from_secs(30));
    let mut d = Daemon::start_with(&path, data.clone());
    let (status, _) = post(
        &d,
        &auth,
        "devices/tank-1/level",
        r#"[{"level":4},{"level":6}]"#,
    );
    assert_eq!(status, 201);
    d.terminate(Duration::from_secs(30));
    let mut d = Daemon::start_with(&path, data.clone());
    let got = consume(
        &kafka.bootstrap(),
        AGGREGATES,
        2,
        Duration::from_secs(30),
        false,
    );
    assert_eq!(got.len(), 2);
    let partial = payload(&got[1]);
    assert_eq!(partial["complete"], false, "{partial}");
    assert_eq!(partial["fields"]["level"]["count"], 2);
    assert_eq!(partial["fields"]["level"]["mean"], 5.0);

    // A crash loses the open window (the readings themselves are stored): after kill -9 and a
    // clean stop of the next run, no third aggregate.
    let (status, _) = post(&d, &auth, "devices/tank-1/level", r#"{"level":9}"#);
    assert_eq!(status, 201);
    d.kill9();
    let mut d = Daemon::start_with(&path, data);
    assert_eq!(
        consume(
            &kafka.bootstrap(),
            READINGS,
            14,
            Duration::from_secs(30),
            false
        )
        .len(),
        13
    );
    d.terminate(Duration::from_secs(30));
    assert_eq!(
        consume(
            &kafka.bootstrap(),
            AGGREGATES,
            3,
            Duration::from_secs(5),
            false
        )
        .len(),
        2
    );
}

#[test]
fn a_rule_changed_through_the_api_applies_to_the_next_reading_and_survives_a_restart() {
    let kafka = Tansu::start(&[(READINGS, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let file_rule =
        "\n[[edge.rules]]\nname = \"from-file\"\ntopic = \"devices/+/file\"\nenrich = [\"name\"]\n";
    let path = write_config(dir.path(), &format!("{}{file_rule}", kafka_config(&kafka)));
    let data = dir.path().join("data");
    let mut d = Daemon::start_with(&path, data.clone());
    let secret = create_device(&d, "meter-1", None);
    let auth = basic("meter-1", &secret);
    let send = |d: &Daemon, watts: u32| {
        let (status, body) = post(
            d,
            &auth,
            "devices/meter-1/power",
            &format!(r#"{{"w":{watts}}}"#),
        );
        assert_eq!(status, 201, "{body}");
    };
    send(&d, 1000);

    // Created through the API: the next reading is converted.
    let rule = r#"{"topic":"devices/+/power","set":{"kw":"double(w) / 1000.0"},"drop":["w"]}"#;
    let r = admin(&d, "PUT", "/api/v1/edge/rules/kilowatts", rule);
    assert_eq!(r.status, 201, "{}", r.text());
    send(&d, 2500);
    let got = consume(
        &kafka.bootstrap(),
        READINGS,
        2,
        Duration::from_secs(30),
        false,
    );
    assert_eq!(payload(&got[0]), json!({"w": 1000}));
    assert_eq!(payload(&got[1]), json!({"kw": 2.5}));
    let list = admin(&d, "GET", "/api/v1/edge/rules", "").json();
    let names: Vec<(&str, &str)> = list["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["origin"].as_str().unwrap()))
        .collect();
    assert_eq!(names, [("from-file", "config"), ("kilowatts", "api")]);

    // Refused changes name the key, and leave the rules as they were.
    let r = admin(
        &d,
        "PUT",
        "/api/v1/edge/rules/kilowatts",
        r#"{"when":"w >","set":{"kw":"1.0"}}"#,
    );
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["field"], "when", "{}", r.text());
    let r = admin(&d, "PUT", "/api/v1/edge/rules/kilowatts", r#"{"sett":{}}"#);
    assert_eq!(r.status, 422, "{}", r.text());
    let r = admin(
        &d,
        "PUT",
        "/api/v1/edge/rules/from-file",
        r#"{"drop":["x"]}"#,
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["error"], "rule_in_config");

    // Kept across a restart; deleted, it no longer applies.
    d.terminate(Duration::from_secs(30));
    let d = Daemon::start_with(&path, data);
    send(&d, 500);
    let r = admin(&d, "DELETE", "/api/v1/edge/rules/kilowatts", "");
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(
        admin(&d, "DELETE", "/api/v1/edge/rules/kilowatts", "").status,
        404
    );
    send(&d, 700);
    let got = consume(
        &kafka.bootstrap(),
        READINGS,
        4,
        Duration::from_secs(30),
        false,
    );
    assert_eq!(payload(&got[2]), json!({"kw": 0.5}));
    assert_eq!(payload(&got[3]), json!({"w": 700}));
}

/// Accepts one HTTP request on `listener`, answers `200`, and returns its request line and body.
fn receive_one(listener: &std::net::TcpListener) -> (String, String) {
    use std::io::{Read, Write};
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the request ended early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= length {
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .unwrap();
                return (head.lines().next().unwrap().to_owned(), body.to_owned());
            }
        }
    }
}

#[test]
fn an_alert_webhook_is_kept_across_a_crash_and_delivered_after_the_restart() {
    let port = outpost_e2e::kafka::free_port();
    let dir = tempfile::tempdir().unwrap();
    let rules = format!(
        r#"
[[edge.rules]]
name = "leak"
topic = "devices/+/water"
[edge.rules.alert]
raise = "wet"
severity = "critical"
[edge.rules.alert.webhook]
url = "http://127.0.0.1:{port}/hooks/outpost"
"#
    );
    let path = write_config(dir.path(), &format!("{}{rules}", admin_token_config()));
    let data = dir.path().join("data");
    let mut d = Daemon::start_with(&path, data.clone());
    let secret = create_device(&d, "cellar-1", None);
    let (status, body) = post(
        &d,
        &basic("cellar-1", &secret),
        "devices/cellar-1/water",
        r#"{"wet":true}"#,
    );
    assert_eq!(status, 201, "{body}");
    // Nobody listens yet: the call fails and waits for its retry, stored.
    d.wait_until("a failed attempt", Duration::from_secs(10), |d| {
        d.metric("outpost_edge_webhook_retries_total") >= 1.0
    });
    assert_eq!(d.metric("outpost_edge_webhook_pending"), 1.0);
    d.kill9();

    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let mut d = Daemon::start_with(&path, data);
    let (request_line, body) = receive_one(&listener);
    assert_eq!(request_line, "POST /hooks/outpost HTTP/1.1");
    let alert: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            alert["alert"].as_str(),
            alert["state"].as_str(),
            alert["device"].as_str()
        ),
        (Some("leak"), Some("raised"), Some("cellar-1")),
        "{alert}"
    );
    assert_eq!(alert["reading"], json!({"wet": true}));
    d.wait_until("the delivery", Duration::from_secs(10), |d| {
        d.metric("outpost_edge_webhook_delivered_total") == 1.0
    });
    assert_eq!(d.metric("outpost_edge_webhook_pending"), 0.0);
    d.terminate(Duration::from_secs(30));
}

/// The acceptance case of docs/EDGE.md, "Aggregate": a register polled at 10 Hz over Modbus
/// TCP, one-minute aggregates on Kafka with the count of a full minute of polls and the
/// register's value as min, max and mean, while `[[kafka.rules]]` forwards one raw reading in
/// ten. Runs over two minutes (a full window), so it is a `_slow_` test (started first).
#[test]
fn modbus_slow_one_minute_aggregates_of_a_10_hz_register_reach_kafka_raw_sampled_1_in_10() {
    let kafka = Tansu::start(&[(READINGS, 1), (AGGREGATES, 1)]);
    let port = outpost_e2e::kafka::free_port();
    let _slave = outpost_e2e::modbus::Slave::start(&["--tcp", &format!("127.0.0.1:{port}")]);
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"{}
[[kafka.rules]]
name = "raw-meter"
topic = "modbus/#"
action = "sample"
sample_every = 10

[[drivers]]
kind = "modbus"
name = "plant"
transport = "tcp"
[[drivers.slaves]]
device_id = "meter-a"
unit = 1
address = "127.0.0.1:{port}"
[[drivers.slaves.points]]
name = "power"
address = 0
interval = "100ms"

[[edge.rules]]
name = "meter-minutes"
topic = "modbus/#"
[edge.rules.aggregate]
window = "1m"
fields = ["power"]
functions = ["count", "min", "max", "mean"]
"#,
        kafka_config(&kafka)
    );
    let d = Daemon::start(dir.path(), &config);
    // The first window started before the driver; the second is a full minute of polls.
    let got = consume(
        &kafka.bootstrap(),
        AGGREGATES,
        2,
        Duration::from_secs(150),
        false,
    );
    assert_eq!(got.len(), 2, "two one-minute aggregates within 150 s");
    let full = payload(&got[1]);
    assert_eq!(full["device"], "meter-a", "{full}");
    assert_eq!(
        full["window_end_ms"].as_u64().unwrap() - full["window_start_ms"].as_u64().unwrap(),
        60_000
    );
    let stats = &full["fields"]["power"];
    let count = stats["count"].as_u64().unwrap();
    assert!((570..=610).contains(&count), "10 Hz for a minute: {full}");
    // Register 0 of the slave's map holds 1234.
    assert_eq!(
        (
            stats["min"].as_f64(),
            stats["max"].as_f64(),
            stats["mean"].as_f64()
        ),
        (Some(1234.0), Some(1234.0), Some(1234.0)),
        "{full}"
    );

    // Raw readings of that minute on Kafka: one in ten.
    let (start, end) = (
        full["window_start_ms"].as_i64().unwrap(),
        full["window_end_ms"].as_i64().unwrap(),
    );
    let raw = consume(
        &kafka.bootstrap(),
        READINGS,
        10_000,
        Duration::from_secs(5),
        false,
    );
    let in_window = raw
        .iter()
        .filter(|r| {
            r.header("outpost-received-at")
                .and_then(|t| t.parse::<i64>().ok())
                .is_some_and(|t| (start..end).contains(&t))
        })
        .count();
    let expected = usize::try_from(count / 10).unwrap();
    assert!(
        in_window.abs_diff(expected) <= 2,
        "{in_window} raw readings forwarded of {count}"
    );
    assert_eq!(payload(&raw[0])["power"], 1234);
    drop(d);
}
