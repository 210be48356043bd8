#!/usr/bin/env bash
# Benchmarks behind the figures in docs/BENCHMARKS.md. Not part of the test command: figures are
# measured here and written down, never asserted in timed tests.
#
#   bash scripts/bench.sh [outbox|rss|size|all]
#
# outbox: append throughput and append->commit latency at 50,000 records/s (median of 5 runs)
# rss:    resident memory of an idle `outpost run` on defaults (median of 5 starts)
# size:   stripped release binary sizes (x86_64, and aarch64 if cross/build.sh has run)
# http:   HTTP ingestion, single-record POSTs from 50 keep-alive connections with wrk (median of 5)
# coap:   CoAP CON POSTs from 100 clients with the repo's bench client (median of 5)
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
    printf '[gateway]\ndata_dir = "%s/data"\n[admin]\nlisten = "127.0.0.1:0"\n[coap]\nlisten = "127.0.0.1:0"\n' "$dir" >"$dir/c.toml"
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

# Starts the release daemon with an admin token on ephemeral ports; sets $bench_pid, $bench_admin,
# $bench_dir. The token is "bench-token".
start_daemon() {
  cargo build --locked --release -p outpost
  bench_dir=$(mktemp -d)
  local digest
  digest=$(printf '%s' bench-token | sha256sum | cut -d' ' -f1)
  cat >"$bench_dir/c.toml" <<TOML
[gateway]
data_dir = "$bench_dir/data"
[admin]
listen = "127.0.0.1:0"
[log]
format = "json"
[coap]
listen = "127.0.0.1:0"
[[api.tokens]]
name = "bench"
sha256 = "$digest"
scopes = ["admin"]
TOML
  "$target_dir/release/outpost" run --config "$bench_dir/c.toml" 2>"$bench_dir/log" &
  bench_pid=$!
  for _ in $(seq 100); do
    bench_admin=$(sed -nE 's/.*"addr":"([^"]+)".*"Admin listener bound".*/\1/p; s/.*"Admin listener bound".*"addr":"([^"]+)".*/\1/p' "$bench_dir/log" | head -n1)
    [[ -n $bench_admin ]] && grep -q "Outpost ready" "$bench_dir/log" && return 0
    sleep 0.1
  done
  echo "daemon did not start:" >&2
  cat "$bench_dir/log" >&2
  exit 1
}

stop_daemon() {
  kill -TERM "$bench_pid"
  wait "$bench_pid" || true
  rm -rf "$bench_dir"
}

http() {
  command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
  start_daemon
  local secret auth results=()
  secret=$(curl -fsS -X POST -H 'Authorization: Bearer bench-token' -H 'Content-Type: application/json' \
    -d '{"id":"bench-device"}' "http://$bench_admin/api/v1/devices" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
  auth="Basic $(printf '%s' "bench-device:$secret" | base64 -w0)"
  for run in 1 2 3 4 5; do
    local out
    out=$(OUTPOST_BENCH_AUTH=$auth wrk -t2 -c50 -d10s --latency -s scripts/bench/ingest.lua \
      "http://$bench_admin/api/v1/ingest/bench/telemetry")
    printf '%s\n' "$out" | grep -E 'Requests/sec|non-201|latency p'
    results+=("$(printf '%s\n' "$out" | awk '/Requests\/sec/ {print $2}')")
  done
  printf 'HTTP ingestion requests/s (all 201 = committed records/s): %s\n' "${results[*]}"
  printf 'median: %s\n' "$(printf '%s\n' "${results[@]}" | sort -n | sed -n 3p)"
  "$target_dir/release/outpost" buffer stats --data-dir "$bench_dir/data" | grep -E '^records'
  stop_daemon
}

coap() {
  cargo build --locked --release -p outpost -p outpost-e2e --bins
  "$target_dir/release/coap-bench" --clients 100 --seconds 10 --warmup 2 --runs 5
}

machine
case $what in
  outbox) outbox ;;
  rss) rss ;;
  size) size ;;
  http) http ;;
  coap) coap ;;
  all) outbox; rss; size; http; coap ;;
  *) echo "usage: $0 [outbox|rss|size|http|coap|all]" >&2; exit 2 ;;
esac
