//! Checks the files in `systemd/` with systemd's own tools, so a typo in a directive, a wrong
//! section or a bad sysusers/tmpfiles line fails here rather than on a gateway.
//!
//! `systemd-analyze verify` also checks that every `Exec*=` binary exists. The unit names the
//! installed path `/usr/bin/outpost`, so the test verifies a copy in which that path is replaced
//! by a stand-in that always exists (`true`, else this test executable). Verify only checks that
//! the file is executable, never runs it, so the real `outpost` binary would prove nothing more
//! and would make this test depend on `cargo build --bins` having run first. Whether the unit's
//! command lines match the CLI is for the CLI's own tests.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outpost_e2e::{outpost_bin, require_command};

/// Where the unit expects the binary once installed.
const INSTALLED_BIN: &str = "/usr/bin/outpost";
/// The daemon's default shutdown grace; TimeoutStopSec must leave it room.
const DAEMON_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn systemd_dir() -> PathBuf {
    outpost_e2e::manifest_dir().join("../systemd")
}

fn read(name: &str) -> String {
    let path = systemd_dir().join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// An executable that exists on every machine the tests run on.
fn stand_in_binary() -> PathBuf {
    ["/usr/bin/true", "/bin/true"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| std::env::current_exe().expect("path of the test executable"))
}

/// `(section, key) -> values` of a unit file, in file order. Enough of the syntax for our unit:
/// comments, sections, `Key=value`; no line continuations.
fn directives(unit: &str) -> HashMap<(String, String), Vec<String>> {
    let mut section = String::new();
    let mut map: HashMap<(String, String), Vec<String>> = HashMap::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "line continuations are not expected: {line}"
        );
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((key, value)) = line.split_once('=') {
            map.entry((section.clone(), key.trim().to_owned()))
                .or_default()
                .push(value.trim().to_owned());
        } else {
            panic!("not a section or a directive: {line}");
        }
    }
    map
}

/// The last value of `[section] key`, which is the one systemd uses for single-valued keys.
fn value<'a>(d: &'a HashMap<(String, String), Vec<String>>, section: &str, key: &str) -> &'a str {
    d.get(&(section.to_owned(), key.to_owned()))
        .and_then(|v| v.last())
        .unwrap_or_else(|| panic!("outpost.service has no [{section}] {key}="))
}

/// Parses the systemd time spans this unit uses: "20s", "10min", "1min 30s", "500ms", "20".
fn time_span(span: &str) -> Duration {
    span.split_whitespace()
        .map(|part| {
            let split = part
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(part.len());
            let (number, unit) = part.split_at(split);
            let n: u64 = number
                .parse()
                .unwrap_or_else(|_| panic!("bad time span {span:?}"));
            match unit {
                "ms" => Duration::from_millis(n),
                "" | "s" | "sec" => Duration::from_secs(n),
                "min" | "m" => Duration::from_secs(n * 60),
                _ => panic!("unexpected unit in time span {span:?}"),
            }
        })
        .sum()
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let analyze = require_command("systemd-analyze");
    let unit = read("outpost.service");
    assert!(
        unit.contains(INSTALLED_BIN),
        "outpost.service should run {INSTALLED_BIN}"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("outpost.service");
    let stand_in = stand_in_binary();
    fs::write(
        &copy,
        unit.replace(INSTALLED_BIN, &stand_in.to_string_lossy()),
    )
    .expect("write unit copy");

    let out = Command::new(&analyze)
        .args(["verify", "--man=no"])
        .arg(&copy)
        .env("SYSTEMD_LOG_COLOR", "0")
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", analyze.display()));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Messages about our unit name its file or the unit; anything else (say, a warning in an
    // unrelated installed unit that ours is ordered after) is shown but is not ours to fix.
    let copy_path = copy.to_string_lossy();
    let ours: Vec<&str> = printed
        .lines()
        .filter(|l| l.contains(copy_path.as_ref()) || l.contains("outpost.service"))
        .collect();
    if ours.is_empty() && !printed.trim().is_empty() {
        eprintln!("systemd-analyze verify printed, about other units:\n{printed}");
    }
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify rejects systemd/outpost.service ({}; {} stood in for {INSTALLED_BIN}):\n{}",
        out.status,
        stand_in.display(),
        if ours.is_empty() {
            printed.clone()
        } else {
            ours.join("\n")
        },
    );
}

