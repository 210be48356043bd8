//! `tracing` setup: human-readable by default, JSON on request, and no duplicate timestamps when
//! journald (which stamps every line itself) collects the output.

use std::sync::OnceLock;

use outpost_config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// Replaces the installed subscriber's filter (set by [`init`]).
type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

static SET_FILTER: OnceLock<SetFilter> = OnceLock::new();

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
    // Each formatter is its own type, and so is its reload handle: keep a closure over it.
    macro_rules! install {
        ($builder:expr) => {{
            let builder = $builder.with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = SET_FILTER.set(Box::new(move |filter| {
                handle.reload(filter).map_err(|e| e.to_string())
            }));
            builder.try_init()
        }};
    }
    let result = match config.format {
        LogFormat::Json => install!(builder.json().flatten_event(true).with_current_span(false)),
        LogFormat::Human | LogFormat::Auto if under_journald => {
            install!(builder.without_time().with_ansi(false))
        }
        LogFormat::Human | LogFormat::Auto => install!(builder),
    };
    // A subscriber already installed (tests) is fine.
    let _ = result;
}

/// Applies a new `log.level` to the running subscriber (a reload). `Ok(false)` when `RUST_LOG`
/// is set: it keeps precedence, as at start.
pub fn set_level(level: &str) -> Result<bool, String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Ok(false);
    }
    let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    let set = SET_FILTER
        .get()
        .ok_or_else(|| "no logging subscriber is installed".to_owned())?;
    set(filter).map(|()| true)
}
