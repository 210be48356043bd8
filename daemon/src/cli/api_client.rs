//! `outpost devices …`, `outpost apps …`, `outpost dead-letters …` and `outpost token new`: the
//! management API from the command line.
//!
//! `devices`, `apps` and `dead-letters` talk to the *running* daemon through its management API
//! (plain HTTP to the admin listener, blocking `ureq` client), so the daemon stays the only
//! writer of `registry.db` and `outbox.db` and its in-memory state (index, auth cache, outbox
//! figures) stays right. On the gateway the local admin socket is used, no token needed. Else
//! the URL is `--url`, else `admin.listen` of the configuration file (`--config`, else
//! /etc/outpost/outpost.toml when it exists; `0.0.0.0`/`::` become loopback; `https://` with
//! `[admin.tls]`), else `http://127.0.0.1:8080`; the token comes from `$OUTPOST_API_TOKEN` or
//! the file `--token-file` names, never from the command line (visible to every user in `ps`);
//! `--token` is refused with that explanation.
//!
//! `token new` works offline: it prints a fresh random token and the `[[api.tokens]]` entry
//! holding only its SHA-256, so installers never write a clear token into the config.
//!
//! Exit codes: 0 success; 1 the API refused (its JSON error is printed) or is unreachable;
//! 2 bad arguments (no token, bad URL); 78 unreadable config.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::EXIT_CONFIG;
use super::args::{
    ApiArgs, AppsCommand, DeadLettersCommand, DevicesCommand, RulesCommand, Selection, TokenCommand,
};
use super::local_socket::{LocalSocket, Unusable};
use crate::registry::secrets;

/// A failed command: message and exit code.
struct Failure {
    message: String,
    code: u8,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        code,
    }
}

fn finish(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("outpost: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

// ---- token new ------------------------------------------------------------------------------

pub fn token(command: TokenCommand, api: &ApiArgs) -> ExitCode {
    match command {
        TokenCommand::New { name, scopes } => finish(token_new(&name, &scopes, api.json)),
        other => finish(Client::new(api).and_then(|client| run_tokens(&client, other, api.json))),
    }
}

/// `token create|list|revoke` through the API.
fn run_tokens(client: &Client, command: TokenCommand, as_json: bool) -> Result<(), Failure> {
    match command {
        TokenCommand::New { .. } => unreachable!("handled offline"),
        TokenCommand::Create { name, scopes } => {
            let created = client.ok(
                "POST",
                "/api/v1/tokens",
                Some(&json!({ "name": name, "scopes": scopes })),
            )?;
            if as_json {
                println!("{created:#}");
            } else {
                println!(
                    "Token \"{name}\" (shown once; give it to the API client, e.g. as OUTPOST_API_TOKEN):"
                );
                println!();
                println!("    {}", created["token"].as_str().unwrap_or_default());
            }
        }
        TokenCommand::List => {
            let listed = client.ok("GET", "/api/v1/tokens", None)?;
            if as_json {
                println!("{listed:#}");
            } else {
                println!("{:<24} {:<6} {:<7} CREATED BY", "NAME", "SCOPE", "SOURCE");
                for t in listed["tokens"].as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:<6} {:<7} {}",
                        t["name"].as_str().unwrap_or_default(),
                        t["scope"].as_str().unwrap_or_default(),
                        t["source"].as_str().unwrap_or_default(),
                        t["created_by"].as_str().unwrap_or("-"),
                    );
                }
            }
        }
        TokenCommand::Revoke { name } => {
            client.ok("DELETE", &format!("/api/v1/tokens/{}", encode(&name)), None)?;
            if !as_json {
                println!("Token \"{name}\" revoked.");
            }
        }
    }
    Ok(())
}