#[test]
fn unit_is_notify_with_watchdog_and_config_check() {
    let d = directives(&read("outpost.service"));

    assert_eq!(value(&d, "Service", "Type"), "notify");
    assert_eq!(value(&d, "Service", "NotifyAccess"), "main");
    assert!(
        time_span(value(&d, "Service", "WatchdogSec")) > Duration::ZERO,
        "WatchdogSec must enable the watchdog"
    );

    let start = value(&d, "Service", "ExecStart");
    let config = start
        .split_whitespace()
        .skip_while(|arg| *arg != "--config")
        .nth(1)
        .unwrap_or_else(|| panic!("ExecStart should pass --config: {start}"));
    assert!(
        start.starts_with(&format!("{INSTALLED_BIN} run ")),
        "ExecStart: {start}"
    );
    let pre = d
        .get(&("Service".to_owned(), "ExecStartPre".to_owned()))
        .expect("outpost.service should have ExecStartPre=");
    let check = format!("{INSTALLED_BIN} check-config {config}");
    assert!(
        pre.iter().any(|p| p == &check),
        "an ExecStartPre= should be `{check}` (the config ExecStart uses), found {pre:?}"
    );

    let stop = time_span(value(&d, "Service", "TimeoutStopSec"));
    assert!(
        stop > DAEMON_SHUTDOWN_GRACE,
        "TimeoutStopSec ({stop:?}) must exceed the daemon's {DAEMON_SHUTDOWN_GRACE:?} shutdown \
         grace, or systemd kills it while it flushes the outbox"
    );
    assert_eq!(value(&d, "Service", "StateDirectory"), "outpost");
    assert_eq!(value(&d, "Service", "User"), "outpost");

    // Serial sensors must stay reachable under the hardening.
    assert!(
        d.get(&("Service".to_owned(), "PrivateDevices".to_owned()))
            .is_none_or(|v| v.last().is_some_and(|v| v == "no")),
        "PrivateDevices=yes would hide the serial ports"
    );
    assert_eq!(value(&d, "Service", "DevicePolicy"), "closed");
    let allowed = &d[&("Service".to_owned(), "DeviceAllow".to_owned())];
    for driver in ["char-ttyUSB", "char-ttyACM", "char-ttyS", "char-ttyAMA"] {
        assert!(
            allowed
                .iter()
                .any(|a| a.split_whitespace().eq([driver, "rw"])),
            "DeviceAllow should grant `{driver} rw`, has {allowed:?}"
        );
    }
    assert!(
        value(&d, "Service", "SupplementaryGroups")
            .split_whitespace()
            .any(|g| g == "dialout")
    );
}

