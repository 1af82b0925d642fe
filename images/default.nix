# The host images: a control node (gateway + scheduler) and a compute node
# (agent), each as a raw EFI disk image and a qcow2 VM image (nixpkgs'
# `system.build.images`), and the compute node as PXE netboot artefacts.
{
  nixpkgs,
  system,
  kilnModules,
  kilnPackages,
}:
let
  inherit (nixpkgs) lib;
  pkgs = nixpkgs.legacyPackages.${system};

  host =
    modules:
    lib.nixosSystem {
      specialArgs = { inherit kilnPackages; };
      modules = [
        { nixpkgs.hostPlatform = system; }
        kilnModules.default
        ./common.nix
      ]
      ++ modules;
    };

  systems = {
    kiln-control = host [
      ./control/configuration.nix
      ./disk.nix
    ];
    kiln-compute = host [
      ./compute/configuration.nix
      ./disk.nix
    ];
    kiln-compute-netboot = host [
      ./compute/configuration.nix
      ./compute/netboot.nix
    ];
  };

  images = name: systems.${name}.config.system.build.images;
  netboot = systems.kiln-compute-netboot.config.system.build;
  inherit (systems.kiln-compute-netboot.config.system.boot.loader) kernelFile;
in
{
  inherit systems;
  packages = {
    control-raw-efi = (images "kiln-control").raw-efi;
    control-qcow2 = (images "kiln-control").qemu-efi;
    compute-raw-efi = (images "kiln-compute").raw-efi;
    compute-qcow2 = (images "kiln-compute").qemu-efi;
    # What a TFTP/HTTP server hands a PXE-booting compute node: the kernel,
    # the initrd (which carries the whole system as a squashfs) and the iPXE
    # script that boots them.
    compute-netboot = pkgs.linkFarm "kiln-compute-netboot" [
      {
        name = kernelFile;
        path = "${netboot.kernel}/${kernelFile}";
      }
      {
        name = "initrd";
        path = "${netboot.netbootRamdisk}/initrd";
      }
      {
        name = "netboot.ipxe";
        path = "${netboot.netbootIpxeScript}/netboot.ipxe";
      }
    ];
  };
}
