#!/usr/bin/env bash
# Installs `tansu`, a real Kafka-protocol broker (memory storage), used by the Kafka end-to-end
# tests and the forwarder benchmark. Idempotent: does nothing when the pinned version is already
# on PATH. A first build from source takes 25-40 minutes on a 2-core machine; the binary lands in
# ~/.cargo/bin and every later run reuses it.
set -euo pipefail

TANSU_VERSION=0.6.0

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

if command -v tansu >/dev/null 2>&1 && tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
  exit 0
fi
# A work area may hold a prebuilt copy beside the checkout (`../shared/bin/tansu`): use it when it
# is the pinned version, instead of half an hour of compiling.
prebuilt=../shared/bin/tansu
if [[ -x $prebuilt ]] && "$prebuilt" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
  mkdir -p "$HOME/.cargo/bin"
  install -m 0755 "$prebuilt" "$HOME/.cargo/bin/tansu"
  log "Installed the prebuilt tansu $TANSU_VERSION from $prebuilt"
  exit 0
fi
log "Installing tansu $TANSU_VERSION from crates.io (a Kafka-protocol broker; builds from source, 25-40 minutes)"
# A separate target directory: this build must not evict the project's own cache.
CARGO_TARGET_DIR="${TANSU_TARGET_DIR:-$HOME/.cache/outpost-tansu-build}" \
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore
