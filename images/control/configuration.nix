# The control node: the gateway (FC API on 443 and the internal listener
# agents fetch code from) and the scheduler, both unprivileged.
{ lib, ... }:
let
  site = lib.importJSON ../site.json;
  pki = name: "/etc/kiln/pki/${name}";
  tls = role: {
    ca = pki "ca.pem";
    cert = pki "${role}.pem";
    key = pki "${role}-key.pem";
  };
in
{
  networking.hostName = lib.mkDefault "kiln-control";

  services.kiln.gateway = {
    enable = true;
    openFirewall = true;
    settings = {
      inherit (site) region;
      scheduler_url = "https://${site.controlHost}:9443";
      public = {
        listen = "0.0.0.0:443";
        cert = pki "gateway.pem";
        key = pki "gateway-key.pem";
      };
      internal.listen = "0.0.0.0:8444";
      tls = tls "gateway-internal";
    };
  };

  services.kiln.scheduler = {
    enable = true;
    openFirewall = true;
    settings = {
      listen = "0.0.0.0:9443";
      tls = tls "scheduler";
    };
  };
}
