#!/usr/bin/env bash
# Cross-compiles release binaries of `outpost` for ARM gateways with Debian's GNU cross toolchains.
#
#   [PROFILE=dist] cross/build.sh [aarch64|armv7|all]     (default: all, profile release)
#
# Output: $CARGO_TARGET_DIR (default target/)/<triple>/<profile>/outpost. `release` is what CI
# builds and smoke-tests; `dist` (fat LTO, one codegen unit) is the smaller binary to ship.
# The toolchain is chosen with per-target environment variables set only for the cargo command
# below, so native builds in the same target dir are unaffected (no .cargo/config.toml).
# Installs what it needs when missing (rustup target, Debian cross compilers); idempotent.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

usage() {
  log "usage: $0 [aarch64|armv7|all]"
  exit 2
}

# arch_vars ARCH : sets TRIPLE, GNU (the cross tools' prefix) and CROSS_PACKAGES for ARCH.
arch_vars() {
  case $1 in
    aarch64) # 64-bit Raspberry Pi OS / Debian arm64 (Pi 3, 4, 5, Zero 2 W, most ARM gateways)
      TRIPLE=aarch64-unknown-linux-gnu
      GNU=aarch64-linux-gnu
      CROSS_PACKAGES=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross)
      ;;
    armv7) # 32-bit Raspberry Pi OS / Debian armhf on ARMv7 (Pi 2, 3, 4 running 32-bit)
      TRIPLE=armv7-unknown-linux-gnueabihf
      GNU=arm-linux-gnueabihf
      CROSS_PACKAGES=(gcc-arm-linux-gnueabihf g++-arm-linux-gnueabihf libc6-dev-armhf-cross)
      ;;
    *) usage ;;
  esac
}

build() {
  local arch=$1
  arch_vars "$arch"
  ensure_apt_packages "${CROSS_PACKAGES[@]}"
  ensure_rust_target "$TRIPLE"

  # cc-rs (bundled SQLite and any other C/C++ code) reads CC_<triple>, CXX_<triple>, AR_<triple>;
  # cargo reads CARGO_TARGET_<TRIPLE>_LINKER. Host build scripts keep using the native compiler.
  local triple_env=${TRIPLE//-/_}
  local triple_upper=${triple_env^^}
  local profile=${PROFILE:-release}
  log "Building outpost for $TRIPLE ($profile)"
  local start=$SECONDS
  env \
    "CC_${triple_env}=${GNU}-gcc" \
    "CXX_${triple_env}=${GNU}-g++" \
    "AR_${triple_env}=${GNU}-ar" \
    "CARGO_TARGET_${triple_upper}_LINKER=${GNU}-gcc" \
    cargo build --profile "$profile" --locked -p outpost --bin outpost --target "$TRIPLE"

  local bin
  bin="$(cargo_target_dir)/$TRIPLE/$profile/outpost"
  [[ -x $bin ]] || die "cargo finished but $bin is missing"

  # The release profile already strips symbols; strip a copy anyway so the size printed is the
  # size that ships even if the profile changes.
  local stripped size
  stripped=$(mktemp)
  "${GNU}-strip" -o "$stripped" "$bin"
  size=$(stat -c %s "$stripped")
  rm -f "$stripped"
  local machine
  machine=$("${GNU}-readelf" -h "$bin" | sed -n 's/^ *Machine: *//p')

  printf '%s: %s\n' "$arch" "$bin"
  printf '  machine: %s, stripped size: %s bytes (%s MiB), built in %ss\n' \
    "$machine" "$size" "$(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1048576 }')" \
    "$((SECONDS - start))"
}

case ${1:-all} in
  aarch64 | armv7) build "$1" ;;
  all)
    build aarch64
    build armv7
    ;;
  -h | --help) usage ;;
  *) usage ;;
esac
