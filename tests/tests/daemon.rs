//! The daemon's lifecycle against the real binary: config errors, readiness endpoints, metrics,
//! the buffer CLI on a live data directory, graceful shutdown under load, corrupt-file quarantine.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_e2e::daemon::{Daemon, outpost_cli, write_config};
use outpost_sync::OutboxReader;

/// `(device, n)` of a simulator payload.
fn sim_key(payload: &[u8]) -> (String, u64) {
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
    (
        v["device"].as_str().unwrap().to_owned(),
        v["n"].as_u64().unwrap(),
    )
}

/// Checks that every simulated device's readings are stored gap-free from 0 and in order, and
/// returns the count per device.
fn assert_simulator_readings_complete(data_dir: &std::path::Path) -> BTreeMap<String, u64> {
    let stored = OutboxReader::open(&data_dir.join("outbox.db"))
        .unwrap()
        .read_all()
        .unwrap();
    let mut per_device: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in &stored {
        let (device, n) = sim_key(&r.payload);
        assert_eq!(r.device_id, device);
        per_device.entry(device).or_default().push(n);
    }
    per_device
        .into_iter()
        .map(|(device, ns)| {
            let expected: Vec<u64> = (0..ns.len() as u64).collect();
            assert_eq!(
                ns, expected,
                "device {device}: readings lost, duplicated or reordered"
            );
            (device, ns.len() as u64)
        })
        .collect()
}

