#!/usr/bin/env bash
# Build the Kiln microVM guest from Debian's packages (development and tests;
# the flake builds the same from nixpkgs, see default.nix):
#
#   images/guest/build.sh [image]
#       Debian's cloud kernel (virtio drivers are modules) and an initramfs
#       holding kiln-guest as /init plus the modules it loads, into
#       $KILN_GUEST_CACHE (default /var/cache/kiln/guest):
#         vmlinuz, initramfs.cpio.gz, kernel-release, manifest
#   images/guest/build.sh disk SRC_DIR OUT [erofs|squashfs]
#       A read-only disk image of a directory (a runtime root filesystem or
#       a code package), owned by root, reproducible.
#
# Environment:
#   KILN_GUEST_CACHE        output directory (default /var/cache/kiln/guest)
#   KILN_GUEST_BIN          a static kiln-guest to use instead of building one
#   KILN_GUEST_KERNEL_PKG   kernel package (default: what linux-image-cloud-amd64 depends on)
#   KILN_GUEST_LOCK_WAIT    seconds to wait for another build of the same cache (default 600)
#
# Needs (scripts/install-deps.sh installs them): apt-get, dpkg-deb, kmod
# (depmod), cpio, gzip, flock (util-linux), erofs-utils / squashfs-tools,
# and cargo for kiln-guest.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${KILN_GUEST_CACHE:-/var/cache/kiln/guest}"

# Modules kiln-guest needs; their dependencies are added from modules.dep.
modules=(virtio_pci virtio_mmio virtio_blk virtio_net virtio_console
  vmw_vsock_virtio_transport erofs squashfs overlay)

log() { echo "guest image: $*" >&2; }

make_disk() {
  local src="$1" out="$2" fs="${3:-erofs}"
  [ -d "$src" ] || { log "no such directory: $src"; exit 2; }
  local tmp="$out.tmp.$$"
  rm -f "$tmp"
  case "$fs" in
    erofs) mkfs.erofs --quiet --all-root -T 0 "$tmp" "$src" >/dev/null ;;
    squashfs) mksquashfs "$src" "$tmp" -noappend -all-root -quiet -mkfs-time 0 -all-time 0 >/dev/null ;;
    *) log "unknown filesystem $fs (erofs or squashfs)"; exit 2 ;;
  esac
  mv -f "$tmp" "$out"
  log "$out ($fs) from $src"
}

guest_binary() {
  if [ -n "${KILN_GUEST_BIN:-}" ]; then
    echo "$KILN_GUEST_BIN"
    return
  fi
  # An explicit --target keeps RUSTFLAGS off build scripts and proc macros.
  local target_dir="${CARGO_TARGET_DIR:-$repo/target}"
  (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --quiet -p kiln-guest --bin kiln-guest --target x86_64-unknown-linux-gnu >&2)
  echo "$target_dir/x86_64-unknown-linux-gnu/debug/kiln-guest"
}

