# Hosts installed on a disk (the raw EFI and qcow2 images): the file
# systems and boot loader the images' partitions carry. nixpkgs' image
# modules set the same (by label), so `nixos-rebuild` on the host agrees
# with the image it was booted from.
{ lib, ... }:
{
  fileSystems = {
    "/" = {
      device = "/dev/disk/by-label/nixos";
      fsType = "ext4";
      autoResize = true;
    };
    "/boot" = {
      device = "/dev/disk/by-label/ESP";
      fsType = "vfat";
    };
  };
  boot = {
    growPartition = true;
    loader = {
      systemd-boot.enable = lib.mkDefault true;
      efi.canTouchEfiVariables = false;
    };
    initrd.availableKernelModules = [
      "virtio_pci"
      "virtio_blk"
      "virtio_scsi"
      "nvme"
      "ahci"
      "xhci_pci"
      "usb_storage"
      "sd_mod"
    ];
  };
}
