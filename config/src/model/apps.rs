//! `[apps]`: local app containers run by Outpost on a Docker-compatible engine, and
//! `[[apps.app]]`, the apps declared in the file (more can be added through the API).
//!
//! Like the rest of the model: every field has a default documented on it; ranges, names,
//! mounts and ports are checked by `validate.rs` (also for apps posted to the API, through
//! [`AppConfig::problems`]).

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Config;
use crate::path::KeyPath;
use crate::units::ByteSize;
use crate::validate::{Checker, root};

deserialize_from_str!(RestartPolicy {
    "always" => Always,
    "on-failure" => OnFailure,
    "never" => Never,
});

/// What Outpost does when an app's container exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart it whatever the exit code (with backoff and crash-loop detection).
    #[default]
    Always,
    /// Restart it only after a non-zero exit code, at most `max_retries` times.
    OnFailure,
    /// Leave it stopped.
    Never,
}

/// `[apps]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [apps] table")]
pub struct AppsConfig {
    /// Run the apps subsystem. Default `false`: no engine is contacted.
    pub enabled: bool,
    /// The engine's API socket: Docker's, or Podman's Docker-compatible one
    /// (`/run/podman/podman.sock`). Default `"/var/run/docker.sock"`.
    pub engine_socket: PathBuf,
    /// Pull an image that is not present locally. Default `false`: only local images run.
    pub pull: bool,
    /// Host directory under which app mounts must lie. Default `"/var/lib/outpost/apps"`.
    pub allowed_mount_root: PathBuf,
    /// Consecutive fast failures (a container that exits within `crash_loop_window` of its
    /// start) after which an app is FAILED and not restarted (also not after a daemon restart)
    /// until its spec changes or it is restarted through the API. Default 5; 1 to 100.
    pub crash_loop_failures: u32,
    /// A container that exits sooner than this after starting counts as a fast failure.
    /// Default `"30s"`; 1s to 1h.
    #[serde(with = "crate::units::duration")]
    pub crash_loop_window: Duration,
    /// Longest pause between restarts (the pause doubles from 250ms). Default `"30s"`;
    /// 1s to 10m.
    #[serde(with = "crate::units::duration")]
    pub restart_backoff_max: Duration,
    /// MQTT filters the apps' bus identities (`app-<name>`) may subscribe to, on top of
    /// `[mqtt.acl] subscribe` (same syntax; `{id}` is `app-<name>`). Default `["devices/+/#"]`:
    /// every device's readings and commands. `[]` gives apps only what every device gets.
    pub bus_subscribe: Vec<String>,
    /// `[[apps.app]]`: apps declared in the file. Default: none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub app: Vec<AppConfig>,
}

impl Default for AppsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            engine_socket: PathBuf::from("/var/run/docker.sock"),
            pull: false,
            allowed_mount_root: PathBuf::from("/var/lib/outpost/apps"),
            crash_loop_failures: 5,
            crash_loop_window: Duration::from_secs(30),
            restart_backoff_max: Duration::from_secs(30),
            bus_subscribe: vec!["devices/+/#".to_owned()],
            app: Vec::new(),
        }
    }
}

/// `[[apps.app]]`: one app container. Also the body of `POST /api/v1/apps`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "an [[apps.app]] table")]
pub struct AppConfig {
    /// Required, unique among apps: 1 to 64 characters a-z, 0-9, _ or -.
    pub name: String,
    /// Required: the image reference, e.g. `"registry.example/filter:1.2"`.
    pub image: String,
    /// Command and arguments replacing the image's default. Default: the image's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Environment as `"KEY=value"`. Keys starting with `OUTPOST_` are reserved. Default: none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Bind mounts as `"/host/path:/container/path"` or `"…:ro"`; the host path must lie
    /// under `apps.allowed_mount_root`. Default: none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<String>,
    /// Published ports as `"host:container"` with an optional `"/tcp"` or `"/udp"`.
    /// Default: none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    /// Memory limit. Default: none; at least 4MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// CPU limit in cores (`0.5` = half a core). Default: none; 0.01 to 256.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// `"always"`, `"on-failure"` or `"never"`. Default `"always"`.
    pub restart: RestartPolicy,
    /// With `restart = "on-failure"`: restarts before the app is FAILED. Default 5; 0 to 1000.
    pub max_retries: u32,
}

