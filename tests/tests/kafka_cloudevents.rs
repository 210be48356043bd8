//! Forwarded records as CloudEvents, read by another language's SDK: the real binary forwards
//! to librdkafka's mock cluster, an rdkafka consumer reads the records back, and the CloudEvents
//! SDK for Python (`cloudevents` from PyPI, `tests/peers/cloudevents_check.py`) parses each one
//! — binary content mode by default, structured mode by a rule — and must accept it.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use outpost_e2e::admin::{Device, admin_token_config};
use outpost_e2e::daemon::Daemon;
use outpost_e2e::kafka::{Consumed, MockKafka, consume};

const BINARY: &str = "outpost.readings";
const STRUCTURED: &str = "outpost.events";

/// What the Python SDK made of each record (one JSON object per record).
fn read_with_the_python_sdk(records: &[Consumed]) -> Vec<serde_json::Value> {
    let script = outpost_e2e::manifest_dir().join("peers/cloudevents_check.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cloudevents_check.py");
    let mut input = String::new();
    for r in records {
        let headers: serde_json::Map<String, serde_json::Value> = r
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), STANDARD.encode(v).into()))
            .collect();
        let line = serde_json::json!({
            "headers": headers,
            "key": r.key.as_ref().map(|k| STANDARD.encode(k)),
            "value": STANDARD.encode(&r.payload),
        });
        input.push_str(&format!("{line}\n"));
    }
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the CloudEvents SDK refused a record: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Binary mode (the default here) keeps the payload and puts the attributes in `ce_*` headers;
/// a rule switches a topic to structured mode (the value is the JSON event). Both parse with
/// the Python SDK; the id is `<outbox>-<seq>` (unique per record), the source names gateway and
/// device, the subject is the record's topic, the time its receipt; an octet-stream payload
/// travels as `data_base64` in structured mode.
#[test]
fn cloudevents_in_both_content_modes_parse_with_the_python_sdk() {
    let kafka = MockKafka::start(1, &[(BINARY, 1), (STRUCTURED, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[kafka]\nenabled = true\nbrokers = [\"{}\"]\nlinger = \"2ms\"\ncloudevents = \"binary\"\n\n\
         [[kafka.rules]]\ntopic = \"events/#\"\nkafka_topic = \"{STRUCTURED}\"\ncloudevents = \"structured\"\n",
        admin_token_config(),
        kafka.bootstrap()
    );
    let mut d = Daemon::start(dir.path(), &config);
    let mut dev = Device::new(&d, "ce-1");
    dev.send(&d, "telemetry/room-1", 3);
    dev.send(&d, "events/door", 2);
    dev.post(
        &d,
        "events/raw",
        "application/octet-stream",
        b"\x00\x01binary",
    );
    d.wait_until("delivered", Duration::from_secs(30), |d| {
        d.metric("outpost_outbox_records") == 0.0
    });

    let binary = consume(kafka.bootstrap(), BINARY, 3, Duration::from_secs(15), false);
    let structured = consume(
        kafka.bootstrap(),
        STRUCTURED,
        3,
        Duration::from_secs(15),
        false,
    );
    assert_eq!((binary.len(), structured.len()), (3, 3));
    let gateway = binary[0].header("outpost-gateway").unwrap();
    let source = format!("/outpost/{gateway}/devices/ce-1");
    let mut ids = HashSet::new();

    for (record, event) in binary.iter().zip(read_with_the_python_sdk(&binary)) {
        let id = format!(
            "{}-{}",
            record.header("outpost-outbox").unwrap(),
            record.header("outpost-seq").unwrap()
        );
        assert_eq!(event["specversion"], "1.0", "{event}");
        assert_eq!(event["id"], id.as_str(), "{event}");
        assert_eq!(event["source"], source.as_str(), "{event}");
        assert_eq!(event["type"], "outpost.reading", "{event}");
        assert_eq!(event["subject"], "telemetry/room-1", "{event}");
        assert_eq!(event["datacontenttype"], "application/json", "{event}");
        assert!(event["time"].as_str().unwrap().ends_with('Z'), "{event}");
        // Binary mode: the value is the payload, byte for byte.
        assert_eq!(
            STANDARD
                .decode(event["data_base64"].as_str().unwrap())
                .unwrap(),
            record.payload,
            "{event}"
        );
        assert!(ids.insert(id), "ids are unique");
    }

    let events = read_with_the_python_sdk(&structured);
    for (record, event) in structured.iter().zip(&events) {
        assert_eq!(
            record.header("content-type").as_deref(),
            Some("application/cloudevents+json; charset=UTF-8")
        );
        assert_eq!(event["source"], source.as_str(), "{event}");
        assert!(
            ids.insert(event["id"].as_str().unwrap().to_owned()),
            "{event}"
        );
    }
    assert_eq!(events[0]["subject"], "events/door");
    assert_eq!(
        events[0]["data"],
        serde_json::json!({"n": 3}),
        "JSON data stays JSON"
    );
    assert_eq!(events[1]["data"], serde_json::json!({"n": 4}));
    assert_eq!(events[2]["subject"], "events/raw");
    // The event itself says what its data is. (The Python SDK's `from_structured` copies every
    // Kafka header into the attributes, so it reports the record's `content-type`, the event
    // format, as `datacontenttype`: read the event as sent.)
    let sent: serde_json::Value = serde_json::from_slice(&structured[2].payload).unwrap();
    assert_eq!(
        sent["datacontenttype"], "application/octet-stream",
        "{sent}"
    );
    assert_eq!(
        STANDARD
            .decode(events[2]["data_base64"].as_str().unwrap())
            .unwrap(),
        b"\x00\x01binary",
        "bytes travel as data_base64"
    );
}
