//! The `outpost` binary: command-line edge of the daemon. Everything here turns `anyhow` errors
//! and typed results into exit codes; the work happens in the library modules.

#![deny(unsafe_code)] // one exception: the allocator options in `allocator`

mod admin;
mod allocator;
mod api;
mod app;
mod apps;
mod cli;
mod cloud_commands;
mod console;
mod edge;
mod fleet;
mod history;
mod https;
mod ingress;
mod local_admin;
mod registry;
mod reload;
mod status;
mod supervisor;
mod systemd;
mod telemetry;
mod webhooks;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    cli::dispatch(cli::args::Cli::parse())
}
