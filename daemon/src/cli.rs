//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Outpost edge gateway: MQTT/CoAP/HTTP ingestion, a durable SQLite outbox, sync to Kafka.
#[derive(Debug, Parser)]
#[command(name = "outpost", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (in the foreground; under systemd as a Type=notify service).
    Run {
        /// Configuration file. Without it Outpost runs on its built-in defaults.
        #[arg(long, short, env = "OUTPOST_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and print every problem with its key path.
    ///
    /// Exits 0 when the file is valid and 78 (EX_CONFIG) when it is not.
    CheckConfig {
        /// The file to check.
        #[arg(default_value = "/etc/outpost/outpost.toml")]
        path: PathBuf,
    },
    /// Print the version and build information.
    Version,
    /// Inspect the outbox (read-only; safe while the daemon runs).
    Buffer {
        #[command(subcommand)]
        command: BufferCommand,
        #[command(flatten)]
        location: DataLocation,
    },
    /// Manage devices through the running daemon's API (token: --token or OUTPOST_API_TOKEN).
    Devices {
        #[command(subcommand)]
        command: Box<crate::cli_devices::DevicesCommand>,
        #[command(flatten)]
        api: crate::cli_devices::ApiArgs,
    },
    /// Local app containers through the running daemon's API (token as for `devices`).
    Apps {
        #[command(subcommand)]
        command: crate::cli_devices::AppsCommand,
        #[command(flatten)]
        api: crate::cli_devices::ApiArgs,
    },
    /// Records Kafka refused for good (the outbox's dead-letter table): list, retry, drop,
    /// through the running daemon's API (token as for `devices`).
    DeadLetters {
        #[command(subcommand)]
        command: crate::cli_devices::DeadLettersCommand,
        #[command(flatten)]
        api: crate::cli_devices::ApiArgs,
    },
    /// The fleet as Kafka sees it (heartbeats of every gateway on `kafka.heartbeat_topic`).
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Management API tokens.
    Token {
        #[command(subcommand)]
        command: crate::cli_devices::TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// List every gateway's last heartbeat; flag gateways silent for three intervals.
    Watch {
        /// Kafka settings (brokers, security, heartbeat topic) from this configuration file.
        #[arg(long, short, env = "OUTPOST_CONFIG")]
        config: Option<PathBuf>,
        /// Bootstrap brokers (`host:port,...`), overriding the configuration's.
        #[arg(long)]
        brokers: Option<String>,
        /// Print once and exit (1 if a gateway is silent) instead of refreshing.
        #[arg(long)]
        once: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BufferCommand {
    /// Record count, bytes, oldest record age, dead letters, per-route counts.
    Stats {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Full SQLite integrity check plus the outbox's own invariants. Exits 1 on any problem.
    Verify {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Where to find the data directory: explicitly, or from a config file, or the defaults.
#[derive(Debug, clap::Args)]
pub struct DataLocation {
    /// The data directory holding outbox.db.
    #[arg(long, global = true, conflicts_with = "config")]
    pub data_dir: Option<PathBuf>,
    /// Read the data directory from this configuration file.
    #[arg(long, short, global = true, env = "OUTPOST_CONFIG")]
    pub config: Option<PathBuf>,
}