fn token_new(name: &str, scopes: &[String], as_json: bool) -> Result<(), Failure> {
    let name_ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !name_ok {
        return Err(fail(2, "--name must be 1 to 64 of a-z, 0-9, '_', '-'"));
    }
    let mut list: Vec<&str> = Vec::new();
    for s in scopes {
        let s = s.trim();
        if !matches!(s, "read" | "write" | "admin") {
            return Err(fail(
                2,
                format!("unknown scope \"{s}\": use read, write or admin"),
            ));
        }
        if !list.contains(&s) {
            list.push(s);
        }
    }
    if list.is_empty() {
        return Err(fail(2, "--scopes needs at least one of read, write, admin"));
    }
    let token = secrets::generate();
    let digest = secrets::hex(&secrets::sha256(token.as_bytes()));
    if as_json {
        let v = json!({ "name": name, "token": token, "sha256": digest, "scopes": list });
        println!("{v:#}");
        return Ok(());
    }
    let scopes_toml = list
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    println!("Token (shown once; give it to the API client, e.g. as OUTPOST_API_TOKEN):");
    println!();
    println!("    {token}");
    println!();
    println!("Add this to the configuration (it holds only the token's SHA-256):");
    println!();
    println!("[[api.tokens]]");
    println!("name = \"{name}\"");
    println!("sha256 = \"{digest}\"");
    println!("scopes = [{scopes_toml}]");
    Ok(())
}

// ---- devices --------------------------------------------------------------------------------

pub fn devices(command: DevicesCommand, api: &ApiArgs) -> ExitCode {
    finish(Client::new(api).and_then(|client| run(&client, command, api.json)))
}

struct Client {
    /// Where requests go, for messages: the URL, or `unix:<path>` of the local admin socket.
    base: String,
    transport: Transport,
}

enum Transport {
    /// The admin listener over TCP, with a token.
    Http { token: String, agent: ureq::Agent },
    /// The local admin socket: no token, its permissions decide.
    Local(LocalSocket),
}

struct Reply {
    status: u16,
    body: Value,
}

