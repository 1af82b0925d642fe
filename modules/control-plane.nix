# services.kiln.controlPlane: what a clustered control node runs beside
# its gateway and scheduler (docs/ha.md): a local PostgreSQL holding the
# state every gateway and scheduler shares, and HAProxy in front of the
# gateways. Both are optional: a site with its own replicated PostgreSQL
# (Patroni) or its own load balancer points the services at those instead.
{
  config,
  lib,
  ...
}:
let
  cfg = config.services.kiln.controlPlane;
  inherit (lib) types;
  db = cfg.database.name;
  lb = cfg.loadBalancer;
  portOf = addr: lib.toInt (lib.last (lib.splitString ":" addr));
  servers = lib.concatStrings (
    lib.imap0 (i: g: "  server gateway${toString i} ${g.public}\n") lb.gateways
  );
  # Each internal server follows its gateway's public check.
  internalServers = lib.concatStrings (
    lib.imap0 (
      i: g: "  server gateway${toString i} ${g.internal} track gateways/gateway${toString i}\n"
    ) lb.gateways
  );
in
{
  options.services.kiln.controlPlane = {
    database = {
      enable = lib.mkEnableOption ''
        a local PostgreSQL for the gateways' and schedulers' shared state,
        reached over its unix socket by peer identity (no password, no TCP):
        point `settings.cluster.postgres_url` of both services at
        `host=/run/postgresql dbname=''${name} user=''${name}`
      '';
      name = lib.mkOption {
        type = types.str;
        default = "kiln";
        description = "The database and the role the gateway's and the scheduler's system users map to.";
      };
    };
    loadBalancer = {
      enable = lib.mkEnableOption ''
        HAProxy in front of the gateways' public listeners: TCP, TLS passed
        through to the gateways (custom domains keep their certificates),
        each gateway probed on `GET /healthz` over TLS and taken out when it
        fails or drains
      '';
      listen = lib.mkOption {
        type = types.str;
        default = "0.0.0.0:443";
        description = "Where clients reach the FC API (the endpoint in their credentials).";
      };
      internalListen = lib.mkOption {
        type = types.str;
        default = "0.0.0.0:7443";
        description = ''
          Where agents reach a gateway's internal listener (code packages,
          credentials): their `gateway_internal_url`. Mutual TLS passes
          through; each gateway still checks every client certificate.
        '';
      };
      gateways = lib.mkOption {
        type = types.listOf (
          types.submodule {
            options = {
              public = lib.mkOption {
                type = types.str;
                description = "`host:port` of the gateway's public listener.";
              };
              internal = lib.mkOption {
                type = types.str;
                description = "`host:port` of the gateway's internal (mTLS) listener.";
              };
            };
          }
        );
        example = [
          {
            public = "10.0.0.2:8443";
            internal = "10.0.0.2:8444";
          }
        ];
        description = "Every gateway of the cluster.";
      };
      caFile = lib.mkOption {
        type = types.str;
        description = "The CA that issued the gateways' public certificates: health checks verify it.";
      };
      checkIntervalMs = lib.mkOption {
        type = types.ints.positive;
        default = 1000;
        description = "How often each gateway is probed; two failures take it out, two passes bring it back.";
      };
      timeoutS = lib.mkOption {
        type = types.ints.positive;
        default = 3600;
        description = "The longest a connection may stay idle (above the longest function timeout callers wait for).";
      };
    };
  };

  config = lib.mkMerge [
    (lib.mkIf cfg.database.enable {
      services.postgresql = {
        enable = true;
        ensureDatabases = [ db ];
        ensureUsers = [
          {
            name = db;
            ensureDBOwnership = true;
          }
        ];
        # The services run as dynamic users named after their units; both
        # act as the one role that owns the database.
        identMap = ''
          kiln kiln-gateway ${db}
          kiln kiln-scheduler ${db}
        '';
        authentication = lib.mkOverride 10 ''
          local ${db} ${db} peer map=kiln
          local all postgres peer
        '';
      };
      systemd.services = lib.genAttrs [ "kiln-gateway" "kiln-scheduler" ] (_: {
        wants = [ "postgresql.service" ];
        after = [ "postgresql.service" ];
      });
    })
    (lib.mkIf lb.enable {
      assertions = [
        {
          assertion = lb.gateways != [ ];
          message = "services.kiln.controlPlane.loadBalancer.gateways must list at least one gateway";
        }
      ];
      networking.firewall.allowedTCPPorts = [
        (portOf lb.listen)
        (portOf lb.internalListen)
      ];
      services.haproxy = {
        enable = true;
        config = ''
          defaults
            mode tcp
            timeout connect 5s
            timeout client ${toString lb.timeoutS}s
            timeout server ${toString lb.timeoutS}s
            # A draining gateway finishes the calls it holds (no
            # shutdown-sessions); a lost machine is found by keepalive.
            option srvtcpka
            srvtcpka-idle 10s
            srvtcpka-intvl 5s
            srvtcpka-cnt 3

          frontend kiln
            bind ${lb.listen}
            default_backend gateways

          backend gateways
            balance leastconn
            # A refused connection is retried on another gateway.
            retries 2
            option redispatch
            option httpchk
            http-check send meth GET uri /healthz ver HTTP/1.1 hdr host kiln-health
            http-check expect status 200
            default-server check check-ssl verify required ca-file ${lb.caFile} inter ${toString lb.checkIntervalMs} fall 2 rise 2
          ${servers}
          frontend kiln-internal
            bind ${lb.internalListen}
            default_backend gateways-internal

          backend gateways-internal
            balance leastconn
          ${internalServers}'';
      };
    })
  ];
}