#[test]
fn check_config_reports_every_problem_and_run_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\ndata_dir = \"{}\"\nshutdown_grace = \"10 parsecs\"\n\n[admin]\nlisten = 8080\n\n\
             [outbox]\nmax_byts = \"1GiB\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let (code, _out, err) = outpost_cli(&["check-config", path.to_str().unwrap()]);
    assert_eq!(
        code, 78,
        "distinct exit code for a bad config; stderr:\n{err}"
    );
    for key in ["gateway.shutdown_grace", "admin.listen", "outbox.max_byts"] {
        assert!(err.contains(key), "problem at {key} not reported:\n{err}");
    }
    assert!(
        err.contains("max_bytes"),
        "no suggestion for the misspelt key:\n{err}"
    );

    let (code, _out, err) = outpost_cli(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 78, "run must refuse an invalid config:\n{err}");
    assert!(
        !dir.path().join("data").exists(),
        "nothing may be created by a refused start"
    );

    let good = write_config(dir.path(), "");
    let (code, out, err) = outpost_cli(&["check-config", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("warning"), "{err}");

    // Valid but probably a mistake: a warning naming the key, and the check still passes.
    let large = write_config(dir.path(), "[outbox]\nmax_record_bytes = \"2MiB\"\n");
    let (code, out, err) = outpost_cli(&["check-config", large.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("warning: outbox.max_record_bytes: 2097152 bytes is more than Kafka accepts"),
        "{err}"
    );
}

#[test]
fn endpoints_metrics_and_buffer_cli_on_a_live_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        dir.path(),
        "[[drivers]]\nkind = \"simulator\"\nname = \"sim\"\ndevices = 3\ninterval = \"20ms\"\n",
    );
    assert_eq!(d.get("/healthz"), (200, "ok\n".to_owned()));
    let (code, body) = d.get("/readyz");
    assert_eq!(code, 200, "{body}");
    assert_eq!(d.get("/nope").0, 404);
    d.wait_until("readings committed", Duration::from_secs(10), |d| {
        d.metric("outpost_outbox_records") >= 30.0
    });
    let (_, metrics) = d.get("/metrics");
    for name in [
        "outpost_outbox_records",
        "outpost_outbox_size_bytes",
        "outpost_outbox_oldest_record_age_seconds",
        "outpost_outbox_commits_total",
        "outpost_outbox_commit_duration_seconds_bucket",
        "outpost_outbox_append_latency_seconds_count",
        "outpost_outbox_corruption_alarm",
    ] {
        assert!(metrics.contains(name), "metric {name} missing:\n{metrics}");
    }
    let status = d.status();
    assert!(status["outbox"]["records"].as_u64().unwrap() >= 30);
    assert_eq!(status["build"]["arch"], std::env::consts::ARCH, "{status}");
    assert!(status["build"]["version"].is_string());
    let states: BTreeMap<String, String> = status["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(states["outbox"], "ACTIVE");
    assert_eq!(states["admin"], "ACTIVE");
    assert_eq!(states["driver/sim"], "ACTIVE");
    assert_eq!(states["cloud"], "INACTIVE");

    // Read-only tools on the live data directory.
    let data = d.data_dir.to_str().unwrap().to_owned();
    let (code, out, err) = outpost_cli(&["buffer", "stats", "--json", "--data-dir", &data]);
    assert_eq!(code, 0, "{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(stats["records"].as_u64().unwrap() >= 30);
    assert_eq!(stats["routes"][0]["route"], "default");
    let outbox_id = stats["outbox_id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(outbox_id.len(), 32, "{stats}");
    let status = d.status();
    assert_eq!(status["outbox"]["id"], outbox_id.as_str(), "{status}");
    assert_eq!(
        status["outbox"]["synchronous"], "full",
        "the live writer connection's durability: {status}"
    );
    let config = d.config_path.to_str().unwrap().to_owned();
    let (code, out, err) = outpost_cli(&["buffer", "stats", "--config", &config]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("oldest age:")
            && out.contains("default")
            && out.contains(&format!("outbox id:     {outbox_id}")),
        "{out}"
    );
    let (code, out, err) = outpost_cli(&["buffer", "verify", "--data-dir", &data]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(d.is_running(), "inspection must not disturb the daemon");
    let (code, out, _) = outpost_cli(&["version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("outpost 0."), "{out}");

    let (status, _) = d.terminate(Duration::from_secs(15));
    assert!(status.success(), "{status}");
}

#[test]
fn state_directory_is_the_default_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let config = dir.path().join("outpost.toml");
    std::fs::write(
        &config,
        "[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n",
    )
    .unwrap();
    // SAFETY of the environment: only this test process's child sees it.
    let mut cmd = std::process::Command::new(outpost_e2e::outpost_bin());
    cmd.args(["buffer", "stats", "--config", config.to_str().unwrap()])
        .env("STATE_DIRECTORY", &state);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "no outbox at {}",
            state.join("outbox.db").display()
        )),
        "{err}"
    );
}

#[test]
fn sigterm_under_load_exits_zero_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        dir.path(),
        "[[drivers]]\nkind = \"simulator\"\nname = \"load\"\ndevices = 50\ninterval = \"1ms\"\npayload_bytes = 100\n",
    );
    d.wait_until("load flowing", Duration::from_secs(20), |d| {
        d.metric("outpost_outbox_records") >= 5_000.0
    });
    let (status, took) = d.terminate(Duration::from_secs(15));
    assert_eq!(
        status.code(),
        Some(0),
        "exit code after SIGTERM:\n{}",
        d.logs().join("\n")
    );
    assert!(
        took < Duration::from_secs(10),
        "exceeded the 10 s grace: {took:?}"
    );
    assert!(
        d.logs()
            .iter()
            .any(|l| l.contains("Outpost stopped cleanly"))
    );
    let counts = assert_simulator_readings_complete(&d.data_dir);
    assert_eq!(counts.len(), 50, "every device stored");
    let (min, max) = (
        counts.values().min().unwrap(),
        counts.values().max().unwrap(),
    );
    // The simulator finishes each round before stopping, and ingress drains before the writer
    // closes, so every device has the same number of readings.
    assert_eq!(min, max, "a round was cut at shutdown: {counts:?}");
    let (code, out, err) = outpost_cli(&[
        "buffer",
        "verify",
        "--data-dir",
        d.data_dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn corrupt_outbox_is_quarantined_with_a_visible_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("outbox.db"),
        b"\x00garbage, not SQLite\xff".repeat(500),
    )
    .unwrap();
    let mut d = Daemon::start(dir.path(), "");
    d.wait_for_log("Outbox database is corrupt", Duration::from_secs(5));
    let status = d.status();
    let moved_to = status["outbox"]["quarantined"]["moved_to"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        std::path::Path::new(&moved_to).exists(),
        "quarantined file kept at {moved_to}"
    );
    assert!(moved_to.contains("outbox.db.corrupt-"), "{moved_to}");
    let alarms = status["alarms"].as_array().unwrap();
    assert!(
        alarms
            .iter()
            .any(|a| a["subsystem"] == "outbox"
                && a["message"].as_str().unwrap().contains("corrupt")),
        "{status}"
    );
    assert_eq!(d.metric("outpost_outbox_corruption_alarm"), 1.0);
    assert_eq!(d.get("/readyz").0, 200, "a fresh outbox is ready");
    let (status, _) = d.terminate(Duration::from_secs(15));
    assert!(status.success());
    // A second start finds the fresh file sound: no new alarm, no crash loop.
    let mut again = Daemon::start(dir.path(), "");
    assert_eq!(again.metric("outpost_outbox_corruption_alarm"), 0.0);
    again.terminate(Duration::from_secs(15));
}

