#!/usr/bin/env bash
# Install the system packages Kiln needs on a Debian 12 machine (as root):
# runc to run container sandboxes, iproute2 for per-instance network
# namespaces, Open vSwitch, iperf3 and ethtool for the network isolation
# tests (VPC bridges, bandwidth caps), debootstrap to build the custom.debian12 runtime, python3-venv
# and Node.js for the official-SDK tests, libc6-dev for static test binaries,
# e2fsprogs and mount for each container instance's size-limited writable disk,
# PostgreSQL for the store tests (each starts a throwaway server of its own),
# HAProxy for `kiln dev --postgres` (the load balancer in front of its gateways).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
for pkg in runc iproute2 debootstrap nftables python3-venv libc6-dev openssl zip ca-certificates curl nginx-light nix-bin openvswitch-switch iperf3 ethtool e2fsprogs mount postgresql haproxy; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
for pkg in docker-registry skopeo apache2-utils; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
# The microVM guest image (images/guest/build.sh: kernel from Debian's
# packages, depmod, cpio, strip, erofs/squashfs disks) and its qemu TCG boot test.
for pkg in qemu-system-x86 erofs-utils squashfs-tools cpio kmod binutils; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq "${need[@]}"
fi
command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest
# Static checks of the Nix files (scripts/check-nix.sh): nix-instantiate
# comes with nix-bin above, deadnix from crates.io. statix, the Nix linter,
# is not on crates.io (an unrelated crate has the name), so it is built from
# a source checkout of its v0.5.8 tag when KILN_STATIX_SRC points at one
# (about 40 s with Rust 1.95); check-nix.sh says so when it is missing.
command -v deadnix >/dev/null 2>&1 || cargo install --locked deadnix --version 1.3.1
if ! statix --version 2>/dev/null | grep -q '^statix 0\.' \
  && [ -n "${KILN_STATIX_SRC:-}" ] && [ -f "$KILN_STATIX_SRC/bin/Cargo.toml" ]; then
  cargo install --locked --path "$KILN_STATIX_SRC/bin"
fi
