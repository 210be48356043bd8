//! Starting the real `outpost` binary and talking to it.

#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code, no async runtime here

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::outpost_bin;

/// A running daemon with JSON logs captured from stderr.
pub struct Daemon {
    child: Child,
    /// The admin listener's address, read from the daemon's log.
    pub admin: SocketAddr,
    /// The data directory (`outbox.db` lives here).
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
    /// Set by the log reader at the end of the daemon's stderr: after an exit, every line is in
    /// `logs` once this is set ([`Daemon::settle_logs`]).
    log_eof: Arc<AtomicBool>,
}

/// Writes a config into `dir/outpost.toml`: data under `dir/data`, admin, CoAP and MQTT on
/// ephemeral loopback ports, JSON logs, then `extra` TOML appended verbatim. When `extra` has its
/// own `[coap]` or `[mqtt]` table it must set `listen` itself (TOML forbids a table twice).
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let data_dir = dir.join("data");
    let coap = if extra.contains("[coap]") {
        ""
    } else {
        "[coap]\nlisten = \"127.0.0.1:0\"\n\n"
    };
    let mqtt = if extra.contains("[mqtt]") {
        ""
    } else {
        "[mqtt]\nlisten = \"127.0.0.1:0\"\n\n"
    };
    let text = format!(
        "[gateway]\ndata_dir = \"{}\"\nshutdown_grace = \"10s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [log]\nformat = \"json\"\nlevel = \"info\"\n\n{coap}{mqtt}{extra}\n",
        data_dir.display()
    );
    let path = dir.join("outpost.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

impl Daemon {
    /// Starts `outpost run` on a config written by [`write_config`] and waits until it is ready.
    pub fn start(dir: &Path, extra: &str) -> Daemon {
        let config_path = write_config(dir, extra);
        Self::start_with(&config_path, dir.join("data"))
    }

    pub fn start_with(config_path: &Path, data_dir: PathBuf) -> Daemon {
        Self::start_with_env(config_path, data_dir, &[])
    }

    /// Like [`Daemon::start_with`], with extra environment variables for the daemon.
    pub fn start_with_env(config_path: &Path, data_dir: PathBuf, env: &[(&str, &str)]) -> Daemon {
        Self::start_binary(&outpost_bin(), config_path, data_dir, env)
    }

    /// Like [`Daemon::start`], running the `outpost` binary `bin` (another build, for a
    /// benchmark's before/after).
    pub fn start_other(bin: &Path, dir: &Path, extra: &str) -> Daemon {
        let config_path = write_config(dir, extra);
        Self::start_binary(bin, &config_path, dir.join("data"), &[])
    }

    fn start_binary(
        bin: &Path,
        config_path: &Path,
        data_dir: PathBuf,
        env: &[(&str, &str)],
    ) -> Daemon {
        let mut command = Command::new(bin);
        command.arg("run").arg("--config").arg(config_path);
        Self::start_command(command, env, config_path, data_dir)
    }

    /// Starts the daemon with `command` (which must end up `exec`ing `outpost run`, so the pid
    /// is the daemon's) and the environment variables `env`, and waits until it is ready.
    /// `config_path` is the file it reads.
    pub fn start_command(
        mut command: Command,
        env: &[(&str, &str)],
        config_path: &Path,
        data_dir: PathBuf,
    ) -> Daemon {
        let mut child = command
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn outpost");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let log_eof = Arc::new(AtomicBool::new(false));
        let stderr = child.stderr.take().expect("stderr");
        let (sink, eof) = (Arc::clone(&logs), Arc::clone(&log_eof));
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
            eof.store(true, Ordering::Release);
        });
        let mut daemon = Daemon {
            child,
            admin: "0.0.0.0:0".parse().expect("addr"),
            data_dir,
            config_path: config_path.to_path_buf(),
            logs,
            log_eof,
        };
        let bound = daemon.wait_for_log("Admin listener bound", Duration::from_secs(30));
        let v: serde_json::Value = serde_json::from_str(&bound).expect("json log line");
        daemon.admin = v["addr"]
            .as_str()
            .expect("addr field")
            .parse()
            .expect("socket addr");
        daemon.wait_for_log("Outpost ready", Duration::from_secs(30));
        daemon
    }

    /// The address a listener bound, from its log line `<what> listener bound` (e.g. `"MQTT"`,
    /// `"HTTP ingestion"`); waits up to 10 s for it.
    pub fn listener(&mut self, what: &str) -> SocketAddr {
        let line = self.wait_for_log(&format!("{what} listener bound"), Duration::from_secs(10));
        let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
        v["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits for a log line containing `needle`; panics with the log on timeout or exit.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.settle_logs();
                if let Some(line) = self.logs().into_iter().find(|l| l.contains(needle)) {
                    return line;
                }
                panic!(
                    "outpost exited ({status}) before logging {needle:?}:\n{}",
                    self.logs().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "no log line {needle:?} within {timeout:?}:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until at least `n` log lines contain `needle` (the log is read by another thread),
    /// then returns how many do: a test expecting exactly `n` compares the count.
    pub fn count_log_lines(&mut self, needle: &str, n: usize, timeout: Duration) -> usize {
        let count = |d: &Daemon| d.logs().iter().filter(|l| l.contains(needle)).count();
        self.wait_until(&format!("{n} log lines {needle:?}"), timeout, |d| {
            count(d) >= n
        });
        count(self)
    }

    /// `GET path` on the admin listener: (status code, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path)
    }

    /// Any request on the admin listener, with extra headers and a body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> crate::http::Response {
        crate::http::request(self.admin, method, path, headers, body)
    }

    /// `POST path` with a JSON body (empty for none) and `Authorization: Bearer <token>` when
    /// `token` is not empty.
    pub fn post(&self, path: &str, token: &str, json: &str) -> crate::http::Response {
        self.json_request("POST", path, token, json)
    }

    /// `PATCH path` with a JSON body, like [`Daemon::post`].
    pub fn patch(&self, path: &str, token: &str, json: &str) -> crate::http::Response {
        self.json_request("PATCH", path, token, json)
    }

    /// `DELETE path`, like [`Daemon::post`] without a body.
    pub fn delete(&self, path: &str, token: &str) -> crate::http::Response {
        self.json_request("DELETE", path, token, "")
    }

    /// `GET path` with a bearer token, like [`Daemon::post`].
    pub fn get_with_token(&self, path: &str, token: &str) -> crate::http::Response {
        self.json_request("GET", path, token, "")
    }

    fn json_request(
        &self,
        method: &str,
        path: &str,
        token: &str,
        json: &str,
    ) -> crate::http::Response {
        let auth = format!("Bearer {token}");
        let mut headers = Vec::new();
        if !token.is_empty() {
            headers.push(("Authorization", auth.as_str()));
        }
        if !json.is_empty() {
            headers.push(("Content-Type", "application/json"));
        }
        self.request(method, path, &headers, json.as_bytes())
    }

    /// The value of an un-labelled metric from `/metrics` (0 if absent).
    pub fn metric(&self, name: &str) -> f64 {
        let (code, body) = self.get("/metrics");
        assert_eq!(code, 200, "/metrics: {body}");
        metric_value(&body, name).unwrap_or(0.0)
    }

    /// The subsystem `name` of the status document; panics if there is none.
    pub fn subsystem(&self, name: &str) -> serde_json::Value {
        let status = self.status();
        status["subsystems"]
            .as_array()
            .and_then(|all| all.iter().find(|s| s["name"] == name).cloned())
            .unwrap_or_else(|| panic!("no subsystem {name} in {status}"))
    }

    pub fn status(&self) -> serde_json::Value {
        let (code, body) = self.get("/api/v1/status");
        assert_eq!(code, 200, "/api/v1/status: {body}");
        serde_json::from_str(&body).expect("status json")
    }

    /// Polls `check` every 50 ms until it returns true; panics after `timeout`.
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Daemon) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !check(self) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "outpost exited ({status}) while waiting for {what}:\n{}",
                    self.logs().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits for the exit: (status, time from signal to exit).
    pub fn terminate(&mut self, timeout: Duration) -> (ExitStatus, Duration) {
        let t0 = Instant::now();
        signal(self.child.id(), rustix::process::Signal::TERM);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let took = t0.elapsed();
                self.settle_logs();
                return (status, took);
            }
            if t0.elapsed() > timeout {
                let _ = self.child.kill();
                panic!(
                    "outpost did not exit within {timeout:?} of SIGTERM:\n{}",
                    self.logs().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.settle_logs();
    }

    /// Whether the daemon still runs; once it does not, its last log lines are in.
    pub fn is_running(&mut self) -> bool {
        let running = matches!(self.child.try_wait(), Ok(None));
        if !running {
            self.settle_logs();
        }
        running
    }

    /// After an exit: waits (up to 5 s) until the log reader has read the daemon's stderr to
    /// its end, so a check of the last lines cannot race the reader. A process the daemon
    /// started may hold stderr open longer: then whatever was read by then counts.
    fn settle_logs(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.log_eof.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // No wait for the log reader: nothing reads the logs any more.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `kB` figure of `/proc/<pid>/status` (`"VmRSS"`, `"VmHWM"`), in KiB; 0 if the process is
/// gone.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|l| {
                l.strip_prefix(field)
                    .and_then(|v| v.strip_prefix(':'))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

pub fn signal(pid: u32, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    rustix::process::kill_process(pid, signal).expect("kill");
}

/// A minimal HTTP/1.1 GET with `Connection: close`.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (code, body)
}

/// Parses `name value` from a Prometheus text exposition.
pub fn metric_value(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key == name).then(|| value.parse().ok()).flatten()
    })
}

