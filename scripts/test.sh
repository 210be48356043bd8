#!/usr/bin/env bash
# THE test command: installs what is missing, then runs every check. `.ci/run` execs this.
#
#   bash scripts/test.sh
#
# Sections: setup, fmt, deny (dependency policy: deny.toml), clippy, build, docker (a Docker
# engine and the test images), tansu (waits for the Kafka broker built in the background),
# cargo-fuzz, tests (nextest, profile `ci`, with every cargo-fuzz target and the aarch64 cross
# build built beside the first run), the cross build's qemu smoke test, the arm64 .deb (lintian).
# Stops at the first failing section and says which one failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

# CI clones afresh each run; keep the build cache outside the clone so the next run on the same
# machine reuses it. A machine without the cache simply builds from scratch.
if [[ ${CI:-} == true && -z ${CARGO_TARGET_DIR:-} ]]; then
  export CARGO_TARGET_DIR="$HOME/.cache/outpost-ci/target"
  mkdir -p "$CARGO_TARGET_DIR"
fi
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}

started=$SECONDS
current=
timings=()
nextest_log=$(mktemp -t outpost-nextest.XXXXXX)

# Stops a dockerd that scripts/ensure-docker.sh started for this run; an engine that was
# already running is left alone.
stop_our_dockerd() {
  local pid
  [[ -f /tmp/outpost-dockerd.pid ]] || return 0
  pid=$(cat /tmp/outpost-dockerd.pid)
  rm -f /tmp/outpost-dockerd.pid
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 20); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.5
  done
  kill -9 "$pid" 2>/dev/null || true
}

finish() {
  local rc=$?
  stop_our_dockerd
  rm -f "$nextest_log" "${tansu_log:-}"
  if ((rc != 0)); then
    printf '\n##### FAILED in section "%s" (exit %s) after %ss #####\n' \
      "$current" "$rc" "$((SECONDS - started))"
  fi
}
trap finish EXIT

# section NAME CMD... : run CMD under a banner and record how long it took.
section() {
  current=$1
  shift
  printf '\n##### %s #####\n' "$current"
  local start=$SECONDS
  "$@"
  local took=$((SECONDS - start))
  printf '##### %s: ok (%ss) #####\n' "$current" "$took"
  timings+=("$(printf '%-14s %5ss' "$current" "$took")")
}

# Tests named `alone_…` assert a time the product promises ("disconnected within a second",
# "reports an outage within 15 s"): they run after the rest, one at a time, so what else the
# suite runs beside them cannot move their clock. Both runs always run; either failing fails.
#
# The first run mostly waits (daemons, brokers, timers; its longest test holds a Kafka outage
# for 5 minutes), so the fuzz targets and the aarch64 cross build are built meanwhile, at the
# lowest CPU priority (nice 19: a test that wants the CPU gets it), and awaited before the
# `alone_` run, which runs with nothing else. Their output goes to a log printed if they fail.
run_nextest() {
  local rc=0 builds_log builds_pid
  # Build the test binaries first, so the background builds start once they are done.
  cargo nextest run --workspace --locked --profile ci --no-run
  builds_log=$(mktemp -t outpost-builds.XXXXXX)
  nice -n 19 bash -c 'set -e; (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build); bash cross/build.sh aarch64' \
    >"$builds_log" 2>&1 &
  builds_pid=$!
  # tee keeps nextest's own output (and its summary line) on screen; pipefail keeps its status.
  cargo nextest run --workspace --locked --profile ci -E 'not test(/^alone_/)' 2>&1 |
    tee "$nextest_log" || rc=$?
  local waited=$SECONDS
  if wait "$builds_pid"; then
    printf 'fuzz-build and cross-build (in the background): ok; waited %ss for them\n' "$((SECONDS - waited))"
    grep -E '^(aarch64|  machine)' "$builds_log" || true
  else
    cat "$builds_log"
    printf 'fuzz-build or cross-build (in the background) FAILED\n'
    rc=1
  fi
  rm -f "$builds_log"
  cargo nextest run --workspace --locked --profile ci -E 'test(/^alone_/)' --test-threads 1 2>&1 |
    tee -a "$nextest_log" || rc=$?
  return "$rc"
}

# Every fuzz target (fuzz/, its own workspace) must build (run_nextest builds them). The toolchain
# is stable: cargo-fuzz needs nightly flags (-Zsanitizer), which RUSTC_BOOTSTRAP=1 unlocks on a
# stable compiler.
ensure_cargo_fuzz() {
  if ! cargo fuzz --version >/dev/null 2>&1; then
    log "Installing cargo-fuzz from crates.io (builds from source, takes a few minutes)"
    cargo install cargo-fuzz --locked
  fi
}

# tansu (the Kafka broker of the Kafka tests) is built from source on a machine that lacks it:
# start that in the background so it overlaps fmt, clippy and the build; `tansu` waits for it.
section setup env OUTPOST_TANSU_LATER=1 bash scripts/setup-test-deps.sh
tansu_log=$(mktemp -t outpost-tansu.XXXXXX)
bash scripts/ensure-tansu.sh >"$tansu_log" 2>&1 &
tansu_pid=$!
wait_tansu() {
  if ! wait "$tansu_pid"; then
    cat "$tansu_log"
    return 1
  fi
}
section fmt cargo fmt --all -- --check
# Licenses, duplicate versions and sources of every dependency (deny.toml). Offline: the
# advisories check needs the network (docs/TESTING.md, "Dependency policy").
section deny cargo deny --locked check bans licenses sources
section clippy cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests start the real binary: build it first (cargo would not, for another
# package's tests).
section build cargo build --workspace --bins --locked
# The apps tests need a real container engine and the local test image.
section docker bash scripts/ensure-docker.sh
section tansu wait_tansu
section cargo-fuzz ensure_cargo_fuzz
# The tests, with the fuzz targets and the aarch64 cross build built beside them (run_nextest).
section tests run_nextest
section cross-smoke bash cross/smoke.sh aarch64
# The arm64 Debian package of that build, checked by lintian (the amd64 package of the test build
# is installed on a Debian system with systemd by tests/tests/package.rs).
section package bash packaging/deb.sh aarch64 --lintian

current=summary
printf '\n##### summary #####\n'
printf '%s\n' "${timings[@]}"
printf '%-14s %5ss\n' total "$((SECONDS - started))"
# Repeat the test count last, so it is the closing line of the whole run.
# Two nextest runs (the suite, then the `alone_` tests): add up their summaries.
summaries=$(grep -E '^ *Summary \[' "$nextest_log" || true)
if [[ -n $summaries ]]; then
  printf '%s\n' "$summaries"
  passed=0
  failed=0
  while read -r line; do
    passed=$((passed + $(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$line" | grep . || echo 0)))
    failed=$((failed + $(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$line" | grep . || echo 0)))
  done <<<"$summaries"
  printf 'tests: %s passed, %s failed\n' "$passed" "$failed"
fi
