//! The Debian package on a Debian system: `packaging/deb.sh` builds `outpost_*_amd64.deb` (from
//! the binary under test: the suite's debug build, stripped; the release packages hold the
//! release build and are otherwise identical), and a Debian 12 container built from Debian's
//! packages (`scripts/ensure-docker.sh`, mmdebstrap) with systemd as PID 1 installs it with apt.
//! The container has no network but its own loopback; every client runs inside it.
//!
//! Covered: lintian; install creates the user (in `dialout`), the directories and the config's
//! ownership, enables and starts the unit, which reaches READY under the unit's hardening;
//! `/healthz`; `sudo outpost devices add` over the local socket without a token; `mosquitto_pub`
//! with that device's credentials is stored; an upgrade keeps the data and the edited conffile
//! and restarts the daemon; `systemctl stop` ends cleanly; `remove` keeps data and config,
//! `purge` deletes them and keeps the system user.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use outpost_e2e::{outpost_bin, require_command};

/// The image scripts/ensure-docker.sh builds.
const IMAGE: &str = "outpost-test/debian-systemd:bookworm-1";

/// Runs `program args`; (exit code, stdout, stderr).
fn run(program: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running Debian container with systemd as PID 1; removed on drop.
struct Machine {
    name: String,
}

impl Machine {
    fn boot() -> Machine {
        require_command("docker");
        let (code, _, err) = run("docker", &["image", "inspect", IMAGE]);
        assert_eq!(
            code, 0,
            "no image {IMAGE} ({err}): run `bash scripts/ensure-docker.sh` (it starts the engine \
             and builds the image; `bash scripts/test.sh` runs it)"
        );
        let name = format!("outpost-package-test-{}", std::process::id());
        let _ = run("docker", &["rm", "-f", &name]);
        // systemd needs most capabilities and the cgroup tree; CAP_SYS_RESOURCE is not granted
        // here (so no --privileged). --network none: only the container's own loopback.
        let (code, _, err) = run(
            "docker",
            &[
                "run",
                "-d",
                "--name",
                &name,
                "--cap-add",
                "ALL",
                "--cap-drop",
                "SYS_RESOURCE",
                "--security-opt",
                "seccomp=unconfined",
                "--security-opt",
                "apparmor=unconfined",
                "--network",
                "none",
                "--tmpfs",
                "/run",
                "--tmpfs",
                "/run/lock",
                "-v",
                "/sys/fs/cgroup:/sys/fs/cgroup:rw",
                IMAGE,
                "/lib/systemd/systemd",
            ],
        );
        assert_eq!(code, 0, "docker run: {err}");
        let machine = Machine { name };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, state, _) = machine.exec(&["systemctl", "is-system-running"]);
            if matches!(state.trim(), "running" | "degraded") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "systemd did not finish booting: {state}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        machine
    }

    fn exec(&self, command: &[&str]) -> (i32, String, String) {
        let mut args = vec!["exec", self.name.as_str()];
        args.extend_from_slice(command);
        run("docker", &args)
    }

    /// `sh -c script` inside; panics unless it exits 0; its stdout.
    fn sh(&self, script: &str) -> String {
        let (code, out, err) = self.exec(&["sh", "-c", script]);
        assert_eq!(code, 0, "`{script}` failed ({code}):\n{out}\n{err}");
        out
    }

    fn copy_in(&self, file: &Path) -> String {
        let dest = format!("/tmp/{}", file.file_name().unwrap().to_string_lossy());
        let (code, _, err) = run(
            "docker",
            &[
                "cp",
                file.to_str().unwrap(),
                &format!("{}:{dest}", self.name),
            ],
        );
        assert_eq!(code, 0, "docker cp: {err}");
        dest
    }

    fn main_pid(&self) -> String {
        self.sh("systemctl show -p MainPID --value outpost")
            .trim()
            .to_owned()
    }

    /// The outbox record count from `/metrics` (loopback needs no token).
    fn records(&self) -> String {
        let metrics = self.sh("curl -fsS http://127.0.0.1:8080/metrics");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("outpost_outbox_records "))
            .unwrap_or_else(|| panic!("no outpost_outbox_records in:\n{metrics}"))
            .to_owned()
    }

    fn wait_active(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, state, _) = self.exec(&["systemctl", "is-active", "outpost"]);
            if state.trim() == "active" {
                return;
            }
            assert!(
                Instant::now() < deadline && state.trim() != "failed",
                "outpost did not become active ({}):\n{}",
                state.trim(),
                self.exec(&["journalctl", "-u", "outpost", "--no-pager", "-n", "50"])
                    .1
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = run("docker", &["rm", "-f", &self.name]);
    }
}