/// A parsed `mounts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount<'a> {
    /// Host path.
    pub source: &'a str,
    /// Path in the container.
    pub target: &'a str,
    /// Mounted read-only.
    pub read_only: bool,
}

/// A parsed `ports` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port {
    /// Host port.
    pub host: u16,
    /// Container port.
    pub container: u16,
    /// `true` for UDP.
    pub udp: bool,
}

impl AppConfig {
    /// Parses one `mounts` entry.
    pub fn parse_mount(text: &str) -> Result<Mount<'_>, String> {
        let mut parts = text.split(':');
        let (Some(source), Some(target)) = (parts.next(), parts.next()) else {
            return Err(format!(
                "invalid mount \"{text}\": use \"/host/path:/container/path\" with an optional \":ro\""
            ));
        };
        let read_only = match parts.next() {
            None | Some("rw") => false,
            Some("ro") => true,
            Some(other) => {
                return Err(format!(
                    "invalid mount \"{text}\": unknown option \"{other}\" (use \"ro\" or \"rw\")"
                ));
            }
        };
        if parts.next().is_some() {
            return Err(format!("invalid mount \"{text}\": too many ':'"));
        }
        for (what, path) in [("host", source), ("container", target)] {
            if !clean_absolute(Path::new(path)) {
                return Err(format!(
                    "invalid mount \"{text}\": the {what} path must be absolute, without \"..\""
                ));
            }
        }
        Ok(Mount {
            source,
            target,
            read_only,
        })
    }

    /// Parses one `ports` entry.
    pub fn parse_port(text: &str) -> Result<Port, String> {
        let bad = || {
            format!(
                "invalid port \"{text}\": use \"host:container\" (1 to 65535), optionally \"/udp\""
            )
        };
        let (ports, udp) = match text.split_once('/') {
            None | Some((_, "tcp")) => (text.split('/').next().unwrap_or(text), false),
            Some((ports, "udp")) => (ports, true),
            Some(_) => return Err(bad()),
        };
        let (host, container) = ports.split_once(':').ok_or_else(bad)?;
        let parse = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad);
        Ok(Port {
            host: parse(host)?,
            container: parse(container)?,
            udp,
        })
    }

    /// Every problem of this app on its own, as `(key, message)`, given the allowed mount root.
    /// The name's uniqueness is the caller's business.
    pub fn problems(&self, mount_root: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut push = |key: String, message: String| out.push((key, message));
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        {
            push(
                "name".into(),
                format!(
                    "invalid app name \"{}\": use 1 to 64 characters a-z, 0-9, _ or -",
                    self.name
                ),
            );
        }
        if self.image.trim().is_empty() || self.image.chars().any(char::is_whitespace) {
            push(
                "image".into(),
                format!("missing or invalid image reference \"{}\"", self.image),
            );
        }
        for (i, entry) in self.env.iter().enumerate() {
            match entry.split_once('=') {
                Some((key, _)) if !key.is_empty() && !key.starts_with("OUTPOST_") => {}
                Some((key, _)) if key.starts_with("OUTPOST_") => push(
                    format!("env[{i}]"),
                    format!("\"{key}\" is reserved: Outpost sets the OUTPOST_ variables"),
                ),
                _ => push(
                    format!("env[{i}]"),
                    format!("invalid environment entry \"{entry}\": use \"KEY=value\""),
                ),
            }
        }
        for (i, entry) in self.mounts.iter().enumerate() {
            match Self::parse_mount(entry) {
                Ok(m) if !Path::new(m.source).starts_with(mount_root) => push(
                    format!("mounts[{i}]"),
                    format!(
                        "host path \"{}\" is not under apps.allowed_mount_root \"{}\"",
                        m.source,
                        mount_root.display()
                    ),
                ),
                Ok(_) => {}
                Err(e) => push(format!("mounts[{i}]"), e),
            }
        }
        for (i, entry) in self.ports.iter().enumerate() {
            if let Err(e) = Self::parse_port(entry) {
                push(format!("ports[{i}]"), e);
            }
        }
        if let Some(memory) = self.memory
            && memory < ByteSize::mib(4)
        {
            push(
                "memory".into(),
                format!("must be at least 4MiB, found {memory}"),
            );
        }
        if let Some(cpus) = self.cpus
            && !(0.01..=256.0).contains(&cpus)
        {
            push(
                "cpus".into(),
                format!("must be between 0.01 and 256, found {cpus}"),
            );
        }
        if self.max_retries > 1000 {
            push(
                "max_retries".into(),
                format!("must be between 0 and 1000, found {}", self.max_retries),
            );
        }
        out
    }
}

