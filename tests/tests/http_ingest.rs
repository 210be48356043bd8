//! HTTP ingestion against the real binary: devices created through the API post readings with
//! their own credentials; records land in the outbox with the authenticated device id; every
//! refusal has its documented status and a JSON body naming the field; a 201 is never returned
//! for a record that is not committed (kill -9 right after responses).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code, no async runtime here

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_e2e::admin::basic;
use outpost_e2e::admin::{admin, admin_token_config, create_device};
use outpost_e2e::daemon::Daemon;
use outpost_e2e::http::{Response, request, try_request};
use outpost_sync::{OutboxReader, Source};
use rand::RngExt;

fn post(addr: SocketAddr, topic: &str, auth: &str, content_type: &str, body: &[u8]) -> Response {
    request(
        addr,
        "POST",
        &format!("/api/v1/ingest/{topic}"),
        &[("Authorization", auth), ("Content-Type", content_type)],
        body,
    )
}

fn assert_error(r: &Response, status: u16, field: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert!(v["error"].is_string(), "error code in {v}");
    if let Some(field) = field {
        assert_eq!(v["field"], field, "{v}");
    }
}

#[test]
fn records_carry_the_authenticated_device_and_unchanged_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &admin_token_config());
    let secret = create_device(&d, "sensor-1", None);
    let auth = basic("sensor-1", &secret);

    // The payload claims another device: the stored id is still the authenticated one.
    let single = br#"{"device":"impostor","t":21.5}"#;
    let r = post(d.admin, "sensors/room1", &auth, "application/json", single);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["records"], 1);
    let batch = br#"[{"t":1}, {"t":2},{"t":3}]"#;
    assert_eq!(
        post(d.admin, "sensors/batch", &auth, "application/json", batch).json()["records"],
        3
    );
    let cbor = [0xa1, 0x61, b't', 0x15];
    assert_eq!(
        post(d.admin, "cbor", &auth, "application/cbor", &cbor).status,
        201
    );
    let senml = br#"[{"bn":"urn:dev:sensor-1:","n":"temp","u":"Cel","v":23.1}]"#;
    assert_eq!(
        post(d.admin, "senml", &auth, "application/senml+json", senml).status,
        201
    );
    let bearer = format!("Bearer sensor-1:{secret}");
    assert_eq!(
        post(
            d.admin,
            "raw",
            &bearer,
            "application/octet-stream",
            &[0, 1, 2, 255]
        )
        .status,
        201
    );

    let (status, _) = d.terminate(Duration::from_secs(15));
    assert!(status.success());
    let stored = OutboxReader::open(&d.data_dir.join("outbox.db"))
        .unwrap()
        .read_all()
        .unwrap();
    assert_eq!(stored.len(), 7);
    assert!(
        stored
            .iter()
            .all(|r| r.device_id == "sensor-1" && r.source == Source::Http)
    );
    assert_eq!(stored[0].topic, "sensors/room1");
    assert_eq!(stored[0].payload, single);
    assert_eq!(stored[0].content_type.as_deref(), Some("application/json"));
    let batch_payloads: Vec<&[u8]> = stored[1..4].iter().map(|r| r.payload.as_slice()).collect();
    assert_eq!(
        batch_payloads,
        [&br#"{"t":1}"#[..], br#"{"t":2}"#, br#"{"t":3}"#]
    );
    assert_eq!(stored[4].payload, cbor);
    assert_eq!(stored[4].content_type.as_deref(), Some("application/cbor"));
    assert_eq!(stored[5].payload, senml);
    assert_eq!(stored[6].payload, [0, 1, 2, 255]);
}

