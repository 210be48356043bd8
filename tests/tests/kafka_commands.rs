//! Commands from the cloud, end to end: a backend's Kafka client (confluent-kafka from PyPI,
//! `tests/peers/send_commands.py`, partitioning like Java clients) writes commands to a real
//! Kafka-protocol broker (tansu); the real binary reads the partition its gateway id hashes to,
//! queues the commands, delivers them to devices over MQTT (Debian's `mosquitto_sub`/`_pub`,
//! MQTT 5) and HTTP polling, and sends status events back through the outbox, read with an
//! rdkafka consumer.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code, no async runtime here

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost_e2e::admin::basic;
use outpost_e2e::admin::{admin, admin_token_config, create_device};
use outpost_e2e::daemon::{Daemon, write_config};
use outpost_e2e::http::request;
use outpost_e2e::kafka::{Tansu, consume, send_commands};
use serde_json::{Value, json};

const COMMANDS: &str = "outpost.commands";
const STATUS: &str = "outpost.command-status";
const READINGS: &str = "outpost.readings";

fn config(kafka: &Tansu) -> String {
    format!(
        "{}\n[kafka]\nenabled = true\nbrokers = [\"{}\"]\nlinger = \"2ms\"\n\n\
         [kafka.commands]\nenabled = true\n",
        admin_token_config(),
        kafka.bootstrap()
    )
}

/// Sends `(gateway, command)` records with the backend's client; returns their partitions.
fn send(kafka: &Tansu, records: &[(&str, Value)]) -> Vec<i64> {
    send_commands(&kafka.bootstrap(), COMMANDS, records, Duration::ZERO)
}

/// [`send`], pausing `pause` after each record.
fn send_paced(kafka: &Tansu, records: &[(&str, Value)], pause: Duration) -> Vec<i64> {
    send_commands(&kafka.bootstrap(), COMMANDS, records, pause)
}

/// The status events on the status topic (at least `n`, within `timeout`), as JSON.
fn status_events(kafka: &Tansu, n: usize, timeout: Duration) -> Vec<Value> {
    consume(&kafka.bootstrap(), STATUS, n, timeout, false)
        .iter()
        .map(|r| serde_json::from_slice(&r.payload).unwrap())
        .collect()
}

/// Status names per command id, in the order they arrived.
fn by_command(events: &[Value]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in events {
        let id = e["command_id"].as_str().unwrap_or("<none>").to_owned();
        out.entry(id)
            .or_default()
            .push(e["status"].as_str().unwrap().to_owned());
    }
    out
}

fn mqtt_addr(d: &mut Daemon) -> SocketAddr {
    let line = d.wait_for_log("MQTT listener bound", Duration::from_secs(10));
    let v: Value = serde_json::from_str(&line).unwrap();
    v["addr"].as_str().unwrap().parse().unwrap()
}

