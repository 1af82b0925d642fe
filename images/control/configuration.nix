# The control node: the gateway (FC API and the internal listener agents
# fetch code from) and the scheduler, both unprivileged. With `cluster` in
# site.json (docs/ha.md) it is one of several control nodes sharing one
# PostgreSQL database ("local" runs it here, otherwise its URL), with
# HAProxy on 443 in front of every control node's gateway; without, one box
# on SQLite with the gateway itself on 443.
{ lib, ... }:
let
  site = lib.importJSON ../site.json;
  cluster = site.cluster or null;
  clustered = cluster != null;
  localDb = clustered && cluster.database == "local";
  postgresUrl = if localDb then "host=/run/postgresql dbname=kiln user=kiln" else cluster.database;
  pki = name: "/etc/kiln/pki/${name}";
  tls = role: {
    ca = pki "ca.pem";
    cert = pki "${role}.pem";
    key = pki "${role}-key.pem";
  };
  # Database settings both services share (the password, if any, a
  # credential file outside the store).
  database = {
    postgres_url = postgresUrl;
    postgres_password_file = cluster.passwordFile or null;
  };
in
{
  networking.hostName = lib.mkDefault "kiln-control";

  services.kiln.gateway = {
    enable = true;
    openFirewall = true;
    settings = {
      inherit (site) region;
      scheduler_url =
        if clustered then
          lib.concatStringsSep "," cluster.schedulers
        else
          "https://${site.controlHost}:9443";
      public = {
        # HAProxy takes 443 on a clustered control node.
        listen = if clustered then "0.0.0.0:8443" else "0.0.0.0:443";
        cert = pki "gateway.pem";
        key = pki "gateway-key.pem";
      };
      internal.listen = "0.0.0.0:8444";
      tls = tls "gateway-internal";
      secrets.key_file = "/etc/kiln/gateway-secrets.key";
      cluster = if clustered then database else null;
    };
  };

  services.kiln.scheduler = {
    enable = true;
    openFirewall = true;
    settings = {
      listen = "0.0.0.0:9443";
      tls = tls "scheduler";
    }
    // lib.optionalAttrs clustered {
      # Every scheduler of a cluster seals with the same key.
      secrets.key_file = "/etc/kiln/scheduler-secrets.key";
      cluster = database // {
        advertise_url = "https://${site.controlHost}:9443";
      };
    };
  };

  services.kiln.controlPlane = lib.mkIf clustered {
    database.enable = localDb;
    loadBalancer = {
      enable = true;
      listen = "0.0.0.0:443";
      # Every control node's gateway: public on 8443, internal on 8444;
      # agents reach them through HAProxy's internal frontend on 7443.
      gateways = map (host: {
        public = "${host}:8443";
        internal = "${host}:8444";
      }) cluster.gateways;
      caFile = pki "ca.pem";
    };
  };
}
