# services.kiln.gateway: the access service (FC API over HTTPS, signatures,
# the async queue, the code store). Needs no privilege: it runs as a dynamic
# user with a read-only system and its TLS keys and the key that seals
# secrets in its store handed over as credentials (`LoadCredential=`).
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.kiln.gateway;
  kiln = import ./lib.nix { inherit lib pkgs; };
  defaults = lib.importJSON ./defaults/gateway.json;
  # `cluster` is off by default, so its defaults sit in a file of their own.
  clusterDefaults = lib.importJSON ./defaults/gateway-cluster.json;
  inherit (lib) types;

  # Keys the store may still be sealed with while rotating: each handed
  # over as a credential of its own, the list rewritten to their copies.
  credDir = "/run/credentials/kiln-gateway.service";
  previousKeys = lib.imap0 (i: path: {
    name = "secrets-previous-${toString i}";
    inherit path;
  }) cfg.settings.secrets.previous_key_files;

  rendered = kiln.render {
    name = "kiln-gateway";
    settings = lib.recursiveUpdate cfg.settings {
      secrets.previous_key_files = map (k: "${credDir}/${k.name}") previousKeys;
    };
    secretPaths = [
      [
        "secrets"
        "key_file"
      ]
      [
        "public"
        "cert"
      ]
      [
        "public"
        "key"
      ]
      [
        "tls"
        "ca"
      ]
      [
        "tls"
        "cert"
      ]
      [
        "tls"
        "key"
      ]
      [
        "async_queue"
        "webhook_ca"
      ]
      # The database password: a credential, the URL may be public.
      [
        "cluster"
        "postgres_password_file"
      ]
    ];
  };
  stateDir = cfg.settings.state_dir;
  publicPort = kiln.portOf cfg.settings.public.listen;
  internalPort = kiln.portOf cfg.settings.internal.listen;
