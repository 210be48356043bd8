#!/usr/bin/env bash
# Makes sure a Docker engine answers (for tests/tests/apps.rs and tests/tests/package.rs), and
# that the local test images outpost-test/busybox:1, outpost-test/mqtt-sub:1 and
# outpost-test/debian-systemd exist. Idempotent: an engine that already answers is used as is;
# otherwise dockerd is started in the background (log: /tmp/outpost-dockerd.log) and awaited.
# The image is built without a registry: `docker import` of a rootfs tarball holding Debian's
# busybox-static (/bin/busybox plus applet symlinks). outpost-test/mqtt-sub:1 adds Debian's
# mosquitto_sub (mosquitto-clients) with the shared libraries ldd names: an app that subscribes to
# the local bus the way a real one would, with a real MQTT client.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

IMAGE=outpost-test/busybox:1
MQTT_IMAGE=outpost-test/mqtt-sub:1
# A Debian 12 system with systemd as PID 1 for the package tests (tests/tests/package.rs): what a
# gateway runs, built from Debian's packages with mmdebstrap. The runtime libraries the package
# depends on are in it, so `apt install ./outpost_*.deb` needs no network; so are curl and
# mosquitto-clients, the clients the test uses inside. Bump the tag when the list changes.
DEBIAN_IMAGE=outpost-test/debian-systemd:bookworm-1
DEBIAN_PACKAGES=systemd,systemd-sysv,dbus,libc6,libgcc-s1,libssl3,libzstd1,zlib1g,ca-certificates,curl,mosquitto-clients,procps

if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null 2>&1 || die "dockerd not found: run scripts/setup-test-deps.sh (docker.io)"
  log "Starting dockerd in the background (log: /tmp/outpost-dockerd.log)"
  # Sandboxes without netfilter still run containers with the default bridge off.
  extra=()
  if ! iptables -L >/dev/null 2>&1; then
    extra=(--iptables=false --bridge=none)
  fi
  nohup dockerd "${extra[@]}" >/tmp/outpost-dockerd.log 2>&1 &
  # scripts/test.sh stops the engine it caused to start (and only that one) when it finishes.
  echo $! >/tmp/outpost-dockerd.pid
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || die "dockerd did not answer within 60s; see /tmp/outpost-dockerd.log"
fi

if ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
  [[ -x /bin/busybox ]] || die "/bin/busybox not found: run scripts/setup-test-deps.sh (busybox-static)"
  root=$(mktemp -d -t outpost-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root/bin" "$root/tmp" "$root/data"
  cp /bin/busybox "$root/bin/busybox"
  for applet in sh sleep echo cat env kill true false ls nc wget printf; do
    ln -s busybox "$root/bin/$applet"
  done
  log "Importing $IMAGE from a busybox-static rootfs"
  tar -C "$root" -c . | docker import --change 'ENV PATH=/bin' --change 'CMD ["/bin/sh"]' - "$IMAGE" >/dev/null
fi

if ! docker image inspect "$MQTT_IMAGE" >/dev/null 2>&1; then
  [[ -x /bin/busybox ]] || die "/bin/busybox not found: run scripts/setup-test-deps.sh (busybox-static)"
  sub=$(command -v mosquitto_sub) || die "mosquitto_sub not found: run scripts/setup-test-deps.sh (mosquitto-clients)"
  mroot=$(mktemp -d -t outpost-mqtt-rootfs.XXXXXX)
  trap 'rm -rf "${root:-}" "$mroot"' EXIT
  mkdir -p "$mroot/bin" "$mroot/tmp"
  cp /bin/busybox "$mroot/bin/busybox"
  for applet in sh sleep echo cat env; do
    ln -s busybox "$mroot/bin/$applet"
  done
  cp "$sub" "$mroot/bin/mosquitto_sub"
  # Every library the dynamic loader resolves for mosquitto_sub, and the loader itself, at the
  # same absolute paths as on the host.
  for lib in $(ldd "$sub" | grep -o '/[^ ]*'); do
    mkdir -p "$mroot$(dirname "$lib")"
    cp -L "$lib" "$mroot$lib"
  done
  log "Importing $MQTT_IMAGE (busybox + mosquitto_sub and its libraries)"
  tar -C "$mroot" -c . | docker import --change 'ENV PATH=/bin' --change 'CMD ["/bin/sh"]' - "$MQTT_IMAGE" >/dev/null
fi
if ! docker image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
  command -v mmdebstrap >/dev/null 2>&1 || die "mmdebstrap not found: run scripts/setup-test-deps.sh (mmdebstrap)"
  droot=$(mktemp -d -t outpost-debian-rootfs.XXXXXX)
  trap 'rm -rf "${root:-}" "${mroot:-}" "$droot"' EXIT
  log "Building $DEBIAN_IMAGE with mmdebstrap (Debian bookworm, about 200 MB)"
  mmdebstrap --quiet --variant=apt --include="$DEBIAN_PACKAGES" bookworm "$droot/rootfs.tar" \
    http://deb.debian.org/debian
  docker import --change 'CMD ["/lib/systemd/systemd"]' "$droot/rootfs.tar" "$DEBIAN_IMAGE" >/dev/null
fi
log "Docker engine ready; test images $IMAGE, $MQTT_IMAGE and $DEBIAN_IMAGE present"
