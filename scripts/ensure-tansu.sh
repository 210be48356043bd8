#!/usr/bin/env bash
# Installs two builds of `tansu`, a real Kafka-protocol broker, into ~/.cargo/bin. Idempotent:
# each is skipped when the pinned version is already there.
#
# * `tansu` (feature `dynostore`: memory storage): the Kafka end-to-end tests and the forwarder
#   benchmark. A first build from source takes 25-40 minutes on a 2-core machine.
# * `tansu-sqlite` (feature `libsql`: SQLite storage): the SASL/SCRAM tests
#   (tests/tests/kafka_security.rs). tansu keeps SCRAM credentials only in this storage (the
#   memory storage accepts a user and forgets it), so SCRAM needs this build. A debug build
#   (about 5 minutes on 2 cores, against 9 for a release build): those tests need no speed.
set -euo pipefail

TANSU_VERSION=0.6.0

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

# A separate target directory: these builds must not evict the project's own cache.
target_dir="${TANSU_TARGET_DIR:-$HOME/.cache/outpost-tansu-build}"

# has NAME: the pinned version of NAME is on PATH.
has() {
  command -v "$1" >/dev/null 2>&1 && "$1" --version 2>/dev/null | grep -q "$TANSU_VERSION"
}

install_tansu() {
  has tansu && return
  # A work area may hold a prebuilt copy beside the checkout (`../shared/bin/tansu`): use it when
  # it is the pinned version, instead of half an hour of compiling.
  local prebuilt=../shared/bin/tansu
  if [[ -x $prebuilt ]] && "$prebuilt" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    mkdir -p "$HOME/.cargo/bin"
    install -m 0755 "$prebuilt" "$HOME/.cargo/bin/tansu"
    log "Installed the prebuilt tansu $TANSU_VERSION from $prebuilt"
    return
  fi
  log "Installing tansu $TANSU_VERSION from crates.io (a Kafka-protocol broker; builds from source, 25-40 minutes)"
  CARGO_TARGET_DIR="$target_dir" \
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore
}

install_tansu_sqlite() {
  has tansu-sqlite && return
  log "Installing tansu-sqlite (tansu $TANSU_VERSION with SQLite storage, for the SCRAM tests; builds from source, about 5 minutes)"
  local root
  root=$(mktemp -d)
  CARGO_TARGET_DIR="$target_dir-sqlite" \
    cargo install tansu --version "$TANSU_VERSION" --locked --features libsql --debug --root "$root"
  mkdir -p "$HOME/.cargo/bin"
  install -m 0755 "$root/bin/tansu" "$HOME/.cargo/bin/tansu-sqlite"
  rm -rf "$root"
}

install_tansu
install_tansu_sqlite