impl Client {
    /// The local admin socket when no `--url` is given and this user can open it, else the
    /// admin listener over HTTP with a token.
    fn new(api: &ApiArgs) -> Result<Client, Failure> {
        let config = if api.url.is_none() {
            Some(
                super::load_config(api.config.as_deref())
                    .map_err(|e| fail(EXIT_CONFIG, e.to_string()))?,
            )
        } else {
            None
        };
        let token = api_token(api)?;
        let has_token = token.is_some();
        if let Some(config) = &config
            && !config.admin.socket.as_os_str().is_empty()
        {
            let path = &config.admin.socket;
            match LocalSocket::probe(path) {
                Ok(socket) => {
                    return Ok(Client {
                        base: format!("unix:{}", path.display()),
                        transport: Transport::Local(socket),
                    });
                }
                Err(Unusable::Denied) if !has_token => {
                    return Err(fail(
                        2,
                        format!(
                            "the local admin socket {} is not open to this user: run as root or \
                             the service's user or group (e.g. with sudo), or set \
                             OUTPOST_API_TOKEN and --url",
                            path.display()
                        ),
                    ));
                }
                Err(Unusable::Other(e)) if !has_token => {
                    return Err(fail(
                        1,
                        format!("cannot use the local admin socket {}: {e}", path.display()),
                    ));
                }
                // No daemon there (or unusable, with a token to fall back on): HTTP.
                Err(_) => {}
            }
        }
        let base = match (&api.url, &config) {
            (Some(url), _) => url.trim_end_matches('/').to_owned(),
            (None, Some(config)) => default_url(config),
            (None, None) => unreachable!("the config is loaded when no --url is given"),
        };
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(fail(
                2,
                format!("--url must start with http:// or https://, found \"{base}\""),
            ));
        }
        let Some(token) = token else {
            return Err(fail(
                2,
                "no API token: set OUTPOST_API_TOKEN or --token-file (create one with \
                 `outpost token create`), or run on the gateway as root (the local admin socket)",
            ));
        };
        let mut agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)));
        if base.starts_with("https://") {
            let ca_file = api
                .ca_file
                .as_deref()
                .unwrap_or(std::path::Path::new(crate::https::SYSTEM_CA_BUNDLE));
            agent = agent.tls_config(
                ureq::tls::TlsConfig::builder()
                    .unversioned_rustls_crypto_provider(Arc::new(
                        tokio_rustls::rustls::crypto::ring::default_provider(),
                    ))
                    .root_certs(ca_certificates(ca_file)?)
                    .build(),
            );
        }
        let agent: ureq::Agent = agent.build().into();
        Ok(Client {
            base,
            transport: Transport::Http { token, agent },
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Reply, Failure> {
        let unreachable = |e: String| {
            fail(
                1,
                format!("cannot reach the Outpost API at {}: {e}", self.base),
            )
        };
        let (status, text) = match &self.transport {
            Transport::Local(socket) => {
                let body = match (method, body) {
                    ("GET" | "DELETE", _) | ("POST", None) => None,
                    (_, b) => Some(b.map(Value::to_string).unwrap_or_default()),
                };
                socket.call(method, path, body).map_err(unreachable)?
            }
            Transport::Http { token, agent } => Self::call_http(
                &self.base, token, agent, method, path, body,
            )
            .map_err(|e| match e {
                HttpFailure::Unreachable(e) => unreachable(e),
                HttpFailure::Read(e) => {
                    fail(1, format!("reading the response of {method} {path}: {e}"))
                }
            })?,
        };
        let body = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok(Reply { status, body })
    }

    fn call_http(
        base: &str,
        token: &str,
        agent: &ureq::Agent,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, String), HttpFailure> {
        let url = format!("{base}{path}");
        let auth = format!("Bearer {token}");
        let result = match (method, body) {
            ("GET", _) => agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => agent.delete(&url).header("Authorization", &auth).call(),
            ("POST", None) => agent.post(&url).header("Authorization", &auth).send_empty(),
            ("POST", Some(b)) => agent
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(b.to_string()),
            (_, b) => agent
                .patch(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(b.map(Value::to_string).unwrap_or_default()),
        };
        let mut response = result.map_err(|e| HttpFailure::Unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| HttpFailure::Read(e.to_string()))?;
        Ok((status, text))
    }

    /// Like [`Client::call`], turning a non-2xx answer into a failure with the API's message.
    fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, Failure> {
        let reply = self.call(method, path, body)?;
        if (200..300).contains(&reply.status) {
            return Ok(reply.body);
        }
        let b = &reply.body;
        let mut message = format!(
            "{} {}: {}",
            reply.status,
            b["error"].as_str().unwrap_or("error"),
            b["message"]
                .as_str()
                .map_or_else(|| b.to_string(), str::to_owned)
        );
        if let Some(field) = b["field"].as_str() {
            let _ = write!(message, " (field: {field})");
        }
        if reply.status == 401 {
            message.push_str(
                "\nhint: set OUTPOST_API_TOKEN or --token-file to a token the daemon accepts \
                 (`outpost token list` on the gateway)",
            );
        }
        Err(fail(1, message))
    }
}

enum HttpFailure {
    Unreachable(String),
    Read(String),
}

/// The admin listener's URL from `admin.listen` (`0.0.0.0`/`::` become loopback).
/// The API token: `$OUTPOST_API_TOKEN`, else the first line of `--token-file`; `--token` is
/// refused (a command line is visible to every user of the machine).
fn api_token(api: &ApiArgs) -> Result<Option<String>, Failure> {
    if api.token.is_some() {
        return Err(fail(
            2,
            "--token is not accepted: a command line is visible to every user of the machine \
             (ps). Put the token in OUTPOST_API_TOKEN or in a file for --token-file \
             (OUTPOST_API_TOKEN_FILE), or run on the gateway through the local admin socket",
        ));
    }
    if let Some(token) = std::env::var("OUTPOST_API_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        return Ok(Some(token.trim().to_owned()));
    }
    let Some(path) = &api.token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| fail(2, format!("--token-file {}: {e}", path.display())))?;
    match text.lines().next().map(str::trim) {
        Some(token) if !token.is_empty() => Ok(Some(token.to_owned())),
        _ => Err(fail(
            2,
            format!("--token-file {}: the first line is empty", path.display()),
        )),
    }
}

/// The CA certificates in `path` (`--ca-file`, or the system's bundle).
fn ca_certificates(path: &std::path::Path) -> Result<ureq::tls::RootCerts, Failure> {
    crate::https::pem_roots(path).map_err(|why| {
        fail(
            2,
            format!(
                "CA certificates {}: {why} (set --ca-file to the CA that signed the gateway's \
                 certificate)",
                path.display()
            ),
        )
    })
}

fn default_url(config: &outpost_config::Config) -> String {
    let listen = config.admin.listen;
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let scheme = if config.admin.tls.enabled {
        "https"
    } else {
        "http"
    };
    match ip {
        IpAddr::V4(ip) => format!("{scheme}://{ip}:{}", listen.port()),
        IpAddr::V6(ip) => format!("{scheme}://[{ip}]:{}", listen.port()),
    }
}

/// Percent-encodes everything but `[A-Za-z0-9_-]`.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn device_path(id: &str) -> String {
    format!("/api/v1/devices/{}", encode(id))
}

