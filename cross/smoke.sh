#!/usr/bin/env bash
# Smoke-tests a built `outpost` under qemu user-mode emulation:
#
#   cross/smoke.sh [aarch64|armv7|x86_64]   (default: aarch64; build it first with cross/build.sh)
#
# 1. `outpost version` must succeed.
# 2. `outpost run` with a temporary config (admin API on a free loopback port, data in a temp
#    dir) must answer GET /healthz within $SMOKE_START_TIMEOUT seconds (default 60: emulation
#    is slow),
# 3. and exit 0 within $SMOKE_STOP_TIMEOUT seconds of SIGTERM (default 15: the daemon's 10 s
#    shutdown grace plus room for emulation).
# The temp dir and the daemon are cleaned up however the script exits.
#
# SMOKE_PROFILE picks the build (default release). With SMOKE_RECORD_ORDER=FILE, qemu logs every
# block of code it translates (`-d in_asm`) while the daemon starts, answers /healthz and idles
# for $SMOKE_IDLE seconds (default 5); FILE gets the names of the binary's functions in the order
# they first ran: the startup order cross/build.sh links the dist binary with.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
# shellcheck source=cross/arch.sh
source cross/arch.sh

arch=${1:-aarch64}
arch_vars "$arch" || die "usage: $0 [aarch64|armv7|x86_64]"
start_timeout=${SMOKE_START_TIMEOUT:-60}
stop_timeout=${SMOKE_STOP_TIMEOUT:-15}
profile=${SMOKE_PROFILE:-release}
record=${SMOKE_RECORD_ORDER:-}

bin="$(cargo_target_dir)/$TRIPLE/$profile/outpost"
[[ -x $bin ]] || die "$bin not found: run cross/build.sh $arch first"
ensure_foreign_arch "$DEB_ARCH"
ensure_apt_packages qemu-user-static curl python3 "${RUNTIME_PACKAGES[@]}"
# The binary's loader (/lib/ld-linux-*.so.*) and libraries are the multiarch packages' (arch.sh).
qemu=$QEMU
emulate=("$qemu" "$bin")

work=$(mktemp -d -t outpost-smoke.XXXXXX)
pid=
cleanup() {
  local rc=$?
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  if ((rc != 0)) && [[ -s $work/outpost.log ]]; then
    log "--- outpost log (last 50 lines) ---"
    tail -n 50 "$work/outpost.log" >&2
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Systemd's variables would change where the daemon keeps data and whom it notifies.
unset NOTIFY_SOCKET WATCHDOG_USEC WATCHDOG_PID STATE_DIRECTORY

log "== $arch: outpost version"
"${emulate[@]}" version

# A free loopback port. The tiny window between closing it here and the daemon binding it is
# acceptable for a smoke test.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir "$work/data"
cat >"$work/outpost.toml" <<TOML
[gateway]
data_dir = "$work/data"

[admin]
listen = "127.0.0.1:$port"

# Device listeners on ephemeral loopback ports: the smoke test needs none of them, and the
# default ports may be taken on a build machine.
[coap]
listen = "127.0.0.1:0"

[mqtt]
listen = "127.0.0.1:0"
TOML
if [[ -n $record ]]; then
  # A gateway in service forwards to Kafka: record the forwarder's start and idle too. Nothing
  # listens on the discard port, so the client keeps retrying, as it does while a broker is down.
  cat >>"$work/outpost.toml" <<TOML

[kafka]
enabled = true
brokers = ["127.0.0.1:9"]
TOML
fi

log "== $arch: outpost run (admin on 127.0.0.1:$port)"
run=("${emulate[@]}")
[[ -z $record ]] || run=("$qemu" -d in_asm -D "$work/qemu.log" "$bin")
"${run[@]}" run --config "$work/outpost.toml" >"$work/outpost.log" 2>&1 &
pid=$!

url="http://127.0.0.1:$port/healthz"
deadline=$((SECONDS + start_timeout))
until curl -fsS --noproxy '*' --max-time 2 -o /dev/null "$url" 2>/dev/null; do
  if ! kill -0 "$pid" 2>/dev/null; then
    rc=0
    wait "$pid" || rc=$?
    pid=
    die "outpost exited (status $rc) before $url answered"
  fi
  ((SECONDS < deadline)) || die "$url did not answer within ${start_timeout}s"
  sleep 0.5
done
log "healthz answered after $((SECONDS + start_timeout - deadline))s"
if [[ -n $record ]]; then
  sleep "${SMOKE_IDLE:-5}"
fi

log "== $arch: SIGTERM, expecting exit 0 within ${stop_timeout}s"
kill -TERM "$pid"
deadline=$((SECONDS + stop_timeout))
while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
  sleep 0.2
done
if kill -0 "$pid" 2>/dev/null; then
  die "outpost still running ${stop_timeout}s after SIGTERM"
fi
rc=0
wait "$pid" || rc=$?
pid=
((rc == 0)) || die "outpost exited with status $rc after SIGTERM (expected 0)"
log "smoke test passed: $bin under $qemu"

if [[ -n $record ]]; then
  # qemu names the function each translated block starts in ("IN: name"; blank outside the
  # binary's symbol table): keep the binary's functions, each once, in first-run order.
  awk '/^IN: ./ && !seen[$2]++ { print $2 }' "$work/qemu.log" >"$record"
  count=$(wc -l <"$record")
  # A binary without symbols names nothing; a few hundred would mean the daemon barely started.
  ((count >= 1000)) || die "only $count functions recorded in $record: is $bin stripped?"
  log "recorded the $count functions start and idle ran: $record"
fi
