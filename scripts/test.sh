#!/usr/bin/env bash
# Run Kiln's whole test suite (as root: the sandbox tests run real runc
# containers in network namespaces they create and remove).
#
# The custom.debian12, debian12-builtin (python3.11, nodejs18) and
# debian13-builtin (python3.13, nodejs20) root filesystems are built once
# with debootstrap and cached in
# $KILN_ROOTFS_CACHE (default /var/cache/kiln/rootfs).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export KILN_ROOTFS_CACHE="${KILN_ROOTFS_CACHE:-/var/cache/kiln/rootfs}"
# The gateway's SDK tests drive the official Python SDK from this virtualenv
# (the end-to-end SDK tests make their own).
venv="${KILN_SDK_VENV:-/var/cache/kiln/sdk-venv}"
if ! "$venv/bin/python" -c "import alibabacloud_fc20230330" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet -r tests/sdk/requirements.txt
fi
export KILN_FC_SDK_PYTHON="$venv/bin/python"
# Open vSwitch's daemons (the VPC isolation tests attach to them): started
# here once, so tests running in parallel never race to start them. Both
# must answer: installing the package can leave ovsdb-server running
# without ovs-vswitchd, and `ovs-ctl start` starts whichever is missing.
if ! ovs-vsctl --timeout=5 show >/dev/null 2>&1 ||
  ! ovs-appctl --timeout=5 -t ovs-vswitchd version >/dev/null 2>&1; then
  /usr/share/openvswitch/scripts/ovs-ctl start --system-id=random
fi
cargo build --workspace --all-targets --locked
# Every skipped test appends "category<TAB>test<TAB>reason" here
# (crates/kiln-test-support); under CI=true only the kvm and
# cloud-hypervisor categories may skip, any other skip fails its test.
skip_log="$(mktemp -t kiln-skips.XXXXXX)"
trap 'rm -f "$skip_log"' EXIT
export KILN_SKIP_LOG="$skip_log"
status=0
cargo nextest run --workspace --locked --no-fail-fast "$@" || status=$?
./scripts/skip-summary.sh "$skip_log"
exit "$status"
