# The compute node booted over the network (PXE/iPXE): nixpkgs' netboot
# module puts the whole system in the initrd as a squashfs and runs it from
# RAM. Agent state (code cache, instances, runtime trees' links) goes to a
# local disk labelled kiln-state when the machine has one, else to RAM.
{ lib, modulesPath, ... }:
{
  imports = [ (modulesPath + "/installer/netboot/netboot.nix") ];

  boot.loader.systemd-boot.enable = lib.mkForce false;

  fileSystems."/var/lib/kiln" = {
    device = "/dev/disk/by-label/kiln-state";
    fsType = "ext4";
    options = [
      "nofail"
      "x-systemd.device-timeout=10s"
    ];
  };

  boot.kernelParams = [
    "console=tty0"
    "console=ttyS0,115200"
  ];
}