in
{
  options.services.kiln.gateway = {
    enable = lib.mkEnableOption "the Kiln gateway (FC 2023-03-30 API, async queue, code store)";

    package = lib.mkPackageOption pkgs "kiln-gateway" { };

    openFirewall = lib.mkOption {
      type = types.bool;
      default = false;
      description = "Open the public and internal listeners' ports in the firewall.";
    };

    settings = lib.mkOption {
      default = { };
      description = ''
        The gateway's configuration file (`kiln-gateway --config`), as in
        `services/kiln-gateway/config.example.toml`. Typed options cover the
        main settings; any other key is written to the file as it is.
        TLS file paths may be root-only: systemd hands copies to the
        service as credentials.
      '';
      example = lib.literalExpression "lib.importJSON ./modules/examples/gateway.json";
      type = kiln.section {
        state_dir = kiln.setting types.str defaults.state_dir ''
          Holds gateway.db, queue.db and the code packages. Must be below
          /var/lib (it is the unit's StateDirectory).
        '';
        region = kiln.required types.str "Region in function ARNs and `x-fc-region` (e.g. cn-hangzhou).";
        scheduler_url = kiln.required types.str "The scheduler's internal mTLS URL, `https://host:port`; a cluster's schedulers comma separated: the gateway follows the leader.";
        metrics_listen = kiln.setting (types.nullOr types.str) defaults.metrics_listen "Plain-HTTP Prometheus endpoint; null disables it.";
        lease_hold_ms = kiln.setting types.ints.unsigned defaults.lease_hold_ms "How long a healthy lease is kept for the next call (0 to 5000).";
        public = lib.mkOption {
          default = { };
          description = "The public FC API listener (TLS 1.2/1.3).";
          type = kiln.section {
            listen = kiln.setting types.str defaults.public.listen "Address and port of the public API.";
            cert = kiln.required types.str "PEM certificate chain of the public listener.";
            key = kiln.required types.str "PEM private key of the public listener.";
          };
        };
        internal = lib.mkOption {
          default = { };
          description = "The internal mTLS listener (code packages for agents).";
          type = kiln.section {
            listen = kiln.setting types.str defaults.internal.listen "Address and port of the internal listener.";
          };
        };
        tls = lib.mkOption {
          description = "The gateway's identity on the internal mTLS network.";
          type = kiln.section {
            ca = kiln.required types.str "The cluster CA certificate (PEM).";
            cert = kiln.required types.str "Certificate issued by the cluster CA (server and client).";
            key = kiln.required types.str "Its private key.";
          };
        };
        secrets = lib.mkOption {
          description = ''
            The key that seals access key secrets and function environment
            variables in gateway.db (AES-256-GCM). Keep the file outside the
            Nix store, root-only (`(umask 077; head -c 32 /dev/urandom > FILE)`):
            systemd hands the service a copy as a credential. Every gateway
            sharing a store needs the same key. See docs/security.md.
          '';
          type = kiln.section {
            key_file = kiln.required types.str "File of 32 random bytes or 64 hex digits (mode 0600, outside the Nix store).";
            previous_key_files = kiln.setting (types.listOf types.str) defaults.secrets.previous_key_files "Keys being rotated out: opened, and resealed under key_file at start.";
          };
        };
        async_queue = lib.mkOption {
          default = { };
          description = "The async invocation dispatcher: its quotas and timings.";
          type = kiln.section {
            max_in_flight = kiln.setting types.ints.positive defaults.async_queue.max_in_flight "Async invocations in flight in total.";
            per_queue = kiln.setting types.ints.positive defaults.async_queue.per_queue "Async invocations in flight per queue (account or function).";
            lease_ms = kiln.setting types.ints.positive defaults.async_queue.lease_ms "A delivery unanswered this long is redelivered.";
            backoff_cap_ms = kiln.setting types.ints.positive defaults.async_queue.backoff_cap_ms "Longest backoff after throttling or a system error.";
            task_retention_s = kiln.setting types.ints.positive defaults.async_queue.task_retention_s "How long finished async tasks stay readable.";
            webhook_ca = kiln.optional types.str "Extra CA (PEM) trusted for https webhook destinations.";
          };
        };
        cluster = lib.mkOption {
          default = null;
          description = ''
            Several gateways sharing one PostgreSQL database (docs/ha.md):
            functions, keys, code packages, the async queue, signature
            nonces and timer ticks live there, so any gateway serves any
            call and a gateway's loss loses nothing it accepted. Every
            gateway needs the same `secrets.key_file`. Put a load balancer
            in front (`services.kiln.controlPlane.loadBalancer`). When null,
            this gateway is alone, on SQLite in its state directory.
          '';
          type = types.nullOr (kiln.section {
            postgres_url = kiln.required types.str "`postgresql://` URL or `key=value` string of the shared database, without a password (the rendered file is in the Nix store): a unix socket or loopback address.";
            postgres_password_file = kiln.optional types.str "File holding the database password (outside the Nix store); systemd hands the service a root-only copy.";
            max_connections = kiln.setting types.ints.positive clusterDefaults.max_connections "The most connections this gateway opens to the database.";
          });
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = lib.hasPrefix "/var/lib/" stateDir;
        message = "services.kiln.gateway.settings.state_dir must be below /var/lib/, got ${stateDir}";
      }
      {
        assertion = lib.all (u: lib.hasPrefix "https://" (lib.removePrefix " " u)) (lib.splitString "," cfg.settings.scheduler_url);
        message = "services.kiln.gateway.settings.scheduler_url must be an https:// URL (or several, comma separated)";
      }
      {
        assertion = lib.all (p: !(lib.hasPrefix builtins.storeDir (toString p))) (
          [ cfg.settings.secrets.key_file ] ++ cfg.settings.secrets.previous_key_files
        );
        message = ''
          services.kiln.gateway.settings.secrets key files must not be in the Nix store
          (every user can read it): give paths of root-only files on the host.
        '';
      }
      {
        assertion =
          cfg.settings.cluster == null
          || cfg.settings.cluster.postgres_password_file == null
          || !(lib.hasPrefix builtins.storeDir (toString cfg.settings.cluster.postgres_password_file));
        message = "services.kiln.gateway.settings.cluster.postgres_password_file must not be in the Nix store";
      }
    ];

    warnings = lib.optional ((cfg.settings.bootstrap_keys or [ ]) != [ ]) ''
      services.kiln.gateway.settings.bootstrap_keys puts access key secrets in the
      world-readable Nix store; use it for test and development clusters only, and
      rotate them (`kiln keys create`, then `kiln keys delete`).
    '';

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [
      publicPort
      internalPort
    ];

    systemd.paths.kiln-gateway = {
      description = "Start the Kiln gateway once its TLS key is installed";
      wantedBy = [ "multi-user.target" ];
      pathConfig.PathExists = cfg.settings.tls.key;
    };

    systemd.services.kiln-gateway = {
      description = "Kiln gateway (FC API)";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      restartTriggers = [ rendered.file ];
      environment.RUST_LOG = lib.mkDefault "info";
      # Starts once its TLS key is installed (see docs/joining.md).
      unitConfig.ConditionPathExists = cfg.settings.tls.key;
      serviceConfig = kiln.unprivilegedHardening // {
        ExecStart = "${lib.getExe' cfg.package "kiln-gateway"} --config ${rendered.file}";
        StateDirectory = lib.removePrefix "/var/lib/" stateDir;
        StateDirectoryMode = "0700";
        LoadCredential = rendered.loadCredential ++ map (k: "${k.name}:${k.path}") previousKeys;
        # Binding a port below 1024 (e.g. 443) is the one capability it may get.
        AmbientCapabilities = if publicPort < 1024 then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
        CapabilityBoundingSet = if publicPort < 1024 then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
      };
    };
  };
}
