#!/usr/bin/env bash
# Run Kiln's whole test suite (as root: the sandbox tests run real runc
# containers in network namespaces they create and remove).
#
# The custom.debian12 root filesystem is built once with debootstrap and
# cached in $KILN_ROOTFS_CACHE (default /var/cache/kiln/rootfs).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export KILN_ROOTFS_CACHE="${KILN_ROOTFS_CACHE:-/var/cache/kiln/rootfs}"
cargo build --workspace --all-targets --locked
cargo nextest run --workspace --locked --no-fail-fast "$@"
