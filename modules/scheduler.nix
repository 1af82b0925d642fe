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
  # `certificates` is off by default, so its defaults cannot sit in
  # scheduler.json (rendered as a whole by the settings test).
  certDefaults = lib.importJSON ./defaults/scheduler-certificates.json;
  clusterDefaults = lib.importJSON ./defaults/scheduler-cluster.json;
  inherit (lib) types;

  # Keys scheduler.db may still be sealed with while rotating: each handed
  # over as a credential of its own, the list rewritten to their copies.
  credDir = "/run/credentials/kiln-scheduler.service";
  previousKeys =
    if cfg.settings.secrets == null then
      [ ]
    else
      lib.imap0 (i: path: {
        name = "secrets-previous-${toString i}";
        inherit path;
      }) cfg.settings.secrets.previous_key_files;

  rendered = kiln.render {
    name = "kiln-scheduler";
    settings =
      if cfg.settings.secrets == null then
        cfg.settings
      else
        lib.recursiveUpdate cfg.settings {
          secrets.previous_key_files = map (k: "${credDir}/${k.name}") previousKeys;
        };
    secretPaths = [
      # The CA that signs agent certificates (renewals, bootstrap): its key
      # mints any node's identity, so it is a credential, never in the
      # store.
      [
        "certificates"
        "ca_cert"
      ]
      [
        "certificates"
        "ca_key"
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
        "secrets"
        "key_file"
      ]
      # The database password: a credential, the URL may be public.
      [
        "cluster"
        "postgres_password_file"
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
            previous_key_files = kiln.setting (types.listOf types.str) [ ] "Keys being rotated out: opened, and resealed under key_file at start.";
          });
        };
        certificates = lib.mkOption {
          default = null;
          description = ''
            The CA the scheduler signs agent certificates with: short-lived
            node certificates renewed before they expire, and certificates
            for nodes joining with a bootstrap token (docs/joining.md,
            section 3). Use an intermediate signed by the cluster root
            (docs/security.md). Both files stay outside the Nix store;
            systemd hands the service root-only copies. When null, agents
            keep the certificates they were installed with until they
            expire.
          '';
          type = types.nullOr (kiln.section {
            ca_cert = kiln.required types.str "The signing CA's certificate (PEM).";
            ca_key = kiln.required types.str "Its private key (mode 0600, outside the Nix store).";
            agent_cert_lifetime_s = kiln.setting types.ints.positive certDefaults.agent_cert_lifetime_s "How long an agent certificate lives; agents renew at two thirds.";
            max_bootstrap_token_ttl_s = kiln.setting types.ints.positive certDefaults.max_bootstrap_token_ttl_s "The longest `kiln nodes bootstrap-token --ttl` an operator may ask for.";
          });
        };
        cluster = lib.mkOption {
          default = null;
          description = ''
            Several schedulers sharing one PostgreSQL database, one leading
            (docs/ha.md): each candidate answers NotLeader until it wins the
            lease, and a leader that loses it exits (systemd restarts it as a
            candidate). Needs `secrets` (every scheduler seals with the same
            key) and a fixed port in `listen`. Gateways and agents list every
            scheduler in their `scheduler_url`, comma separated. When null,
            this scheduler is alone, on SQLite in its state directory.
          '';
          type = types.nullOr (kiln.section {
            postgres_url = kiln.required types.str "`postgresql://` URL or `key=value` string of the shared database, without a password (the rendered file is in the Nix store): a unix socket or loopback address.";
            postgres_password_file = kiln.optional types.str "File holding the database password (outside the Nix store); systemd hands the service a root-only copy.";
            advertise_url = kiln.required types.str "This scheduler's `https://host:port` as gateways and agents reach it; a standby names the leader's to callers.";
            lease_ms = kiln.setting types.ints.positive clusterDefaults.lease_ms "How long the leader's lease lasts unrenewed: a standby takes over about this long after the leader dies.";
          });
        };
        bootstrap_listen = kiln.optional types.str "Where new nodes redeem their single-use bootstrap tokens (TLS, no client certificate, only `POST /v1/bootstrap`), e.g. `0.0.0.0:9444`; needs `certificates`.";
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
        assertion =
          cfg.settings.certificates == null
          || !(lib.hasPrefix builtins.storeDir (toString cfg.settings.certificates.ca_key));
        message = ''
          services.kiln.scheduler.settings.certificates.ca_key must not be in the Nix store
          (every user could read it and mint any node's certificate): give the path of a
          root-only file on the host.
        '';
      }
      {
        assertion = cfg.settings.cluster == null || cfg.settings.secrets != null;
        message = "services.kiln.scheduler.settings.cluster needs settings.secrets: every scheduler of a cluster must seal function environments with the same key";
      }
      {
        assertion = cfg.settings.bootstrap_listen == null || cfg.settings.certificates != null;
        message = "services.kiln.scheduler.settings.bootstrap_listen needs settings.certificates (the CA that signs the joining nodes' certificates)";
      }
      {
        assertion =
          cfg.settings.secrets == null
          || lib.all (p: !(lib.hasPrefix builtins.storeDir (toString p))) cfg.settings.secrets.previous_key_files;
        message = "services.kiln.scheduler.settings.secrets.previous_key_files must not be in the Nix store";
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

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall (
      [ port ] ++ lib.optional (cfg.settings.bootstrap_listen != null) (kiln.portOf cfg.settings.bootstrap_listen)
    );

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
        LoadCredential = rendered.loadCredential ++ map (k: "${k.name}:${k.path}") previousKeys;
      };
    };
  };
}