#[test]
fn refusals_have_their_status_and_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[http_ingest]\nmax_body = \"2KiB\"\nmax_batch = 2\n",
        admin_token_config()
    );
    let d = Daemon::start(dir.path(), &config);
    let secret = create_device(&d, "dev-a", None);
    let auth = basic("dev-a", &secret);
    let json = "application/json";

    let r = request(
        d.admin,
        "POST",
        "/api/v1/ingest/x",
        &[("Content-Type", json)],
        b"{}",
    );
    assert_error(&r, 401, Some("authorization"));
    assert!(r.header("WWW-Authenticate").unwrap().starts_with("Basic"));
    assert_error(
        &post(d.admin, "x", &basic("dev-a", "wrong"), json, b"{}"),
        401,
        None,
    );
    assert_error(
        &post(d.admin, "x", &basic("nobody", "x"), json, b"{}"),
        401,
        None,
    );
    assert_error(
        &post(d.admin, "a/+/b", &auth, json, b"{}"),
        400,
        Some("topic"),
    );
    assert_error(
        &post(d.admin, "%24SYS/x", &auth, json, b"{}"),
        400,
        Some("topic"),
    );
    assert_error(
        &post(d.admin, "x", &auth, "image/png", b"{}"),
        415,
        Some("content-type"),
    );
    assert_error(
        &post(d.admin, "x", &auth, json, br#"{"t": "#),
        400,
        Some("body"),
    );
    assert_error(
        &post(d.admin, "x", &auth, json, br#"[{"t":1}, 7]"#),
        400,
        Some("/1"),
    );
    assert_error(
        &post(d.admin, "x", &auth, json, br#"[{},{},{}]"#),
        413,
        Some("body"),
    );
    assert_error(
        &post(d.admin, "x", &auth, json, &[b' '; 4096]),
        413,
        Some("body"),
    );
    assert_error(
        &post(
            d.admin,
            "x",
            &auth,
            "application/senml+json",
            br#"[{"n":"t","v":"hot"}]"#,
        ),
        400,
        Some("/0/v"),
    );
    assert_error(
        &post(d.admin, "x", &auth, "application/cbor", &[0x83, 0x01]),
        400,
        Some("body"),
    );

    let r = admin(&d, "POST", "/api/v1/devices/dev-a/disable", "");
    assert!(r.status == 200 || r.status == 204, "{}", r.text());
    assert_error(&post(d.admin, "x", &auth, json, b"{}"), 403, None);
    let r = admin(&d, "POST", "/api/v1/devices/dev-a/enable", "");
    assert!(r.status == 200 || r.status == 204, "{}", r.text());
    assert_eq!(post(d.admin, "x", &auth, json, b"{}").status, 201);
    assert!(d.metric("outpost_http_ingest_requests_total{status=\"400\"}") >= 5.0);
}

#[test]
fn a_full_outbox_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[outbox]\nmax_bytes = \"1MiB\"\nmax_record_bytes = \"256KiB\"\nmin_free_disk = \"0\"\n\n\
         [http_ingest]\nmax_body = \"512KiB\"\n",
        admin_token_config()
    );
    let d = Daemon::start(dir.path(), &config);
    let secret = create_device(&d, "big", None);
    let auth = basic("big", &secret);
    let body = vec![b'z'; 200 * 1024];
    let mut stored = 0;
    let refused = loop {
        let r = post(d.admin, "bulk", &auth, "application/octet-stream", &body);
        if r.status != 201 {
            break r;
        }
        stored += 1;
        assert!(
            stored < 10,
            "a 1 MiB outbox cannot take 10 records of 200 KiB"
        );
    };
    assert_error(&refused, 503, None);
    assert_eq!(refused.json()["error"], "outbox_full");
    assert_eq!(refused.header("Retry-After"), Some("5"));
    assert_eq!(stored, 5, "records that fit were stored");
}

