# services.kiln.scheduler: nodes, instances, leases, placement and
# per-account quotas. Needs no privilege, like the gateway.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.kiln.scheduler;
  kiln = import ./lib.nix { inherit lib pkgs; };
  defaults = lib.importJSON ./defaults/scheduler.json;
  inherit (lib) types;

  rendered = kiln.render {
    name = "kiln-scheduler";
    inherit (cfg) settings;
    secretPaths = [
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
        "secrets"
        "key_file"
      ]
    ];
  };
  stateDir = cfg.settings.state_dir;
  port = kiln.portOf cfg.settings.listen;
  ad = defaults.account_defaults;
in
{
  options.services.kiln.scheduler = {
    enable = lib.mkEnableOption "the Kiln scheduler (nodes, instances, leases, placement)";

    package = lib.mkPackageOption pkgs "kiln-scheduler" { };

    openFirewall = lib.mkOption {
      type = types.bool;
      default = false;
      description = "Open the scheduler's mTLS port in the firewall (agents and gateways call it).";
    };

    settings = lib.mkOption {
      default = { };
      description = ''
        The scheduler's configuration file (`kiln-scheduler --config`), as in
        `services/kiln-scheduler/config.example.toml`. Typed options cover the
        main settings; any other key is written to the file as it is.
      '';
      example = lib.literalExpression "lib.importJSON ./modules/examples/scheduler.json";
      type = kiln.section {
        state_dir = kiln.setting types.str defaults.state_dir "Holds scheduler.db; below /var/lib (the unit's StateDirectory).";
        listen = kiln.setting types.str defaults.listen "The mTLS listener agents and gateways call.";
        metrics_listen = kiln.setting (types.nullOr types.str) defaults.metrics_listen "Plain-HTTP Prometheus endpoint; null disables it.";
        idle_timeout_s = kiln.setting types.ints.positive defaults.idle_timeout_s "An instance without a lease this long is destroyed.";
        heartbeat_interval_ms = kiln.setting types.ints.positive defaults.heartbeat_interval_ms "How often agents report (told to them at registration).";
        node_failure_after_ms = kiln.setting types.ints.positive defaults.node_failure_after_ms "A node silent this long is written off with its instances.";
        instance_start_timeout_ms = kiln.setting types.ints.positive defaults.instance_start_timeout_ms "How long an agent may take to start an instance.";
        max_instances_per_account = kiln.setting types.ints.positive defaults.max_instances_per_account "Instances one account may hold at once (its burst pool).";
        account_defaults = lib.mkOption {
          default = { };
          description = "Quotas and scale-out rates of every account without limits of its own.";
          type = kiln.section {
            memory_quota_mb = kiln.setting types.ints.positive ad.memory_quota_mb "Memory of all an account's instances.";
            vcpu_quota_milli = kiln.setting types.ints.positive ad.vcpu_quota_milli "vCPUs (thousandths) of all an account's instances.";
            scale_out_instances_per_minute = kiln.setting types.ints.positive ad.scale_out_instances_per_minute "New instances per minute (token bucket).";
            scale_out_vcpus_per_minute = kiln.setting types.ints.positive ad.scale_out_vcpus_per_minute "vCPUs of new instances per minute (token bucket).";
          };
        };
        rebalance = lib.mkOption {
          default = { };
          description = "Moving load off hot nodes.";
          type = kiln.section {
            enabled = kiln.setting types.bool defaults.rebalance.enabled "Whether to move instances off nodes above the high watermark.";
          };
        };
        secrets = lib.mkOption {
          default = null;
          description = ''
            The key that seals the function environments inside the instance
            and provision specs scheduler.db keeps (AES-256-GCM). Keep the
            file outside the Nix store, root-only
            (`(umask 077; head -c 32 /dev/urandom > FILE)`): systemd hands the
            service a copy as a credential. When null the scheduler seals with
            a key it creates in its state directory (and warns). See
            docs/security.md.
          '';
          type = types.nullOr (kiln.section {
            key_file = kiln.required types.str "File of 32 random bytes or 64 hex digits (mode 0600, outside the Nix store).";
          });
        };
        tls = lib.mkOption {
          description = "The scheduler's identity on the internal mTLS network.";
          type = kiln.section {
            ca = kiln.required types.str "The cluster CA certificate (PEM).";
            cert = kiln.required types.str "Certificate issued by the cluster CA (server and client).";
            key = kiln.required types.str "Its private key.";
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion =
          cfg.settings.secrets == null
          || !(lib.hasPrefix builtins.storeDir (toString cfg.settings.secrets.key_file));
        message = ''
          services.kiln.scheduler.settings.secrets.key_file must not be in the Nix store
          (every user can read it): give the path of a root-only file on the host.
        '';
      }
      {
        assertion = lib.hasPrefix "/var/lib/" stateDir;
        message = "services.kiln.scheduler.settings.state_dir must be below /var/lib/, got ${stateDir}";
      }
      {
        assertion = cfg.settings.node_failure_after_ms >= 2 * cfg.settings.heartbeat_interval_ms;
        message = "services.kiln.scheduler: node_failure_after_ms must be at least twice heartbeat_interval_ms";
      }
    ];

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ port ];

    systemd.paths.kiln-scheduler = {
      description = "Start the Kiln scheduler once its TLS key is installed";
      wantedBy = [ "multi-user.target" ];
      pathConfig.PathExists = cfg.settings.tls.key;
    };

    systemd.services.kiln-scheduler = {
      description = "Kiln scheduler";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      restartTriggers = [ rendered.file ];
      environment.RUST_LOG = lib.mkDefault "info";
      # Starts once its TLS key is installed (see docs/joining.md).
      unitConfig.ConditionPathExists = cfg.settings.tls.key;
      serviceConfig = kiln.unprivilegedHardening // {
        ExecStart = "${lib.getExe' cfg.package "kiln-scheduler"} --config ${rendered.file}";
        StateDirectory = lib.removePrefix "/var/lib/" stateDir;
        StateDirectoryMode = "0700";
        LoadCredential = rendered.loadCredential;
      };
    };
  };
}
