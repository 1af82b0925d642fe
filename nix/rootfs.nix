# Runtime root filesystems, as directory trees the agent links into its
# rootfs directory (services.kiln.agent.runtimeRootfs). Each has the mount
# points the container driver binds over: /code and /etc/hosts.
{ lib, pkgs }:
let
  hosts = pkgs.writeText "hosts" "127.0.0.1\tlocalhost\n::1\tlocalhost\n";

  # `custom`: nothing but the mount points and the files the agent's own
  # minimal tree has (crates/kiln-sandbox/src/rootfs.rs), for static binaries.
  custom = pkgs.runCommand "kiln-rootfs-custom" { } ''
    mkdir -p $out/code $out/proc $out/dev $out/sys $out/etc $out/tmp
    cp ${hosts} $out/etc/hosts
    printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n' > $out/etc/passwd
    printf 'root:x:0:\nnogroup:x:65534:\n' > $out/etc/group
    echo '# no resolver is configured for this runtime' > $out/etc/resolv.conf
  '';

  # `custom.debian12`: Debian 12 (bookworm) with python3, made from Debian's
  # own packages at the snapshot.debian.org date nixpkgs pins for
  # vmTools.debDistros.debian12x86_64: the packages are installed with dpkg
  # inside a throw-away VM (vmTools.makeImageFromDebDist, which needs a
  # builder with KVM), then the image's file system is copied out as a tree.
  # It is a real Debian userland, not a Nix-built look-alike; it differs from
  # the agent's debootstrap --variant=minbase tree in the package set
  # (nixpkgs' base list plus python3) and in not being refreshed.
  debianTree =
    {
      name,
      extraPackages,
      extraCommands ? "",
    }:
    let
      distro = pkgs.vmTools.debDistros.debian12x86_64;
      image = pkgs.vmTools.makeImageFromDebDist {
        inherit (distro) name fullName urlPrefix;
        packagesLists = distro.packagesLists or [ distro.packagesList ];
        packages = distro.packages ++ extraPackages ++ [ "ca-certificates" ];
        size = 2048;
      };
    in
    pkgs.vmTools.runInLinuxVM (
      pkgs.stdenv.mkDerivation {
        inherit name;
        nativeBuildInputs = [ pkgs.util-linux ];
        # A copy-on-write overlay of the image, attached as /dev/vda.
        preVM = ''
          diskImage=$(pwd)/disk-image.qcow2
          ${pkgs.qemu_kvm}/bin/qemu-img create -f qcow2 -F qcow2 \
            -b ${image}/disk-image.qcow2 "$diskImage"
        '';
        buildCommand = ''
          mkdir -p /mnt
          mount -t ext4 -o ro /dev/vda /mnt
          mkdir -p $out
          cp -a /mnt/. $out/
          umount /mnt
          rm -rf $out/lost+found $out/.debug
          mkdir -p $out/code $out/opt $out/proc $out/dev $out/sys $out/tmp
          cp --remove-destination ${hosts} $out/etc/hosts
          test -x $out/usr/bin/python3
          ${extraCommands}
        '';
      }
    );

  debian12 = debianTree {
    name = "kiln-rootfs-custom-debian12";
    extraPackages = [ "python3" ];
  };

  # `debian12-builtin`: the tree of the built-in runtimes `python3.11` and
  # `nodejs18` (link it into the rootfs directory under that name): Debian
  # 12 with python3 and nodejs, and Kiln's bootstraps at the paths the
  # agent's own build uses (crates/kiln-sandbox/src/rootfs.rs, BOOTSTRAPS),
  # byte for byte the files the agent embeds, so it never rewrites them.
  debian12Builtin = debianTree {
    name = "kiln-rootfs-debian12-builtin";
    extraPackages = [
      "python3"
      "nodejs"
    ];
    extraCommands = ''
      test -x $out/usr/bin/node
      mkdir -p $out/usr/lib/kiln/runtime
      install -m 0644 ${../crates/kiln-sandbox/runtimes/python/bootstrap.py} $out/usr/lib/kiln/runtime/bootstrap.py
      install -m 0644 ${../crates/kiln-sandbox/runtimes/nodejs/bootstrap.js} $out/usr/lib/kiln/runtime/bootstrap.js
    '';
  };
in
{
  inherit custom;
}
// lib.optionalAttrs (pkgs.stdenv.hostPlatform.system == "x86_64-linux") {
  # nixpkgs' vmTools carries Debian 12 for x86_64 (and i386) only.
  inherit debian12 debian12Builtin;
}
