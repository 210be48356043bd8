# The gateway architectures Outpost is built for, shared by cross/build.sh and cross/smoke.sh.
# Source it after scripts/lib.sh; it defines arch_vars only.

# arch_vars ARCH : sets, for ARCH (aarch64, armv7 or x86_64),
#   TRIPLE          the Rust target;
#   GNU             the GNU tools' prefix and Debian multiarch directory (aarch64-linux-gnu, ...);
#   DEB_ARCH        the Debian architecture (arm64, armhf, amd64);
#   CROSS_PACKAGES  the Debian packages the build needs: the cross toolchain, and the target's
#                   builds of the shared libraries the binary links (OpenSSL, zstd, zlib;
#                   ARCHITECTURE.md, "Decision: system OpenSSL");
#   QEMU            the user-mode emulator that runs the binary here (cross/smoke.sh);
#   RUNTIME_PACKAGES  the target's shared libraries the binary needs at run time, from Debian's
#                   multiarch packages: the dynamic loader and libc come from the same glibc
#                   build as libssl3's. (The cross toolchain's own copy under /usr/<triple>
#                   serves the build only: that loader with the multiarch libc, a different
#                   build, hangs in pthread_create.)
# Returns 1 for an unknown ARCH.
arch_vars() {
  case $1 in
    aarch64) # 64-bit Raspberry Pi OS / Debian arm64 (Pi 3, 4, 5, Zero 2 W, most ARM gateways)
      TRIPLE=aarch64-unknown-linux-gnu
      GNU=aarch64-linux-gnu
      DEB_ARCH=arm64
      CROSS_PACKAGES=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross)
      QEMU=qemu-aarch64-static
      ;;
    armv7) # 32-bit Raspberry Pi OS / Debian armhf on ARMv7 (Pi 2, 3, 4 running 32-bit)
      TRIPLE=armv7-unknown-linux-gnueabihf
      GNU=arm-linux-gnueabihf
      DEB_ARCH=armhf
      CROSS_PACKAGES=(gcc-arm-linux-gnueabihf g++-arm-linux-gnueabihf libc6-dev-armhf-cross)
      QEMU=qemu-arm-static
      ;;
    x86_64) # x86_64 gateways and servers: the build machine's own architecture
      TRIPLE=x86_64-unknown-linux-gnu
      GNU=x86_64-linux-gnu
      DEB_ARCH=amd64
      CROSS_PACKAGES=(gcc g++ libc6-dev)
      QEMU=qemu-x86_64-static
      ;;
    *) return 1 ;;
  esac
  local pkg
  for pkg in $(linked_dev_packages "$DEB_ARCH"); do
    CROSS_PACKAGES+=("$pkg")
  done
  RUNTIME_PACKAGES=("libc6:$DEB_ARCH" "libssl3:$DEB_ARCH" "libzstd1:$DEB_ARCH" "zlib1g:$DEB_ARCH")
}