/// Runs the outpost CLI with `args`: (exit code, stdout, stderr).
pub fn outpost_cli(args: &[&str]) -> (i32, String, String) {
    outpost_cli_env(args, &[])
}

/// Like [`outpost_cli`] with environment variables (`OUTPOST_API_TOKEN`: tokens are never
/// command-line arguments).
pub fn outpost_cli_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(outpost_bin())
        .args(args)
        .env_remove("OUTPOST_CONFIG")
        .env_remove("OUTPOST_API_TOKEN")
        .env_remove("OUTPOST_API_TOKEN_FILE")
        .env_remove("OUTPOST_CA_FILE")
        .envs(env.iter().copied())
        .output()
        .expect("run outpost");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// CPU time (user + system, all threads) a process has used, in seconds: the benchmarks' "CPU"
/// figures. `/proc` reports it in USER_HZ clock ticks, 100 per second on Linux whatever the
/// kernel's own tick rate.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    Ok(stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)?.1)
}

/// CPU time per thread name (threads of one name summed, digits dropped: `tokio-runtime-w`,
/// `rdk:broker`), in seconds: where a benchmark's CPU went. Threads that ended are not counted.
pub fn thread_cpu_seconds(pid: u32) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let mut by_name = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(stat) = std::fs::read_to_string(task?.path().join("stat")) else {
            continue; // ended meanwhile
        };
        let (name, cpu) = stat_cpu(&stat)?;
        let name: String = name.chars().filter(|c| !c.is_ascii_digit()).collect();
        *by_name.entry(name).or_insert(0.0) += cpu;
    }
    Ok(by_name)
}

/// The command name and CPU seconds of a `/proc/.../stat` line.
fn stat_cpu(stat: &str) -> anyhow::Result<(String, f64)> {
    use anyhow::Context;
    // Fields after the command name (which is in parentheses and may contain spaces): state is
    // field 3, utime and stime fields 14 and 15.
    let (head, rest) = stat.rsplit_once(')').context("/proc/<pid>/stat")?;
    let name = head.split_once('(').map_or("", |(_, n)| n).to_owned();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i - 3)
            .context("/proc/<pid>/stat field")?
            .parse::<u64>()? as f64)
    };
    Ok((name, (ticks(14)? + ticks(15)?) / 100.0))
}
