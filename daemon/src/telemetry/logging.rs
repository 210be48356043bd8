//! `tracing` setup: human-readable by default, JSON on request, and no duplicate timestamps when
//! journald (which stamps every line itself) collects the output.

use outpost_config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG` overrides `log.level`.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // systemd sets JOURNAL_STREAM when stderr is connected to the journal.
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let result = match config.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Human | LogFormat::Auto if under_journald => {
            builder.without_time().with_ansi(false).try_init()
        }
        LogFormat::Human | LogFormat::Auto => builder.try_init(),
    };
    // A subscriber already installed (tests) is fine.
    let _ = result;
}