/// Every 201 a client received names a record that survives `kill -9` of the daemon.
#[test]
fn serial_201_means_committed_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &admin_token_config());
    let secret = create_device(&d, "loader", None);
    let auth = basic("loader", &secret);
    let mut acknowledged: HashMap<String, u64> = HashMap::new();
    let mut rng = rand::rng();
    for cycle in 0..5 {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));
        let addr = d.admin;
        let clients: Vec<_> = (0..8)
            .map(|client| {
                let (stop, acked, auth) = (Arc::clone(&stop), Arc::clone(&acked), auth.clone());
                std::thread::spawn(move || {
                    for n in 0u64.. {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let key = format!("{cycle}-{client}-{n}");
                        let body = format!(r#"{{"key":"{key}"}}"#);
                        let headers = [
                            ("Authorization", auth.as_str()),
                            ("Content-Type", "application/json"),
                        ];
                        match try_request(
                            addr,
                            "POST",
                            "/api/v1/ingest/load",
                            &headers,
                            body.as_bytes(),
                        ) {
                            Ok(r) if r.status == 201 => {
                                let seq = r.json()["seqs"][0].as_u64().unwrap();
                                acked.lock().unwrap().push((key, seq));
                            }
                            Ok(r) => panic!("unexpected {}: {}", r.status, r.text()),
                            Err(_) => return, // the daemon was killed mid-request
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1200)));
        d.kill9();
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join().unwrap();
        }
        acknowledged.extend(acked.lock().unwrap().drain(..));
        let stored = OutboxReader::open(&d.data_dir.join("outbox.db"))
            .unwrap()
            .read_all()
            .unwrap();
        let by_key: HashMap<String, u64> = stored
            .iter()
            .map(|r| {
                let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
                (v["key"].as_str().unwrap().to_owned(), r.seq)
            })
            .collect();
        assert_eq!(by_key.len(), stored.len(), "a record stored twice");
        for (key, seq) in &acknowledged {
            assert_eq!(
                by_key.get(key),
                Some(seq),
                "cycle {cycle}: 201'd record {key} missing after kill -9"
            );
        }
        d = Daemon::start_with(&d.config_path.clone(), d.data_dir.clone());
    }
    assert!(
        acknowledged.len() > 500,
        "too little load to mean anything: {}",
        acknowledged.len()
    );
    d.terminate(Duration::from_secs(15));
}

#[test]
fn monitoring_fields_follow_the_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &admin_token_config());
    let secret = create_device(&d, "mon", None);
    let status = |d: &Daemon| {
        let r = admin(d, "GET", "/api/v1/devices/mon/status", "");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let before = status(&d);
    assert_eq!(before["state"], "offline", "never seen: {before}");
    assert_eq!(before["messages"], 0);
    assert!(before["last_seen_ms"].is_null());

    let auth = basic("mon", &secret);
    let body = br#"{"t":20.5,"rssi":-67,"lat":52.52,"lon":13.405}"#;
    for _ in 0..3 {
        assert_eq!(
            post(d.admin, "m", &auth, "application/json", body).status,
            201
        );
    }
    let after = status(&d);
    assert_eq!(after["state"], "online", "{after}");
    assert_eq!(after["messages"], 3);
    assert_eq!(after["bytes"], 3 * body.len());
    assert!(after["last_seen_ms"].as_i64().unwrap() > 0);
    assert!(
        after["messages_per_minute"].as_f64().unwrap() > 0.0,
        "{after}"
    );
    assert_eq!(after["signal"]["rssi_dbm"], -67.0, "{after}");
    assert_eq!(after["location"]["lat"], 52.52, "{after}");

    assert_eq!(
        post(d.admin, "m", &auth, "application/json", b"{oops").status,
        400
    );
    assert_eq!(
        post(
            d.admin,
            "m",
            &basic("mon", "wrong"),
            "application/json",
            b"{}"
        )
        .status,
        401
    );
    let errors = status(&d);
    assert_eq!(errors["errors"]["malformed"], 1, "{errors}");
    assert_eq!(errors["errors"]["refused"], 1, "{errors}");
    assert!(
        errors["errors_per_minute"].as_f64().unwrap() > 0.0,
        "{errors}"
    );

    assert!(admin(&d, "POST", "/api/v1/devices/mon/disable", "").status < 300);
    assert_eq!(status(&d)["state"], "disabled");
}

#[test]
fn devices_poll_their_queued_commands_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &admin_token_config());
    let secret = create_device(&d, "valve-7", None);
    let r = admin(
        &d,
        "POST",
        "/api/v1/devices/valve-7/commands",
        r#"{"payload":{"open":true}}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].clone();
    assert_eq!(r.json()["state"], "queued");

    let auth = basic("valve-7", &secret);
    let poll = || {
        request(
            d.admin,
            "GET",
            "/api/v1/device/commands",
            &[("Authorization", auth.as_str())],
            b"",
        )
    };
    let first = poll();
    assert_eq!(first.status, 200, "{}", first.text());
    let commands = first.json()["commands"].as_array().unwrap().clone();
    assert_eq!(commands.len(), 1, "{commands:?}");
    assert_eq!(commands[0]["id"], id);
    assert_eq!(commands[0]["payload"]["open"], true);
    assert_eq!(
        poll().json()["commands"].as_array().unwrap().len(),
        0,
        "delivered at most once"
    );

    let state = admin(
        &d,
        "GET",
        &format!(
            "/api/v1/devices/valve-7/commands/{}",
            id.as_str().map_or(id.to_string(), str::to_owned)
        ),
        "",
    );
    assert_eq!(state.status, 200, "{}", state.text());
    assert_eq!(state.json()["state"], "delivered");
    let r = request(
        d.admin,
        "GET",
        "/api/v1/device/commands",
        &[("Authorization", "Bearer valve-7:wrong")],
        b"",
    );
    assert_eq!(r.status, 401);
}