/// Absolute, and no `..` or `.` components (so a prefix check cannot be escaped).
fn clean_absolute(path: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

// Validation of this section: called by `crate::validate::check`, which holds the shared
// helpers (`problem`, `range`, `name`, ...).

impl Checker {
    pub(crate) fn apps(&mut self, config: &Config) {
        let apps = root("apps");
        let a = &config.apps;
        self.range(
            apps.key("crash_loop_failures"),
            a.crash_loop_failures,
            1,
            100,
        );
        self.duration_range(
            apps.key("crash_loop_window"),
            a.crash_loop_window,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        );
        self.duration_range(
            apps.key("restart_backoff_max"),
            a.restart_backoff_max,
            Duration::from_secs(1),
            Duration::from_secs(600),
        );
        for (key, path) in [
            ("engine_socket", &a.engine_socket),
            ("allowed_mount_root", &a.allowed_mount_root),
        ] {
            if !path.is_absolute() {
                self.problem(
                    apps.key(key),
                    format!("must be an absolute path, found \"{}\"", path.display()),
                );
            }
        }
        for (i, pattern) in a.bus_subscribe.iter().enumerate() {
            if let Err(e) = crate::model::check_acl_pattern(pattern) {
                self.problem(apps.key("bus_subscribe").index(i), e);
            }
        }
        let mut seen: HashMap<&str, KeyPath> = HashMap::new();
        for (i, app) in a.app.iter().enumerate() {
            let path = apps.key("app").index(i);
            for (key, message) in app.problems(&a.allowed_mount_root) {
                let key_path = match key.split_once('[') {
                    Some((k, rest)) => path
                        .key(k)
                        .index(rest.trim_end_matches(']').parse().unwrap_or(0)),
                    None => path.key(&key),
                };
                self.problem(key_path, message);
            }
            if let Some(first) = seen.get(app.name.as_str()) {
                let message = format!("duplicate app name \"{}\"", app.name);
                self.duplicate(path.key("name"), message, first.clone());
            } else {
                seen.insert(&app.name, path.key("name"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_and_ports_parse() {
        assert_eq!(
            AppConfig::parse_mount("/a/b:/data:ro"),
            Ok(Mount {
                source: "/a/b",
                target: "/data",
                read_only: true
            })
        );
        assert!(AppConfig::parse_mount("/a/../etc:/data").is_err());
        assert!(AppConfig::parse_mount("rel:/data").is_err());
        assert_eq!(
            AppConfig::parse_port("8081:80/udp"),
            Ok(Port {
                host: 8081,
                container: 80,
                udp: true
            })
        );
        assert!(AppConfig::parse_port("0:80").is_err());
        assert!(AppConfig::parse_port("80").is_err());
    }

    #[test]
    fn mounts_outside_the_root_are_refused() {
        let app = AppConfig {
            name: "f".into(),
            image: "i:1".into(),
            mounts: vec!["/var/lib/outpost/apps/f:/data".into(), "/etc:/etc".into()],
            env: vec!["OUTPOST_X=1".into(), "A=1".into()],
            ..AppConfig::default()
        };
        let found = app.problems(Path::new("/var/lib/outpost/apps"));
        let keys: Vec<_> = found.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["env[0]", "mounts[1]"], "{found:?}");
    }

    #[test]
    fn bus_subscribe_defaults_to_every_device_and_is_checked() {
        assert_eq!(AppsConfig::default().bus_subscribe, ["devices/+/#"]);
        let found = match crate::from_toml_str("[apps]\nbus_subscribe = [\"ok/+\", \"a/#/b\"]\n") {
            Ok(_) => Vec::new(),
            Err(e) => e.problems().iter().map(ToString::to_string).collect(),
        };
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("apps.bus_subscribe[1]"), "{found:?}");
    }
}