fn run(client: &Client, command: DevicesCommand, as_json: bool) -> Result<(), Failure> {
    match command {
        DevicesCommand::Add {
            id,
            name,
            model,
            batch,
            firmware,
            location,
            tags,
            protocols,
            disabled,
        } => {
            let mut body = json!({ "id": id, "tags": tags, "enabled": !disabled });
            for (key, value) in [
                ("name", name),
                ("model", model),
                ("batch", batch),
                ("firmware", firmware),
                ("location", location),
            ] {
                if let Some(v) = value {
                    body[key] = Value::String(v);
                }
            }
            if let Some(p) = protocols {
                body["protocols"] = json!(p.iter().map(|s| s.trim()).collect::<Vec<_>>());
            }
            let reply = client.ok("POST", "/api/v1/devices", Some(&body))?;
            if as_json {
                println!("{reply:#}");
            } else {
                print!("{}", render_device(&reply["device"]));
                print_secret(
                    &reply,
                    "Secret (shown once: store it now; only its hash is kept):",
                );
            }
        }
        DevicesCommand::List { tag, state, limit } => {
            let mut devices = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let mut query = format!("limit={}", limit.unwrap_or(1000).clamp(1, 1000));
                if let Some(t) = &tag {
                    let _ = write!(query, "&tag={}", encode(t));
                }
                if let Some(s) = &state {
                    let _ = write!(query, "&state={}", encode(s));
                }
                if let Some(c) = &cursor {
                    let _ = write!(query, "&cursor={}", encode(c));
                }
                let page = client.ok("GET", &format!("/api/v1/devices?{query}"), None)?;
                if let Some(list) = page["devices"].as_array() {
                    devices.extend(list.iter().cloned());
                }
                match page["next_cursor"].as_str() {
                    Some(next) if limit.is_none() => cursor = Some(next.to_owned()),
                    _ => break,
                }
            }
            if as_json {
                println!("{:#}", json!({ "devices": devices }));
            } else {
                print!("{}", render_table(&devices, now_ms()));
            }
        }
        DevicesCommand::Show { id } => {
            let device = client.ok("GET", &device_path(&id), None)?;
            let status = client.ok("GET", &format!("{}/status", device_path(&id)), None)?;
            if as_json {
                println!("{:#}", json!({ "device": device, "status": status }));
            } else {
                print!("{}", render_device(&device));
                print!("{}", render_status(&status));
            }
        }
        DevicesCommand::Disable { id } => {
            let d = client.ok("POST", &format!("{}/disable", device_path(&id)), None)?;
            report(as_json, &d, &format!("Device {id} disabled."));
        }
        DevicesCommand::Enable { id } => {
            let d = client.ok("POST", &format!("{}/enable", device_path(&id)), None)?;
            report(as_json, &d, &format!("Device {id} enabled."));
        }
        DevicesCommand::Remove { id } => {
            client.ok("DELETE", &device_path(&id), None)?;
            report(
                as_json,
                &json!({ "removed": id }),
                &format!("Device {id} removed."),
            );
        }
        DevicesCommand::RotateSecret { id } => {
            let reply = client.ok("POST", &format!("{}/rotate-secret", device_path(&id)), None)?;
            if as_json {
                println!("{reply:#}");
            } else {
                print_secret(
                    &reply,
                    &format!("New secret of {id} (shown once; the old secret no longer works):"),
                );
            }
        }
    }
    Ok(())
}

pub fn apps(command: AppsCommand, api: &ApiArgs) -> ExitCode {
    finish(Client::new(api).and_then(|client| run_apps(&client, command, api.json)))
}

fn run_apps(client: &Client, command: AppsCommand, as_json: bool) -> Result<(), Failure> {
    match command {
        AppsCommand::List => {
            let reply = client.ok("GET", "/api/v1/apps", None)?;
            let items = reply["items"].as_array().cloned().unwrap_or_default();
            let mut text = render_apps(&items);
            if let Some(problem) = reply["engine_problem"].as_str() {
                let _ = write!(text, "\nengine: {problem}");
            }
            report(as_json, &reply, &text);
        }
        AppsCommand::Restart { name } => {
            let path = format!("/api/v1/apps/{}/restart", encode(&name));
            let reply = client.ok("POST", &path, None)?;
            report(as_json, &reply, &format!("restart of app {name} requested"));
        }
    }
    Ok(())
}

