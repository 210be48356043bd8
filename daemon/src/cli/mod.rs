//! The command line: what each subcommand does, and how its outcome maps to an exit code.
//!
//! * [`args`]: the argument types (clap). They import nothing of the daemon, so the CLI's shape
//!   can be read, and changed, on its own.
//! * this module: `run` and `check-config` (the daemon's own commands) and the dispatch.
//! * [`buffer`]: `outpost buffer …`, the outbox file read directly.
//! * [`api_client`]: `outpost devices|apps|dead-letters …` through the running daemon's API,
//!   and `outpost token new`.
//! * [`fleet_watch`]: `outpost fleet watch`, a Kafka client reading the heartbeat topic.
//!
//! The dependency runs one way: the CLI uses the daemon's modules (`app`, `telemetry`, the
//! registry's secrets), never the reverse.

pub mod args;

mod api_client;
mod buffer;
mod fleet_watch;
mod local_socket;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use outpost_config::{Config, ConfigError};
use outpost_sync::outbox;

use crate::{app, telemetry};
use args::{Cli, Command, FleetCommand};

/// Exit code for an invalid or unreadable configuration (`EX_CONFIG` from sysexits.h). The
/// systemd unit names it in `RestartPreventExitStatus` so a bad config is not restarted in a loop.
pub const EXIT_CONFIG: u8 = 78;

pub fn dispatch(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run { config } => run(config.as_deref()),
        Command::CheckConfig { path } => check_config(&path),
        Command::Version => {
            println!("{}", version_line());
            ExitCode::SUCCESS
        }
        Command::Buffer { command, location } => buffer::buffer(command, &location),
        Command::Devices { command, api } => api_client::devices(*command, &api),
        Command::Apps { command, api } => api_client::apps(command, &api),
        Command::DeadLetters { command, api } => api_client::dead_letters(command, &api),
        Command::Token { command, api } => api_client::token(command, &api),
        Command::Rules { command, api } => api_client::rules(command, &api),
        Command::Fleet {
            command:
                FleetCommand::Watch {
                    config,
                    brokers,
                    once,
                    json,
                },
        } => fleet_watch::watch(config.as_deref(), brokers, once, json),
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

/// The configuration file every command reads when none is named (`--config`,
/// `$OUTPOST_CONFIG`): the packaged one, when it exists. `check-config` checks the same file.
pub const DEFAULT_CONFIG: &str = "/etc/outpost/outpost.toml";

/// The configuration file to read: the one named, else [`DEFAULT_CONFIG`] when it exists, else
/// none (the built-in defaults). A default that may exist but cannot be looked at (a user
/// outside the `outpost` group, `/etc/outpost` being 0750) is still chosen, so loading it fails
/// with the reason instead of silently running on other settings than the service's.
pub fn config_file(named: Option<&Path>) -> Option<PathBuf> {
    named.map(Path::to_path_buf).or_else(|| {
        let default = Path::new(DEFAULT_CONFIG);
        (!matches!(default.try_exists(), Ok(false))).then(|| default.to_path_buf())
    })
}

/// Loads and fully validates a config ([`config_file`] of `path`): the typed checks of the
/// config crate plus what only the daemon can judge (the log filter, the TLS files). Every
/// command shares this function.
pub fn load_config(path: Option<&Path>) -> Result<Config, ConfigError> {
    let config = match config_file(path) {
        Some(path) => outpost_config::load_file(&path)?,
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
    for (table, tls, used) in [
        ("admin.tls", &config.admin.tls, true),
        (
            "http_ingest.tls",
            &config.http_ingest.tls,
            config.http_ingest.enabled,
        ),
    ] {
        if used
            && tls.enabled
            && let Err(problems) = crate::https::acceptor(table, tls)
        {
            return Err(ConfigError::Invalid {
                path: path.map(Path::to_path_buf),
                problems,
            });
        }
    }
    // `[[edge.rules]]`: the CEL expressions must compile and the schemas be valid.
    if let Err(problems) = outpost_edge::Engine::compile(&config.edge) {
        return Err(ConfigError::Invalid {
            path: path.map(Path::to_path_buf),
            problems: problems
                .into_iter()
                .map(|(path, message)| outpost_config::Problem { path, message })
                .collect(),
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
    let file = config_file(path);
    let config = match load_config(file.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("outpost: refusing to start with an invalid configuration");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::logging::init(&config.log);
    match &file {
        Some(file) => tracing::info!(file = %file.display(), "Configuration read"),
        None => tracing::info!(
            "No configuration file (none named, {DEFAULT_CONFIG} absent): built-in defaults"
        ),
    }
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
    // Ends with the runtime.
    runtime.spawn(crate::allocator::collect_periodically());
    let result = runtime.block_on(async {
        let shutdown = app::shutdown_on_signals();
        app::run(config, path.map(Path::to_path_buf), shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "Outpost stopped with an error");
            ExitCode::FAILURE
        }
    }
}
