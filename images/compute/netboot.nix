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

  # The root file system is RAM: keep the node's certificate on the state
  # disk with the rest of what must survive a reboot.
  services.kiln.agent.settings.tls = lib.mkForce {
    ca = "/var/lib/kiln/pki/ca.pem";
    cert = "/var/lib/kiln/pki/agent.pem";
    key = "/var/lib/kiln/pki/agent-key.pem";
  };
  services.kiln.agent.settings.bootstrap.token_file = lib.mkForce "/var/lib/kiln/pki/bootstrap-token";

  boot.kernelParams = [
    "console=tty0"
    "console=ttyS0,115200"
  ];
}
