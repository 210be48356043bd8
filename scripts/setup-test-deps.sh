#!/usr/bin/env bash
# Installs everything scripts/test.sh needs. Idempotent: each item is checked first, and the network
# is used only for what is missing. Later issues add their tools to the lists below.
set -euo pipefail

# Debian packages the tests and checks use.
PACKAGES=(
  curl                   # health checks against the admin HTTP server
  python3                # small helpers in scripts (free ports, JSON)
  systemd                # systemd-analyze, systemd-sysusers, systemd-tmpfiles (tests/tests/systemd_unit.rs)
  qemu-user-static       # cross/smoke.sh runs the aarch64 binary under qemu-aarch64-static
  gcc-aarch64-linux-gnu  # cross/build.sh: linker and C compiler (bundled SQLite) for aarch64
  g++-aarch64-linux-gnu
  libc6-dev-arm64-cross  # aarch64 glibc headers and crt files for the cross build
  socat                  # pseudo-terminals for serial driver tests
  mosquitto-clients      # a real MQTT client for end-to-end tests
  mosquitto              # the reference broker of the MQTT conformance tests (tests/tests/mqtt_conformance.rs)
  openssl                # test CA and certificates for the MQTT TLS tests (tests/tests/mqtt_tls.rs)
  curl                   # a real HTTPS client for the admin and ingestion listeners (tests/tests/http_ingest.rs)
  ca-certificates        # the system CA bundle the CLI trusts for https:// (and curl's default)
  sqlite3                # inspecting the outbox database in tests and by hand
  libcoap3-bin           # coap-client (libcoap) for the CoAP end-to-end tests (tests/tests/coap.rs)
  docker.io              # the real container engine for the apps tests (scripts/ensure-docker.sh starts dockerd)
  busybox-static         # the rootfs of the local test image outpost-test/busybox:1 (no registry needed)
  cmake                  # builds the bundled librdkafka (rdkafka's cmake-build feature)
  pkg-config             # finds the system libraries the binary links (linked_dev_packages, below)
  g++                    # librdkafka is a C and C++ CMake project (it builds its C++ wrapper too)
  kcat                   # a real Kafka client reading the mock cluster in tests/tests/kafka.rs (Debian's kcat cannot talk to tansu)
  chromium               # a real browser for the web console test (tests/peers/console_check.py)
  chromium-driver        # its WebDriver server
  mmdebstrap             # a Debian rootfs with systemd for the package tests (scripts/ensure-docker.sh)
  lintian                # checks the Debian packages (packaging/deb.sh --lintian, tests/tests/package.rs)
  stunnel4               # a real TLS terminator in front of tansu: Kafka over TLS and mutual TLS (tests/tests/kafka_security.rs)
)

# Python packages for the real peers of the driver tests (tests/peers/), as "requirement:module"
# (the module checked to see whether it is installed), installed with
# `python3 -m pip install --quiet`.
PIP_PACKAGES=(
  "pymodbus>=3.10,<4:pymodbus"  # a real Modbus TCP/RTU slave (tests/peers/modbus_slave.py)
  "pyserial:serial"             # pymodbus' serial (RTU) transport
  "paho-mqtt>=2,<3:paho.mqtt"   # MQTT 5 client for the MQTT server tests (tests/tests/mqtt.rs)
  "openapi-spec-validator>=0.7,<0.8:openapi_spec_validator"  # validates the served OpenAPI document (tests/tests/api.rs)
  "cloudevents>=1.9,<2:cloudevents"  # the CloudEvents SDK for Python reads forwarded events (tests/peers/cloudevents_check.py)
  "selenium>=4.20,<5:selenium"  # drives Chromium through chromedriver (tests/peers/console_check.py)
  "confluent-kafka>=2.6,<3:confluent_kafka"  # a backend's Kafka client: the commands tests and docs/examples/backend.py
)

# rustup components and targets.
RUST_COMPONENTS=(rustfmt clippy)
RUST_TARGETS=(aarch64-unknown-linux-gnu)

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

# shellcheck disable=SC2046 # one package name per word
ensure_apt_packages "${PACKAGES[@]}" $(linked_dev_packages)

command -v cargo >/dev/null 2>&1 ||
  die "cargo not found: install Rust with rustup (https://rustup.rs) and open a new shell"
for component in "${RUST_COMPONENTS[@]}"; do
  ensure_rust_component "$component"
done
for target in "${RUST_TARGETS[@]}"; do
  ensure_rust_target "$target"
done

for entry in "${PIP_PACKAGES[@]}"; do
  requirement=${entry%:*}
  module=${entry##*:}
  if ! python3 -c "import $module" >/dev/null 2>&1; then
    log "Installing Python package $requirement"
    python3 -m pip install --quiet "$requirement"
  fi
done

if ! cargo nextest --version >/dev/null 2>&1; then
  log "Installing cargo-nextest from crates.io (builds from source, takes a few minutes)"
  cargo install cargo-nextest --locked
fi

if ! cargo deb --version >/dev/null 2>&1; then
  log "Installing cargo-deb from crates.io (builds from source, takes a few minutes)"
  cargo install cargo-deb --locked
fi

if ! cargo deny --version >/dev/null 2>&1; then
  log "Installing cargo-deny from crates.io (builds from source, takes a few minutes)"
  # Without default features: no network access for the advisory database, which the test
  # command does not check (docs/TESTING.md, "Dependency policy").
  cargo install cargo-deny --locked --no-default-features
fi

# The real Kafka-protocol broker for the Kafka end-to-end tests (tests/src/kafka.rs). Idempotent;
# a first build from source takes 15-40 minutes. scripts/test.sh builds it in the background
# instead (OUTPOST_TANSU_LATER=1) so that it overlaps the workspace build.
if [[ -z ${OUTPOST_TANSU_LATER:-} ]]; then
  bash scripts/ensure-tansu.sh
fi

log "Test dependencies are in place."