fn render_apps(apps: &[Value]) -> String {
    let header = [
        "NAME",
        "STATE",
        "CONTAINER",
        "RESTARTS",
        "EXIT",
        "HEALTH",
        "REASON",
    ];
    let rows = apps
        .iter()
        .map(|a| {
            let s = &a["status"];
            let short = |v: &Value| {
                v.as_str()
                    .map_or("-".to_owned(), |t| t.chars().take(12).collect())
            };
            vec![
                text(&a["name"]),
                text(&s["state"]),
                short(&s["container_id"]),
                s["restart_count"].to_string(),
                s["last_exit_code"]
                    .as_i64()
                    .map_or("-".to_owned(), |c| c.to_string()),
                s["health"].as_str().unwrap_or("-").to_owned(),
                s["reason"].as_str().unwrap_or("").to_owned(),
            ]
        })
        .collect();
    columns(&header, rows)
}

/// Left-aligned columns under `header`, the last one unpadded; no trailing newline.
fn columns(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let lines =
        std::iter::once(header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()).chain(rows);
    for row in lines {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.trim_end().to_owned()
}

impl Selection {
    fn body(&self) -> Value {
        if self.all {
            json!({ "all": true })
        } else {
            json!({ "seqs": self.seqs })
        }
    }
}

pub fn dead_letters(command: DeadLettersCommand, api: &ApiArgs) -> ExitCode {
    finish(Client::new(api).and_then(|client| run_dead_letters(&client, command, api.json)))
}

pub fn rules(command: RulesCommand, api: &ApiArgs) -> ExitCode {
    finish(Client::new(api).and_then(|client| run_rules(&client, command, api.json)))
}

fn run_rules(client: &Client, command: RulesCommand, as_json: bool) -> Result<(), Failure> {
    match command {
        RulesCommand::Alerts => {
            let reply = client.ok("GET", "/api/v1/alerts", None)?;
            if as_json {
                println!("{reply:#}");
                return Ok(());
            }
            let alerts = reply["alerts"].as_array().cloned().unwrap_or_default();
            if alerts.is_empty() {
                println!("(no alerts raised)");
            }
            for a in alerts {
                println!(
                    "{}  {}  {}  since {}  {}",
                    text(&a["severity"]),
                    text(&a["rule"]),
                    text(&a["device"]),
                    text(&a["raised_at_ms"]),
                    a["reading"]
                );
            }
        }
        RulesCommand::Test {
            file,
            device,
            topic,
        } => {
            let content = std::fs::read(&file)
                .map_err(|e| fail(2, format!("cannot read {}: {e}", file.display())))?;
            let value: Value = serde_json::from_slice(&content)
                .map_err(|e| fail(2, format!("{} is not JSON: {e}", file.display())))?;
            // A full sample has a payload; anything else is the payload itself.
            let mut sample = match value {
                Value::Object(ref m) if m.contains_key("payload") => value,
                payload => json!({ "payload": payload }),
            };
            if let Some(device) = device {
                sample["device"] = Value::String(device);
            }
            if let Some(topic) = topic {
                sample["topic"] = Value::String(topic);
            }
            for key in ["device", "topic"] {
                if !sample[key].is_string() {
                    return Err(fail(
                        2,
                        format!("name the reading's {key}: --{key}, or \"{key}\" in the file"),
                    ));
                }
            }
            let reply = client.ok("POST", "/api/v1/edge/test", Some(&sample))?;
            if as_json {
                println!("{reply:#}");
                return Ok(());
            }
            println!("verdict: {}", text(&reply["verdict"]));
            for key in ["refused", "dead_letter"] {
                if reply[key].is_object() {
                    println!(
                        "  by rule {}: {}",
                        text(&reply[key]["rule"]),
                        text(&reply[key]["error"])
                    );
                }
            }
            for rule in reply["rules"].as_array().cloned().unwrap_or_default() {
                let mut did = Vec::new();
                if rule["skipped"] == json!(true) {
                    did.push("skipped (when)".to_owned());
                }
                if rule["transformed"] == json!(true) {
                    did.push("transformed".to_owned());
                }
                if let Some(facts) = rule["enriched"].as_array() {
                    did.push(format!("enriched {}", Value::Array(facts.clone())));
                }
                if let Some(values) = rule["aggregated"].as_array() {
                    did.push(format!("aggregated {}", Value::Array(values.clone())));
                }
                if rule["alert"].is_object() {
                    did.push(format!("alert {}", rule["alert"]));
                }
                if let Some(e) = rule["error"].as_str() {
                    did.push(format!("error: {e}"));
                }
                if did.is_empty() {
                    did.push("matched".to_owned());
                }
                println!("rule {}: {}", text(&rule["rule"]), did.join(", "));
            }
            if let Some(headers) = reply["headers"].as_object() {
                for (k, v) in headers {
                    println!("header {k}: {}", text(v));
                }
            }
            println!("payload: {}", reply["payload"]);
        }
    }
    Ok(())
}

/// Largest page the API serves.
const DEAD_LETTER_PAGE: u64 = 1000;

fn run_dead_letters(
    client: &Client,
    command: DeadLettersCommand,
    as_json: bool,
) -> Result<(), Failure> {
    match command {
        DeadLettersCommand::List { after, limit } => {
            let mut items: Vec<Value> = Vec::new();
            let mut after = after;
            let (total, bytes) = loop {
                let wanted = limit.map_or(DEAD_LETTER_PAGE, |l| l - items.len() as u64);
                let query = format!("after={after}&limit={}", wanted.min(DEAD_LETTER_PAGE));
                let page = client.ok("GET", &format!("/api/v1/dead-letters?{query}"), None)?;
                if let Some(list) = page["dead_letters"].as_array() {
                    items.extend(list.iter().cloned());
                }
                let done = limit.is_some_and(|l| items.len() as u64 >= l);
                match page["next_after"].as_u64() {
                    Some(next) if !done => after = next,
                    _ => break (page["total"].clone(), page["bytes"].clone()),
                }
            };
            if as_json {
                let v = json!({ "dead_letters": items, "total": total, "bytes": bytes });
                println!("{v:#}");
            } else {
                println!("{}", render_dead_letters(&items, now_ms()));
                if total.as_u64() != Some(0) {
                    println!(
                        "{} shown; {} dead letter(s) held ({} bytes)",
                        items.len(),
                        text(&total),
                        text(&bytes)
                    );
                }
            }
        }
        DeadLettersCommand::Retry(selection) => {
            let reply = client.ok(
                "POST",
                "/api/v1/dead-letters/retry",
                Some(&selection.body()),
            )?;
            let n = reply["retried"].as_u64().unwrap_or(0);
            let text = format!(
                "{n} dead letter(s) put back into the outbox to be forwarded again{}",
                skipped(&selection, n)
            );
            report(as_json, &reply, &text);
        }
        DeadLettersCommand::Drop(selection) => {
            let reply = client.ok("POST", "/api/v1/dead-letters/drop", Some(&selection.body()))?;
            let n = reply["dropped"].as_u64().unwrap_or(0);
            let text = format!(
                "{n} dead letter(s) deleted for good{}",
                skipped(&selection, n)
            );
            report(as_json, &reply, &text);
        }
    }
    Ok(())
}

/// A note when fewer dead letters were touched than sequences given.
fn skipped(selection: &Selection, n: u64) -> String {
    let asked = selection.seqs.len() as u64;
    if selection.all || n >= asked {
        String::new()
    } else {
        format!(
            "; {} given sequence number(s) matched no dead letter",
            asked - n
        )
    }
}

/// Longest error text shown in the table; `--json` has it whole.
const ERROR_WIDTH: usize = 60;

fn render_dead_letters(items: &[Value], now: i64) -> String {
    if items.is_empty() {
        return "(no dead letters)".to_owned();
    }
    let header = [
        "SEQ",
        "DEVICE",
        "TOPIC",
        "KAFKA TOPIC",
        "REASON",
        "ATTEMPTS",
        "SIZE",
        "AGE",
        "ERROR",
    ];
    let rows = items
        .iter()
        .map(|d| {
            let error = d["error"].as_str().unwrap_or_default();
            let error = if error.chars().count() > ERROR_WIDTH {
                let cut: String = error.chars().take(ERROR_WIDTH - 1).collect();
                format!("{cut}…")
            } else {
                error.to_owned()
            };
            vec![
                text(&d["seq"]),
                text(&d["device_id"]),
                text(&d["topic"]),
                text(&d["kafka_topic"]),
                text(&d["reason"]),
                text(&d["attempts"]),
                text(&d["size"]),
                ago(d["received_at_ms"].as_i64(), now),
                error.replace(['\n', '\r'], " "),
            ]
        })
        .collect();
    columns(&header, rows)
}

fn report(as_json: bool, value: &Value, text: &str) {
    if as_json {
        println!("{value:#}");
    } else {
        println!("{text}");
    }
}

fn print_secret(reply: &Value, heading: &str) {
    println!();
    println!("{heading}");
    println!();
    println!("    {}", reply["secret"].as_str().unwrap_or("?"));
}

fn now_ms() -> i64 {
    outpost_sync::outbox::now_unix_ms()
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Bool(true) => "yes".to_owned(),
        Value::Bool(false) => "no".to_owned(),
        Value::Array(items) if items.is_empty() => "-".to_owned(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// `2024-05-01T12:00:00Z` from ms since the epoch.
fn iso(ms: i64) -> String {
    outpost_sync::outbox::rfc3339_utc(ms, false)
}

fn ago(ms: Option<i64>, now: i64) -> String {
    match ms {
        None => "never".to_owned(),
        Some(ms) => {
            let s = (now - ms).max(0) / 1000;
            match s {
                0..60 => format!("{s}s ago"),
                60..3600 => format!("{}m ago", s / 60),
                3600..86_400 => format!("{}h ago", s / 3600),
                _ => format!("{}d ago", s / 86_400),
            }
        }
    }
}

fn render_device(d: &Value) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(out, "{k:<11} {v}");
    };
    line("id:", text(&d["id"]));
    line("name:", text(&d["name"]));
    line("model:", text(&d["model"]));
    line("batch:", text(&d["batch"]));
    line("firmware:", text(&d["firmware"]));
    line("location:", text(&d["location"]));
    line("tags:", text(&d["tags"]));
    line("enabled:", text(&d["enabled"]));
    line("protocols:", text(&d["protocols"]));
    line(
        "secret:",
        if d["has_secret"].as_bool() == Some(true) {
            "set".into()
        } else {
            "none".into()
        },
    );
    line("source:", text(&d["source"]));
    line("state:", text(&d["state"]));
    line("last seen:", ago(d["last_seen_ms"].as_i64(), now_ms()));
    line(
        "created:",
        d["created_at_ms"].as_i64().map_or("-".into(), iso),
    );
    line(
        "updated:",
        d["updated_at_ms"].as_i64().map_or("-".into(), iso),
    );
    out
}

fn render_status(s: &Value) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(out, "{k:<11} {v}");
    };
    line(
        "messages:",
        format!("{} ({} bytes)", text(&s["messages"]), text(&s["bytes"])),
    );
    line(
        "errors:",
        format!(
            "malformed {}, refused {}, dropped {}",
            text(&s["errors"]["malformed"]),
            text(&s["errors"]["refused"]),
            text(&s["errors"]["dropped"])
        ),
    );
    line(
        "rates:",
        format!(
            "{} msg/min, {} err/min",
            text(&s["messages_per_minute"]),
            text(&s["errors_per_minute"])
        ),
    );
    line(
        "signal:",
        match s["signal"]["rssi_dbm"].as_f64() {
            Some(rssi) => format!("{rssi} dBm"),
            None => "-".into(),
        },
    );
    line(
        "position:",
        match (s["location"]["lat"].as_f64(), s["location"]["lon"].as_f64()) {
            (Some(lat), Some(lon)) => format!("{lat}, {lon}"),
            _ => "-".into(),
        },
    );
    out
}