#[test]
fn devices_seen_by_drivers_register_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        dir.path(),
        &format!(
            "{}\n[[drivers]]\nkind = \"simulator\"\nname = \"sim\"\ndevices = 2\ninterval = \"10ms\"\n",
            admin_token_config()
        ),
    );
    d.wait_until(
        "simulated devices registered",
        Duration::from_secs(10),
        |d| admin(d, "GET", "/api/v1/devices/sim-1", "").status == 200,
    );
    let device = admin(&d, "GET", "/api/v1/devices/sim-0", "").json();
    let device = if device["device"].is_object() {
        device["device"].clone()
    } else {
        device
    };
    assert_eq!(device["source"], "driver:sim", "{device}");
    d.wait_until("driver traffic counted", Duration::from_secs(10), |d| {
        admin(d, "GET", "/api/v1/devices/sim-0/status", "").json()["messages"]
            .as_u64()
            .unwrap_or(0)
            > 5
    });
    assert_eq!(
        admin(&d, "GET", "/api/v1/devices/sim-0/status", "").json()["state"],
        "online"
    );

    // A disabled driver device's readings are no longer stored.
    assert!(admin(&d, "POST", "/api/v1/devices/sim-0/disable", "").status < 300);
    // A refused reading means the driver-ingest task (one group at a time, in order) has
    // finished every group admitted before the disable: from here the count must stand still.
    d.wait_until("a reading refused", Duration::from_secs(10), |d| {
        admin(d, "GET", "/api/v1/devices/sim-0/status", "").json()["errors"]["refused"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    });
    let count = |d: &Daemon| {
        OutboxReader::open(&d.data_dir.join("outbox.db"))
            .unwrap()
            .read_all()
            .unwrap()
            .iter()
            .filter(|r| r.device_id == "sim-0")
            .count()
    };
    let frozen = count(&d);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        count(&d),
        frozen,
        "readings of a disabled device are not stored"
    );
    assert!(
        admin(&d, "GET", "/api/v1/devices/sim-0/status", "").json()["errors"]["refused"]
            .as_u64()
            .unwrap()
            > 0
    );
}

