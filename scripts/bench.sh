#!/usr/bin/env bash
# Benchmarks behind the figures in docs/BENCHMARKS.md. Not part of the test command: figures are
# measured here and written down, never asserted in timed tests.
#
#   bash scripts/bench.sh [outbox|rss|size|http|coap|mqtt|serial|modbus|kafka|commands|console|edge|all]
#
# outbox: append throughput and append->commit latency at 50,000 records/s (median of 5 runs)
# rss:    resident memory of an idle `outpost run` on defaults (median of 5 starts); `rss BIN...`
#         measures the given binaries side by side
# size:   stripped release binary sizes (x86_64, and aarch64 if cross/build.sh has run)
# http:   HTTP ingestion, single-record POSTs from 50 keep-alive connections with wrk (median of 5)
# coap:   CoAP CON POSTs from 100 clients with the repo's bench client (median of 5)
# mqtt:   the MQTT server against Debian's mosquitto (no persistence), runs alternating between
#         them (tests/src/bin/mqtt-bench/): QoS 1 msg/s from 100 rumqttc publishers, 100-byte
#         payloads (median of 5); p99 publish->PUBACK at 20,000 msg/s (median of 3); one
#         subscriber to every topic, MQTT 3.1.1 vs MQTT 5 with a content type and 2 user
#         properties (median of 5), once on shared cores and once with the load client and
#         the broker on separate cores (--client-cpus/--broker-cpus); RSS with 1,000 idle
#         devices (plain, subscribed, persistent sessions); RSS growth with 10,000 messages queued for 100 offline sessions; CONNACK
#         latency when 1,000 registered devices connect at once, after a restart and with the
#         gateway running (Outpost only). OUTPOST_BIN=<binary> measures another build.
# serial: serial line parsing throughput per format, one core (drivers/benches/line_parse.rs)
# modbus: CPU of `outpost run` polling 50 registers at 10 Hz from 10 pymodbus TCP slaves (30 s)
# kafka:  forwarder vs a tansu broker: plain-producer ceiling, 1,000,000-record backlog drain and
#         its peak extra memory, live receipt->ack latency at 10,000 records/s (3 processes: the
#         memory figure needs a fresh process per run; sync/benches/forwarder.rs)
# console: the web console's page weight and server time, and the live view's CPU at 100
#         readings/s (scripts/bench/console_bench.py)
# edge:   ingest throughput with 20 edge rules (5 conditions, 5 transforms, 5 aggregates, 5
#         alerts; scripts/bench/edge-rules.toml) against none, runs alternating: HTTP batches of
#         50 records (wrk, 50 connections, 10 s, median of 5) and MQTT QoS 1 JSON publishes
#         (mqtt-bench, 100 publishers, median of 5); RSS growth of 10,000 open aggregate windows
#         (one device, 10,000 topics) against the same readings without the rule (median of 3).
#         EDGE_BEFORE_BIN=<an older outpost binary> runs it too, alternating, for a before/after
#         in the same run (throughput only)
# commands: commands from Kafka (tests/src/bin/commands-bench.rs): Kafka -> MQTT device latency
#         at 100 commands/s, commands/s into the device queues, idle cost of the consumer
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
  cargo bench --locked -p outpost-outbox --bench outbox_append -- --runs 5 --appenders 512 \
    --records 1000000 --rate 50000 --seconds 5
}

