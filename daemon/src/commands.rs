//! What each subcommand does, and how its outcome maps to an exit code.

use std::path::Path;
use std::process::ExitCode;

use outpost_config::{Config, ConfigError};
use outpost_sync::outbox::{self, inspect};

use crate::cli::{BufferCommand, Cli, Command, DataLocation, FleetCommand};
use crate::{EXIT_CONFIG, app, telemetry};

pub fn dispatch(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run { config } => run(config.as_deref()),
        Command::CheckConfig { path } => check_config(&path),
        Command::Version => {
            println!("{}", version_line());
            ExitCode::SUCCESS
        }
        Command::Buffer { command, location } => buffer(command, &location),
        Command::Devices { command, api } => crate::cli_devices::devices(*command, &api),
        Command::Apps { command, api } => crate::cli_devices::apps(command, &api),
        Command::DeadLetters { command, api } => crate::cli_devices::dead_letters(command, &api),
        Command::Token { command } => crate::cli_devices::token(command),
        Command::Fleet {
            command:
                FleetCommand::Watch {
                    config,
                    brokers,
                    once,
                    json,
                },
        } => crate::fleet::watch(config.as_deref(), brokers, once, json),
    }
}

pub fn version_line() -> String {
    format!(
        "outpost {} ({} {}, schema v{})",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH,
        std::env::consts::OS,
        outbox::SCHEMA_VERSION
    )
}

/// Loads and fully validates a config: the typed checks of the config crate plus what only the
/// daemon can judge (the log filter, the MQTT TLS files). `check-config` and `run` share this function.
pub fn load_config(path: Option<&Path>) -> Result<Config, ConfigError> {
    let config = match path {
        Some(path) => outpost_config::load_file(path)?,
        None => Config::default(),
    };
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.log.level) {
        return Err(ConfigError::Invalid {
            path: path.map(Path::to_path_buf),
            problems: vec![outpost_config::Problem {
                path: "log.level".into(),
                message: format!("not a valid log filter: {e}"),
            }],
        });
    }
    // The TLS files: only the daemon reads them (certificate, key and CA must load).
    if config.mqtt.enabled
        && config.mqtt.tls.enabled
        && let Err(problems) = outpost_mqtt::tls::acceptor(&config.mqtt.tls)
    {
        return Err(ConfigError::Invalid {
            path: path.map(Path::to_path_buf),
            problems,
        });
    }
    Ok(config)
}

