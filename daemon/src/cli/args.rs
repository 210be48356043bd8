//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
        /// Configuration file. Without it: /etc/outpost/outpost.toml when it exists, else the
        /// built-in defaults (`--config /dev/null` forces the defaults).
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
    /// Manage devices through the running daemon's API (on the gateway: the local admin socket;
    /// elsewhere: --url with a token from OUTPOST_API_TOKEN or --token-file).
    Devices {
        #[command(subcommand)]
        command: Box<DevicesCommand>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Local app containers through the running daemon's API (token as for `devices`).
    Apps {
        #[command(subcommand)]
        command: AppsCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Records Kafka refused for good (the outbox's dead-letter table): list, retry, drop,
    /// through the running daemon's API (token as for `devices`).
    DeadLetters {
        #[command(subcommand)]
        command: DeadLettersCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Edge rules of the running daemon (`[[edge.rules]]`): dry-run a sample reading, list the
    /// alerts raised now (token as for `devices`).
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The fleet as Kafka sees it (heartbeats of every gateway on `kafka.heartbeat_topic`).
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Management API tokens: `new` prints one for the config file (offline); `create`, `list`
    /// and `revoke` go through the running daemon's API (on the gateway: the local admin socket).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// List every gateway's last heartbeat; flag gateways silent for three intervals.
    Watch {
        /// Kafka settings (brokers, security, heartbeat topic) from this configuration file
        /// (default: /etc/outpost/outpost.toml when it exists).
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
    /// Read the data directory from this configuration file (default: /etc/outpost/outpost.toml
    /// when it exists, else the built-in default data directory).
    #[arg(long, short, global = true, env = "OUTPOST_CONFIG")]
    pub config: Option<PathBuf>,
}

/// How to reach the daemon's API.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Base URL of the admin listener, e.g. `http://127.0.0.1:8080`. Default: from the
    /// configuration file's `admin.listen`, else `http://127.0.0.1:8080`.
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// Configuration file to read `admin.listen` from (default: /etc/outpost/outpost.toml when
    /// it exists).
    #[arg(long, short, global = true, env = "OUTPOST_CONFIG")]
    pub config: Option<PathBuf>,
    /// File holding the management API token (its first line), with the `read`, `write` or
    /// `admin` scope the command needs. The token may also come from $OUTPOST_API_TOKEN; never
    /// from the command line, where every user of the machine sees it (`ps`).
    #[arg(long, global = true, env = "OUTPOST_API_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Not accepted (hidden): answered with where a token goes instead.
    #[arg(long, global = true, hide = true)]
    pub token: Option<String>,
    /// CA certificates (PEM) to trust for an `https://` URL, e.g. the one that signed the
    /// gateway's `[admin.tls]` certificate. Default: the system's bundle
    /// (/etc/ssl/certs/ca-certificates.crt).
    #[arg(long, global = true, env = "OUTPOST_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Print the API's JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// Register a device and print its secret (shown this once).
    Add {
        /// Device id: 1 to 128 of letters, digits, '.', '_', ':', '-'.
        id: String,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        model: Option<String>,
        /// Serial or batch number.
        #[arg(long)]
        batch: Option<String>,
        #[arg(long)]
        firmware: Option<String>,
        /// Free-text location.
        #[arg(long)]
        location: Option<String>,
        /// A tag; repeat for several.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Allowed protocols, comma-separated (mqtt,coap,http). Default: all.
        #[arg(long, value_delimiter = ',')]
        protocols: Option<Vec<String>>,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// List devices (every page, unless --limit is given).
    List {
        /// Only devices with this tag.
        #[arg(long)]
        tag: Option<String>,
        /// Only devices in this state: online, offline or disabled.
        #[arg(long)]
        state: Option<String>,
        /// Show only the first N devices.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Show a device with its monitoring.
    Show { id: String },
    /// Disable a device: every protocol refuses it.
    Disable { id: String },
    /// Enable a device.
    Enable { id: String },
    /// Delete a device with its monitoring and commands (needs the `admin` scope).
    Remove { id: String },
    /// Give a device a new secret; the old one stops working at once (needs `admin`).
    RotateSecret { id: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a new random API token and the `[[api.tokens]]` entry (with its SHA-256) for the
    /// configuration file.
    New {
        /// Token name: 1 to 64 of a-z, 0-9, '_', '-'.
        #[arg(long, default_value = "operator")]
        name: String,
        /// Scopes, comma-separated: read, write, admin (admin implies write implies read).
        #[arg(long, value_delimiter = ',', default_value = "read")]
        scopes: Vec<String>,
    },
    /// Create a token through the daemon's API (kept in its registry, hashed); prints it once.
    Create {
        /// Token name: 1 to 64 of a-z, 0-9, '_', '-'.
        #[arg(long)]
        name: String,
        /// Scopes, comma-separated: read, write, admin (admin implies write implies read).
        #[arg(long, value_delimiter = ',', default_value = "read")]
        scopes: Vec<String>,
    },
    /// Every token the daemon accepts: name, highest scope, where it comes from.
    List,
    /// Revoke a token created through the API (config tokens are removed from the config).
    Revoke {
        /// The token's name.
        name: String,
    },
}

/// `outpost apps …`: local app containers through the daemon's API.
#[derive(Debug, Subcommand)]
pub enum AppsCommand {
    /// Every app with its state, container, restarts and last exit code.
    List,
    /// Recreate an app's container now (clears FAILED).
    Restart {
        /// The app's name.
        name: String,
    },
}

/// `outpost dead-letters …`: records Kafka refused for good, in the outbox's dead-letter table.
#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// List dead letters, oldest first (every one, unless --limit is given).
    List {
        /// Only sequence numbers above this.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Show at most N.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
    /// Put dead letters back into the outbox to be forwarded again (needs `write`).
    Retry(Selection),
    /// Delete dead letters for good (needs `admin`).
    Drop(Selection),
}

/// `outpost rules …`.
#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Show what the rules in force would do to a sample reading; nothing is stored.
    Test {
        /// A JSON file: the reading's payload, or `{"device", "topic", "payload", "source",
        /// "content_type"}` (the body of `POST /api/v1/edge/test`).
        #[arg(long)]
        file: std::path::PathBuf,
        /// The device the reading is from (overrides the file's).
        #[arg(long)]
        device: Option<String>,
        /// The reading's topic (overrides the file's).
        #[arg(long)]
        topic: Option<String>,
    },
    /// The alerts raised now.
    Alerts,
}

/// Which dead letters: `--all`, or sequence numbers.
#[derive(Debug, Args)]
pub struct Selection {
    /// Every dead letter.
    #[arg(long, conflicts_with = "seqs")]
    pub all: bool,
    /// Sequence numbers (the SEQ column of `list`).
    #[arg(required_unless_present = "all")]
    pub seqs: Vec<u64>,
}