# rss [BIN...]: idle RSS of each BIN (default: the release build), five starts each, the
# binaries taking turns so that they share the machine's state. A start: a config that only
# moves the data directory to a temporary one and the listeners to ephemeral loopback ports;
# VmRSS, RssAnon and RssFile from /proc/<pid>/status after 5 s; SIGTERM. RSS_KAFKA=1 turns
# Kafka forwarding on, towards a port where nothing listens.
rss() {
  local bins=("$@") samples=() rss_kib=() dir pid bin i round
  if ((${#bins[@]} == 0)); then
    cargo build --locked --release -p outpost
    bins=("$target_dir/release/outpost")
  fi
  for round in 1 2 3 4 5; do
    for i in "${!bins[@]}"; do
      bin=${bins[$i]}
      dir=$(mktemp -d)
      printf '[gateway]\ndata_dir = "%s/data"\n[admin]\nlisten = "127.0.0.1:0"\n[coap]\nlisten = "127.0.0.1:0"\n[mqtt]\nlisten = "127.0.0.1:0"\n' "$dir" >"$dir/c.toml"
      if [[ -n ${RSS_KAFKA:-} ]]; then
        # Forwarding on, towards a port where nothing listens (the client keeps retrying).
        printf '[kafka]\nenabled = true\nbrokers = ["127.0.0.1:9"]\n' >>"$dir/c.toml"
      fi
      "$bin" run --config "$dir/c.toml" 2>/dev/null &
      pid=$!
      sleep 5
      rss_kib[i]+="$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status") "
      samples[i]+="$(awk '/^VmRSS/ {r=$2} /^RssAnon/ {a=$2} /^RssFile/ {f=$2} END {printf "%s (anon %s, file %s); ", r, a, f}' "/proc/$pid/status")"
      kill -TERM "$pid"
      wait "$pid"
      rm -rf "$dir"
    done
    printf 'round %s done\n' "$round"
  done
  for i in "${!bins[@]}"; do
    printf '%s\n  idle RSS samples (KiB): %s\n  idle RSS median: %s KiB\n' "${bins[$i]}" "${samples[i]}" \
      "$(printf '%s\n' ${rss_kib[i]} | sort -n | sed -n 3p)" # split on purpose: one number each
  done
}

size() {
  cargo build --locked --release -p outpost
  for bin in "$target_dir/release/outpost" "$target_dir/aarch64-unknown-linux-gnu/release/outpost" \
    "$target_dir/armv7-unknown-linux-gnueabihf/release/outpost"; do
    [[ -f $bin ]] && printf '%s: %s bytes (%s)\n' "$bin" "$(stat -c %s "$bin")" "$(file -b "$bin" | cut -d, -f1-2)"
  done
  return 0
}

# Where the x86_64 binary's code goes, per crate (cargo-bloat; installed if missing). The bench
# profile is the release profile with symbols kept, so the crate names survive.
bloat() {
  if ! cargo bloat --version >/dev/null 2>&1; then
    cargo install cargo-bloat --locked
  fi
  cargo bloat --locked --profile bench -p outpost --bin outpost --crates -n 25
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
[mqtt]
listen = "127.0.0.1:0"
[[api.tokens]]
name = "bench"
sha256 = "$digest"
scopes = ["admin"]
TOML
  # BENCH_EXTRA_CONFIG: a file appended to the config (the edge rules of `edge`).
  if [[ -n ${BENCH_EXTRA_CONFIG:-} ]]; then cat "$BENCH_EXTRA_CONFIG" >>"$bench_dir/c.toml"; fi
  # BENCH_BIN: another outpost binary than this build's (edge's before/after).
  "${BENCH_BIN:-$target_dir/release/outpost}" run --config "$bench_dir/c.toml" 2>"$bench_dir/log" &
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

edge() {
  command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
  cargo build --locked --release -p outpost -p outpost-e2e --bins
  local rules=scripts/bench/edge-rules.toml body run mode out rps modes=(none rules) brokers=outpost,edge
  if [[ -n ${EDGE_BEFORE_BIN:-} ]]; then
    modes+=(before-none before-rules)
    brokers+=,before,before-edge
  fi
  declare -A results=()
  body="[$(python3 -c 'import json; print(",".join(json.dumps({"temperature": 20 + i % 30, "humidity": 48.2, "battery": 3.71, "pad": "x" * 34}) for i in range(50)))')]"
  for run in 1 2 3 4 5; do
    for mode in "${modes[@]}"; do
      if [[ $mode == *rules ]]; then export BENCH_EXTRA_CONFIG=$rules; else unset BENCH_EXTRA_CONFIG; fi
      if [[ $mode == before-* ]]; then export BENCH_BIN=$EDGE_BEFORE_BIN; else unset BENCH_BIN; fi
      start_daemon
      local secret auth
      secret=$(curl -fsS -X POST -H 'Authorization: Bearer bench-token' -H 'Content-Type: application/json' \
        -d '{"id":"bench-device"}' "http://$bench_admin/api/v1/devices" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
      auth="Basic $(printf '%s' "bench-device:$secret" | base64 -w0)"
      out=$(OUTPOST_BENCH_AUTH=$auth OUTPOST_BENCH_BODY=$body wrk -t2 -c50 -d10s --latency -s scripts/bench/ingest.lua \
        "http://$bench_admin/api/v1/ingest/devices/bench-device/telemetry")
      rps=$(printf '%s\n' "$out" | awk '/Requests\/sec/ {print $2}')
      printf 'run %s %-12s: %s requests/s (x50 records) %s\n' "$run" "$mode" "$rps" "$(printf '%s\n' "$out" | grep -E 'non-201')"
      results[$mode]+="$(python3 -c "print($rps * 50)") "
      stop_daemon
    done
  done
  unset BENCH_EXTRA_CONFIG BENCH_BIN
  for mode in "${modes[@]}"; do
    printf 'HTTP batches, records/s, %s: %s median %s\n' "$mode" "${results[$mode]}" \
      "$(printf '%s\n' ${results[$mode]} | sort -n | sed -n 3p)"
  done
  OUTPOST_BEFORE_BIN=${EDGE_BEFORE_BIN:-} OUTPOST_BENCH_EDGE_CONFIG=$rules \
    "$target_dir/release/mqtt-bench" --publishers 100 --seconds 10 --warmup 2 --runs 5 --json \
    --brokers "$brokers"
  python3 scripts/bench/edge_windows.py "$target_dir/release/outpost"
}

coap() {
  cargo build --locked --release -p outpost -p outpost-e2e --bins
  "$target_dir/release/coap-bench" --clients 100 --seconds 10 --warmup 2 --runs 5
}

mqtt() {
  command -v mosquitto >/dev/null || { echo "mqtt: needs the mosquitto broker (apt-get install mosquitto)" >&2; exit 1; }
  cargo build --locked --release -p outpost -p outpost-e2e --bins
  local b="$target_dir/release/mqtt-bench"
  "$b" --publishers 100 --seconds 10 --warmup 2 --runs 5
  "$b" --publishers 100 --seconds 10 --warmup 2 --runs 3 --rate 20000
  "$b" --publishers 100 --seconds 10 --warmup 2 --runs 5 --watch --protocol both
  # The same with the load client on core 0 and the broker on core 1 (a figure of the broker alone).
  "$b" --publishers 100 --seconds 10 --warmup 2 --runs 5 --watch --protocol both --client-cpus 0 --broker-cpus 1
  "$b" --idle 1000 --runs 3
  "$b" --idle 1000 --idle-subscribe --runs 3
  "$b" --idle 1000 --idle-persistent --runs 3
  "$b" --queued 10000 --sessions 100 --runs 3
  "$b" --storm 1000 --runs 3 --brokers outpost
}

serial() {
  cargo bench --locked -p outpost-drivers --bench line_parse
}

# 10 pymodbus TCP slaves (tests/peers/modbus_slave.py --map bench) on loopback; one modbus driver
# polls 50 holding registers (u16, addresses 0..49, one request per poll) of each at 100 ms. The
# daemon's CPU is utime+stime from /proc/<pid>/stat over 30 s after a 5 s warm-up.
modbus() {
  cargo build --locked --release -p outpost
  python3 -c 'import pymodbus' 2>/dev/null || { echo "pymodbus is missing: bash scripts/setup-test-deps.sh" >&2; exit 1; }
  local dir slaves=() port ports=() pid t0 t1 s0 s1 r0 r1 hz seconds=30
  dir=$(mktemp -d)
  for i in $(seq 0 9); do
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    ports+=("$port")
    python3 tests/peers/modbus_slave.py --tcp "127.0.0.1:$port" --units 1 --map bench >/dev/null 2>&1 &
    slaves+=("$!")
  done
  {
    printf '[gateway]\ndata_dir = "%s/data"\n[admin]\nlisten = "127.0.0.1:0"\n[coap]\nenabled = false\n' "$dir"
    printf '[log]\nformat = "json"\n\n[[drivers]]\nkind = "modbus"\nname = "bench"\n'
    for i in $(seq 0 9); do
      printf '[[drivers.slaves]]\ndevice_id = "slave-%s"\nunit = 1\naddress = "127.0.0.1:%s"\n' "$i" "${ports[$i]}"
      for a in $(seq 0 49); do
        printf '[[drivers.slaves.points]]\nname = "r%s"\naddress = %s\ninterval = "100ms"\n' "$a" "$a"
      done
    done
  } >"$dir/c.toml"
  sleep 3 # the slaves import pymodbus
  "$target_dir/release/outpost" run --config "$dir/c.toml" 2>"$dir/log" &
  pid=$!
  sleep 5
  hz=$(getconf CLK_TCK)
  read -r t0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
  r0=$("$target_dir/release/outpost" buffer stats --data-dir "$dir/data" | awk '/^records:/ {print $2}')
  sleep "$seconds"
  read -r t1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
  r1=$("$target_dir/release/outpost" buffer stats --data-dir "$dir/data" | awk '/^records:/ {print $2}')
  kill -TERM "$pid"; wait "$pid" || true
  kill "${slaves[@]}" 2>/dev/null || true
  wait "${slaves[@]}" 2>/dev/null || true
  python3 - "$t0" "$s0" "$t1" "$s1" "$hz" "$seconds" "$r0" "$r1" <<'PY'
import sys
t0, s0, t1, s1, hz, seconds, r0, r1 = map(float, sys.argv[1:])
user, system = (t1 - t0) / hz, (s1 - s0) / hz
print(f"outpost CPU over {seconds:.0f} s: user {user:.2f} s + system {system:.2f} s = "
      f"{100 * (user + system) / seconds:.2f}% of one core")
print(f"readings stored: {r1 - r0:.0f} = {(r1 - r0) / seconds:.1f}/s (expected 100/s: 10 slaves x 10 Hz)")
PY
  rm -rf "$dir"
}

machine
kafka() {
  bash scripts/ensure-tansu.sh
  local i
  for i in 1 2 3; do
    cargo bench --locked -p outpost-sync --bench forwarder -- --runs 1 --records 1000000 \
      --rate 10000 --seconds 10 | grep '^run'
  done
}

commands() {
  bash scripts/ensure-tansu.sh
  cargo build --locked --release -p outpost -p outpost-e2e --bin outpost --bin commands-bench
  "$target_dir/release/commands-bench" --runs 3
}

console() {
  cargo build --locked --release -p outpost
  machine
  python3 scripts/bench/console_bench.py "$target_dir/release/outpost"
}

case $what in
  outbox) outbox ;;
  rss) shift; rss "$@" ;;
  size) size ;;
  bloat) bloat ;;
  http) http ;;
  coap) coap ;;
  mqtt) mqtt ;;
  serial) serial ;;
  modbus) modbus ;;
  kafka) kafka ;;
  commands) commands ;;
  console) console ;;
  edge) edge ;;
  all) outbox; rss; size; http; coap; mqtt; serial; modbus; kafka; commands; console; edge ;;
  *) echo "usage: $0 [outbox|rss|size|bloat|http|coap|mqtt|serial|modbus|kafka|commands|console|edge|all]" >&2; exit 2 ;;
esac
