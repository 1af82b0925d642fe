# services.kiln.gateway: the access service (FC API over HTTPS, signatures,
# the async queue, the code store). Needs no privilege: it runs as a dynamic
# user with a read-only system and its TLS keys handed over as credentials.
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
  inherit (lib) types;

  rendered = kiln.render {
    name = "kiln-gateway";
    inherit (cfg) settings;
    secretPaths = [
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
        scheduler_url = kiln.required types.str "The scheduler's internal mTLS URL, `https://host:port`.";
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
        assertion = lib.hasPrefix "https://" cfg.settings.scheduler_url;
        message = "services.kiln.gateway.settings.scheduler_url must be an https:// URL";
      }
    ];

    warnings = lib.optional ((cfg.settings.bootstrap_keys or [ ]) != [ ]) ''
      services.kiln.gateway.settings.bootstrap_keys puts access key secrets in the
      world-readable Nix store; use it for test and development clusters only.
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
        LoadCredential = rendered.loadCredential;
        # Binding a port below 1024 (e.g. 443) is the one capability it may get.
        AmbientCapabilities = if publicPort < 1024 then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
        CapabilityBoundingSet = if publicPort < 1024 then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
      };
    };
  };
}