fn render_table(devices: &[Value], now: i64) -> String {
    let rows: Vec<[String; 6]> = devices
        .iter()
        .map(|d| {
            [
                text(&d["id"]),
                text(&d["state"]),
                text(&d["protocols"]),
                text(&d["tags"]),
                ago(d["last_seen_ms"].as_i64(), now),
                text(&d["name"]),
            ]
        })
        .collect();
    let header = ["ID", "STATE", "PROTOCOLS", "TAGS", "LAST SEEN", "NAME"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut emit = |cells: &[String]| {
        let mut line = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    };
    emit(&header.map(str::to_owned));
    for row in &rows {
        emit(row);
    }
    if rows.is_empty() {
        let _ = writeln!(out, "(no devices)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_url_comes_from_admin_listen() {
        let url_of = |listen: &str| {
            let config =
                outpost_config::from_toml_str(&format!("[admin]\nlisten = \"{listen}\"\n"))
                    .unwrap();
            default_url(&config)
        };
        assert_eq!(url_of("0.0.0.0:9999"), "http://127.0.0.1:9999");
        assert_eq!(url_of("[::]:8081"), "http://[::1]:8081");
        assert_eq!(url_of("10.1.2.3:80"), "http://10.1.2.3:80");
        assert_eq!(
            default_url(&outpost_config::Config::default()),
            "http://127.0.0.1:8080"
        );
    }

    #[test]
    fn encoding_keeps_ids_in_one_segment() {
        assert_eq!(encode("dev-1_a"), "dev-1_a");
        assert_eq!(encode("a.b:c"), "a%2Eb%3Ac");
        assert_eq!(encode(".."), "%2E%2E");
    }

    #[test]
    fn dead_letter_selection_is_all_or_sequences() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Cli {
            #[command(subcommand)]
            command: DeadLettersCommand,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("dead-letters").chain(args.iter().copied()))
                .map(|c| c.command)
        };
        let Ok(DeadLettersCommand::Retry(s)) = parse(&["retry", "3", "7"]) else {
            panic!("retry with sequences");
        };
        assert_eq!(s.body(), json!({ "seqs": [3, 7] }));
        let Ok(DeadLettersCommand::Drop(s)) = parse(&["drop", "--all"]) else {
            panic!("drop --all");
        };
        assert_eq!(s.body(), json!({ "all": true }));
        assert!(parse(&["drop"]).is_err(), "neither --all nor a sequence");
        assert!(parse(&["retry", "--all", "3"]).is_err(), "both");
        assert!(parse(&["retry", "x"]).is_err(), "not a number");
        let Ok(DeadLettersCommand::List { after, limit }) = parse(&["list", "--limit", "5"]) else {
            panic!("list");
        };
        assert_eq!((after, limit), (0, Some(5)));
        assert!(parse(&["list", "--limit", "0"]).is_err());

        let asked = Selection {
            all: false,
            seqs: vec![1, 2, 3],
        };
        assert_eq!(skipped(&asked, 3), "");
        assert_eq!(
            skipped(&asked, 1),
            "; 2 given sequence number(s) matched no dead letter"
        );
    }

    #[test]
    fn dead_letter_table_truncates_errors() {
        let long = "x".repeat(200);
        let items = vec![
            json!({"seq": 7, "device_id": "pump-1", "topic": "t/a", "kafka_topic": "readings",
                   "reason": "too_large", "attempts": 1, "size": 1500000,
                   "received_at_ms": 1000, "error": "Broker: Message size too large"}),
            json!({"seq": 12, "device_id": "d", "topic": "locked/a", "kafka_topic": "forbidden",
                   "reason": "topic_authorization", "attempts": 2, "size": 90,
                   "received_at_ms": 1000, "error": format!("line 1\n{long}")}),
        ];
        let table = render_dead_letters(&items, 121_000);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(
            lines[0].starts_with("SEQ  DEVICE  TOPIC     KAFKA TOPIC  REASON"),
            "{table}"
        );
        assert!(
            lines[1].starts_with("7    pump-1  t/a       readings     too_large")
                && lines[1].contains("1500000")
                && lines[1].contains("2m ago")
                && lines[1].ends_with("Broker: Message size too large"),
            "{table}"
        );
        let error = lines[2].split("2m ago").nth(1).unwrap().trim();
        assert_eq!(error.chars().count(), ERROR_WIDTH, "{error}");
        assert!(
            error.starts_with("line 1 xxx") && error.ends_with('…'),
            "{error}"
        );
        assert_eq!(render_dead_letters(&[], 0), "(no dead letters)");
    }

    #[test]
    fn table_lines_up() {
        let devices = vec![
            json!({"id": "a", "state": "online", "protocols": ["mqtt"], "tags": [], "last_seen_ms": 1000, "name": ""}),
            json!({"id": "long-device", "state": "disabled", "protocols": [], "tags": ["x", "y"], "last_seen_ms": null, "name": "Pump"}),
        ];
        let table = render_table(&devices, 61_000);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID           STATE"), "{table}");
        assert!(lines[1].contains("1m ago"), "{table}");
        assert!(
            lines[2].contains("never") && lines[2].ends_with("Pump"),
            "{table}"
        );
    }
}
