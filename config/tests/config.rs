//! The public contract: examples stay valid and complete, every problem is reported with its
//! key path, and values survive a round trip.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_config::{
    ByteSize, Config, ConfigError, DriverConfig, ModbusConfig, ModbusPointConfig,
    ModbusSlaveConfig, RouteConfig, SerialLineConfig, SerialPortConfig, SimulatorConfig,
    Synchronous, WhenFull, ZigbeeConfig, from_toml_str, load_file,
};

fn examples_dir() -> PathBuf {
    Path::new(&manifest_dir()).join("examples")
}

fn read_example(name: &str) -> String {
    std::fs::read_to_string(examples_dir().join(name)).expect("example exists")
}

/// The problems of an invalid config, rendered as `path: message`.
fn problems(text: &str) -> Vec<String> {
    match from_toml_str(text) {
        Ok(_) => panic!("expected problems in:\n{text}"),
        Err(ConfigError::Invalid { problems, path }) => {
            assert_eq!(path, None);
            problems.iter().map(ToString::to_string).collect()
        }
        Err(other) => panic!("expected Invalid, got {other}"),
    }
}

#[test]
fn every_example_parses_and_validates() {
    let mut seen = 0;
    for entry in std::fs::read_dir(examples_dir()).expect("examples dir") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let config = load_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(config.validate().is_empty());
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected outpost.toml and simulator.toml");
}

#[test]
fn outpost_example_states_the_defaults() {
    let config = from_toml_str(&read_example("outpost.toml")).expect("valid");
    assert_eq!(config, Config::default());
}

/// Uncommenting the example's `# key = value` lines and `# [[table]]` headers gives a valid
/// configuration, so the commented examples are not stale.
#[test]
fn outpost_example_commented_keys_are_valid() {
    let text: String = read_example("outpost.toml")
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if looks_like_toml(rest) => format!("{rest}\n"),
            _ => format!("{line}\n"),
        })
        .collect();
    let config = from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(config.gateway.id.is_some() && config.gateway.data_dir.is_some());
    assert_eq!(config.routes.len(), 1);
    let kinds: Vec<_> = config.drivers.iter().map(DriverConfig::kind).collect();
    assert_eq!(kinds, ["simulator", "serial", "modbus", "zigbee"]);
    let DriverConfig::Simulator(sim) = &config.drivers[0] else {
        panic!("simulator first");
    };
    assert_eq!(sim.max_readings, Some(1000));
    let DriverConfig::Serial(serial) = &config.drivers[1] else {
        panic!("serial second");
    };
    assert_eq!(serial.units.len(), 2);
    let DriverConfig::Modbus(modbus) = &config.drivers[2] else {
        panic!("modbus third");
    };
    assert_eq!(modbus.slaves[0].points[0].unit.as_deref(), Some("kW"));
    let DriverConfig::Zigbee(zigbee) = &config.drivers[3] else {
        panic!("zigbee fourth");
    };
    assert_eq!((zigbee.serial.baud, zigbee.pan_id), (115_200, 0x1a62));
    assert_eq!(
        config.apps.app[0].restart,
        outpost_config::RestartPolicy::OnFailure
    );
}

fn looks_like_toml(line: &str) -> bool {
    let header = line.starts_with('[') && line.ends_with(']');
    let key_value = line.split_once(" = ").is_some_and(|(key, _)| {
        !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    });
    header || key_value
}