#[test]
fn systemd_notifications_ready_watchdog_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let config = write_config(dir.path(), "");
    let mut d = Daemon::start_with_env(
        &config,
        dir.path().join("data"),
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    // READY first, then WATCHDOG pings at half the 400 ms interval while the writer is healthy.
    while messages
        .iter()
        .filter(|m: &&String| m.contains("WATCHDOG=1"))
        .count()
        < 3
    {
        let n = socket.recv(&mut buf).expect("notification within 10 s");
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(messages[0].contains("READY=1"), "{messages:?}");
    assert!(messages[0].contains("STATUS=ready"), "{messages:?}");
    let (status, _) = d.terminate(Duration::from_secs(15));
    assert!(status.success());
    let mut stopping = false;
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while let Ok(n) = socket.recv(&mut buf) {
        stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
    }
    assert!(stopping, "STOPPING=1 sent at shutdown");
}

/// Every listener and the forwarder run under the supervisor: each one forced to fail once (the
/// debug fault hook) is restarted, its restart is in the status, and it serves again.
#[test]
fn failed_listeners_and_the_forwarder_are_restarted_by_the_supervisor() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = write_config(
        dir.path(),
        "[kafka]\nenabled = true\nbrokers = [\"127.0.0.1:1\"]\n",
    );
    let mut d = Daemon::start_with_env(
        &config_path,
        dir.path().join("data"),
        &[("OUTPOST_DEBUG_FAIL", "admin,coap,mqtt,cloud")],
    );
    let names = ["admin", "coap", "mqtt", "cloud"];
    d.wait_until("four subsystems restarted", Duration::from_secs(15), |d| {
        let Ok(status) = std::panic::catch_unwind(|| d.status()) else {
            return false; // the admin listener itself is being restarted
        };
        let subsystems = status["subsystems"].as_array().cloned().unwrap_or_default();
        names.iter().all(|name| {
            subsystems
                .iter()
                .any(|s| s["name"] == *name && s["restarts"] == 1 && s["state"] == "ACTIVE")
        })
    });
    assert_eq!(
        d.get("/readyz").0,
        200,
        "the restarted admin listener serves"
    );
    // The restarted CoAP endpoint answers discovery on the same port.
    let coap = d
        .logs()
        .iter()
        .find(|l| l.contains("CoAP listener bound"))
        .cloned()
        .unwrap();
    let addr = serde_json::from_str::<serde_json::Value>(&coap).unwrap()["addr"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = std::process::Command::new(outpost_e2e::coap::coap_client())
        .args(["-m", "get", "-B", "5"])
        .arg(format!("coap://{addr}/.well-known/core"))
        .output()
        .expect("run coap-client");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("</t>"),
        "discovery after the restart: {out:?}"
    );
    // The restarted MQTT server accepts a device (mosquitto_pub, anonymous access refused
    // with "not authorised" proves the CONNECT was answered by the server).
    let mqtt = d
        .logs()
        .iter()
        .find(|l| l.contains("MQTT listener bound"))
        .cloned()
        .unwrap();
    let addr: std::net::SocketAddr =
        serde_json::from_str::<serde_json::Value>(&mqtt).unwrap()["addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
    let out = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-t", "x", "-m", "y", "-q", "1"])
        .output()
        .expect("mosquitto_pub (apt install mosquitto-clients)");
    let said = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        said.contains("not authori"),
        "MQTT server after its restart: {out:?}"
    );
    let (status, _) = d.terminate(Duration::from_secs(15));
    assert!(status.success(), "{}", d.logs().join("\n"));
}

