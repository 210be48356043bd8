//! Zigbee driver end to end: the real `outpost` binary against a Z-Stack coordinator simulator
//! (`tests/peers/znp_sim.py`) on a pseudo-terminal. The simulator's frames are written from TI's
//! MT document, not with the driver's encoder.
//!
//! Covered: start-up with network formation, then resume after a replug; device announce →
//! registered device; attribute reports of every supported cluster → readings with values and
//! units; a bad checksum and two wrong lengths skipped without losing the frames after them;
//! unknown clusters kept raw; permit join through the API reaching the stick; replug recovery.

#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use outpost_e2e::admin::{admin, admin_token_config};
use outpost_e2e::daemon::Daemon;
use outpost_e2e::require_command;
use outpost_sync::OutboxReader;
use serde_json::Value;

const DEVICE: &str = "zigbee-00124b0012345678";
const WAIT: Duration = Duration::from_secs(20);

/// The simulator process: commands on its stdin, events from its stdout.
struct Sim {
    child: Child,
    stdin: ChildStdin,
    events: Receiver<String>,
    seen: Vec<String>,
}

impl Sim {
    fn start(link: &Path, state: &Path) -> Sim {
        let python = require_command("python3");
        let script = outpost_e2e::manifest_dir().join("peers/znp_sim.py");
        let mut child = Command::new(python)
            .arg(script)
            .arg(link)
            .arg(state)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start znp_sim.py");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = mpsc::sync_channel(1024);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut sim = Sim {
            child,
            stdin,
            events,
            seen: Vec::new(),
        };
        sim.wait("listening");
        sim
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        self.wait(&format!("sent {command}"));
    }

    /// Waits for an event line starting with `prefix`; returns it.
    fn wait(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "simulator: no `{prefix}` within {WAIT:?}; saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Pulls the plug: the pty master closes at once.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn readings(d: &Daemon) -> Vec<Value> {
    OutboxReader::open(&d.data_dir.join("outbox.db"))
        .unwrap()
        .read_all()
        .unwrap()
        .into_iter()
        .filter(|r| r.device_id == DEVICE)
        .map(|r| {
            assert_eq!(r.topic, format!("zigbee/{DEVICE}"));
            serde_json::from_slice(&r.payload).unwrap()
        })
        .collect()
}

fn wait_readings(d: &mut Daemon, what: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    d.wait_until(what, WAIT, |d| check(&readings(d)));
    readings(d)
}

/// A metric of the driver `zb` from `/metrics`.
fn driver_metric(d: &Daemon, name: &str) -> f64 {
    let (code, body) = d.get("/metrics");
    assert_eq!(code, 200);
    body.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(r#"driver="zb""#))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} for driver zb in:\n{body}"))
}

fn with_field<'a>(all: &'a [Value], field: &str) -> Vec<&'a Value> {
    all.iter().filter(|v| v.get(field).is_some()).collect()
}

