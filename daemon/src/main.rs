//! The `outpost` binary: command-line edge of the daemon. Everything here turns `anyhow` errors
//! and typed results into exit codes; the work happens in the library modules.

#![deny(unsafe_code)] // one exception: the allocator options in `allocator`

mod admin;
mod allocator;
mod api;
mod app;
mod apps;
mod cli;
mod cli_devices;
mod commands;
mod fleet;
mod ingress;
mod registry;
mod status;
mod supervisor;
mod systemd;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

/// Exit code for an invalid or unreadable configuration (`EX_CONFIG` from sysexits.h). The
/// systemd unit names it in `RestartPreventExitStatus` so a bad config is not restarted in a loop.
pub const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    commands::dispatch(cli)
}
