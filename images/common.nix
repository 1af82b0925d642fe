# What every Kiln host shares: site settings, SSH for operators, Nix with
# flakes for upgrades, and the kiln CLI.
{
  lib,
  kilnPackages,
  ...
}:
let
  site = lib.importJSON ./site.json;
in
{
  system.stateVersion = "25.05";

  networking = {
    useNetworkd = true;
    useDHCP = true;
    firewall.enable = true;
  };

  services.openssh = {
    enable = true;
    settings = {
      PermitRootLogin = "prohibit-password";
      PasswordAuthentication = false;
      KbdInteractiveAuthentication = false;
    };
  };
  users.users.root.openssh.authorizedKeys.keys = site.sshAuthorizedKeys;

  nix.settings.experimental-features = [
    "nix-command"
    "flakes"
  ];

  time.timeZone = "UTC";
  services.timesyncd.enable = true;

  environment.systemPackages = [ kilnPackages.kiln ];

  # Certificates are installed here at first boot (docs/joining.md).
  systemd.tmpfiles.rules = [ "d /etc/kiln/pki 0700 root root -" ];
}