fn check_config(path: &Path) -> ExitCode {
    match load_config(Some(path)) {
        Ok(config) => {
            // Warnings do not fail the check: the setting may be deliberate.
            for warning in config.warnings() {
                eprintln!("warning: {warning}");
            }
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn run(path: Option<&Path>) -> ExitCode {
    let config = match load_config(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("outpost: refusing to start with an invalid configuration");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::logging::init(&config.log);
    for warning in config.warnings() {
        tracing::warn!(key = %warning.path, "Configuration: {}", warning.message);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("outpost-worker")
        .max_blocking_threads(16)
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "Cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = app::shutdown_on_signals();
        app::run(config, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "Outpost stopped with an error");
            ExitCode::FAILURE
        }
    }
}

fn buffer(command: BufferCommand, location: &DataLocation) -> ExitCode {
    let data_dir = match (&location.data_dir, &location.config) {
        (Some(dir), _) => dir.clone(),
        (None, config) => match load_config(config.as_deref()) {
            Ok(config) => config.data_dir(),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let path = data_dir.join(outbox::FILE_NAME);
    match command {
        BufferCommand::Stats { json } => match inspect::stats(&path) {
            Ok(stats) if json => {
                let dead = dead_letter_figures(&path);
                match serde_json::to_value(&stats) {
                    Ok(mut value) => {
                        value["dead_letters"] =
                            dead.map_or(serde_json::Value::Null, |d| d.0.into());
                        value["dead_letter_bytes"] =
                            dead.map_or(serde_json::Value::Null, |d| d.1.into());
                        print_json(&value)
                    }
                    Err(e) => {
                        eprintln!("outpost: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Ok(stats) => {
                let dead = dead_letter_figures(&path);
                print!(
                    "{}",
                    render_stats(&stats, dead, outpost_sync::outbox::now_unix_ms())
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("outpost: {e}");
                ExitCode::FAILURE
            }
        },
        BufferCommand::Verify { json } => match inspect::verify(&path) {
            Ok(report) => {
                if json {
                    let _ = print_json(&report);
                } else if report.problems.is_empty() {
                    println!("{}: ok", report.path.display());
                } else {
                    println!(
                        "{}: {} problem(s)",
                        report.path.display(),
                        report.problems.len()
                    );
                    for p in &report.problems {
                        println!("  {p}");
                    }
                }
                if report.problems.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("outpost: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Records and bytes in the outbox's dead-letter table (schema 4; none in an older file), read
/// on a read-only connection like `inspect::stats`. `None` (with the error printed) when it
/// cannot be read: the other figures are still worth showing.
fn dead_letter_figures(path: &Path) -> Option<(u64, u64)> {
    let read = || -> rusqlite::Result<(u64, u64)> {
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let has_table: bool = conn.query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'dead_letters'",
            [],
            |r| r.get(0),
        )?;
        if !has_table {
            return Ok((0, 0));
        }
        let (records, bytes): (i64, i64) = conn.query_row(
            "SELECT count(*), coalesce(sum(size), 0) FROM dead_letters",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((records.max(0) as u64, bytes.max(0) as u64))
    };
    match read() {
        Ok(figures) => Some(figures),
        Err(e) => {
            eprintln!(
                "outpost: reading the dead letters of {}: {e}",
                path.display()
            );
            None
        }
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outpost: {e}");
            ExitCode::FAILURE
        }
    }
}

fn render_stats(s: &inspect::Stats, dead: Option<(u64, u64)>, now_ms: i64) -> String {
    use std::fmt::Write;
    let age = |ms: Option<i64>| {
        ms.map_or_else(
            || "-".to_owned(),
            |ms| format!("{:.1}s", (now_ms - ms).max(0) as f64 / 1e3),
        )
    };
    let mut out = String::new();
    let _ = writeln!(out, "outbox:        {}", s.path.display());
    let _ = writeln!(out, "schema:        v{}", s.schema_version);
    let _ = writeln!(
        out,
        "outbox id:     {}",
        s.outbox_id
            .as_deref()
            .unwrap_or("- (assigned when the daemon next opens it)")
    );
    let _ = writeln!(out, "records:       {}", s.records);
    let _ = writeln!(out, "bytes:         {}", s.bytes);
    let _ = writeln!(out, "oldest age:    {}", age(s.oldest_received_ms));
    let _ = match dead {
        Some((0, _)) => writeln!(out, "dead letters:  0"),
        Some((records, bytes)) => writeln!(
            out,
            "dead letters:  {records} ({bytes} bytes; see `outpost dead-letters list`)"
        ),
        None => writeln!(out, "dead letters:  ? (unreadable)"),
    };
    let _ = writeln!(
        out,
        "sequence:      {}..{} (next {})",
        s.oldest_seq.map_or("-".into(), |v| v.to_string()),
        s.newest_seq.map_or("-".into(), |v| v.to_string()),
        s.next_seq
    );
    let _ = writeln!(
        out,
        "file bytes:    {} (+{} WAL)",
        s.file_bytes, s.wal_bytes
    );
    let _ = writeln!(out, "routes:");
    if s.routes.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for r in &s.routes {
        let _ = writeln!(
            out,
            "  {:<20} priority {}  records {:>10}  bytes {:>12}  oldest age {}",
            r.route,
            r.priority,
            r.records,
            r.bytes,
            age(r.oldest_received_ms)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `outpost buffer stats` counts the dead-letter table on its own read-only connection.
    #[tokio::test]
    async fn buffer_stats_count_the_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let (outbox, _, _writer) =
            crate::api::tests::outbox_with_dead_letters(dir.path(), 3, &[1], stop.clone()).await;
        let path = outbox.path().to_path_buf();
        let figures = dead_letter_figures(&path);
        assert_eq!(figures, Some(outbox.dead_letter_figures()));
        assert_eq!(figures.unwrap().0, 1);
        let stats = inspect::stats(&path).unwrap();
        let text = render_stats(&stats, figures, 0);
        let (_, bytes) = figures.unwrap();
        assert!(
            text.contains(&format!(
                "dead letters:  1 ({bytes} bytes; see `outpost dead-letters list`)"
            )),
            "{text}"
        );
        assert!(render_stats(&stats, Some((0, 0)), 0).contains("dead letters:  0\n"));
        assert!(render_stats(&stats, None, 0).contains("dead letters:  ? (unreadable)"));
        assert_eq!(dead_letter_figures(&dir.path().join("none.db")), None);
        stop.cancel();
    }
}