/// The MQTT session store cannot be restarted in-process: when its writer stops, the essential
/// subsystem `mqtt-sessions` is INACTIVE with the reason and /readyz answers 503 (and the
/// watchdog is no longer fed, so systemd restarts the daemon).
#[test]
fn a_stopped_session_store_makes_the_gateway_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = write_config(dir.path(), "");
    let mut d = Daemon::start_with_env(
        &config_path,
        dir.path().join("data"),
        &[("OUTPOST_DEBUG_FAIL", "mqtt-sessions")],
    );
    d.wait_until("mqtt-sessions inactive", Duration::from_secs(10), |d| {
        d.status()["subsystems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| {
                s["name"] == "mqtt-sessions"
                    && s["state"] == "INACTIVE"
                    && s["essential"] == true
                    && s["reason"]
                        .as_str()
                        .unwrap_or("")
                        .contains("restart the daemon")
            })
    });
    assert_eq!(d.get("/readyz").0, 503);
    assert_eq!(d.get("/healthz").0, 200, "alive, just not ready");
    let (status, _) = d.terminate(Duration::from_secs(15));
    assert!(status.success(), "{}", d.logs().join("\n"));
}

/// Without `--config`, `outpost run`, `outpost devices` and `outpost buffer` read
/// /etc/outpost/outpost.toml when it exists (the file `check-config` checks by default), and
/// `--config /dev/null` still gives the built-in defaults. The daemon runs in a private mount
/// namespace whose /etc is an overlay (`unshare`, util-linux), so the host's /etc is never
/// touched; the CLI commands join that namespace with `nsenter`.
#[test]
fn without_config_every_command_reads_the_packaged_config_file() {
    use outpost_e2e::admin::{ADMIN_TOKEN, admin_token_config};
    let dir = tempfile::tempdir().unwrap();
    let (upper, work) = (dir.path().join("upper"), dir.path().join("work"));
    std::fs::create_dir(&upper).unwrap();
    std::fs::create_dir(&work).unwrap();
    let data = dir.path().join("packaged-data");
    let port = outpost_e2e::kafka::free_port();
    let packaged = dir.path().join("packaged.toml");
    std::fs::write(
        &packaged,
        format!(
            "{}\n[gateway]\ndata_dir = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [log]\nformat = \"json\"\n\n[mqtt]\nenabled = false\n\n[coap]\nenabled = false\n",
            admin_token_config(),
            data.display()
        ),
    )
    .unwrap();
    let mut command = std::process::Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-ec"])
        .arg(
            "mount -t overlay overlay -o \"lowerdir=/etc,upperdir=$1,workdir=$2\" /etc\n\
             mkdir -p /etc/outpost\n\
             cp \"$3\" /etc/outpost/outpost.toml\n\
             exec \"$4\" run",
        )
        .arg("sh")
        .args([&upper, &work, &packaged])
        .arg(outpost_e2e::outpost_bin())
        .env_remove("OUTPOST_CONFIG");
    let mut d = Daemon::start_command(
        command,
        &[],
        std::path::Path::new("/etc/outpost/outpost.toml"),
        data.clone(),
    );
    assert_eq!(
        d.admin.port(),
        port,
        "the daemon listens where the packaged file says"
    );
    let read = d.wait_for_log("Configuration read", Duration::from_secs(5));
    assert!(read.contains("/etc/outpost/outpost.toml"), "{read}");
    assert!(
        !std::path::Path::new("/etc/outpost/outpost.toml").exists()
            || std::fs::read(&packaged).unwrap()
                != std::fs::read("/etc/outpost/outpost.toml").unwrap(),
        "the host's /etc was changed"
    );

    // The CLI in the daemon's mount namespace, with neither --config nor --url.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("nsenter")
            .args(["--mount", "--target", &d.pid().to_string(), "--"])
            .arg(outpost_e2e::outpost_bin())
            .args(args)
            .env_remove("OUTPOST_CONFIG")
            .env("OUTPOST_API_TOKEN", ADMIN_TOKEN)
            .current_dir(dir.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = cli(&["devices", "add", "sensor-1"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let r = d.get_with_token("/api/v1/devices/sensor-1", ADMIN_TOKEN);
    assert_eq!(r.status, 200, "{}", r.text());
    let (code, out, err) = cli(&["buffer", "stats", "--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        stats["path"],
        data.join("outbox.db").display().to_string(),
        "{stats}"
    );
    // The defaults on request: /dev/null is an empty configuration, whose data directory
    // (./outpost-data under the working directory) holds no outbox.
    let (code, out, err) = cli(&["buffer", "stats", "--config", "/dev/null"]);
    assert_ne!(code, Some(0), "{out}{err}");
    assert!(err.contains("outpost-data"), "{err}");
    assert!(d.terminate(Duration::from_secs(15)).0.success());
}

/// The local admin socket (`admin.socket`): the CLI uses it without a token when no `--url` is
/// given, so root administers the gateway right after installation; curl (a client nobody here
/// wrote) gets the API over it without a token while the TCP listener still answers 401; a
/// user who may not open it (`nobody`, via util-linux `setpriv`) is told so; the API logs the
/// caller's uid; the socket is 0660 and gone after a clean stop.
#[test]
fn the_local_admin_socket_needs_no_token_and_only_its_permissions() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    // Others may read the directory and the config (for `nobody`); the socket stays 0660.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("admin.sock");
    let config = write_config(dir.path(), &outpost_e2e::admin::admin_token_config());
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[admin]\n",
        &format!("[admin]\nsocket = \"{}\"\n", socket.display()),
        1,
    );
    std::fs::write(&config, text).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut d = Daemon::start_with(&config, dir.path().join("data"));
    d.wait_for_log("Local admin socket bound", Duration::from_secs(5));
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let subsystem = d.subsystem("admin-socket");
    assert_eq!(subsystem["state"], "ACTIVE", "{subsystem}");

    // `nobody` cannot reach the build directory under root's home: a copy it may run.
    let public_bin = dir.path().join("outpost");
    if std::fs::hard_link(outpost_e2e::outpost_bin(), &public_bin).is_err() {
        std::fs::copy(outpost_e2e::outpost_bin(), &public_bin).unwrap();
    }
    let cli = |user: Option<&str>, args: &[&str]| {
        let mut command = match user {
            Some(uid) => {
                let mut c = std::process::Command::new("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                ])
                .arg(&public_bin);
                c
            }
            None => std::process::Command::new(outpost_e2e::outpost_bin()),
        };
        let out = command
            .args(args)
            .args(["--config", config.to_str().unwrap()])
            .env_remove("OUTPOST_API_TOKEN")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // No token, no --url: over the socket.
    let (code, out, err) = cli(None, &["devices", "add", "sensor-1", "--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let added: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(added["secret"].as_str().unwrap().len(), 64, "{added}");
    let (code, out, err) = cli(None, &["devices", "remove", "sensor-1"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let removed = d.wait_for_log("Device deleted through the API", Duration::from_secs(5));
    assert!(removed.contains("local:uid=0"), "{removed}");

    // curl over the socket without a token; the TCP listener still wants one.
    let curl = std::process::Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(&socket)
        .arg("http://localhost/api/v1/devices")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&curl.stdout).into_owned();
    assert!(text.ends_with("\n200"), "{text}");
    assert!(text.contains("\"devices\""), "{text}");
    let (status, _) = d.get("/api/v1/devices");
    assert_eq!(status, 401);

    // A token made on the gateway for a client elsewhere: created over the socket, used over
    // TCP, listed with its creator, revoked.
    let (code, out, err) = cli(
        None,
        &[
            "token",
            "create",
            "--name",
            "installer",
            "--scopes",
            "write",
            "--json",
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    assert_eq!(d.get_with_token("/api/v1/devices", &token).status, 200);
    let (code, out, err) = cli(None, &["token", "list"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.lines().any(|l| l.starts_with("installer")
            && l.contains("write")
            && l.contains("local:uid=0")),
        "{out}"
    );
    let (code, out, err) = cli(None, &["token", "revoke", "installer"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(d.get_with_token("/api/v1/devices", &token).status, 401);

    // A user who may not open the socket, and has no token.
    let (code, out, err) = cli(Some("65534"), &["devices", "list"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("is not open to this user"), "{err}");

    assert!(d.terminate(Duration::from_secs(15)).0.success());
    assert!(!socket.exists(), "the socket is removed at a clean stop");
}

/// `SIGHUP` reloads the configuration file: a new `log.level`, new `[[api.tokens]]`, a new
/// `[mqtt.acl]` and new `[mqtt.limits]` apply at once (a removed token stops working, an added
/// one works, debug lines appear, `mosquitto_pub` to a topic the old ACL refused is stored, a
/// burst over the new rate limit is refused), a change that
/// needs a restart is reported by key path in the status and the log, and an invalid file
/// changes nothing (its problem is shown) while the daemon keeps serving.
#[test]
fn sighup_applies_log_level_and_tokens_and_reports_what_needs_a_restart() {
    use outpost_e2e::admin::sha256_hex;
    let dir = tempfile::tempdir().unwrap();
    let token_entry = |name: &str, token: &str| {
        format!(
            "[[api.tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nscopes = [\"admin\"]\n",
            sha256_hex(token)
        )
    };
    let acl = "[mqtt.acl]\npublish = [\"devices/{id}/#\"]\n";
    let config = write_config(
        dir.path(),
        &format!("{acl}\n{}", token_entry("first", "first-token-0123456789")),
    );
    let original = std::fs::read_to_string(&config).unwrap();
    let mut d = Daemon::start_with(&config, dir.path().join("data"));
    let get = |d: &Daemon, token: &str| d.get_with_token("/api/v1/devices", token).status;
    assert_eq!(get(&d, "first-token-0123456789"), 200);
    assert_eq!(get(&d, "unknown-token"), 401);
    let debug_lines = |d: &Daemon| {
        d.logs()
            .iter()
            .filter(|l| l.contains("\"DEBUG\"") && l.contains("unknown token"))
            .count()
    };
    assert_eq!(debug_lines(&d), 0, "info level logs no debug line");
    let hup = |d: &Daemon| {
        outpost_e2e::daemon::signal(d.pid(), rustix::process::Signal::HUP);
    };
    // A device publishing outside the ACL: refused now, stored once the ACL allows it.
    let mqtt_port = d.listener("MQTT").port();
    let created = d.post(
        "/api/v1/devices",
        "first-token-0123456789",
        r#"{"id": "acl-dev"}"#,
    );
    assert_eq!(created.status, 201, "{}", created.text());
    let secret = created.json()["secret"].as_str().unwrap().to_owned();
    let publish = |topic: &str| {
        std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string()])
            .args([
                "-u", "acl-dev", "-P", &secret, "-q", "1", "-t", topic, "-m", "{}",
            ])
            .output()
            .unwrap();
    };
    // QoS 1: a stored publish is committed before its PUBACK, so mosquitto_pub's exit is the
    // moment to look.
    publish("plant/acl-dev/t");
    assert_eq!(
        d.metric("outpost_outbox_records"),
        0.0,
        "outside the ACL: not stored"
    );

    // The level, the tokens, and a key that needs a restart.
    let edited = original
        .replace("level = \"info\"", "level = \"debug\"")
        .replace("shutdown_grace = \"10s\"", "shutdown_grace = \"11s\"")
        .replace(
            "publish = [\"devices/{id}/#\"]",
            "publish = [\"plant/{id}/#\"]",
        )
        .replace(
            &token_entry("first", "first-token-0123456789"),
            &token_entry("second", "second-token-0123456789"),
        )
        + "\n[mqtt.limits]\nmessages_per_second = 1\nburst = \"1s\"\n";
    assert_ne!(edited, original);
    std::fs::write(&config, edited).unwrap();
    hup(&d);
    d.wait_until("the reload", Duration::from_secs(10), |d| {
        d.status()["config"]["reloads"] == 1
    });
    let report = d.status()["config"].clone();
    assert_eq!(
        report["applied"],
        serde_json::json!(["log.level", "api.tokens", "mqtt.acl", "mqtt.limits"]),
        "{report}"
    );
    assert_eq!(
        report["needs_restart"],
        serde_json::json!(["gateway.shutdown_grace"]),
        "{report}"
    );
    assert!(report["error"].is_null(), "{report}");
    assert_eq!(report["file"], config.display().to_string());
    let warned = d.wait_for_log(
        "some changes take effect only after a restart",
        Duration::from_secs(5),
    );
    assert!(warned.contains("gateway.shutdown_grace"), "{warned}");
    assert_eq!(get(&d, "first-token-0123456789"), 401);
    assert_eq!(get(&d, "second-token-0123456789"), 200);
    assert_eq!(get(&d, "unknown-token"), 401);
    // The log is read from the daemon's stderr by another thread: wait for the line.
    d.wait_until(
        "a debug line for the unknown token after the reload",
        Duration::from_secs(5),
        |d| debug_lines(d) >= 1,
    );
    // The new ACL applies from the next CONNECT.
    publish("plant/acl-dev/t");
    d.wait_until("the publish stored", Duration::from_secs(5), |d| {
        d.metric("outpost_outbox_records") == 1.0
    });
    // So do the new rate limits: a burst of 4 from a bucket of 1 (MQTT 5: PUBACK 0x97).
    let refused = |d: &Daemon| d.metric("outpost_mqtt_refused_total{reason=\"rate_limit\"}");
    assert_eq!(refused(&d), 0.0);
    std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string(), "-V", "5"])
        .args([
            "-u",
            "acl-dev",
            "-P",
            &secret,
            "-q",
            "1",
            "-t",
            "plant/acl-dev/t",
        ])
        .args(["-m", "{}", "--repeat", "4"])
        .output()
        .unwrap();
    assert!(
        refused(&d) >= 1.0,
        "the new limit refused part of the burst"
    );

    // An invalid file: nothing changes, the problem is shown.
    std::fs::write(&config, original.replace("level = \"info\"", "level = 5")).unwrap();
    hup(&d);
    d.wait_until("the failed reload", Duration::from_secs(10), |d| {
        d.status()["config"]["reloads"] == 2
    });
    let report = d.status()["config"].clone();
    assert!(
        report["error"].as_str().unwrap().contains("log.level"),
        "{report}"
    );
    assert_eq!(get(&d, "second-token-0123456789"), 200);
    d.wait_for_log(
        "Configuration not reloaded, nothing changed",
        Duration::from_secs(5),
    );
    assert!(d.terminate(Duration::from_secs(15)).0.success());
}
