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
# (librdkafka is built with it), pkg-config for -sys crates, the headers of the system libraries
# the binary links (OpenSSL, zstd, zlib), and libcurl's headers: librdkafka 2.12.1 includes
# <curl/curl.h> in one file even when built without libcurl (nothing of it is linked).
BUILD_PACKAGES=(build-essential cmake pkg-config libssl-dev libzstd-dev zlib1g-dev libcurl4-openssl-dev)

if command -v dpkg-query >/dev/null 2>&1; then
  ensure_apt_packages "${BUILD_PACKAGES[@]}"
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