#[test]
fn zigbee_coordinator_end_to_end() {
    require_command("python3");
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("zstack");
    let state = dir.path().join("nv-state");
    let mut sim = Sim::start(&link, &state);

    let extra = format!(
        "{}\n[[drivers]]\nkind = \"zigbee\"\nname = \"zb\"\nchannel = 15\npan_id = 0x1a62\n\
         permit_join_max = \"120s\"\n[drivers.serial]\npath = \"{}\"\nbaud = 115200\n\
         [drivers.reopen]\nbackoff_initial = \"100ms\"\nbackoff_max = \"500ms\"\n",
        admin_token_config(),
        link.display()
    );
    let mut d = Daemon::start(dir.path(), &extra);

    // Start-up: reset, ping, version, device info, no network stored → formation.
    sim.wait("reset");
    sim.wait("formation");
    sim.wait("ready");
    let requests: Vec<&String> = sim.seen.iter().filter(|l| l.starts_with("rx ")).collect();
    // Each line is the start of the request's `rx <CMD0> <CMD1> <DATA hex>` event.
    let expect = [
        "rx 41 00 01",             // SYS_RESET_REQ, soft
        "rx 21 01 ",               // SYS_PING
        "rx 21 02 ",               // SYS_VERSION
        "rx 27 00 ",               // UTIL_GET_DEVICE_INFO
        "rx 21 08 4f0000",         // SYS_OSAL_NV_READ ZCD_NV_BDBNODEISONANETWORK: 0
        "rx 21 09 8700000100",     // SYS_OSAL_NV_WRITE ZCD_NV_LOGICAL_TYPE = coordinator
        "rx 21 09 83000002621a",   // SYS_OSAL_NV_WRITE ZCD_NV_PANID = 0x1a62
        "rx 2f 08 0100800000",     // APP_CNF_BDB_SET_CHANNEL primary, 1 << 15
        "rx 2f 08 0000000000",     // APP_CNF_BDB_SET_CHANNEL secondary, none
        "rx 2f 05 04",             // APP_CNF_BDB_START_COMMISSIONING, formation
        "rx 24 00 01040105000000", // AF_REGISTER ep 1, profile 0x0104, device 0x0005
        "rx 25 50 ",               // ZDO_EXT_NWK_INFO: the network the stick is on
    ];
    assert_eq!(requests.len(), expect.len(), "{requests:#?}");
    for (got, want) in requests.iter().zip(expect) {
        assert!(got.starts_with(want), "expected {want}, got {got}");
    }

    // The network as the stick reports it: in the log and in the status.
    let up = log_fields(&d.wait_for_log("Zigbee network up", WAIT));
    assert_eq!(
        (&up["channel"], &up["pan_id"]),
        (&15.into(), &"0x1a62".into()),
        "{up}"
    );
    let details = driver_details(&mut d);
    assert_eq!(details["channel"], "15", "{details}");
    assert_eq!(details["pan_id"], "0x1a62", "{details}");

    // Join: announce → device registered with its IEEE id.
    sim.send("announce");
    d.wait_until("device registered", WAIT, |d| {
        admin(d, "GET", &format!("/api/v1/devices/{DEVICE}"), "").status == 200
    });
    let device = admin(&d, "GET", &format!("/api/v1/devices/{DEVICE}"), "").json();
    assert_eq!(device["source"], "driver:zb", "{device}");
    let joined = wait_readings(&mut d, "joined reading", |r| !r.is_empty());
    assert_eq!(joined[0]["event"], "joined");
    assert_eq!(joined[0]["ieee"], "00124b0012345678");
    assert_eq!(joined[0]["nwk"], "0x1234");
    assert!(joined[0]["time_ms"].as_i64().unwrap() > 1_600_000_000_000);

    // Attribute reports of every supported cluster.
    sim.send("reports");
    let all = wait_readings(&mut d, "8 report readings", |r| r.len() >= 9);
    let t = with_field(&all, "temperature");
    assert_eq!(t.len(), 2, "{all:#?}");
    assert_eq!(t[0]["temperature"], 21.5);
    assert_eq!(t[0]["units"]["temperature"], "°C");
    assert_eq!(t[0]["cluster"], "0x0402");
    assert_eq!(t[1]["temperature"], 21.0, "read attributes response");
    let h = with_field(&all, "humidity");
    assert_eq!(h[0]["humidity"], 66.66);
    assert_eq!(h[0]["units"]["humidity"], "%");
    let p = with_field(&all, "pressure");
    assert_eq!(p[0]["pressure"], 1013.0);
    assert_eq!(p[0]["units"]["pressure"], "hPa");
    let l = with_field(&all, "illuminance");
    assert_eq!(l[0]["illuminance"], 1000.0);
    assert_eq!(l[0]["units"]["illuminance"], "lx");
    assert_eq!(with_field(&all, "occupancy")[0]["occupancy"], true);
    assert_eq!(with_field(&all, "on")[0]["on"], true);
    let b = with_field(&all, "battery");
    assert_eq!(b[0]["battery"], 90.0);
    assert_eq!(b[0]["units"]["battery"], "%");
    assert_eq!(b[0]["battery_voltage"], 3.0);
    assert_eq!(b[0]["units"]["battery_voltage"], "V");
    // Every reading carries time_ms (docs/DRIVERS.md, framework section).
    assert!(all.iter().all(|r| r["time_ms"].is_i64()), "{all:#?}");

    // Corrupted frames between good ones: bad checksum, length too long, length too short.
    sim.send("corrupt");
    let all = wait_readings(&mut d, "the 3 good frames around corrupted ones", |r| {
        r.len() >= 12
    });
    let after: Vec<&Value> = all[9..].iter().collect();
    assert_eq!(after.len(), 3, "{after:#?}");
    assert_eq!(after[0]["temperature"], -12.34);
    assert_eq!(after[1]["humidity"], 12.34);
    assert_eq!(after[2]["pressure"], 999.0);
    assert!(
        !all.iter().any(|v| v["temperature"] == 99.99),
        "a corrupted frame was accepted"
    );
    // Exactly the three corrupted frames are counted, in the metric and in the logs.
    assert_eq!(driver_metric(&d, "outpost_driver_frames_bad_total"), 3.0);
    let logged = d.count_log_lines("Skipped a bad Z-Stack frame", 3, Duration::from_secs(5));
    assert_eq!(logged, 3);
    assert_eq!(driver_metric(&d, "outpost_driver_up"), 1.0);

    // Unknown cluster, unknown attribute, cluster-specific command: kept raw.
    sim.send("unknown");
    let all = wait_readings(&mut d, "3 raw readings", |r| r.len() >= 15);
    let raw = &all[12]["raw"][0];
    assert_eq!(all[12]["cluster"], "0xfc00");
    assert_eq!(raw["attribute"], "0x0001");
    assert_eq!(raw["type"], "0x42");
    assert_eq!(raw["data"], "03616263");
    assert_eq!(all[13]["raw"][0]["attribute"], "0x0010");
    assert_eq!(all[13]["raw"][0]["data"], "0500");
    assert_eq!(all[14]["cluster"], "0x0500");
    assert_eq!(all[14]["zcl"]["cluster_specific"], true);
    assert_eq!(all[14]["zcl"]["command"], "0x00");
    assert_eq!(all[14]["zcl"]["frame"], "192200010000000000");

    // A manufacturer-specific frame on the temperature cluster: attribute 0x0000 is the
    // manufacturer's, kept raw with its code, never read as MeasuredValue (21.0 °C).
    sim.send("manufacturer");
    let all = wait_readings(&mut d, "the manufacturer-specific reading", |r| {
        r.len() >= 16
    });
    let m = &all[15];
    assert_eq!(m["cluster"], "0x0402", "{m}");
    assert!(m.get("temperature").is_none(), "{m}");
    assert_eq!(m["raw"][0]["manufacturer"], "0x115f", "{m}");
    assert_eq!(m["raw"][0]["attribute"], "0x0000", "{m}");
    assert_eq!(m["raw"][0]["type"], "0x29", "{m}");
    assert_eq!(m["raw"][0]["data"], "3408", "{m}");

    // Permit join through the API, as text and as seconds; capped by permit_join_max.
    let r = admin(
        &d,
        "POST",
        "/api/v1/zigbee/permit-join",
        r#"{"duration":"60s"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["seconds"], 60);
    assert_eq!(
        sim.wait("permit_join"),
        "permit_join 60 addr_mode=0f dst=fffc"
    );
    let r = admin(
        &d,
        "POST",
        "/api/v1/zigbee/permit-join",
        r#"{"duration":200}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["seconds"], 120);
    assert!(sim.wait("permit_join").starts_with("permit_join 120 "));
    let r = admin(
        &d,
        "POST",
        "/api/v1/zigbee/permit-join",
        r#"{"duration":"300s"}"#,
    );
    assert_eq!(r.status, 422, "{}", r.text());
    let r = d.post(
        "/api/v1/zigbee/permit-join",
        "not-a-token",
        r#"{"duration":"60s"}"#,
    );
    assert_eq!(r.status, 401);

    // Replug: the stick disappears, the API says 503, the same link comes back, the driver
    // reopens it and resumes the stored network (no new formation), and readings continue.
    sim.kill();
    std::fs::remove_file(&link).unwrap();
    d.wait_until("the driver noticed the unplug", WAIT, |d| {
        admin(
            d,
            "POST",
            "/api/v1/zigbee/permit-join",
            r#"{"duration":10}"#,
        )
        .status
            == 503
    });
    let mut sim = Sim::start(&link, &state);
    sim.wait("reset");
    sim.wait("resumed");
    sim.wait("ready");
    let resumed: Vec<&String> = sim.seen.iter().filter(|l| l.starts_with("rx ")).collect();
    let expect = [
        "rx 41 00 01",
        "rx 21 01 ",
        "rx 21 02 ",
        "rx 27 00 ",
        "rx 21 08 4f0000", // on a network: yes
        "rx 25 40 6400",   // ZDO_STARTUP_FROM_APP, delay 100 ms
        "rx 24 00 01040105000000",
        "rx 25 50 ",
    ];
    assert_eq!(resumed.len(), expect.len(), "{resumed:#?}");
    for (got, want) in resumed.iter().zip(expect) {
        assert!(got.starts_with(want), "expected {want}, got {got}");
    }
    assert!(
        !sim.seen.iter().any(|l| l == "formation"),
        "{:#?}",
        sim.seen
    );
    assert!(driver_metric(&d, "outpost_driver_reopens_total") >= 1.0);
    sim.send("reports");
    let all = wait_readings(&mut d, "reports after the replug", |r| r.len() >= 16 + 8);
    assert_eq!(with_field(&all, "temperature").len(), 2 + 1 + 2);
    d.wait_until("permit join works again", WAIT, |d| {
        admin(d, "POST", "/api/v1/zigbee/permit-join", r#"{"duration":5}"#).status == 200
    });
    assert_eq!(
        sim.wait("permit_join"),
        "permit_join 5 addr_mode=0f dst=fffc"
    );

    // A restart with another channel and PAN id: the stick keeps its network, and the daemon
    // says so instead of logging the config's values.
    d.terminate(Duration::from_secs(15));
    let config = outpost_e2e::daemon::write_config(
        dir.path(),
        &extra
            .replace("channel = 15", "channel = 20")
            .replace("pan_id = 0x1a62", "pan_id = 0x2222"),
    );
    let mut d = Daemon::start_with(&config, d.data_dir.clone());
    sim.wait("resumed");
    let up = log_fields(&d.wait_for_log("Zigbee network up", WAIT));
    assert_eq!(
        (&up["channel"], &up["pan_id"]),
        (&15.into(), &"0x1a62".into()),
        "{up}"
    );
    let warned = log_fields(&d.wait_for_log("keeps the network it has", WAIT));
    assert_eq!(
        (&warned["config_channel"], &warned["config_pan_id"]),
        (&20.into(), &"0x2222".into()),
        "{warned}"
    );
    let details = driver_details(&mut d);
    assert_eq!(details["channel"], "15", "{details}");
    assert_eq!(details["pan_id"], "0x1a62", "{details}");
    sim.kill();
    d.terminate(Duration::from_secs(15));
}

/// The fields of a JSON log line.
fn log_fields(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// The `details` of subsystem `driver/zb` in `/api/v1/status`, once the driver reports them.
fn driver_details(d: &mut Daemon) -> Value {
    let mut details = Value::Null;
    d.wait_until("driver details in the status", WAIT, |d| {
        details = d
            .status()
            .get("subsystems")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().find(|s| s["name"] == "driver/zb"))
            .map(|s| s["details"].clone())
            .unwrap_or(Value::Null);
        details.get("channel").is_some()
    });
    details
}

#[test]
fn permit_join_without_zigbee_driver_is_409() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &admin_token_config());
    let r = admin(
        &d,
        "POST",
        "/api/v1/zigbee/permit-join",
        r#"{"duration":"60s"}"#,
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["error"], "no_zigbee_driver");
}
