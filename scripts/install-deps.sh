#!/usr/bin/env bash
# Install the system packages Kiln needs on a Debian 12 machine (as root):
# runc to run container sandboxes, iproute2 for per-instance network
# namespaces, debootstrap to build the custom.debian12 runtime, python3-venv
# and Node.js for the official-SDK tests, libc6-dev for static test binaries.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
for pkg in runc iproute2 debootstrap nftables python3-venv libc6-dev openssl zip ca-certificates curl nginx-light; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq "${need[@]}"
fi
command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest
