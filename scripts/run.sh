#!/usr/bin/env bash
# Builds and runs the gateway from source (release build):
#
#   bash scripts/run.sh [--config PATH]      (arguments go to `outpost run`)
#
# Without --config, Outpost runs with safe defaults and keeps its data in ./outpost-data.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

# Debian packages needed to build: a C and C++ toolchain (bundled SQLite, librdkafka), cmake
# (librdkafka is built with it), pkg-config for -sys crates, and the -dev packages of what the
# binary links (linked_dev_packages in scripts/lib.sh).
BUILD_PACKAGES=(build-essential cmake pkg-config)

if command -v dpkg-query >/dev/null 2>&1; then
  # shellcheck disable=SC2046 # one package name per word
  ensure_apt_packages "${BUILD_PACKAGES[@]}" $(linked_dev_packages)
else
  log "Not a Debian-based system: make sure a C compiler and pkg-config are installed."
fi

if ! command -v cargo >/dev/null 2>&1; then
  cat >&2 <<'MSG'
cargo not found. Install Rust with rustup:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh
then open a new shell (or `source "$HOME/.cargo/env"`) and run this script again.
MSG
  exit 1
fi

exec cargo run --release --locked -p outpost -- run "$@"
