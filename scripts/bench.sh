#!/usr/bin/env bash
# Benchmarks behind the figures in docs/BENCHMARKS.md. Not part of the test command: figures are
# measured here and written down, never asserted in timed tests.
#
#   bash scripts/bench.sh [outbox|rss|size|all]
#
# outbox: append throughput and append->commit latency at 50,000 records/s (median of 5 runs)
# rss:    resident memory of an idle `outpost run` on defaults (median of 5 starts)
# size:   stripped release binary sizes (x86_64, and aarch64 if cross/build.sh has run)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
what=${1:-all}
target_dir=${CARGO_TARGET_DIR:-target}

machine() {
  printf 'machine: %s, %s cores, %s\n' "$(uname -m)" "$(nproc)" \
    "$(awk '/MemTotal/ {printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo)"
  grep -m1 'model name' /proc/cpuinfo || true
}

outbox() {
  cargo bench --locked -p outpost-sync --bench outbox_append -- --runs 5 --appenders 512 \
    --records 1000000 --rate 50000 --seconds 5
}

rss() {
  cargo build --locked --release -p outpost
  local bin=$target_dir/release/outpost samples=() dir pid
  for _ in 1 2 3 4 5; do
    dir=$(mktemp -d)
    printf '[gateway]\ndata_dir = "%s/data"\n[admin]\nlisten = "127.0.0.1:0"\n' "$dir" >"$dir/c.toml"
    "$bin" run --config "$dir/c.toml" 2>/dev/null &
    pid=$!
    sleep 5
    samples+=("$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")")
    kill -TERM "$pid"
    wait "$pid"
    rm -rf "$dir"
  done
  printf 'idle RSS samples (KiB): %s\n' "${samples[*]}"
  printf 'idle RSS median: %s KiB\n' "$(printf '%s\n' "${samples[@]}" | sort -n | sed -n 3p)"
}

size() {
  cargo build --locked --release -p outpost
  for bin in "$target_dir/release/outpost" "$target_dir/aarch64-unknown-linux-gnu/release/outpost" \
    "$target_dir/armv7-unknown-linux-gnueabihf/release/outpost"; do
    [[ -f $bin ]] && printf '%s: %s bytes (%s)\n' "$bin" "$(stat -c %s "$bin")" "$(file -b "$bin" | cut -d, -f1-2)"
  done
  return 0
}

machine
case $what in
  outbox) outbox ;;
  rss) rss ;;
  size) size ;;
  all) outbox; rss; size ;;
  *) echo "usage: $0 [outbox|rss|size|all]" >&2; exit 2 ;;
esac
