//! CoAP against the real binary: Debian's `coap-client` (libcoap) for CON and NON POSTs,
//! discovery, Block1 uploads and the error codes; raw UDP for what a well-behaved client never
//! sends (a duplicated message id, malformed datagrams) and for filling the outbox.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code, no async runtime here

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outpost_e2e::admin::{admin, admin_token_config, create_device};
use outpost_e2e::coap::{self, Client, Message};
use outpost_e2e::daemon::Daemon;
use outpost_sync::{OutboxReader, Source, StoredRecord};
use rand::RngExt;

/// Starts the daemon with the admin token (plus `extra`) and device `sensor-1`.
fn start(dir: &Path, extra: &str) -> (Daemon, SocketAddr) {
    let mut d = Daemon::start(dir, &format!("{}\n{extra}", admin_token_config()));
    let addr = coap::coap_addr(&mut d);
    create_device(&d, "sensor-1", None);
    (d, addr)
}

fn records(d: &Daemon) -> Vec<StoredRecord> {
    OutboxReader::open(&d.data_dir.join("outbox.db"))
        .unwrap()
        .read_all()
        .unwrap()
}

/// Runs `coap-client` (at most 5 s of waiting for a response): (stdout, stderr).
fn coap_client(args: &[&str]) -> (String, String) {
    let out = Command::new(coap::coap_client())
        .args(["-B", "5"])
        .args(args)
        .output()
        .expect("run coap-client");
    assert!(out.status.success(), "coap-client {args:?} failed: {out:?}");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn uri(addr: SocketAddr, path: &str) -> String {
    format!("coap://{addr}/{path}")
}

fn metric_total(d: &Daemon, name: &str) -> f64 {
    d.metric(name)
}

#[test]
fn con_and_non_posts_from_coap_client_are_stored_with_the_device_id() {
    let dir = tempfile::tempdir().unwrap();
    let (d, addr) = start(dir.path(), "");

    let (_, err) = coap_client(&[
        "-m",
        "post",
        "-t",
        "50",
        "-e",
        r#"{"t":21.5}"#,
        &uri(addr, "t/room/1/temp?d=sensor-1"),
    ]);
    assert!(err.trim().is_empty(), "a 2.01 prints nothing: {err}");
    let (_, err) = coap_client(&[
        "-N",
        "-B",
        "1", // no response comes: wait 1 s, not 5
        "-m",
        "post",
        "-t",
        "60",
        "-e",
        "%a1%61a%01",
        &uri(addr, "t/room/2?d=sensor-1"),
    ]);
    assert!(!err.contains("4.") && !err.contains("5."), "{err}");
    let (_, err) = coap_client(&[
        "-m",
        "put",
        "-t",
        "0",
        "-e",
        "on",
        &uri(addr, "t/switch?d=sensor-1"),
    ]);
    assert!(err.trim().is_empty(), "a 2.04 prints nothing: {err}");

    // The CON answers came after their commits; the NON has no answer, so wait for it.
    let mut d = d;
    d.wait_until(
        "3 CoAP records in the outbox",
        Duration::from_secs(10),
        |d| records(d).len() == 3,
    );
    let recs = records(&d);
    let by_topic = |t: &str| {
        recs.iter()
            .find(|r| r.topic == t)
            .unwrap_or_else(|| panic!("{t} in {recs:?}"))
    };
    let con = by_topic("room/1/temp");
    assert_eq!(
        (con.device_id.as_str(), con.source),
        ("sensor-1", Source::Coap)
    );
    assert_eq!(con.content_type.as_deref(), Some("application/json"));
    assert_eq!(con.payload, br#"{"t":21.5}"#);
    let non = by_topic("room/2");
    assert_eq!(non.device_id, "sensor-1");
    assert_eq!(non.content_type.as_deref(), Some("application/cbor"));
    assert_eq!(non.payload, [0xA1, 0x61, 0x61, 0x01]);
    assert_eq!(
        by_topic("switch").content_type.as_deref(),
        Some("text/plain")
    );

    // The monitoring figures moved.
    let r = admin(&d, "GET", "/api/v1/devices/sensor-1/status", "");
    assert_eq!(r.status, 200, "{}", r.text());
    let status = r.json();
    assert_eq!(status["messages"], 3, "{status}");
    assert!(status["last_seen_ms"].is_number(), "{status}");
    assert_eq!(metric_total(&d, "outpost_coap_records_total"), 3.0);
}

#[test]
fn discovery_lists_the_readings_resource() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, addr) = start(dir.path(), "");
    let (out, err) = coap_client(&["-m", "get", &uri(addr, ".well-known/core")]);
    assert!(
        out.contains(r#"</t>;rt="outpost.readings";if="core.b""#),
        "stdout {out:?} stderr {err:?}"
    );
}

#[test]
fn block1_upload_of_a_body_larger_than_a_datagram() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, addr) = start(dir.path(), "");
    let samples: Vec<String> = (0..400)
        .map(|i| format!("{{\"i\":{i},\"v\":{}}}", i * 7 % 101))
        .collect();
    let body = format!("[{}]", samples.join(","));
    assert!(body.len() > 4 * 1024, "{}", body.len());
    // One JSON object as one record, so the payload can be compared whole.
    let object = format!("{{\"samples\":{body}}}");
    let file = dir.path().join("body.json");
    std::fs::write(&file, &object).unwrap();
    let (_, err) = coap_client(&[
        "-m",
        "post",
        "-t",
        "50",
        "-b",
        "64",
        "-f",
        file.to_str().unwrap(),
        &uri(addr, "t/bulk?d=sensor-1"),
    ]);
    assert!(err.trim().is_empty(), "{err}");
    let recs = records(&d);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].payload, object.as_bytes());
    assert_eq!(recs[0].topic, "bulk");
    let metrics = d.get("/metrics").1;
    assert!(
        metrics.contains("outpost_coap_block1_transfers_total{outcome=\"completed\"} 1"),
        "{metrics}"
    );
    // The same body as a batch: one record per element.
    std::fs::write(&file, &body).unwrap();
    coap_client(&[
        "-m",
        "post",
        "-t",
        "50",
        "-b",
        "256",
        "-f",
        file.to_str().unwrap(),
        &uri(addr, "t/batch?d=sensor-1"),
    ]);
    d.wait_until("the batch", Duration::from_secs(5), |d| {
        records(d).len() == 401
    });
}