kernel() {
  local pkg="${KILN_GUEST_KERNEL_PKG:-}"
  if [ -z "$pkg" ]; then
    pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')"
    if [ -z "$pkg" ]; then
      apt-get update -qq >&2
      pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')"
    fi
    [ -n "$pkg" ] || { log "cannot resolve linux-image-cloud-amd64 (apt-get update?)"; exit 1; }
  fi
  local dir="$cache/kernel/$pkg"
  if [ ! -f "$dir/.done" ]; then
    log "fetching $pkg"
    local dl
    dl="$(mktemp -d)"
    (cd "$dl" && apt-get download -q "$pkg" >/dev/null 2>&1) || { rm -rf "$dl"; log "apt-get download $pkg failed"; exit 1; }
    rm -rf "$dir"
    mkdir -p "$dir"
    dpkg-deb -x "$dl"/*.deb "$dir/root"
    rm -rf "$dl"
    local release
    release="$(ls "$dir/root/lib/modules")"
    depmod -b "$dir/root" "$release"
    echo "$release" > "$dir/release"
    touch "$dir/.done"
  fi
  echo "$dir"
}

# Module paths (relative to /lib/modules/RELEASE) in load order.
module_order() {
  local dep="$1"
  local -A seen=()
  local m line path deps i
  for m in "${modules[@]}"; do
    line="$(grep -E "(^|/)${m}\.ko(\.[a-z]+)?:" "$dep" || true)"
    if [ -z "$line" ]; then
      log "module $m is built in or missing; skipping"
      continue
    fi
    path="${line%%:*}"
    read -r -a deps <<< "${line#*:}"
    # modules.dep lists dependencies so that the last loads first.
    for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
      [ -n "${seen[${deps[$i]}]:-}" ] || { seen[${deps[$i]}]=1; echo "${deps[$i]}"; }
    done
    [ -n "${seen[$path]:-}" ] || { seen[$path]=1; echo "$path"; }
  done
}

build_image() {
  mkdir -p "$cache"
  # One builder at a time per cache (parallel test binaries, a retry, two
  # checkouts sharing /var/cache/kiln/guest): the kernel directory is
  # removed and re-extracted, and the outputs are replaced, under this lock.
  exec 9>"$cache/.lock"
  if ! flock -w "${KILN_GUEST_LOCK_WAIT:-600}" 9; then
    log "another build of $cache held its lock for too long"
    exit 1
  fi
  # Leftovers of a build that was killed.
  rm -rf "$cache"/.stage.* "$cache"/*.tmp
  local bin kdir release
  bin="$(guest_binary)"
  [ -x "$bin" ] || { log "no kiln-guest binary at $bin"; exit 1; }
  if readelf -l "$bin" | grep -q INTERP; then
    log "$bin is dynamically linked; kiln-guest must be static"
    exit 1
  fi
  kdir="$(kernel)"
  release="$(cat "$kdir/release")"
  local order=()
  mapfile -t order < <(module_order "$kdir/root/lib/modules/$release/modules.dep")
  local manifest
  manifest="$(printf 'kernel %s\nkiln-guest %s\nmodules %s\nbuilder %s\n' "$release" \
    "$(sha256sum "$bin" | cut -d' ' -f1)" "${#order[@]}" "$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)")"
  if [ -f "$cache/vmlinuz" ] && [ -f "$cache/initramfs.cpio.gz" ] &&
    [ "$(cat "$cache/manifest" 2>/dev/null)" = "$manifest" ]; then
    log "$cache is up to date (kernel $release, ${#order[@]} modules)"
    return
  fi
  # Everything is built in a private directory on the cache's filesystem
  # and renamed into place; the manifest goes last, so an interrupted
  # build is never taken for a complete one.
  local stage
  stage="$(mktemp -d "$cache/.stage.XXXXXX")"
  trap 'rm -rf "$stage"' RETURN
  local root="$stage/root"
  mkdir -p "$root"/{dev,proc,sys,tmp,run,mnt,lib/modules/"$release"}
  install -m 0755 "$bin" "$root/init"
  # Debug info is most of a debug build; the guest does not need it.
  if command -v strip >/dev/null; then strip --strip-debug "$root/init"; fi
  local p
  for p in "${order[@]}"; do
    install -D -m 0644 "$kdir/root/lib/modules/$release/$p" "$root/lib/modules/$release/$p"
  done
  printf '%s\n' "${order[@]}" > "$root/lib/modules/kiln.order"
  # The kernel opens /dev/console for PID 1 before anything is mounted.
  mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || log "cannot mknod /dev/console (not root?): PID 1 will have no console"
  (cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --reproducible -R 0:0 --quiet) | gzip -9n > "$stage/initramfs.cpio.gz"
  cp -f "$kdir/root/boot/vmlinuz-$release" "$stage/vmlinuz"
  echo "$release" > "$stage/kernel-release"
  echo "$manifest" > "$stage/manifest"
  rm -f "$cache/manifest"
  mv -f "$stage/vmlinuz" "$cache/vmlinuz"
  mv -f "$stage/initramfs.cpio.gz" "$cache/initramfs.cpio.gz"
  mv -f "$stage/kernel-release" "$cache/kernel-release"
  mv -f "$stage/manifest" "$cache/manifest"
  log "$cache/vmlinuz + $cache/initramfs.cpio.gz (kernel $release, ${#order[@]} modules)"
}

case "${1:-image}" in
  image) build_image ;;
  disk)
    [ $# -ge 3 ] || { echo "usage: $0 disk SRC_DIR OUT [erofs|squashfs]" >&2; exit 2; }
    make_disk "$2" "$3" "${4:-erofs}"
    ;;
  *) echo "usage: $0 [image] | disk SRC_DIR OUT [erofs|squashfs]" >&2; exit 2 ;;
esac