/// Every key of the configuration (with all optional keys and one route and one driver of
/// each kind set) appears in outpost.toml under its section, live or commented out.
#[test]
fn outpost_example_documents_every_key() {
    let mut full = Config::default();
    full.gateway.id = Some("gw".into());
    full.gateway.data_dir = Some("/var/lib/outpost".into());
    full.routes.push(RouteConfig {
        name: "r".into(),
        priority: 1,
        when_full: Some(WhenFull::Reject),
    });
    full.drivers.push(DriverConfig::Simulator(SimulatorConfig {
        name: "s".into(),
        max_readings: Some(1),
        ..SimulatorConfig::default()
    }));
    full.drivers.push(DriverConfig::Serial(SerialLineConfig {
        name: "l".into(),
        device_field: Some("id".into()),
        device_id: Some("d".into()),
        timestamp_field: Some("ts".into()),
        units: [("temperature".to_owned(), "Cel".to_owned())].into(),
        ..SerialLineConfig::default()
    }));
    full.drivers.push(DriverConfig::Modbus(ModbusConfig {
        name: "m".into(),
        address: Some("h:502".into()),
        serial: Some(SerialPortConfig::default()),
        slaves: vec![ModbusSlaveConfig {
            device_id: "d".into(),
            unit: 1,
            address: Some("h:502".into()),
            points: vec![ModbusPointConfig {
                unit: Some("kW".into()),
                ..ModbusPointConfig::default()
            }],
        }],
        ..ModbusConfig::default()
    }));
    full.drivers
        .push(DriverConfig::Zigbee(ZigbeeConfig::default()));
    full.apps.app.push(outpost_config::AppConfig {
        command: vec!["x".into()],
        env: vec!["A=1".into()],
        mounts: vec!["/a:/b".into()],
        ports: vec!["1:1".into()],
        memory: Some(ByteSize::mib(64)),
        cpus: Some(0.5),
        ..outpost_config::AppConfig::default()
    });
    let toml::Value::Table(schema) = toml::Value::try_from(&full).expect("serializes") else {
        panic!("config serializes to a table");
    };
    fn walk(prefix: &str, table: &toml::Table, out: &mut BTreeSet<String>) {
        for (key, value) in table {
            let here = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match value {
                toml::Value::Table(t) => walk(&here, t, out),
                toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {
                    for item in items {
                        walk(&here, item.as_table().expect("table"), out);
                    }
                }
                _ => {
                    out.insert(here);
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    walk("", &schema, &mut expected);
    // `[[drivers]]` with one `kind` per element: the kind is written on the header's line.
    expected.insert("drivers.kind".into());

    let mut documented = BTreeSet::new();
    let mut section = String::new();
    for line in read_example("outpost.toml").lines() {
        let line = line.trim_start_matches(['#', ' ']);
        if let Some(name) = line.strip_prefix('[') {
            section = name.trim_matches(['[', ']']).to_owned();
        } else if let Some((key, _)) = line.split_once(" = ") {
            documented.insert(format!("{section}.{key}"));
        }
    }
    let missing: Vec<_> = expected.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "not documented in outpost.toml: {missing:?}"
    );
    assert!(expected.len() > 60, "{expected:?}");
}

#[test]
fn empty_text_gives_the_defaults() {
    let config = from_toml_str("").expect("valid");
    assert_eq!(config, Config::default());
    assert_eq!(config.outbox.max_bytes, ByteSize::gib(1));
    assert_eq!(config.outbox.max_record_bytes.bytes(), 256 * 1024);
    assert_eq!(config.gateway.shutdown_grace, Duration::from_secs(10));
    assert_eq!(config.admin.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(config.outbox.synchronous, Synchronous::Full);
    let routes = config.routes();
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].name, "default");
    assert_eq!(routes[0].when_full, WhenFull::Reject);
}

#[test]
fn three_mistakes_are_all_reported() {
    let found = problems(
        r#"
[gateway]
shutdown_grace = "10 seconds"

[outbox]
max_byts = "2GiB"

[[routes]]
name = "alarms"

[[routes]]
name = "bulk"
when_full = 3

[[drivers]]
kind = "simulator"
name = "sim"
interval = 5
"#,
    );
    assert_eq!(
        found,
        [
            "drivers[0].interval: expected a duration like \"30s\" or \"250ms\", found integer 5",
            "gateway.shutdown_grace: invalid duration \"10 seconds\": missing unit after 10 \
             (use ms, s, m, h or d, e.g. \"10s\")",
            "outbox.max_byts: unknown key `max_byts`, did you mean `max_bytes`?",
            "routes[1].when_full: expected one of \"reject\", \"drop_oldest\", found integer 3",
        ]
    );
}

#[test]
fn unknown_key_without_close_match_lists_valid_keys() {
    let found = problems("[admin]\nport = 8080\n");
    assert_eq!(
        found,
        [
            "admin.port: unknown key `port`; valid keys are `listen`, `socket`, `public_monitoring`, `tls`"
        ]
    );
}

#[test]
fn semantic_problems_are_reported_together() {
    let found = problems(
        r#"
[outbox]
max_bytes = "512KiB"

[[routes]]
name = "alarms"
priority = 12

[[routes]]
name = "alarms"

[[routes]]
priority = 1

[[drivers]]
kind = "simulator"
name = "sim"
route = "alarm"
payload_bytes = 8
"#,
    );
    assert_eq!(
        found,
        [
            "drivers[0].payload_bytes: must be between 16 and outbox.max_record_bytes \
             (262144 = 256KiB), found 8",
            "drivers[0].route: unknown route \"alarm\", did you mean \"alarms\"? \
             (routes: default, alarms)",
            "outbox.max_bytes: must be at least 1MiB, found 512KiB",
            "outbox.max_record_bytes: must be at most a quarter of outbox.max_bytes (128KiB), \
             found 256KiB",
            "routes[0].priority: must be between 0 and 9 (higher is forwarded first), found 12",
            "routes[1].name: duplicate route name \"alarms\" (also routes[0].name)",
            "routes[2].name: missing required key: every route needs a unique name of 1 to 64 \
             characters a-z, 0-9, _ or -",
        ]
    );
}

#[test]
fn driver_without_name_or_kind() {
    let found = problems("[[drivers]]\nkind = \"simulator\"\n[[drivers]]\nname = \"x\"\n");
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(found[0].starts_with("drivers[0].name: missing required key"));
    assert_eq!(
        found[1],
        "drivers[1].kind: missing required key (kinds: \"simulator\", \"serial\", \"modbus\", \
         \"zigbee\")"
    );
}

#[test]
fn syntax_error_has_line_and_column() {
    let err = from_toml_str("[outbox]\nmax_bytes = \"1GiB\"\nwhen_full = reject\n")
        .expect_err("bare word is not TOML");
    let ConfigError::Syntax { path, message } = &err else {
        panic!("expected Syntax, got {err}");
    };
    assert_eq!(*path, None);
    assert!(message.starts_with("line 3, column 13:"), "{message}");
    assert!(
        err.to_string()
            .starts_with("invalid TOML: line 3, column 13:"),
        "{err}"
    );
}

#[test]
fn load_file_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.toml");
    let err = load_file(&missing).expect_err("no such file");
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(
        err.to_string()
            .starts_with(&format!("cannot read config file {}: ", missing.display()))
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[log]\nlevel = \"\"\n[admin]\nlisten = 1\n").expect("write");
    let err = load_file(&bad).expect_err("invalid");
    assert_eq!(
        err.to_string(),
        format!(
            "2 problems in config in {}:\n  admin.listen: expected an address like \
             \"0.0.0.0:8080\" or \"[::1]:8080\", found integer 1\n  log.level: must not be \
             empty; use e.g. \"info\" or \"info,outpost_sync=debug\"",
            bad.display()
        )
    );

    std::fs::write(&bad, "[log\n").expect("write");
    let err = load_file(&bad).expect_err("syntax");
    assert!(
        matches!(&err, ConfigError::Syntax { path: Some(p), .. } if *p == bad),
        "{err}"
    );
}

#[test]
fn sizes_and_durations_round_trip_through_a_file() {
    let text = r#"
[gateway]
shutdown_grace = "1m30s"
[outbox]
max_bytes = "100MB"
min_free_disk = 4096
max_record_bytes = "2kB"
batch_max_delay = "250ms"
[[drivers]]
kind = "simulator"
name = "sim"
interval = "1h30m"
"#;
    let config = from_toml_str(text).expect("valid");
    assert_eq!(config.gateway.shutdown_grace, Duration::from_secs(90));
    assert_eq!(config.outbox.max_bytes, ByteSize(100_000_000));
    assert_eq!(config.outbox.min_free_disk, ByteSize::kib(4));
    assert_eq!(config.outbox.max_record_bytes, ByteSize(2_000));
    assert_eq!(config.outbox.batch_max_delay, Duration::from_millis(250));

    let written = toml::to_string(&config).expect("serializes");
    assert!(written.contains("shutdown_grace = \"1m30s\""), "{written}");
    assert!(written.contains("min_free_disk = \"4KiB\""), "{written}");
    assert!(
        written.contains("max_record_bytes = \"2000B\""),
        "{written}"
    );
    assert_eq!(from_toml_str(&written).expect("reads back"), config);
}

#[test]
fn validate_works_on_a_typed_config() {
    let mut config = Config::default();
    config.outbox.queue_capacity = 0;
    config
        .drivers
        .push(DriverConfig::Simulator(SimulatorConfig {
            name: "s".into(),
            devices: 0,
            ..SimulatorConfig::default()
        }));
    let found: Vec<String> = config.validate().iter().map(ToString::to_string).collect();
    assert_eq!(
        found,
        [
            "drivers[0].devices: must be between 1 and 10000, found 0",
            "outbox.queue_capacity: must be between 1 and 1000000, found 0",
        ]
    );
}

#[test]
fn hardware_drivers_report_every_problem_with_its_path() {
    let found = problems(concat!(
        "[[drivers]]\nkind = \"serial\"\nname = \"l\"\nformat = \"csv\"\n",
        "device_field = \"id\"\ndevice_id = \"x\"\nseparator = \";;\"\n",
        "max_line_bytes = \"2MiB\"\n",
        "[drivers.serial]\ndata_bits = 9\nstop_bits = 3\nparity = \"mark\"\n",
        "[drivers.reopen]\nbackoff_initial = \"1s\"\nbackoff_max = \"100ms\"\n",
        "[[drivers]]\nkind = \"modbus\"\nname = \"m\"\ntransport = \"rtu\"\n",
        "address = \"h:502\"\n",
        "[[drivers.slaves]]\ndevice_id = \"a b\"\nunit = 0\n",
        "[[drivers.slaves.points]]\nname = \"p\"\nfunction = \"coil\"\ndata_type = \"f32\"\n",
        "[[drivers.slaves.points]]\nname = \"p\"\naddress = 65535\ndata_type = \"u32\"\n",
        "scale = 0.0\ninterval = \"1ms\"\n",
        "[[drivers]]\nkind = \"zigbee\"\nname = \"z\"\nchannel = 27\npan_id = 0xffff\n",
        "[drivers.serial]\npath = \"/dev/ttyACM0\"\n",
        "[[drivers]]\nkind = \"serial\"\nname = \"s2\"\ndevice_id = \"x\"\n",
        "[drivers.serial]\npath = \"/dev/ttyACM0\"\n",
    ));
    let expected = [
        "drivers[0].serial.parity: unknown value \"mark\" (expected one of \"none\", \"even\", \
         \"odd\")",
        "drivers[0].serial.path: missing required key",
        "drivers[0].serial.data_bits: must be between 5 and 8, found 9",
        "drivers[0].serial.stop_bits: must be 1 or 2, found 3",
        "drivers[0].reopen.backoff_max: must be between 1s and 1h, found 100ms",
        "drivers[0].device_id: set only one of device_field and device_id",
        "drivers[0].columns: required for format = \"csv\"",
        "drivers[0].separator: must be a single character",
        "drivers[0].max_line_bytes: must be between 16B and 1MiB",
        "drivers[1].serial: required for transport = \"rtu\"",
        "drivers[1].address: only used with transport = \"tcp\"",
        "drivers[1].slaves[0].device_id: invalid device id \"a b\"",
        "drivers[1].slaves[0].unit: must be between 1 and 247, found 0",
        "drivers[1].slaves[0].points[0].data_type: coils and discrete inputs are read as \"bool\"",
        "drivers[1].slaves[0].points[1].name: duplicate point name \"p\"",
        "drivers[1].slaves[0].points[1].address: 65535 plus the value's width passes 65535",
        "drivers[1].slaves[0].points[1].scale: must be finite and not 0, found 0",
        "drivers[1].slaves[0].points[1].interval: must be between 10ms and 1d, found 1ms",
        "drivers[2].channel: must be between 11 and 26, found 27",
        "drivers[2].pan_id: must be between 0x0001 and 0xfffe, found 0xffff",
        "drivers[3].serial.path: serial port /dev/ttyACM0 is already used by another driver \
         (also drivers[2].serial.path)",
    ];
    for prefix in expected {
        assert!(
            found.iter().any(|f| f.starts_with(prefix)),
            "missing {prefix:?} in {found:#?}"
        );
    }
    assert_eq!(found.len(), expected.len(), "{found:#?}");
}

#[test]
fn hardware_driver_defaults() {
    let config = from_toml_str(concat!(
        "[[drivers]]\nkind = \"serial\"\nname = \"l\"\ndevice_id = \"t1\"\n",
        "[drivers.serial]\npath = \"/dev/ttyUSB0\"\n",
        "[[drivers]]\nkind = \"modbus\"\nname = \"m\"\naddress = \"127.0.0.1:502\"\n",
        "[[drivers.slaves]]\ndevice_id = \"meter\"\n",
        "[[drivers.slaves.points]]\nname = \"v\"\n",
    ))
    .expect("valid");
    let DriverConfig::Serial(serial) = &config.drivers[0] else {
        panic!("serial");
    };
    assert_eq!(serial.serial.baud, 9600);
    assert_eq!(serial.max_line_bytes, ByteSize::kib(4));
    assert_eq!(serial.topic_for("t1"), "serial/t1");
    assert_eq!(serial.reopen.backoff_initial, Duration::from_millis(500));
    let DriverConfig::Modbus(modbus) = &config.drivers[1] else {
        panic!("modbus");
    };
    assert_eq!(modbus.slaves[0].unit, 0);
    assert_eq!(modbus.slaves[0].points[0].interval, Duration::from_secs(1));
    assert_eq!(modbus.timeout, Duration::from_millis(500));
}

/// This package's directory, as the test runner reports it when the test runs (cargo and
/// nextest set it): a test binary reused from a build in another checkout must not read that
/// checkout's files, which may be gone.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned())
}