#[test]
fn refusals_have_their_codes_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (d, addr) = start(dir.path(), "");
    create_device(&d, "http-only", Some(r#"["http"]"#));
    create_device(&d, "gone", None);
    let r = admin(&d, "POST", "/api/v1/devices/gone/disable", "");
    assert!(
        r.status == 200 || r.status == 204,
        "disable: {} {}",
        r.status,
        r.text()
    );

    let post = |path: &str, format: &str, body: &str| {
        let (_, err) = coap_client(&["-m", "post", "-t", format, "-e", body, &uri(addr, path)]);
        err
    };
    let cases = [
        (post("t/a?d=nobody", "50", "{}"), "4.01"),
        (post("t/a", "50", "{}"), "4.01"),
        (post("t/a?d=gone", "50", "{}"), "4.01"),
        (post("t/a?d=http-only", "50", "{}"), "4.03"),
        (post("t/a?d=sensor-1", "41", "<x/>"), "4.15"),
        (post("t/a?d=sensor-1", "50", r#"{"t":"#), "4.00"),
        (post("elsewhere?d=sensor-1", "50", "{}"), "4.04"),
        (
            coap_client(&["-m", "get", &uri(addr, "t/a?d=sensor-1")]).1,
            "4.05",
        ),
        (
            coap_client(&["-m", "delete", &uri(addr, "t/a?d=sensor-1")]).1,
            "4.05",
        ),
        // Sent through us as a forward proxy (Proxy-Uri): we are not one (RFC 7252 §5.7.2).
        (
            coap_client(&[
                "-m",
                "post",
                "-t",
                "50",
                "-e",
                "{}",
                "-P",
                &format!("coap://{addr}"),
                // TEST-NET-1: never contacted, the request goes to the "proxy".
                "coap://192.0.2.1/t/a?d=sensor-1",
            ])
            .1,
            "5.05",
        ),
    ];
    for (i, (stderr, code)) in cases.iter().enumerate() {
        assert!(
            stderr.trim_start().starts_with(code),
            "case {i}: expected {code}, got {stderr:?}"
        );
    }
    // The 4.00 names the problem.
    assert!(cases[5].0.contains("body"), "{}", cases[5].0);
    assert!(records(&d).is_empty());
    assert_eq!(metric_total(&d, "outpost_coap_records_total"), 0.0);
}

#[test]
fn a_duplicated_con_is_stored_once_and_every_copy_answered_identically() {
    let dir = tempfile::tempdir().unwrap();
    let (d, addr) = start(dir.path(), "");
    let client = Client::new(addr);
    let request = Message::post(0x5150, "dup", "sensor-1", 50, br#"{"n":1}"#).encode();
    // Back to back: the copy usually arrives while the first is still being committed.
    client.send(&request);
    client.send(&request);
    let first = client
        .recv_within(Duration::from_secs(10))
        .expect("first answer");
    let second = client
        .recv_within(Duration::from_secs(10))
        .expect("second answer");
    assert_eq!(first, second);
    let ack = Message::decode(&first).unwrap();
    assert_eq!(
        (ack.kind, ack.code_text(), ack.mid),
        (coap::ACK, "2.01".to_owned(), 0x5150)
    );
    // Long after: the cached answer again.
    std::thread::sleep(Duration::from_millis(300));
    client.send(&request);
    assert_eq!(client.recv_within(Duration::from_secs(10)).unwrap(), first);
    assert_eq!(records(&d).len(), 1);
    assert_eq!(metric_total(&d, "outpost_coap_duplicates_total"), 2.0);
    // The same message id from another endpoint is another message.
    let other = Client::new(addr);
    assert_eq!(
        other
            .exchange(&Message::decode(&request).unwrap())
            .code_text(),
        "2.01"
    );
    assert_eq!(records(&d).len(), 2);
}

#[test]
fn malformed_datagrams_are_answered_or_ignored_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, addr) = start(dir.path(), "");
    let client = Client::new(addr);
    let silent = Duration::from_millis(300);
    // Unknown version (3, 2), truncated header, empty datagram: silently ignored.
    client.send(b"\xde\xad\xbe\xef not CoAP at all");
    client.send(&[0x80, 0x02, 0x00, 0x01]);
    client.send(&[0x40, 0x02, 0x00]);
    client.send(&[]);
    assert_eq!(client.recv_within(silent), None);
    // Confirmable with a readable message id: a Reset carrying it.
    let resets = [
        (
            vec![0x49, 0x02, 0x12, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 9],
            0x1201,
        ), // token length 9
        (vec![0x40, 0x02, 0x12, 0x02, 0xF1, 0x00], 0x1202), // option delta 15
        (vec![0x40, 0x02, 0x12, 0x03, 0xB4, b't'], 0x1203), // option runs past the end
        (vec![0x40, 0x02, 0x12, 0x04, 0xB1, b't', 0xFF], 0x1204), // payload marker, no payload
    ];
    for (bytes, mid) in &resets {
        client.send(bytes);
        let rst = client
            .recv_within(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no reset for {bytes:02x?}"));
        let rst = Message::decode(&rst).unwrap();
        assert_eq!(
            (rst.kind, rst.code, rst.mid, rst.token.len()),
            (coap::RST, 0, *mid, 0)
        );
    }
    // The same format errors in a NON: ignored.
    client.send(&[0x59, 0x02, 0x12, 0x05, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(client.recv_within(silent), None);
    let m = |n| metric_total(&d, n);
    assert_eq!(m("outpost_coap_malformed_total"), 9.0);
    assert_eq!(m("outpost_coap_resets_total"), 4.0);

    // Random datagrams, some starting like a CoAP header.
    let mut rng = rand::rng();
    for i in 0..2000 {
        let len = rng.random_range(0..64);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if i % 2 == 0 && len > 0 {
            bytes[0] = 0x40 | (bytes[0] & 0x3F);
        }
        client.send(&bytes);
    }
    let ok = Client::new(addr).exchange(&Message::post(7, "after", "sensor-1", 50, b"{}"));
    assert_eq!(ok.code_text(), "2.01");
    assert!(d.is_running());
    assert!(
        !d.logs().iter().any(|l| l.contains("panicked")),
        "{:?}",
        d.logs()
    );
    assert_eq!(records(&d).iter().filter(|r| r.topic == "after").count(), 1);
}

#[test]
fn a_full_outbox_is_answered_5_03_with_max_age() {
    let dir = tempfile::tempdir().unwrap();
    let (d, addr) = start(
        dir.path(),
        "[outbox]\nmax_bytes = \"1MiB\"\nmax_record_bytes = \"128KiB\"\n\
         min_free_disk = \"0\"\nwhen_full = \"reject\"\n",
    );
    let client = Client::new(addr);
    let body = vec![0x5A; 60_000];
    let mut created = 0;
    let mut refused = None;
    for mid in 1..=40u16 {
        let r = client.exchange(&Message::post(mid, "fill", "sensor-1", 42, &body));
        match r.code_text().as_str() {
            "2.01" => created += 1,
            "5.03" => {
                refused = Some(r);
                break;
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    let refused = refused.expect("the outbox refused before 40 × 60 KB");
    assert!(created >= 10, "{created} stored before the outbox was full");
    assert_eq!(refused.uint_option(coap::MAX_AGE), Some(5), "{refused:?}");
    assert!(refused.text().contains("full"), "{}", refused.text());
    assert_eq!(records(&d).len(), created);
    // Still full, still refused; nothing stored.
    let again = client.exchange(&Message::post(100, "fill", "sensor-1", 42, &body));
    assert_eq!(again.code_text(), "5.03");
    assert_eq!(records(&d).len(), created);
    // A status of the device says so.
    let status = admin(&d, "GET", "/api/v1/devices/sensor-1/status", "").json();
    assert!(
        status["errors"]["dropped"].as_u64().unwrap() >= 2,
        "{status}"
    );
}