/// Builds the amd64 package of the binary under test as `version` into `out`.
fn build_package(out: &Path, version: &str, lintian: bool) -> PathBuf {
    let script = outpost_e2e::manifest_dir().join("../packaging/deb.sh");
    let bin = outpost_bin();
    let mut args = vec![
        script.to_str().unwrap(),
        "x86_64",
        bin.to_str().unwrap(),
        "--deb-version",
        version,
        "--fast",
        "--output",
        out.to_str().unwrap(),
    ];
    if lintian {
        args.push("--lintian");
    }
    let (code, stdout, err) = run("bash", &args);
    assert_eq!(code, 0, "packaging/deb.sh: {err}");
    let deb = PathBuf::from(stdout.lines().last().unwrap_or_default());
    assert!(deb.is_file(), "no package at {}: {err}", deb.display());
    deb
}

#[test]
fn the_package_installs_runs_upgrades_and_purges_on_debian_with_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let first = build_package(dir.path(), "0.1.0-1", true);
    let second = build_package(dir.path(), "0.1.0-2", false);
    let m = Machine::boot();

    // Install: user, directories, config ownership, unit enabled and started (READY: the unit
    // is Type=notify, so "active" means the daemon said READY=1).
    let deb = m.copy_in(&first);
    m.sh(&format!("apt-get install -y -q {deb}"));
    m.wait_active();
    assert_eq!(m.sh("systemctl is-enabled outpost").trim(), "enabled");
    assert!(
        m.sh("id -nG outpost")
            .split_whitespace()
            .any(|g| g == "dialout")
    );
    assert_eq!(
        m.sh("stat -c '%U:%G %a' /etc/outpost /etc/outpost/outpost.toml /var/lib/outpost"),
        "root:outpost 750\nroot:outpost 640\noutpost:outpost 750\n"
    );
    assert_eq!(
        m.sh("ps -o user= -p $(systemctl show -p MainPID --value outpost)")
            .trim(),
        "outpost",
        "the daemon runs as its own user"
    );
    assert_eq!(m.sh("curl -fsS http://127.0.0.1:8080/healthz").trim(), "ok");

    // The first device, as an installer would add it: root, the local socket, no token.
    let added = m.sh("outpost devices add sensor-1");
    let secret = outpost_e2e::admin::secret_in(&added);
    m.sh(&format!(
        "mosquitto_pub -h 127.0.0.1 -p 1883 -u sensor-1 -P {secret} -q 1 \
         -t devices/sensor-1/temp -m '{{\"t\":21.5}}'"
    ));
    assert_eq!(m.records(), "1");

    // The installer edits the config; an upgrade keeps the edit and the data, and restarts.
    m.sh("sed -i 's/^level = \"info\"/level = \"debug\"/' /etc/outpost/outpost.toml");
    m.sh("echo '# edited by the installer' >> /etc/outpost/outpost.toml");
    let pid_before = m.main_pid();
    let deb = m.copy_in(&second);
    m.sh(&format!("apt-get install -y -q {deb}"));
    m.wait_active();
    assert_eq!(
        m.sh("dpkg-query -W -f '${Version}' outpost").trim(),
        "0.1.0-2"
    );
    let config = m.sh("cat /etc/outpost/outpost.toml");
    assert!(
        config.contains("# edited by the installer") && config.contains("level = \"debug\""),
        "the edited conffile was replaced"
    );
    assert_ne!(m.main_pid(), pid_before, "the upgrade restarted the daemon");
    assert_eq!(m.records(), "1", "the outbox survived the upgrade");
    assert!(m.sh("outpost devices show sensor-1").contains("sensor-1"));
    // The edited level applies: a request with an unknown token is a debug line.
    m.sh(
        "curl -s -o /dev/null -H 'Authorization: Bearer nope' http://127.0.0.1:8080/api/v1/devices",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !m
        .sh("journalctl -u outpost --no-pager -o cat")
        .lines()
        .any(|l| l.contains("DEBUG") && l.contains("unknown token"))
    {
        assert!(
            Instant::now() < deadline,
            "the edited log level does not apply"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A clean stop: SIGTERM, drain, exit 0 within the unit's timeout.
    m.sh("systemctl stop outpost");
    assert_eq!(
        m.sh("systemctl show -p Result -p ExecMainStatus outpost"),
        "Result=success\nExecMainStatus=0\n"
    );

    // remove keeps the data and the config; purge deletes them, the user stays.
    m.sh("apt-get remove -y -q outpost");
    m.sh("test -f /var/lib/outpost/outbox.db && test -f /etc/outpost/outpost.toml");
    assert_ne!(m.exec(&["systemctl", "is-active", "outpost"]).0, 0);
    m.sh("apt-get purge -y -q outpost");
    m.sh("test ! -e /var/lib/outpost && test ! -e /etc/outpost");
    m.sh("id outpost");
}
