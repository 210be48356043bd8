#!/usr/bin/env bash
# Builds the Debian package of Outpost for one architecture with cargo-deb, from a binary built
# beforehand (cargo-deb --no-build): by default the one cross/build.sh made.
#
#   packaging/deb.sh aarch64|armv7|x86_64 [BINARY] [--deb-version VERSION] [--fast] [--lintian]
#                      [--output DIR]
#
# aarch64 → outpost_<version>_arm64.deb (64-bit Raspberry Pi OS), armv7 → _armhf.deb (32-bit),
# x86_64 → _amd64.deb. BINARY defaults to $CARGO_TARGET_DIR/<triple>/${PROFILE:-release}/outpost
# (`PROFILE=dist bash cross/build.sh <arch>` makes the one to ship). The package lands in
# $CARGO_TARGET_DIR/debian/ (or --output DIR) and its path is the last line printed. Installs cargo-deb when
# missing. What goes into the package: the [package.metadata.deb] table of daemon/Cargo.toml;
# packaging/README.md explains it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
# shellcheck source=cross/arch.sh
source cross/arch.sh

usage() {
  log "usage: $0 aarch64|armv7|x86_64 [BINARY] [--deb-version VERSION] [--fast] [--lintian] [--output DIR]"
  exit 2
}

[[ $# -ge 1 ]] || usage
arch=$1
shift
arch_vars "$arch" || usage
binary=
version_args=()
# --fast: lighter compression (the package tests install a debug build, which compresses slowly).
fast_args=()
# --lintian: check the package with Debian's lintian; any error or warning (beyond the
# overrides the package carries, each explained) fails.
lintian=
out=
while [[ $# -gt 0 ]]; do
  case $1 in
    --deb-version)
      [[ $# -ge 2 ]] || usage
      version_args=(--deb-version "$2")
      shift 2
      ;;
    --output)
      [[ $# -ge 2 ]] || usage
      out=$2
      shift 2
      ;;
    --lintian)
      lintian=1
      shift
      ;;
    --fast)
      fast_args=(--fast)
      shift
      ;;
    -*) usage ;;
    *)
      binary=$1
      shift
      ;;
  esac
done
target_dir=$(cargo_target_dir)
binary=${binary:-$target_dir/$TRIPLE/${PROFILE:-release}/outpost}
[[ -x $binary ]] || die "no binary at $binary: build it first (bash cross/build.sh $arch)"

ensure_cargo_deb() {
  if ! cargo deb --version >/dev/null 2>&1; then
    log "Installing cargo-deb from crates.io (builds from source, takes a few minutes)"
    cargo install cargo-deb --locked
  fi
}
ensure_cargo_deb
if [[ $arch != x86_64 ]]; then
  ensure_apt_packages "binutils-$GNU"
fi

# cargo-deb takes the binary from <target dir>/<triple>/release/outpost: stage a stripped copy
# there, in a directory of its own, so whatever binary was given is the one packaged.
staging=$(mktemp -d -t outpost-deb.XXXXXX)
trap 'rm -rf "$staging"' EXIT
mkdir -p "$staging/$TRIPLE/release"
"${GNU}-strip" -o "$staging/$TRIPLE/release/outpost" "$binary"
out=${out:-$target_dir/debian}
mkdir -p "$out"
deb=$(CARGO_TARGET_DIR=$staging cargo deb -p outpost --no-build --no-strip --locked \
  --target "$TRIPLE" --output "$out" "${version_args[@]}" "${fast_args[@]}" | tail -n 1)
[[ -f $deb ]] || die "cargo-deb did not report a package path (got: $deb)"
log "$(basename "$deb"): $(stat -c %s "$deb") bytes"
if [[ -n $lintian ]]; then
  ensure_apt_packages lintian
  rc=0
  report=$(lintian --fail-on error,warning "$deb" 2>&1) || rc=$?
  # lintian warns that it runs as root; that line is not about the package.
  grep -v 'running with root privileges' <<<"$report" >&2 || true
  ((rc == 0)) || die "lintian found problems in $(basename "$deb")"
  log "lintian: no errors or warnings"
fi
printf '%s\n' "$deb"
