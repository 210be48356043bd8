# shellcheck shell=bash
# Helpers shared by scripts/*.sh and cross/*.sh. Source it; it defines functions only.

# log MSG... : a progress line on stderr, so it never mixes with a command's stdout.
log() { printf '%s\n' "$*" >&2; }

# die MSG... : print an error and exit 1.
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# as_root CMD... : run CMD as root (directly, or through sudo when we are not root).
as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root to run '$*' (and sudo is not installed)"
  fi
}

# apt_installed PKG : true if the Debian package is installed (not merely known to dpkg).
apt_installed() {
  # With a foreign architecture added (cross/build.sh), a bare name matches the package of every
  # installed architecture, one line each: a bare name wants the native or the `all` one.
  local want
  case $1 in
    *:*) want=${1##*:} ;;
    *) want="$(dpkg --print-architecture)|all" ;;
  esac
  dpkg-query -W -f='${Architecture} ${Status}\n' "$1" 2>/dev/null |
    grep -Eq "^($want) install ok installed$"
}

# ensure_apt_packages PKG... : install whichever of PKG are missing. Runs `apt-get update` only
# when something has to be installed, so a machine that has everything never touches the network.
ensure_apt_packages() {
  command -v dpkg-query >/dev/null 2>&1 ||
    die "not a Debian-based system: install these packages by hand: $*"
  local missing=() pkg
  for pkg in "$@"; do
    apt_installed "$pkg" || missing+=("$pkg")
  done
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  log "Installing Debian packages: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# linked_dev_packages [ARCH] : the Debian -dev packages a build of outpost links against, one per
# line, as NAME:ARCH when ARCH is given (another architecture's build): the system's OpenSSL, zstd
# and zlib (ARCHITECTURE.md, "Decision: system OpenSSL"), and libcurl's headers, because
# librdkafka 2.12.1 includes <curl/curl.h> even when built without libcurl (none of it is linked).
linked_dev_packages() {
  local pkg
  for pkg in libssl-dev libzstd-dev zlib1g-dev libcurl4-openssl-dev; do
    printf '%s\n' "$pkg${1:+:$1}"
  done
}

# ensure_foreign_arch ARCH : let dpkg install packages of Debian architecture ARCH (multiarch), so
# a cross build can link the target's libraries (libssl-dev:arm64, ...). The next
# ensure_apt_packages call that finds something missing runs `apt-get update`, which fetches the
# new architecture's package lists.
ensure_foreign_arch() {
  [[ $(dpkg --print-architecture) == "$1" ]] && return 0
  dpkg --print-foreign-architectures | grep -qx "$1" && return 0
  log "Adding Debian architecture $1 (multiarch)"
  as_root dpkg --add-architecture "$1"
}

# ensure_rust_target TRIPLE : add the standard library for TRIPLE to the active toolchain.
ensure_rust_target() {
  command -v rustup >/dev/null 2>&1 ||
    die "rustup not found; cross targets need it (https://rustup.rs), or install rust-std for $1 by hand"
  if ! rustup target list --installed | grep -qx "$1"; then
    log "Adding Rust target $1"
    rustup target add "$1"
  fi
}

# ensure_rust_component NAME : add a rustup component (rustfmt, clippy) to the active toolchain.
ensure_rust_component() {
  command -v rustup >/dev/null 2>&1 || die "rustup not found; install $1 for your toolchain by hand"
  if ! rustup component list --installed | grep -q "^$1"; then
    log "Adding Rust component $1"
    rustup component add "$1"
  fi
}

# cargo_target_dir : where cargo writes artifacts (honours CARGO_TARGET_DIR, as cargo does).
# Call from the repository root.
cargo_target_dir() {
  printf '%s\n' "${CARGO_TARGET_DIR:-$PWD/target}"
}
