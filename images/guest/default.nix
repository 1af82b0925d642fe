# The microVM guest for the `microvm` sandbox backend: nixpkgs' kernel with
# the drivers a cloud-hypervisor guest needs built in (virtio PCI/MMIO,
# block, net, console, vsock; erofs, squashfs, ext4 and overlayfs for the
# code and runtime disks), so the initramfs needs no /lib/modules/kiln.order
# (kiln-guest loads what that file lists, none here), and an initramfs whose
# /init is kiln-guest with its run-time closure. images/guest/build.sh builds
# the same from Debian's packages for development.
{
  lib,
  stdenv,
  linuxPackages,
  makeInitrd,
  linkFarm,
  kiln-guest,
}:
let
  inherit (lib.kernel) yes;
  kernel = linuxPackages.kernel.override {
    structuredExtraConfig = lib.mapAttrs (_: lib.mkForce) {
      VIRTIO_PCI = yes;
      VIRTIO_MMIO = yes;
      VIRTIO_BLK = yes;
      VIRTIO_NET = yes;
      VIRTIO_CONSOLE = yes;
      VSOCKETS = yes;
      VIRTIO_VSOCKETS = yes;
      EROFS_FS = yes;
      EXT4_FS = yes;
      SQUASHFS = yes;
      OVERLAY_FS = yes;
    };
  };
  initrd = makeInitrd {
    name = "kiln-guest-initrd";
    contents = [
      {
        object = lib.getExe' kiln-guest "kiln-guest";
        symlink = "/init";
      }
    ];
  };
  kernelFile = stdenv.hostPlatform.linux-kernel.target;
in
linkFarm "kiln-guest-image" (
  [
    {
      name = kernelFile;
      path = "${kernel}/${kernelFile}";
    }
    {
      name = "initrd";
      path = "${initrd}/initrd";
    }
  ]
  # cloud-hypervisor boots an uncompressed ELF kernel on x86_64.
  ++ lib.optional stdenv.hostPlatform.isx86_64 {
    name = "vmlinux";
    path = "${kernel.dev}/vmlinux";
  }
)
