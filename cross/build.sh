#!/usr/bin/env bash
# Builds `outpost` for the gateway architectures with Debian's GNU (cross) toolchains.
#
#   [PROFILE=dist] cross/build.sh [aarch64|armv7|x86_64|all]   (default: all = aarch64 + armv7)
#
# Output: $CARGO_TARGET_DIR (default target/)/<triple>/<profile>/outpost.
# - `release` (the default) is what CI builds and smoke-tests.
# - `dist` is the binary to ship: fat LTO and one codegen unit, linked twice. The first link is
#   run once under qemu (cross/smoke.sh) with every function it executes recorded, from start
#   through a few idle seconds; the second link puts those functions first, together, in the
#   code section (lld's --symbol-ordering-file, passed by daemon/build.rs). The code an idle
#   daemon runs then fills a few hundred pages instead of touching pages all over the binary,
#   which is what keeps idle RSS low (docs/BENCHMARKS.md, "Idle RSS"). The result is stripped.
# The toolchain is chosen with per-target environment variables set only for the cargo command
# below, so native builds in the same target dir are unaffected (no .cargo/config.toml).
# Installs what it needs when missing (rustup target, Debian cross compilers); idempotent.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
# shellcheck source=cross/arch.sh
source cross/arch.sh

usage() {
  log "usage: [PROFILE=release|dist] $0 [aarch64|armv7|x86_64|all]"
  exit 2
}

# cargo_build PROFILE [ENV=VALUE...] : `cargo build` of the outpost binary for $TRIPLE.
# cc-rs (bundled SQLite and any other C/C++ code) reads CC_<triple>, CXX_<triple>, AR_<triple>;
# cargo reads CARGO_TARGET_<TRIPLE>_LINKER. Host build scripts keep using the native compiler.
# The pkg-config crate (openssl-sys, zstd-sys, libz-sys) reads the target's .pc files from the
# multiarch directory; Debian's cross compilers search its headers and libraries by themselves.
cargo_build() {
  local profile=$1
  shift
  local triple_env=${TRIPLE//-/_}
  local triple_upper=${triple_env^^}
  env \
    "CC_${triple_env}=${GNU}-gcc" \
    "CXX_${triple_env}=${GNU}-g++" \
    "AR_${triple_env}=${GNU}-ar" \
    "CARGO_TARGET_${triple_upper}_LINKER=${GNU}-gcc" \
    "PKG_CONFIG_ALLOW_CROSS_${triple_env}=1" \
    "PKG_CONFIG_LIBDIR_${triple_env}=/usr/lib/${GNU}/pkgconfig:/usr/share/pkgconfig" \
    "$@" \
    cargo build --profile "$profile" --locked -p outpost --bin outpost --target "$TRIPLE"
}

build() {
  local arch=$1
  arch_vars "$arch" || usage
  ensure_foreign_arch "$DEB_ARCH"
  ensure_apt_packages "${CROSS_PACKAGES[@]}"
  ensure_rust_target "$TRIPLE"

  local profile=${PROFILE:-release}
  local bin
  bin="$(cargo_target_dir)/$TRIPLE/$profile/outpost"
  log "Building outpost for $TRIPLE ($profile)"
  local start=$SECONDS
  if [[ $profile == dist ]]; then
    # Link 1, with symbols, without an order; record what start and idle run; link 2 in that
    # order. OUTPOST_SYMBOL_ORDER is empty for link 1 so that cargo relinks when it changes.
    local order="$(cargo_target_dir)/$TRIPLE/$profile/startup-order.txt"
    cargo_build "$profile" OUTPOST_SYMBOL_ORDER=
    SMOKE_PROFILE=$profile SMOKE_RECORD_ORDER=$order bash cross/smoke.sh "$arch"
    cargo_build "$profile" "OUTPOST_SYMBOL_ORDER=$order"
    "${GNU}-strip" "$bin"
    SMOKE_PROFILE=$profile bash cross/smoke.sh "$arch"
  else
    cargo_build "$profile"
  fi
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
  aarch64 | armv7 | x86_64) build "$1" ;;
  all)
    build aarch64
    build armv7
    ;;
  *) usage ;;
esac
