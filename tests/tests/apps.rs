//! Local app containers against the real Docker engine (scripts/ensure-docker.sh starts
//! `dockerd` and imports the test image `outpost-test/busybox:1` from Debian's busybox-static):
//! deploy from config and from the API, env / limits / labels as the engine reports them,
//! restart after `docker kill`, crash-loop detection, removal, API apps persisted across a
//! daemon restart, FAILED kept across a daemon restart, foreign containers untouched, an unreachable engine, and an app (Debian's
//! `mosquitto_sub` in `outpost-test/mqtt-sub:1`) that reads the local MQTT bus with the
//! credentials Outpost gave it.
//!
//! `serial_`: the tests share the engine and measure restart times.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code

use std::process::Command;
use std::time::{Duration, Instant};

use outpost_e2e::admin::{ADMIN_TOKEN, admin, admin_token_config};
use outpost_e2e::daemon::{Daemon, outpost_cli_env};
use serde_json::Value;

const IMAGE: &str = "outpost-test/busybox:1";
const MQTT_IMAGE: &str = "outpost-test/mqtt-sub:1";

fn docker(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("run docker");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

/// `docker inspect` of a container, or `None` if it does not exist.
fn inspect(name: &str) -> Option<Value> {
    let (ok, text) = docker(&["inspect", name]);
    if !ok {
        return None;
    }
    let v: Value = serde_json::from_str(&text).unwrap();
    v.as_array().and_then(|a| a.first()).cloned()
}

fn running(name: &str) -> bool {
    inspect(name).is_some_and(|v| v["State"]["Running"] == true)
}

/// Fails (never skips) without the engine or the image, naming the command that provides them.
fn require_engine() {
    assert!(
        docker(&["info"]).0 && docker(&["image", "inspect", IMAGE]).0,
        "no Docker engine or no {IMAGE}: run `bash scripts/ensure-docker.sh` (after \
         scripts/setup-test-deps.sh for docker.io and busybox-static)"
    );
}

fn app_status(d: &Daemon, name: &str) -> Value {
    d.status()["apps"][name].clone()
}

fn cleanup(names: &[&str]) {
    for name in names {
        docker(&["rm", "-f", &format!("outpost-app-{name}")]);
    }
}

fn apps_config(extra: &str) -> String {
    format!(
        "{}\n[apps]\nenabled = true\ncrash_loop_failures = 3\ncrash_loop_window = \"3s\"\n\
         restart_backoff_max = \"2s\"\nallowed_mount_root = \"/tmp\"\n\n{extra}",
        admin_token_config()
    )
}

#[test]
fn serial_apps_deploy_kill_crash_loop_delete() {
    require_engine();
    let names = ["cfg", "crashy", "viaapi"];
    cleanup(&names);
    docker(&["rm", "-f", "outpost-test-foreign"]);
    let (ok, foreign) = docker(&[
        "run",
        "-d",
        "--name",
        "outpost-test-foreign",
        IMAGE,
        "sleep",
        "3600",
    ]);
    assert!(ok, "foreign container: {foreign}");

    let dir = tempfile::tempdir().unwrap();
    let config = apps_config(&format!(
        r#"[[apps.app]]
name = "cfg"
image = "{IMAGE}"
command = ["sleep", "3600"]
env = ["FOO=bar"]
memory = "32MiB"
cpus = 0.5

[[apps.app]]
name = "crashy"
image = "{IMAGE}"
command = ["sh", "-c", "exit 3"]
"#
    ));
    let mut d = Daemon::start(dir.path(), &config);
    d.wait_until("apps ACTIVE", Duration::from_secs(20), |d| {
        d.status()["subsystems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "apps" && s["state"] == "ACTIVE")
    });
    d.wait_until("cfg ACTIVE", Duration::from_secs(20), |d| {
        app_status(d, "cfg")["state"] == "ACTIVE" && running("outpost-app-cfg")
    });

    // Env, limits and labels as the engine has them.
    let c = inspect("outpost-app-cfg").unwrap();
    let env: Vec<&str> = c["Config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(env.contains(&"FOO=bar"), "{env:?}");
    assert!(env.contains(&"OUTPOST_DEVICE_ID=app-cfg"), "{env:?}");
    assert!(
        env.iter()
            .any(|e| e.starts_with("OUTPOST_DEVICE_SECRET=") && e.len() > 30),
        "{env:?}"
    );
    assert_eq!(c["HostConfig"]["Memory"], 32 * 1024 * 1024);
    assert_eq!(c["HostConfig"]["NanoCpus"], 500_000_000);
    assert_eq!(c["Config"]["Labels"]["io.outpost.managed"], "true");
    assert_eq!(c["Config"]["Labels"]["io.outpost.app"], "cfg");
    // The app's bus identity is a registry device allowed on MQTT.
    let dev = admin(&d, "GET", "/api/v1/devices/app-cfg", "");
    assert_eq!(dev.status, 200, "{}", dev.text());
    assert_eq!(dev.json()["protocols"], serde_json::json!(["mqtt"]));

    // docker kill → restarted within 2 s, restart counted.
    let first_id = app_status(&d, "cfg")["container_id"].clone();
    assert!(docker(&["kill", "outpost-app-cfg"]).0);
    let killed = Instant::now();
    d.wait_until("cfg restarted", Duration::from_secs(2), |d| {
        running("outpost-app-cfg") && app_status(d, "cfg")["restart_count"] == 1
    });
    eprintln!("restarted {:?} after the kill", killed.elapsed());
    assert_eq!(app_status(&d, "cfg")["container_id"], first_id);
    assert_eq!(app_status(&d, "cfg")["last_exit_code"], 137);
    let (_, metrics) = d.get("/metrics");
    assert!(
        metrics.contains("outpost_app_restarts_total{app=\"cfg\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("outpost_apps_engine_up 1"), "{metrics}");

    // Crash loop → FAILED with the exit code, not restarted any more.
    d.wait_until("crashy FAILED", Duration::from_secs(20), |d| {
        app_status(d, "crashy")["state"] == "FAILED"
    });
    let s = app_status(&d, "crashy");
    assert_eq!(s["last_exit_code"], 3, "{s}");
    assert!(s["reason"].as_str().unwrap().contains("crash loop"), "{s}");
    let restarts = s["restart_count"].clone();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(app_status(&d, "crashy")["restart_count"], restarts);

    // From the API: create, listed, runs; config apps cannot be deleted through it.
    let body = format!(
        r#"{{"name":"viaapi","image":"{IMAGE}","command":["sleep","3600"],"env":["X=1"]}}"#
    );
    let r = admin(&d, "POST", "/api/v1/apps", &body);
    assert_eq!(r.status, 201, "{}", r.text());
    d.wait_until("viaapi running", Duration::from_secs(20), |d| {
        app_status(d, "viaapi")["state"] == "ACTIVE" && running("outpost-app-viaapi")
    });
    let list = admin(&d, "GET", "/api/v1/apps", "").json();
    let listed: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["cfg", "crashy", "viaapi"]);
    assert_eq!(admin(&d, "DELETE", "/api/v1/apps/cfg", "").status, 409);
    let url = format!("http://{}", d.admin);
    let (code, out, err) = outpost_cli_env(
        &["apps", "list", "--url", &url],
        &[("OUTPOST_API_TOKEN", ADMIN_TOKEN)],
    );
    assert_eq!(code, 0, "{err}");
    let crashy = out.lines().find(|l| l.starts_with("crashy")).unwrap();
    assert!(crashy.contains("FAILED") && crashy.contains(" 3 "), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("cfg") && l.contains("ACTIVE")),
        "{out}"
    );
    let logs = admin(&d, "GET", "/api/v1/apps/viaapi/logs?tail=10", "");
    assert_eq!(logs.status, 200, "{}", logs.text());

    // PUT replaces the spec: the container is recreated with the new env.
    let old_id = app_status(&d, "viaapi")["container_id"].clone();
    let body = format!(
        r#"{{"name":"viaapi","image":"{IMAGE}","command":["sleep","3600"],"env":["X=2"]}}"#
    );
    let r = admin(&d, "PUT", "/api/v1/apps/viaapi", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    d.wait_until("viaapi recreated", Duration::from_secs(20), |d| {
        let s = app_status(d, "viaapi");
        s["state"] == "ACTIVE" && s["container_id"] != old_id && !s["container_id"].is_null()
    });
    let env = inspect("outpost-app-viaapi").unwrap()["Config"]["Env"].clone();
    assert!(env.as_array().unwrap().iter().any(|e| e == "X=2"), "{env}");
    // An explicit restart clears FAILED (the crash loop then starts over).
    let r = admin(&d, "POST", "/api/v1/apps/crashy/restart", "");
    assert_eq!(r.status, 202, "{}", r.text());
    d.wait_until("crashy retried", Duration::from_secs(10), |d| {
        app_status(d, "crashy")["restart_count"].as_u64() > restarts.as_u64()
    });

    // Status changes are recorded: the crash loop's history, newest first, with exit codes.
    let events = |d: &Daemon, name: &str| -> Vec<Value> {
        let r = admin(d, "GET", &format!("/api/v1/apps/{name}/events"), "");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["events"].as_array().unwrap().clone()
    };
    let history = events(&d, "crashy");
    assert!(
        history
            .iter()
            .any(|e| e["state"] == "FAILED" && e["exit_code"] == 3),
        "{history:?}"
    );
    assert!(
        history.iter().any(|e| e["state"] == "ACTIVE"),
        "{history:?}"
    );
    let times: Vec<i64> = history
        .iter()
        .map(|e| e["at_ms"].as_i64().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    assert_eq!(admin(&d, "GET", "/api/v1/apps/nope/events", "").status, 404);

    // Persisted: a restarted daemon still has the API app (and keeps its container), and the
    // recorded history.
    d.terminate(Duration::from_secs(15));
    let mut d = Daemon::start_with(&dir.path().join("outpost.toml"), dir.path().join("data"));
    d.wait_until("viaapi back", Duration::from_secs(20), |d| {
        app_status(d, "viaapi")["state"] == "ACTIVE"
    });
    assert!(events(&d, "crashy").len() >= history.len());

    // Delete → the container is removed.
    let r = admin(&d, "DELETE", "/api/v1/apps/viaapi", "");
    assert_eq!(r.status, 204, "{}", r.text());
    d.wait_until("viaapi removed", Duration::from_secs(10), |_| {
        inspect("outpost-app-viaapi").is_none()
    });
    assert!(app_status(&d, "viaapi").is_null());
    // ... and so is its bus identity.
    d.wait_until("app-viaapi device removed", Duration::from_secs(5), |d| {
        admin(d, "GET", "/api/v1/devices/app-viaapi", "").status == 404
    });

    // The foreign, unlabelled container was never touched.
    assert!(running("outpost-test-foreign"));
    d.terminate(Duration::from_secs(15));
    cleanup(&names);
    docker(&["rm", "-f", "outpost-test-foreign"]);
}

/// The engine's start time of a container (changes whenever it is started again).
fn started_at(name: &str) -> String {
    inspect(name).unwrap_or_else(|| panic!("no container {name}: {:?}", docker(&["ps", "-a"])))
        ["State"]["StartedAt"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// FAILED survives a daemon restart (config and API apps alike): the new daemon adopts the
/// exited containers as FAILED without starting them; an API restart or a changed spec (PUT,
/// or an edited config file) clears it.
#[test]
fn serial_a_failed_app_stays_failed_across_a_daemon_restart() {
    require_engine();
    let names = ["failing", "apifail"];
    cleanup(&names);
    let dir = tempfile::tempdir().unwrap();
    let app = |command: &str| {
        apps_config(&format!(
            "[[apps.app]]\nname = \"failing\"\nimage = \"{IMAGE}\"\ncommand = {command}\n"
        ))
    };
    let config_path =
        outpost_e2e::daemon::write_config(dir.path(), &app(r#"["sh", "-c", "exit 3"]"#));
    let data = dir.path().join("data");
    let mut d = Daemon::start_with(&config_path, data.clone());
    let body = format!(r#"{{"name":"apifail","image":"{IMAGE}","command":["sh","-c","exit 4"]}}"#);
    let r = admin(&d, "POST", "/api/v1/apps", &body);
    assert_eq!(r.status, 201, "{}", r.text());
    d.wait_until("both FAILED", Duration::from_secs(30), |d| {
        names.iter().all(|n| app_status(d, n)["state"] == "FAILED")
    });
    let before: Vec<(String, Value)> = names
        .iter()
        .map(|n| (started_at(&format!("outpost-app-{n}")), app_status(&d, n)))
        .collect();
    d.terminate(Duration::from_secs(15));

    // Restarted: adopted as FAILED, with reason and exit code, never started again.
    let mut d = Daemon::start_with(&config_path, data.clone());
    d.wait_until(
        "both FAILED after the restart",
        Duration::from_secs(20),
        |d| names.iter().all(|n| app_status(d, n)["state"] == "FAILED"),
    );
    for (n, (started, status)) in names.iter().zip(&before) {
        let now = app_status(&d, n);
        assert_eq!(now["reason"], status["reason"], "{n}: {now}");
        assert_eq!(
            now["last_exit_code"], status["last_exit_code"],
            "{n}: {now}"
        );
        assert_eq!(now["restart_count"], status["restart_count"], "{n}: {now}");
        assert_eq!(
            &started_at(&format!("outpost-app-{n}")),
            started,
            "{n} was started again"
        );
    }
    assert_eq!(app_status(&d, "failing")["last_exit_code"], 3);
    assert_eq!(app_status(&d, "apifail")["last_exit_code"], 4);
    // A pass of the reconcile loop later still nothing was started.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !d.logs()
            .iter()
            .any(|l| l.contains("App exited; restarting it")),
        "{:#?}",
        d.logs()
    );
    for (n, (started, _)) in names.iter().zip(&before) {
        assert_eq!(app_status(&d, n)["state"], "FAILED");
        assert_eq!(&started_at(&format!("outpost-app-{n}")), started, "{n}");
    }

    // An API restart clears FAILED: the container is recreated and runs again (and fails
    // again).
    let r = admin(&d, "POST", "/api/v1/apps/apifail/restart", "");
    assert_eq!(r.status, 202, "{}", r.text());
    d.wait_until("apifail started again", Duration::from_secs(10), |_| {
        inspect("outpost-app-apifail")
            .is_some_and(|c| c["State"]["StartedAt"].as_str() != Some(before[1].0.as_str()))
    });
    // A new spec through the API clears it too, and the app runs.
    let body = format!(r#"{{"name":"apifail","image":"{IMAGE}","command":["sleep","3600"]}}"#);
    let r = admin(&d, "PUT", "/api/v1/apps/apifail", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    d.wait_until("apifail ACTIVE", Duration::from_secs(20), |d| {
        app_status(d, "apifail")["state"] == "ACTIVE" && running("outpost-app-apifail")
    });
    d.terminate(Duration::from_secs(15));

    // A changed spec in the config file clears it: the app is recreated and runs.
    outpost_e2e::daemon::write_config(dir.path(), &app(r#"["sleep", "3600"]"#));
    let mut d = Daemon::start_with(&config_path, data);
    d.wait_until(
        "failing ACTIVE with its new spec",
        Duration::from_secs(20),
        |d| app_status(d, "failing")["state"] == "ACTIVE" && running("outpost-app-failing"),
    );
    d.wait_until("apifail ACTIVE", Duration::from_secs(20), |d| {
        app_status(d, "apifail")["state"] == "ACTIVE"
    });
    d.terminate(Duration::from_secs(15));
    cleanup(&names);
}

#[test]
fn serial_apps_engine_unreachable_leaves_the_rest_running() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[apps]\nenabled = true\nengine_socket = \"{}\"\n\n[[apps.app]]\nname = \"nowhere\"\nimage = \"{IMAGE}\"\ncommand = [\"sleep\", \"3600\"]\n",
        admin_token_config(),
        dir.path().join("no-such-engine.sock").display()
    );
    let mut d = Daemon::start(dir.path(), &config);
    d.wait_until(
        "apps INACTIVE with the reason",
        Duration::from_secs(10),
        |d| {
            d.status()["subsystems"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| {
                    s["name"] == "apps"
                        && s["state"] == "INACTIVE"
                        && s["reason"]
                            .as_str()
                            .is_some_and(|r| r.contains("no-such-engine.sock"))
                })
        },
    );
    assert_eq!(app_status(&d, "nowhere")["state"], "INACTIVE");
    // Everything else works: ready, devices, API.
    assert_eq!(d.get("/readyz").0, 200);
    let r = admin(&d, "POST", "/api/v1/devices", r#"{"id":"still-works"}"#);
    assert_eq!(r.status, 201, "{}", r.text());
    let list = admin(&d, "GET", "/api/v1/apps", "").json();
    assert!(
        list["engine_problem"]
            .as_str()
            .unwrap()
            .contains("no-such-engine.sock")
    );

    // The engine comes back (the socket appears): the app is reconciled.
    require_engine();
    cleanup(&["nowhere"]);
    std::os::unix::fs::symlink(
        "/var/run/docker.sock",
        dir.path().join("no-such-engine.sock"),
    )
    .unwrap();
    d.wait_until("nowhere running", Duration::from_secs(20), |d| {
        app_status(d, "nowhere")["state"] == "ACTIVE" && running("outpost-app-nowhere")
    });
    // A missing image is not pulled (apps.pull = false): the app says why.
    let r = admin(
        &d,
        "POST",
        "/api/v1/apps",
        r#"{"name":"noimage","image":"outpost-test/missing:0"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    d.wait_until("noimage reason", Duration::from_secs(10), |d| {
        let s = app_status(d, "noimage");
        s["state"] == "INACTIVE"
            && s["reason"]
                .as_str()
                .is_some_and(|r| r.contains("not present locally"))
    });
    d.terminate(Duration::from_secs(15));
    cleanup(&["nowhere"]);
}

/// Self-supervision: the debug fault hook makes the first run of `apps` and `registry-flush`
/// panic; both are restarted and their restart is counted in the status.
#[test]
fn supervised_subsystems_forced_to_fail_are_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = outpost_e2e::daemon::write_config(
        dir.path(),
        &format!(
            "[apps]\nenabled = true\nengine_socket = \"{}\"\n",
            dir.path().join("none.sock").display()
        ),
    );
    let mut d = Daemon::start_with_env(
        &config_path,
        dir.path().join("data"),
        &[("OUTPOST_DEBUG_FAIL", "apps,registry-flush")],
    );
    d.wait_until("both restarted", Duration::from_secs(10), |d| {
        let status = d.status();
        let subsystems = status["subsystems"].as_array().unwrap();
        ["apps", "registry-flush"].iter().all(|name| {
            subsystems.iter().any(|s| {
                s["name"] == *name
                    && s["restarts"] == 1
                    && !s["reason"].as_str().unwrap_or("").contains("panicked")
            })
        })
    });
    d.wait_for_log("Subsystem failed; restarting it", Duration::from_secs(5));
    assert_eq!(d.get("/readyz").0, 200);
    d.terminate(Duration::from_secs(15));
}

#[test]
fn serial_an_app_receives_readings_over_the_local_bus() {
    require_engine();
    assert!(
        docker(&["image", "inspect", MQTT_IMAGE]).0,
        "no {MQTT_IMAGE}: run `bash scripts/ensure-docker.sh`"
    );
    cleanup(&["bus"]);
    let dir = tempfile::tempdir().unwrap();
    // The server must be reachable from containers (host.docker.internal is the bridge gateway).
    let config = apps_config("[mqtt]\nlisten = \"0.0.0.0:0\"\n");
    let mut d = Daemon::start(dir.path(), &config);
    let secret = outpost_e2e::admin::create_device(&d, "sensor-1", None);
    // What a real app does: subscribe with the URL and credentials from its environment.
    let script = r#"exec mosquitto_sub -L "$OUTPOST_MQTT_URL/devices/+/#" -u "$OUTPOST_DEVICE_ID" -P "$OUTPOST_DEVICE_SECRET" -i "$OUTPOST_DEVICE_ID" -q 1 -v"#;
    let body = serde_json::json!({
        "name": "bus",
        "image": MQTT_IMAGE,
        "command": ["sh", "-c", script],
    });
    let r = admin(&d, "POST", "/api/v1/apps", &body.to_string());
    assert_eq!(r.status, 201, "{}", r.text());
    d.wait_until(
        "the app connected to the bus",
        Duration::from_secs(30),
        |d| {
            app_status(d, "bus")["state"] == "ACTIVE" && d.metric("outpost_mqtt_connections") >= 1.0
        },
    );
    let logs = |d: &Daemon| admin(d, "GET", "/api/v1/apps/bus/logs?tail=100", "").text();
    // A reading over HTTP reaches the app; retried until its SUBSCRIBE has gone through.
    let auth = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("sensor-1:{secret}")
        )
    );
    let expected = r#"devices/sensor-1/http/room/temp {"t":21.5}"#;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !logs(&d).contains(expected) {
        assert!(
            Instant::now() < deadline,
            "the app never logged the reading; its logs: {}\nstatus: {}",
            logs(&d),
            app_status(&d, "bus")
        );
        let r = outpost_e2e::http::request(
            d.admin,
            "POST",
            "/api/v1/ingest/room/temp",
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
            ],
            br#"{"t":21.5}"#,
        );
        assert_eq!(r.status, 201, "{}", r.text());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(app_status(&d, "bus")["restart_count"], 0);

    // Deleting the app removes its container and its bus identity.
    assert_eq!(admin(&d, "DELETE", "/api/v1/apps/bus", "").status, 204);
    d.wait_until("app and identity removed", Duration::from_secs(10), |d| {
        inspect("outpost-app-bus").is_none()
            && admin(d, "GET", "/api/v1/devices/app-bus", "").status == 404
    });
    cleanup(&["bus"]);
}

/// Gateway management from Kafka (`kafka.commands.gateway = true`): a backend's client deploys an
/// app, restarts it, asks for the status and the inventory, sends an unknown action and a bad
/// spec, and removes the app; each command is `queued`, then `acked` with its result or `failed`
/// with the reason, on the status topic.
#[test]
fn serial_apps_are_deployed_restarted_and_removed_by_commands_from_kafka() {
    use outpost_e2e::kafka::{Tansu, consume, send_commands};
    use serde_json::json;
    require_engine();
    cleanup(&["from-kafka"]);
    let kafka = Tansu::start(&[
        ("outpost.commands", 2),
        ("outpost.command-status", 1),
        ("outpost.readings", 1),
        ("outpost.heartbeats", 1),
        ("outpost.inventory", 1),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let config = apps_config(&format!(
        "[kafka]\nenabled = true\nbrokers = [\"{}\"]\nheartbeat_interval = \"1h\"\n\n\
         [kafka.commands]\nenabled = true\ngateway = true\n",
        kafka.bootstrap()
    ));
    let mut d = Daemon::start(dir.path(), &config);
    let gateway = d.status()["gateway_id"].as_str().unwrap().to_owned();
    outpost_e2e::admin::create_device(&d, "sensor-9", None);
    d.wait_for_log("Reading commands", Duration::from_secs(30));
    let command = |id: &str, name: &str, payload: Value| json!({"id": id, "target": "gateway", "name": name, "payload": payload});
    let send = |records: &[Value]| {
        let records: Vec<(&str, Value)> = records
            .iter()
            .map(|r| (gateway.as_str(), r.clone()))
            .collect();
        send_commands(
            &kafka.bootstrap(),
            "outpost.commands",
            &records,
            Duration::ZERO,
        );
    };

    send(&[command(
        "g-deploy",
        "deploy_app",
        json!({"name": "from-kafka", "image": IMAGE, "command": ["sleep", "3600"]}),
    )]);
    d.wait_until("the deployed app running", Duration::from_secs(30), |d| {
        app_status(d, "from-kafka")["state"] == "ACTIVE" && running("outpost-app-from-kafka")
    });
    let first = app_status(&d, "from-kafka")["container_id"].clone();
    let inventory_before = consume(
        &kafka.bootstrap(),
        "outpost.inventory",
        100,
        Duration::from_secs(3),
        false,
    )
    .len();
    send(&[
        command("g-restart", "restart_app", json!({"name": "from-kafka"})),
        command("g-status", "report_status", Value::Null),
        command("g-inventory", "resend_inventory", Value::Null),
        command("g-unknown", "format_disk", Value::Null),
        command("g-bad", "deploy_app", json!({"name": "bad", "image": 5})),
    ]);
    d.wait_until("the restart", Duration::from_secs(30), |d| {
        let s = app_status(d, "from-kafka");
        s["container_id"] != first && s["state"] == "ACTIVE" && running("outpost-app-from-kafka")
    });
    send(&[command(
        "g-remove",
        "remove_app",
        json!({"name": "from-kafka"}),
    )]);
    d.wait_until("the app removed", Duration::from_secs(30), |_| {
        inspect("outpost-app-from-kafka").is_none()
    });

    let events: Vec<Value> = consume(
        &kafka.bootstrap(),
        "outpost.command-status",
        14,
        Duration::from_secs(30),
        false,
    )
    .iter()
    .map(|r| serde_json::from_slice(&r.payload).unwrap())
    .collect();
    let story = |id: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["command_id"] == id)
            .map(|e| e["status"].as_str().unwrap().to_owned())
            .collect()
    };
    let last = |id: &str| {
        events
            .iter()
            .rfind(|e| e["command_id"] == id)
            .unwrap()
            .clone()
    };
    for id in [
        "g-deploy",
        "g-restart",
        "g-status",
        "g-inventory",
        "g-remove",
    ] {
        assert_eq!(story(id), ["queued", "acked"], "{id}: {events:#?}");
    }
    for id in ["g-unknown", "g-bad"] {
        assert_eq!(story(id), ["queued", "failed"], "{id}: {events:#?}");
    }
    for e in &events {
        assert_eq!(
            (e["target"].clone(), e["device"].clone()),
            (json!("gateway"), Value::Null),
            "{e}"
        );
        assert_eq!(e["gateway"], gateway.as_str());
    }
    assert_eq!(last("g-deploy")["result"]["app"], "from-kafka");
    assert_eq!(last("g-status")["result"]["gateway_id"], gateway.as_str());
    // sensor-9 and the app's own bus identity (app-from-kafka).
    assert_eq!(last("g-inventory")["result"]["devices"], 2);
    assert!(
        last("g-unknown")["reason"]
            .as_str()
            .unwrap()
            .starts_with("unknown gateway action")
    );
    assert!(
        last("g-bad")["reason"]
            .as_str()
            .unwrap()
            .starts_with("payload.image"),
        "{}",
        last("g-bad")
    );
    // The inventory was sent again.
    let inventory_after = consume(
        &kafka.bootstrap(),
        "outpost.inventory",
        inventory_before + 1,
        Duration::from_secs(10),
        false,
    )
    .len();
    assert!(
        inventory_after > inventory_before,
        "{inventory_before} → {inventory_after}"
    );
    cleanup(&["from-kafka"]);
}