/// An HTTP device's poll (`GET /api/v1/device/commands` with its `Authorization`): the
/// commands it got, now marked delivered.
fn poll_http(d: &Daemon, auth: &str) -> Vec<Value> {
    let r = request(
        d.admin,
        "GET",
        "/api/v1/device/commands",
        &[("Authorization", auth)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["commands"].as_array().unwrap().clone()
}

/// The device's commands as the API lists them.
fn commands_of(d: &Daemon, device: &str) -> Vec<Value> {
    let r = admin(d, "GET", &format!("/api/v1/devices/{device}/commands"), "");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["commands"].as_array().unwrap().clone()
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `mosquitto_sub` as the device, printing topic, response topic, correlation data, user
/// properties and payload of `count` messages.
fn subscribe(d: &mut Daemon, addr: SocketAddr, device: &str, secret: &str, count: usize) -> Child {
    outpost_e2e::mosquitto::subscribe_commands(d, addr, device, secret, count, "%t|%R|%D|%P|%p")
}

/// A command written to Kafka reaches an MQTT device (name in the topic, MQTT 5 response topic
/// and correlation data) and an HTTP-polling device; both acknowledge over their protocol, and
/// the status topic tells the backend queued → delivered → acked with the device's result. An
/// unknown device and a record that is not a command are rejected, a command nobody takes in
/// time expires, a command sent twice is queued once, and records keyed with another gateway's
/// id (even in the same partition) are skipped.
#[test]
fn commands_reach_mqtt_and_http_devices_and_their_acks_reach_kafka() {
    let kafka = Tansu::start(&[(COMMANDS, 4), (STATUS, 1), (READINGS, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &config(&kafka));
    let mut d = Daemon::start_with(&path, dir.path().join("data"));
    let addr = mqtt_addr(&mut d);
    let gateway = d.status()["gateway_id"].as_str().unwrap().to_owned();
    let valve = create_device(&d, "valve-1", Some(r#"["mqtt"]"#));
    let poller = create_device(&d, "poller-1", Some(r#"["http"]"#));
    create_device(&d, "sleeper-1", Some(r#"["http"]"#));
    d.wait_for_log("Reading commands", Duration::from_secs(30));
    let sub = subscribe(&mut d, addr, "valve-1", &valve, 1);

    let open = json!({"id": "c-mqtt-1", "device": "valve-1", "name": "open",
                      "payload": {"percent": 40}, "ttl_s": 600, "correlation": "job-7"});
    let partitions = send(
        &kafka,
        &[
            (&gateway, open.clone()),
            (
                &gateway,
                json!({"id": "c-http-1", "device": "poller-1", "name": "calibrate",
                              "payload_base64": "AAEC/w=="}),
            ),
            (
                &gateway,
                json!({"id": "c-ghost-1", "device": "ghost", "name": "open"}),
            ),
            (
                &gateway,
                json!({"id": "c-late-1", "device": "sleeper-1", "name": "wake", "ttl_s": 3}),
            ),
            (&gateway, Value::String("not a command".into())),
            // Commands to the gateway itself are off by default.
            (
                &gateway,
                json!({"id": "c-gw-1", "target": "gateway", "name": "report_status"}),
            ),
            // A backend that sends twice: queued once.
            (&gateway, open),
            (
                &format!("{gateway}-other"),
                json!({"id": "c-other", "device": "valve-1", "name": "open"}),
            ),
        ],
    );
    assert!(
        partitions[..7].iter().all(|p| *p == partitions[0]),
        "{partitions:?}"
    );

    // MQTT: the command on the device's topic, with what MQTT 5 request/response needs.
    let out = sub.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "mosquitto_sub: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fields: Vec<&str> = text.trim_end().split('|').collect();
    let local_id = fields[0]
        .strip_prefix("devices/valve-1/commands/")
        .and_then(|rest| rest.strip_suffix("/open"))
        .unwrap_or_else(|| panic!("topic of {text}"));
    let response_topic = format!("devices/valve-1/acks/{local_id}");
    assert_eq!(fields[1], response_topic, "{text}");
    assert_eq!(fields[2], "c-mqtt-1", "{text}");
    assert!(
        fields[3].contains("command-id") && fields[3].contains("command-name"),
        "{text}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(fields[4]).unwrap(),
        json!({"percent": 40})
    );
    let ack = Command::new("mosquitto_pub")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-V", "5", "-u", "valve-1", "-P", &valve, "-q", "1"])
        .args([
            "-t",
            &response_topic,
            "-D",
            "publish",
            "correlation-data",
            "c-mqtt-1",
        ])
        .args(["-m", r#"{"ok": true, "percent": 40}"#])
        .output()
        .unwrap();
    assert!(
        ack.status.success(),
        "{}",
        String::from_utf8_lossy(&ack.stderr)
    );

    // HTTP: poll, then acknowledge; a repeated ack is answered the same; bad ones are refused.
    let auth = basic("poller-1", &poller);
    let polled = wait_for("the HTTP command", Duration::from_secs(10), || {
        poll_http(&d, &auth).into_iter().next()
    });
    assert_eq!(polled["command_id"], "c-http-1");
    assert_eq!(polled["name"], "calibrate");
    assert_eq!(polled["payload_base64"], "AAEC/w==");
    let ack_path = format!("/api/v1/device/commands/{}/ack", polled["id"]);
    let json_headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    for _ in 0..2 {
        let r = request(
            d.admin,
            "POST",
            &ack_path,
            &json_headers,
            br#"{"offset": 0.25}"#,
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["command"]["state"], "acked");
    }
    let r = request(
        d.admin,
        "POST",
        "/api/v1/device/commands/999999/ack",
        &json_headers,
        b"{}",
    );
    assert_eq!(
        (r.status, r.json()["field"].clone()),
        (404, json!("id")),
        "{}",
        r.text()
    );
    let r = request(d.admin, "POST", &ack_path, &json_headers, b"{not json");
    assert_eq!(
        (r.status, r.json()["field"].clone()),
        (400, json!("body")),
        "{}",
        r.text()
    );

    // The status topic: every command's story, in order, with the gateway and the results.
    let events = status_events(&kafka, 11, Duration::from_secs(30));
    let stories = by_command(&events);
    let events = if stories.get("c-late-1").is_some_and(|s| s.len() == 1) {
        status_events(&kafka, 10, Duration::from_secs(30))
    } else {
        events
    };
    let stories = by_command(&events);
    let expected: BTreeMap<String, Vec<String>> = [
        ("c-mqtt-1", &["queued", "delivered", "acked"][..]),
        ("c-http-1", &["queued", "delivered", "acked"]),
        ("c-ghost-1", &["rejected"]),
        ("c-gw-1", &["rejected"]),
        ("<none>", &["rejected"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.iter().map(|s| (*s).to_owned()).collect()))
    .collect();
    // Nobody takes c-late-1: it expires, queued first unless reading it took longer than its
    // 3 s (a loaded machine).
    let mut stories = stories;
    let late = stories.remove("c-late-1").unwrap_or_default();
    assert!(
        late == ["queued", "expired"] || late == ["expired"],
        "c-late-1: {late:?}"
    );
    let expected_events = expected.values().map(Vec::len).sum::<usize>() + late.len();
    assert_eq!(stories, expected, "{events:#?}");
    for e in &events {
        assert_eq!(e["gateway"], gateway.as_str(), "{e}");
        assert!(e["at_ms"].as_i64().unwrap() > 0 && e["at"].as_str().unwrap().ends_with('Z'));
    }
    let find = |id: &str, status: &str| {
        events
            .iter()
            .find(|e| e["command_id"] == id && e["status"] == status)
            .unwrap()
            .clone()
    };
    let acked = find("c-mqtt-1", "acked");
    assert_eq!(acked["result"], json!({"ok": true, "percent": 40}));
    assert_eq!(
        (acked["correlation"].clone(), acked["name"].clone()),
        (json!("job-7"), json!("open"))
    );
    assert_eq!(find("c-http-1", "acked")["result"], json!({"offset": 0.25}));
    assert!(
        find("c-ghost-1", "rejected")["reason"]
            .as_str()
            .unwrap()
            .contains("unknown device")
    );
    assert_eq!(find("c-ghost-1", "rejected")["device"], "ghost");
    let off = find("c-gw-1", "rejected");
    assert_eq!(
        (off["target"].clone(), off["device"].clone()),
        (json!("gateway"), Value::Null)
    );
    assert!(
        off["reason"]
            .as_str()
            .unwrap()
            .contains("kafka.commands.gateway = false"),
        "{off}"
    );
    let invalid = events.iter().find(|e| e["command_id"].is_null()).unwrap();
    assert!(
        invalid["reason"]
            .as_str()
            .unwrap()
            .starts_with("not a command"),
        "{invalid}"
    );

    // Nothing more: not the repeated command, not the other gateway's.
    assert_eq!(
        status_events(&kafka, expected_events + 1, Duration::from_secs(3)).len(),
        expected_events
    );
    let valve_commands = commands_of(&d, "valve-1");
    assert_eq!(valve_commands.len(), 1, "{valve_commands:?}");
    assert_eq!(valve_commands[0]["state"], "acked");
    assert_eq!(d.metric("outpost_kafka_commands_read_total"), 7.0);
    assert_eq!(d.metric("outpost_kafka_commands_invalid_total"), 1.0);
}

/// Commands sent while the gateway is down are delivered when it is back (unless they expired
/// meanwhile), and a `kill -9` while commands are being stored neither loses one nor queues one
/// twice: the offset is stored in the transaction that queues the commands, so a restart reads
/// on from exactly there. A backend resending an old id after the restart is not queued again.
#[test]
fn commands_survive_an_offline_gateway_and_kill_9_exactly_once() {
    let kafka = Tansu::start(&[(COMMANDS, 3), (STATUS, 1), (READINGS, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &config(&kafka));
    let data = dir.path().join("data");
    let mut d = Daemon::start_with(&path, data.clone());
    let gateway = d.status()["gateway_id"].as_str().unwrap().to_owned();
    let devices = ["d-0", "d-1", "d-2", "d-3"];
    let secrets: Vec<String> = devices
        .iter()
        .map(|device| create_device(&d, device, Some(r#"["http"]"#)))
        .collect();
    d.wait_for_log("Reading commands", Duration::from_secs(30));
    let command = |i: usize, ttl_s: u64| {
        json!({"id": format!("c-{i}"), "device": devices[i % 4], "name": "set",
               "payload": {"i": i}, "ttl_s": ttl_s})
    };
    send(&kafka, &[(&gateway, command(0, 600))]);
    wait_for("c-0 queued", Duration::from_secs(10), || {
        (!commands_of(&d, "d-0").is_empty()).then_some(())
    });

    // Offline: 20 commands, one of which expires before the gateway is back.
    d.terminate(Duration::from_secs(15));
    let offline: Vec<(&str, Value)> = (1..=20)
        .map(|i| (gateway.as_str(), command(i, if i == 7 { 1 } else { 600 })))
        .collect();
    send(&kafka, &offline);
    std::thread::sleep(Duration::from_secs(2));
    let mut d = Daemon::start_with(&path, data.clone());
    let queued_ids = |d: &Daemon| -> Vec<String> {
        devices
            .iter()
            .flat_map(|dev| commands_of(d, dev))
            .map(|c| c["command_id"].as_str().unwrap().to_owned())
            .collect()
    };
    wait_for("the offline commands", Duration::from_secs(20), || {
        (queued_ids(&d).len() == 20).then_some(())
    });

    // kill -9 while 200 more are read and stored.
    let burst: Vec<(&str, Value)> = (21..=220)
        .map(|i| (gateway.as_str(), command(i, 600)))
        .collect();
    let read_before = d.metric("outpost_kafka_commands_read_total");
    let (sent, read_at_kill) = std::thread::scope(|s| {
        let sender = s.spawn(|| send_paced(&kafka, &burst, Duration::from_millis(10)));
        d.wait_until("commands being stored", Duration::from_secs(30), |d| {
            d.metric("outpost_kafka_commands_read_total") - read_before >= 5.0
        });
        let read = d.metric("outpost_kafka_commands_read_total") - read_before;
        d.kill9();
        (sender.join().unwrap(), read)
    });
    assert_eq!(sent.len(), 200);
    assert!(read_at_kill < 200.0, "the kill came after the whole burst");
    let mut d = Daemon::start_with(&path, data);
    // A backend retrying an old command after the restart.
    send(&kafka, &[(&gateway, command(3, 600))]);
    let ids = wait_for("every command queued", Duration::from_secs(30), || {
        let ids = queued_ids(&d);
        (ids.len() >= 220).then_some(ids)
    });
    std::thread::sleep(Duration::from_secs(2));
    let ids_after = queued_ids(&d);
    assert_eq!(ids, ids_after, "more commands were queued later");
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "a command was queued twice");
    let expected: BTreeSet<String> = (0..=220)
        .filter(|i| *i != 7)
        .map(|i| format!("c-{i}"))
        .collect();
    assert_eq!(
        unique.into_iter().cloned().collect::<BTreeSet<_>>(),
        expected
    );

    // The backend learns of each: queued for all but c-7, expired for c-7 (events are at least
    // once: a kill -9 may repeat one, never drop one).
    let events = status_events(&kafka, 221, Duration::from_secs(30));
    let stories = by_command(&events);
    assert_eq!(stories.len(), 221, "{stories:?}");
    assert_eq!(stories["c-7"], ["expired"]);
    for (id, story) in &stories {
        if id != "c-7" {
            assert!(story.iter().all(|s| s == "queued"), "{id}: {story:?}");
        }
    }

    // Kafka unreachable: d-0 polls and acknowledges its commands; their status events wait in
    // the outbox and reach the backend once Kafka is back, in order per command.
    kafka.block();
    let auth = basic("d-0", &secrets[0]);
    let polled = poll_http(&d, &auth);
    assert!(polled.len() >= 10, "{polled:?}");
    for c in &polled {
        let r = request(
            d.admin,
            "POST",
            &format!("/api/v1/device/commands/{}/ack", c["id"]),
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
            ],
            br#"{"done": true}"#,
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let held = (2 * polled.len()) as f64;
    d.wait_until(
        "the events held in the outbox",
        Duration::from_secs(10),
        |d| d.metric("outpost_outbox_records") >= held,
    );
    std::thread::sleep(Duration::from_secs(3));
    kafka.unblock();
    let events = status_events(
        &kafka,
        events.len() + 2 * polled.len(),
        Duration::from_secs(60),
    );
    let stories = by_command(&events);
    for c in &polled {
        let id = c["command_id"].as_str().unwrap();
        let mut story = stories[id].clone();
        story.dedup(); // at least once: the kill -9 may have repeated a `queued`
        assert_eq!(story, ["queued", "delivered", "acked"], "{id}");
    }
}

/// The backend quickstart of docs/KAFKA.md (`docs/examples/backend.py`, confluent-kafka) runs
/// against the real binary: it shows a device's reading with Outpost's headers, sends that
/// device a command, and exits 0 once the device (played here over HTTP) acknowledged it.
#[test]
fn the_backend_quickstart_reads_a_reading_sends_a_command_and_sees_it_acked() {
    let kafka = Tansu::start(&[(COMMANDS, 2), (STATUS, 1), (READINGS, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &config(&kafka));
    let mut d = Daemon::start_with(&path, dir.path().join("data"));
    let gateway = d.status()["gateway_id"].as_str().unwrap().to_owned();
    let secret = create_device(&d, "valve-7", Some(r#"["http"]"#));
    let auth = basic("valve-7", &secret);
    d.wait_for_log("Reading commands", Duration::from_secs(30));
    let r = request(
        d.admin,
        "POST",
        "/api/v1/ingest/valve-7/flow",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        br#"{"litres_per_min": 12.5}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());

    let script = outpost_e2e::manifest_dir().join("../docs/examples/backend.py");
    let backend = Command::new("python3")
        .arg(&script)
        .args(["--bootstrap", &kafka.bootstrap(), "--gateway", &gateway])
        .args([
            "--device",
            "valve-7",
            "--name",
            "open",
            "--payload",
            r#"{"percent": 40}"#,
        ])
        .args(["--timeout", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run docs/examples/backend.py");

    // The device: poll until the command is there, then acknowledge it.
    let polled = wait_for("the quickstart's command", Duration::from_secs(30), || {
        poll_http(&d, &auth).first().cloned()
    });
    assert_eq!(
        (polled["name"].clone(), polled["payload"].clone()),
        (json!("open"), json!({"percent": 40}))
    );
    let r = request(
        d.admin,
        "POST",
        &format!("/api/v1/device/commands/{}/ack", polled["id"]),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        br#"{"opened": true}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());

    let out = backend.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "backend.py: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("reading from valve-7")
            && text.contains(r#"{"litres_per_min": 12.5}"#)
            && text.contains("queued")
            && text.contains(r#"acked"#)
            && text.contains(r#"result {"opened": true}"#),
        "{text}"
    );
}

/// Runs `coap-client` once (at most 5 s of waiting): stdout.
fn coap(args: &[&str]) -> String {
    let out = Command::new(outpost_e2e::coap::coap_client())
        .args(["-B", "5"])
        .args(args)
        .output()
        .expect("run coap-client");
    assert!(out.status.success(), "coap-client {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The first command in the `{"commands": [...]}` listings in `text` (coap-client prints one
/// payload after the other, without a separator).
fn first_command(text: &str) -> Option<Value> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .map_while(Result::ok)
        .find_map(|v| v["commands"].as_array().and_then(|c| c.first().cloned()))
}

/// CoAP: a device observing `/c` (RFC 7641, libcoap's `coap-client -s`) gets a command from
/// Kafka as a notification, and another device polls `/c`; both acknowledge with `POST /c/<n>`
/// (libcoap again), and the backend sees queued → delivered → acked with their results.
#[test]
fn commands_reach_coap_devices_by_observe_and_poll_and_their_acks_reach_kafka() {
    let kafka = Tansu::start(&[(COMMANDS, 2), (STATUS, 1), (READINGS, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &config(&kafka));
    let mut d = Daemon::start_with(&path, dir.path().join("data"));
    let addr = outpost_e2e::coap::coap_addr(&mut d);
    let gateway = d.status()["gateway_id"].as_str().unwrap().to_owned();
    create_device(&d, "watcher-c", Some(r#"["coap"]"#));
    create_device(&d, "poller-c", Some(r#"["coap"]"#));
    d.wait_for_log("Reading commands", Duration::from_secs(30));

    // The observer: its first answer (registration) lists nothing; a notification follows.
    // stdbuf: coap-client's stdout is a pipe here, which stdio would buffer until it exits.
    let mut observer = Command::new("stdbuf")
        .arg("-o0")
        .arg(outpost_e2e::coap::coap_client())
        .args([
            "-m",
            "get",
            "-s",
            "20",
            &format!("coap://{addr}/c?d=watcher-c"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run coap-client -s");
    let stdout = observer.stdout.take().unwrap();
    let (chunks_tx, chunks_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut stdout = stdout;
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = std::io::Read::read(&mut stdout, &mut buf) {
            if chunks_tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    d.wait_until("the observation", Duration::from_secs(10), |d| {
        d.metric("outpost_coap_observers") == 1.0
    });

    send(
        &kafka,
        &[
            (
                &gateway,
                json!({"id": "c-coap-1", "device": "watcher-c", "name": "blink",
                              "payload": {"times": 3}}),
            ),
            (
                &gateway,
                json!({"id": "c-coap-2", "device": "poller-c", "name": "sample"}),
            ),
        ],
    );
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let notified = loop {
        while let Ok(chunk) = chunks_rx.try_recv() {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
        if let Some(command) = first_command(&seen) {
            break command;
        }
        assert!(
            Instant::now() < deadline,
            "no notification; coap-client printed: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        (notified["command_id"].clone(), notified["name"].clone()),
        (json!("c-coap-1"), json!("blink"))
    );
    assert_eq!(notified["payload"], json!({"times": 3}));
    assert!(d.metric("outpost_coap_notifications_total") >= 1.0);
    let ack = format!("coap://{addr}/c/{}?d=watcher-c", notified["id"]);
    coap(&["-m", "post", "-t", "json", "-e", r#"{"blinked": 3}"#, &ack]);

    // The poller: a plain GET takes its command; the acknowledgement is text here.
    let polled = wait_for("the polled command", Duration::from_secs(10), || {
        first_command(&coap(&[
            "-m",
            "get",
            &format!("coap://{addr}/c?d=poller-c"),
        ]))
    });
    assert_eq!(polled["command_id"], "c-coap-2");
    coap(&[
        "-m",
        "post",
        "-e",
        "sampled",
        &format!("coap://{addr}/c/{}?d=poller-c", polled["id"]),
    ]);
    // No such command: 4.04.
    let missing = Command::new(outpost_e2e::coap::coap_client())
        .args([
            "-B",
            "5",
            "-m",
            "post",
            "-e",
            "x",
            &format!("coap://{addr}/c/99999?d=poller-c"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&missing.stdout).into_owned()
        + &String::from_utf8_lossy(&missing.stderr);
    assert!(text.contains("4.04"), "{text}");

    let events = status_events(&kafka, 6, Duration::from_secs(30));
    let stories = by_command(&events);
    for id in ["c-coap-1", "c-coap-2"] {
        assert_eq!(stories[id], ["queued", "delivered", "acked"], "{events:#?}");
    }
    let result = |id: &str| {
        events
            .iter()
            .find(|e| e["command_id"] == id && e["status"] == "acked")
            .unwrap()["result"]
            .clone()
    };
    assert_eq!(result("c-coap-1"), json!({"blinked": 3}));
    assert_eq!(result("c-coap-2"), json!("sampled"));
    observer.kill().unwrap();
    observer.wait().unwrap();
}