/// `http_ingest.listen`: devices post and poll on a listener of their own, which serves nothing
/// else (the management API and metrics answer 404 there, JSON), while the admin listener no
/// longer takes readings.
#[test]
fn ingestion_on_its_own_listener_serves_devices_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        dir.path(),
        &format!(
            "{}\n[http_ingest]\nlisten = \"127.0.0.1:0\"\n",
            admin_token_config()
        ),
    );
    let ingest = d.listener("HTTP ingestion");
    assert_ne!(ingest, d.admin);
    let secret = create_device(&d, "field-1", None);
    let auth = basic("field-1", &secret);

    let r = post(ingest, "t", &auth, "application/json", br#"{"v": 1}"#);
    assert_eq!(r.status, 201, "{}", r.text());
    let r = request(
        ingest,
        "GET",
        "/api/v1/device/commands",
        &[("Authorization", auth.as_str())],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Nothing but ingestion there, and no ingestion on the admin listener.
    for path in ["/api/v1/devices", "/metrics", "/api/v1/status"] {
        let r = request(ingest, "GET", path, &[], b"");
        assert_error(&r, 404, None);
    }
    assert_error(
        &post(d.admin, "t", &auth, "application/json", br#"{"v": 2}"#),
        404,
        None,
    );
    let r = request(ingest, "GET", "/api/v1/ingest/t", &[], b"");
    assert_error(&r, 405, None);
    assert_eq!(d.metric("outpost_outbox_records"), 1.0);
    let subsystem = d.subsystem("http-ingest");
    assert_eq!(
        (subsystem["state"].clone(), subsystem["essential"].clone()),
        (serde_json::json!("ACTIVE"), serde_json::json!(true))
    );
    assert!(d.terminate(Duration::from_secs(15)).0.success());
}

/// `[admin.tls]` and `[http_ingest.tls]`: both listeners speak HTTPS with the configured
/// certificate (curl trusts it only with the CA), plain HTTP gets no answer, a client that
/// never finishes its handshake holds nobody back, loopback still reads `/metrics` without a
/// token, and the CLI manages devices over HTTPS with `--ca-file` and a token from the
/// environment; a device then posts over HTTPS.
#[test]
fn the_admin_and_ingestion_listeners_speak_https() {
    use outpost_e2e::admin::ADMIN_TOKEN;
    use outpost_e2e::daemon::{outpost_cli, outpost_cli_env};
    use outpost_e2e::tls::Ca;

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let (cert, key) = ca.issue("gateway", "gateway", "DNS:localhost,IP:127.0.0.1");
    let tls = format!(
        "enabled = true\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let mut d = Daemon::start(
        dir.path(),
        &format!(
            "{}\n[admin.tls]\n{tls}\n[http_ingest]\nlisten = \"127.0.0.1:0\"\n\
             [http_ingest.tls]\n{tls}",
            admin_token_config()
        ),
    );
    let ingest = d.listener("HTTP ingestion");
    let ca_file = ca.cert();
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (
            out.status.code().unwrap_or(-1),
            body.to_owned(),
            code.to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let admin_url = format!("https://localhost:{}", d.admin.port());

    // A client that connects and says nothing: the others are served meanwhile (its handshake
    // times out after 10 s; curl gives up after 5).
    let silent = std::net::TcpStream::connect(d.admin).unwrap();
    let (code, body, status, err) = curl(&[
        "--cacert",
        ca_file.to_str().unwrap(),
        &format!("{admin_url}/healthz"),
    ]);
    assert_eq!((code, status.as_str()), (0, "200"), "{body} {err}");
    // Loopback reads the metrics without a token over HTTPS too.
    let (code, body, status, err) = curl(&[
        "--cacert",
        ca_file.to_str().unwrap(),
        &format!("{admin_url}/metrics"),
    ]);
    assert_eq!((code, status.as_str()), (0, "200"), "{err}");
    assert!(body.contains("outpost_outbox_records"), "{body}");
    drop(silent);
    // Without the CA the certificate is not trusted: it is the configured one, not a default.
    let (code, _, _, err) = curl(&[&format!("{admin_url}/healthz")]);
    assert_eq!(code, 60, "curl without the CA: {err}");
    // Plain HTTP on the HTTPS port gets no HTTP answer.
    assert!(
        try_request(d.admin, "GET", "/healthz", &[], b"").is_err(),
        "plain HTTP was answered on the HTTPS listener"
    );

    // The CLI over HTTPS, trusting the gateway's CA, token from the environment.
    let (code, out, err) = outpost_cli_env(
        &[
            "devices",
            "add",
            "field-tls",
            "--url",
            &admin_url,
            "--ca-file",
            ca_file.to_str().unwrap(),
        ],
        &[("OUTPOST_API_TOKEN", ADMIN_TOKEN)],
    );
    assert_eq!(code, 0, "{err}");
    let secret = outpost_e2e::admin::secret_in(&out);
    // Without --ca-file the system's CAs do not know the gateway's: a clear refusal.
    let (code, _, err) = outpost_cli_env(
        &["devices", "list", "--url", &admin_url],
        &[("OUTPOST_API_TOKEN", ADMIN_TOKEN)],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach"), "{err}");

    // The device posts over HTTPS on the ingestion listener.
    let ingest_url = format!("https://localhost:{}/api/v1/ingest/t", ingest.port());
    let (code, body, status, err) = curl(&[
        "--cacert",
        ca_file.to_str().unwrap(),
        "-u",
        &format!("field-tls:{secret}"),
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        r#"{"v": 1}"#,
        &ingest_url,
    ]);
    assert_eq!((code, status.as_str()), (0, "201"), "{body} {err}");
    let (_, body, _, _) = curl(&[
        "--cacert",
        ca_file.to_str().unwrap(),
        &format!("{admin_url}/metrics"),
    ]);
    assert!(
        body.lines().any(|l| l == "outpost_outbox_records 1"),
        "{body}"
    );
    assert!(d.terminate(Duration::from_secs(15)).0.success());

    // An unreadable certificate is a configuration error naming its key.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[admin.tls]\nenabled = true\ncert_file = \"/nonexistent/cert.pem\"\n\
         key_file = \"/nonexistent/key.pem\"\n",
    )
    .unwrap();
    let (code, _, err) = outpost_cli(&["check-config", bad.to_str().unwrap()]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("admin.tls.cert_file") && err.contains("admin.tls.key_file"),
        "{err}"
    );
}