/// The unit must not restart a daemon that refused its config: the exit status `outpost` uses
/// for that has to be listed in RestartPreventExitStatus=. Runs the real binary.
#[test]
fn invalid_config_exit_status_is_not_restarted() {
    let d = directives(&read("outpost.service"));
    let prevented: Vec<i32> = value(&d, "Service", "RestartPreventExitStatus")
        .split_whitespace()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("not a number in RestartPreventExitStatus: {s}"))
        })
        .collect();

    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("outpost.toml");
    fs::write(&config, "[gateway\n").expect("write config");
    let bin = outpost_bin();
    for args in [&["check-config"][..], &["run", "--config"][..]] {
        let out = Command::new(&bin)
            .args(args)
            .arg(&config)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("OUTPOST_CONFIG")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let code = out.status.code();
        assert!(
            code.is_some_and(|c| c != 0 && prevented.contains(&c)),
            "`outpost {} <invalid config>` exited with {:?}, which RestartPreventExitStatus={:?} \
             does not list, so systemd would restart it in a loop. stderr:\n{}",
            args.join(" "),
            code,
            prevented,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A scratch root with the groups every Debian system has, for sysusers/tmpfiles `--root`.
fn scratch_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("temp dir");
    let etc = root.path().join("etc");
    fs::create_dir(&etc).expect("mkdir etc");
    fs::write(etc.join("passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("write passwd");
    fs::write(etc.join("group"), "root:x:0:\ndialout:x:20:\n").expect("write group");
    root
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{printed}",
        out.status
    );
    printed
}

fn sysusers_into(root: &Path) {
    let sysusers = require_command("systemd-sysusers");
    run_ok(
        Command::new(sysusers)
            .arg("--root")
            .arg(root)
            .arg(systemd_dir().join("outpost.sysusers")),
    );
}

#[test]
fn sysusers_creates_outpost_in_dialout() {
    let root = scratch_root();
    sysusers_into(root.path());

    let passwd = fs::read_to_string(root.path().join("etc/passwd")).expect("read passwd");
    let user = passwd
        .lines()
        .find(|l| l.starts_with("outpost:"))
        .unwrap_or_else(|| panic!("no outpost user created:\n{passwd}"));
    let fields: Vec<&str> = user.split(':').collect();
    assert!(
        fields[2]
            .parse::<u32>()
            .is_ok_and(|uid| uid > 0 && uid < 1000),
        "not a system user: {user}"
    );
    assert_eq!(
        fields[6], "/usr/sbin/nologin",
        "the daemon's user must not log in: {user}"
    );

    let group = fs::read_to_string(root.path().join("etc/group")).expect("read group");
    let dialout = group
        .lines()
        .find(|l| l.starts_with("dialout:"))
        .unwrap_or_else(|| panic!("dialout group disappeared:\n{group}"));
    assert_eq!(
        dialout, "dialout:x:20:outpost",
        "outpost should join the existing dialout group"
    );
    assert!(
        group.lines().any(|l| l.starts_with("outpost:")),
        "no outpost group:\n{group}"
    );
}

#[test]
fn tmpfiles_creates_private_config_and_state_dirs() {
    let root = scratch_root();
    let euid = fs::metadata("/proc/self").expect("stat /proc/self").uid();
    assert_eq!(
        euid, 0,
        "systemd-tmpfiles must chown to the outpost user, which needs root: run the tests as root \
         (CI and scripts/test.sh do)"
    );
    sysusers_into(root.path());
    let tmpfiles = require_command("systemd-tmpfiles");
    run_ok(
        Command::new(tmpfiles)
            .arg("--root")
            .arg(root.path())
            .arg("--create")
            .arg(systemd_dir().join("outpost.tmpfiles")),
    );

    let group = fs::read_to_string(root.path().join("etc/group")).expect("read group");
    let gid_of = |name: &str| -> u32 {
        group
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:x:")))
            .and_then(|rest| rest.split(':').next())
            .and_then(|gid| gid.parse().ok())
            .unwrap_or_else(|| panic!("no group {name}:\n{group}"))
    };
    let outpost_gid = gid_of("outpost");

    for (path, mode, owner_is_root) in [
        ("etc/outpost", 0o750, true),
        ("etc/outpost/outpost.toml", 0o640, true),
        ("var/lib/outpost", 0o750, false),
    ] {
        let meta = fs::metadata(root.path().join(path)).unwrap_or_else(|e| panic!("/{path}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "mode of /{path}");
        assert_eq!(meta.gid(), outpost_gid, "group of /{path}");
        assert_eq!(
            meta.uid() == 0,
            owner_is_root,
            "owner of /{path} (uid {})",
            meta.uid()
        );
    }
}
