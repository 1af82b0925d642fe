# services.kiln.agent: the compute-node agent. It creates, freezes and
# destroys sandboxes (runc containers or cloud-hypervisor microVMs), so it
# runs as root, but with only the capabilities and devices that takes:
# CAP_NET_ADMIN for network namespaces, veths, taps and nftables,
# CAP_SYS_ADMIN for mounts and namespaces, /dev/kvm, /dev/net/tun and vsock
# for microVMs, and a delegated cgroup subtree.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.kiln.agent;
  kiln = import ./lib.nix { inherit lib pkgs; };
  defaults = lib.importJSON ./defaults/agent.json;
  inherit (lib) types;
  sb = defaults.sandbox;

  rendered = kiln.render {
    name = "kiln-agent";
    inherit (cfg) settings;
    # Only the CA is handed over as a credential (a read-only copy): the
    # agent renews its own certificate and key in place (and writes them
    # when it joins with a bootstrap token), so those stay where they are,
    # root-only, and their directories writable (`ReadWritePaths`).
    secretPaths = [
      [
        "tls"
        "ca"
      ]
    ];
  };
  bootstrap = cfg.settings.bootstrap;
  # What the agent writes: its certificate and key, and the bootstrap token
  # it deletes once redeemed.
  writableDirs = lib.unique (
    map dirOf ([
      cfg.settings.tls.cert
      cfg.settings.tls.key
    ]
    ++ lib.optional (bootstrap != null) bootstrap.token_file)
  );
  # The agent starts once it has a key, or a token to get one with.
  startsWith = [ cfg.settings.tls.key ] ++ lib.optional (bootstrap != null) bootstrap.token_file;
  stateDir = cfg.settings.state_dir;
  rootfsDir =
    if cfg.settings.sandbox.rootfs_dir != null then
      cfg.settings.sandbox.rootfs_dir
    else
      "${stateDir}/rootfs";
  port = kiln.portOf cfg.settings.listen;

  # Render the final file at start: the Nix-built settings, then the
  # node-local file over them.
  mergeConfig = pkgs.writers.writePython3 "kiln-agent-config" {
    libraries = [ pkgs.python3Packages.tomli-w ];
  } ''
    import os
    import sys
    import tomllib

    import tomli_w


    def merge(base, over):
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            else:
                base[key] = value
        return base


    base_path, local_path, out_path = sys.argv[1:4]
    with open(base_path, "rb") as f:
        config = tomllib.load(f)
    if local_path and os.path.exists(local_path):
        with open(local_path, "rb") as f:
            merge(config, tomllib.load(f))
    with open(out_path, "wb") as f:
        tomli_w.dump(config, f)
  '';
  runtimeConfig = "/run/kiln-agent/config.toml";

  # The capabilities runc needs to set up a container (and may pass on,
  # reduced, to it), plus what the agent itself uses.
  capabilities = [
    "CAP_NET_ADMIN"
    "CAP_SYS_ADMIN"
    "CAP_NET_RAW"
    "CAP_NET_BIND_SERVICE"
    "CAP_SYS_CHROOT"
    "CAP_SYS_PTRACE"
    "CAP_SYS_RESOURCE"
    "CAP_IPC_LOCK"
    "CAP_SETUID"
    "CAP_SETGID"
    "CAP_SETPCAP"
    "CAP_SETFCAP"
    "CAP_CHOWN"
    "CAP_DAC_OVERRIDE"
    "CAP_DAC_READ_SEARCH"
    "CAP_FOWNER"
    "CAP_FSETID"
    "CAP_KILL"
    "CAP_MKNOD"
    "CAP_AUDIT_WRITE"
  ];
in
{
  options.services.kiln.agent = {
    enable = lib.mkEnableOption "the Kiln compute-node agent (sandboxes, instance networking, invoke forwarding)";

    package = lib.mkPackageOption pkgs "kiln-agent" { };

    openFirewall = lib.mkOption {
      type = types.bool;
      default = false;
      description = "Open the agent's mTLS port (the scheduler and gateways call it).";
    };

    memoryMax = lib.mkOption {
      type = types.nullOr types.str;
      default = "2G";
      example = "4G";
      description = ''
        systemd's `MemoryMax` for the agent's own unit: the agent, its
        runc and helper processes (instances live in their own cgroups
        under `settings.sandbox.cgroup_parent` and are not counted). A
        bug or a hostile function that made the agent grow is then stopped
        by the kernel and the agent restarted (it adopts its instances),
        instead of taking the node's memory. `null` leaves it unbounded.
      '';
    };

    runtimeRootfs = lib.mkOption {
      type = types.attrsOf types.package;
      default = { };
      example = lib.literalExpression ''{ "custom.debian12" = kiln.packages.x86_64-linux."rootfs-custom-debian12"; }'';
      description = ''
        Runtime root filesystems built by Nix, linked into the agent's
        rootfs directory under their tree name: the runtime's name, except
        `debian12-builtin`, the one tree of the built-in runtimes
        `python3.11` and `nodejs18` (`rootfs-debian12-builtin`). A runtime
        listed in `settings.runtimes` whose tree is not here is built by the
        agent at its first start (with debootstrap from a Debian mirror).
      '';
    };

    vpcBridges = lib.mkOption {
      default = { };
      example = {
        br-vpc = {
          interfaces = [ "eno2" ];
        };
      };
      description = ''
        Open vSwitch bridges that connect this node to VPC networks (the
        physical or VLAN uplinks VPC traffic is routed over), created
        through NixOS's own `networking.vswitches`. The agent's per-VPC
        bridges (`<prefix>v<n>`, userspace datapath) and their gateways are
        its own, made and removed at run time from `sandbox.network.vpcs`.
      '';
      type = types.attrsOf (
        types.submodule {
          options.interfaces = lib.mkOption {
            type = types.listOf types.str;
            default = [ ];
            description = "Uplink interfaces added to the bridge.";
          };
        }
      );
    };

    guestImage = lib.mkOption {
      type = types.nullOr types.package;
      default = null;
      example = lib.literalExpression "kiln.packages.x86_64-linux.guest-image";
      description = ''
        The microVM guest (kernel and kiln-guest initramfs, the flake's
        `guest-image`), written to `settings.sandbox.microvm.kernel` and
        `.initramfs` for the microVM backend.
      '';
    };

    localSettingsFile = lib.mkOption {
      type = types.nullOr types.str;
      default = "/etc/kiln/agent.local.toml";
      description = ''
        A node-local TOML file merged over `settings` when the agent starts
        (tables merge key by key, its values win), for what differs per
        node of one image: `advertise_url`, `node.memory_mb`, labels. Ignored
        when absent; null disables it.
      '';
    };

    extraPackages = lib.mkOption {
      type = types.listOf types.package;
      default = [ ];
      description = "More programs on the agent's PATH.";
    };

    settings = lib.mkOption {
      default = { };
      description = ''
        The agent's configuration file (`kiln-agent --config`), as in
        `services/kiln-agent/config.example.toml`. Typed options cover the
        main settings; any other key (for example the sandbox backend's
        section) is written to the file as it is.
      '';
      example = lib.literalExpression "lib.importJSON ./modules/examples/agent.json";
      type = kiln.section {
        state_dir = kiln.setting types.str defaults.state_dir "Node id, code cache, instances, runtime root filesystems; below /var/lib.";
        listen = kiln.setting types.str defaults.listen "The agent's mTLS API.";
        advertise_url = kiln.optional types.str "Where the scheduler and gateways reach this agent (`https://host:port`); required when `listen` is a wildcard.";
        scheduler_url = kiln.required types.str "The scheduler's mTLS URL; a cluster's schedulers comma separated (`https://a:9443,https://b:9443`): the agent follows the leader.";
        gateway_internal_url = kiln.required types.str "The gateway's internal mTLS URL (code packages).";
        metrics_listen = kiln.setting (types.nullOr types.str) defaults.metrics_listen "Plain-HTTP Prometheus endpoint; null disables it.";
        region = kiln.optional types.str "Passed to functions in `x-fc-region` unless the gateway sends one.";
        instance_start_timeout_ms = kiln.setting types.ints.positive defaults.instance_start_timeout_ms "How long a new instance has to open its port (100 to 600000).";
        drain_on_shutdown = kiln.setting types.bool defaults.drain_on_shutdown "Destroy every instance when the agent stops.";
        runtimes = kiln.setting (types.listOf types.str) defaults.runtimes "Runtimes prepared at start and offered to functions.";
        tls = lib.mkOption {
          description = "The agent's identity on the internal mTLS network.";
          type = kiln.section {
            ca = kiln.required types.str "The cluster CA certificate (PEM).";
            cert = kiln.required types.str "Certificate issued by the cluster CA (server and client); the agent renews it in place, so its directory is writable to the agent.";
            key = kiln.required types.str "Its private key (root-only, outside the Nix store; rewritten at renewal).";
          };
        };
        bootstrap = lib.mkOption {
          default = null;
          description = ''
            Joining with a single-use token (`kiln nodes bootstrap-token`,
            docs/joining.md section 3): when `tls.key` does not exist the
            agent makes a key, redeems the token at the scheduler's
            `bootstrap_listen` for a certificate, writes both to
            `tls.cert`/`tls.key` and deletes the token file. The unit starts
            as soon as either the key or the token file exists.
          '';
          type = types.nullOr (kiln.section {
            url = kiln.required types.str "The scheduler's bootstrap listener, `https://host:port`.";
            token_file = kiln.required types.str "Where the operator installs the token (root-only, outside the Nix store; deleted once redeemed).";
            names = kiln.setting (types.listOf types.str) [ ] "DNS names and addresses the certificate carries besides the host of `advertise_url`.";
          });
        };
        node = lib.mkOption {
          description = "What this node offers the scheduler, and its labels (zone, tenancy, dedicated account).";
          type = kiln.section {
            zone = kiln.setting types.str defaults.node.zone "Availability zone label.";
            tenancy = kiln.setting (types.enum [
              "dedicated"
              "multi-tenant"
            ]) defaults.node.tenancy "dedicated (container or microVM sandboxes) or multi-tenant (microVM sandboxes only).";
            dedicated_account = kiln.optional types.str "The one account a dedicated node serves.";
            memory_mb = kiln.required types.ints.positive "Memory offered to instances.";
            cpu_milli = kiln.required types.ints.positive "CPU offered to instances, in thousandths of a vCPU.";
            max_instances = kiln.required types.ints.positive "Instances at most (1 to 65536).";
          };
        };
        sandbox = lib.mkOption {
          default = { };
          description = "The sandbox backend: names, addresses and confinement of instances.";
          type = kiln.section {
            backend = kiln.optional (types.enum [
              "container"
              "microvm"
            ]) "The sandbox backend; default: microvm on a multi-tenant node, container otherwise. The microVM backend's settings go in `sandbox.microvm`.";
            oci_runtime = kiln.setting (types.enum [
              "runc"
              "crun"
            ]) sb.oci_runtime "The runc-compatible CLI that runs container bundles.";
            name_prefix = kiln.setting types.str sb.name_prefix "Prefix of every netns, veth, container and cgroup the agent creates.";
            instance_subnet = kiln.setting types.str sb.instance_subnet "Instance addresses (IPv4 CIDR, one /30 per instance).";
            cgroup_parent = kiln.setting types.str sb.cgroup_parent "Cgroup (from the hierarchy root) under which instances go.";
            uid_base = kiln.setting types.ints.positive sb.uid_base "Host uid/gid that a sandbox's root maps to (65536 ids from here).";
            tmp_size_mb = kiln.setting types.ints.positive sb.tmp_size_mb "Size of each instance's /tmp.";
            netns_pool = kiln.setting types.ints.unsigned sb.netns_pool "Network namespaces kept ready for cold starts.";
            rootfs_dir = kiln.optional types.str "Where runtime root filesystems live (default: state_dir/rootfs).";
            debootstrap_mirror = kiln.optional types.str "Debian mirror for building custom.debian12 on the node.";
            premade = lib.mkOption {
              default = { };
              description = ''
                Pre-made container sandboxes: per runtime, containers
                started ahead of demand (runtime root, namespaces, cgroup,
                network slot behind the default-deny rules, /tmp disk) that
                a cold start claims and hands its function; destroyed at
                release, never reused.
              '';
              type = kiln.section {
                enabled = kiln.setting types.bool sb.premade.enabled "Keep pools of pre-made sandboxes.";
                budget_mb = kiln.setting types.ints.positive sb.premade.budget_mb "Memory all pre-made sandboxes of the node may take together (each is charged sandbox_mb).";
                sandbox_mb = kiln.setting types.ints.positive sb.premade.sandbox_mb "The cgroup memory limit of a sandbox waiting in the pool (16-1024).";
                max_per_runtime = kiln.setting types.ints.positive sb.premade.max_per_runtime "The most sandboxes ready for one runtime.";
                demand_window_s = kiln.setting types.ints.positive sb.premade.demand_window_s "How far back the demand that sizes each runtime's pool is looked at.";
              };
            };
            network = lib.mkOption {
              default = { };
              description = ''
                Per-instance egress isolation (nftables table of the agent's
                own, tc shaping; always on: the agent refuses to start
                without it) and the VPCs this node attaches instances to
                (`vpcs`, passed through: ids, CIDRs, vSwitches with their
                gateway and instance pool, security groups).
              '';
              type = kiln.section {
                uplink_interface = kiln.optional types.str "Interface internet traffic leaves by (masqueraded); default: any that is neither an instance's nor a VPC's.";
                standard_bandwidth_mbit = kiln.setting types.ints.positive sb.network.standard_bandwidth_mbit "Per-instance rate, each direction, of standard instances.";
                performance_bandwidth_mbit = kiln.setting types.ints.positive sb.network.performance_bandwidth_mbit "Per-instance rate, each direction, of performance instances.";
                ovs_netns = kiln.optional types.str "Network namespace ovs-vswitchd runs in, when not the agent's.";
                deny = kiln.setting (types.listOf types.str) sb.network.deny "IPv4 networks (CIDR) instances with internet access may not reach, on top of the private, CGNAT, link-local, loopback and multicast ranges: other cluster hosts' addresses, provider services.";
                allow = kiln.setting (types.listOf types.str) sb.network.allow "Exceptions to the deny lists for instances with internet access (CIDR, at most a /8), e.g. a DNS resolver.";
                public_ports = kiln.setting (types.listOf types.port) sb.network.public_ports "TCP ports of this node's internet-facing services that instances with internet access may reach on the node's own addresses.";
              };
            };
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = lib.hasPrefix "/var/lib/" stateDir;
        message = "services.kiln.agent.settings.state_dir must be below /var/lib/, got ${stateDir}";
      }
      {
        assertion = cfg.settings.advertise_url != null || !(lib.hasPrefix "0.0.0.0:" cfg.settings.listen);
        message = "services.kiln.agent.settings.advertise_url is required when listen is a wildcard address";
      }
      {
        # The store is world-readable and read-only: a key there is
        # everyone's, and the agent could not renew it.
        assertion = lib.all (p: !(lib.hasPrefix builtins.storeDir (toString p))) (
          [
            cfg.settings.tls.cert
            cfg.settings.tls.key
          ]
          ++ lib.optional (bootstrap != null) bootstrap.token_file
        );
        message = "services.kiln.agent.settings.tls.cert, tls.key and bootstrap.token_file must be paths on the host, not in the Nix store";
      }
    ];

    networking = {
      # The agent adds a table of its own (named after sandbox.name_prefix)
      # at run time: NixOS must not flush the whole ruleset when the
      # firewall reloads, only the tables it manages.
      nftables = {
        enable = true;
        flushRuleset = false;
      };
      # VPC bridges through NixOS's own Open vSwitch options.
      vswitches = lib.mapAttrs (_: bridge: {
        interfaces = lib.genAttrs bridge.interfaces (_: { });
      }) cfg.vpcBridges;
      firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ port ];
    };

    virtualisation.vswitch = {
      enable = lib.mkDefault true;
      resetOnStart = false;
    };

    boot = {
      kernelModules = [
        "tun"
        "veth"
        "overlay"
        "vhost_net"
        "vhost_vsock"
      ];
      # Instances reach the network through the host (NAT per egress mode).
      kernel.sysctl."net.ipv4.ip_forward" = lib.mkDefault 1;
    };
    services.kiln.agent.settings.sandbox = lib.mkIf (cfg.guestImage != null) {
      microvm = {
        kernel = lib.mkDefault (
          if pkgs.stdenv.hostPlatform.isx86_64 then
            "${cfg.guestImage}/vmlinux"
          else
            "${cfg.guestImage}/${pkgs.stdenv.hostPlatform.linux-kernel.target}"
        );
        initramfs = lib.mkDefault "${cfg.guestImage}/initrd";
      };
    };

    # Sandboxes need user namespaces (NixOS allows them by default).
    security.allowUserNamespaces = true;

    systemd = {
      tmpfiles.rules = lib.optionals (cfg.runtimeRootfs != { }) (
        [
          "d ${stateDir} 0711 root root -"
          "d ${rootfsDir} 0755 root root -"
        ]
        ++ lib.mapAttrsToList (runtime: tree: "L+ ${rootfsDir}/${runtime} - - - - ${tree}") cfg.runtimeRootfs
      );

      paths.kiln-agent = {
        description = "Start the Kiln agent once its TLS key is installed";
        wantedBy = [ "multi-user.target" ];
        pathConfig.PathExists = startsWith;
      };

      services.kiln-agent = {
        description = "Kiln compute-node agent";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [
          "network-online.target"
          "nftables.service"
        ]
        ++ lib.optional config.virtualisation.vswitch.enable "ovs-vswitchd.service";
        restartTriggers = [ rendered.file ];
        environment.RUST_LOG = lib.mkDefault "info";
        # A node joins once its certificate, or a bootstrap token, is
        # installed (see docs/joining.md); "|": any one of them.
        unitConfig.ConditionPathExists = map (p: "|${p}") startsWith;
        path = [
          pkgs.runc
          pkgs.crun
          pkgs.iproute2
          pkgs.nftables
          pkgs.util-linux # nsenter for InstanceExec
          pkgs.e2fsprogs # each instance's size-limited writable disk
          pkgs.erofs-utils # microVM runtime and code disks
          pkgs.ethtool # checksum offload off on the VPC gateways (userspace datapath)
          pkgs.debootstrap
          pkgs.cloud-hypervisor
        ]
        ++ lib.optional config.virtualisation.vswitch.enable config.virtualisation.vswitch.package
        ++ cfg.extraPackages;
        serviceConfig = {
          ExecStartPre = "${mergeConfig} ${rendered.file} '${toString cfg.localSettingsFile}' ${runtimeConfig}";
          ExecStart = "${lib.getExe' cfg.package "kiln-agent"} --config ${runtimeConfig}";
          RuntimeDirectory = "kiln-agent";
          RuntimeDirectoryMode = "0700";
          StateDirectory = lib.removePrefix "/var/lib/" stateDir;
          # Sandboxes run as unprivileged users that must reach their instances.
          StateDirectoryMode = "0711";
          LoadCredential = rendered.loadCredential;
          ReadWritePaths = writableDirs;
          # Instances' cgroups are the agent's to manage.
          Delegate = "yes";
          # Let calls in flight finish; the agent removes leftovers on start.
          TimeoutStopSec = "90s";
          MemoryMax = lib.mkIf (cfg.memoryMax != null) cfg.memoryMax;
          Restart = "on-failure";
          RestartSec = "2s";
          CapabilityBoundingSet = capabilities;
          AmbientCapabilities = [ "" ];
          NoNewPrivileges = true;
          DevicePolicy = "closed";
          DeviceAllow = [
            "/dev/kvm rw"
            "/dev/net/tun rw"
            "/dev/vhost-net rw"
            "/dev/vhost-vsock rw"
            "/dev/ptmx rw"
            "/dev/tty rw"
            "char-pts rw"
          ];
          ProtectSystem = "full";
          ProtectHome = true;
          PrivateTmp = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectClock = true;
          RestrictAddressFamilies = [
            "AF_INET"
            "AF_INET6"
            "AF_UNIX"
            "AF_NETLINK"
            "AF_VSOCK"
            "AF_PACKET"
          ];
          RestrictRealtime = true;
          LockPersonality = true;
          SystemCallArchitectures = "native";
          LimitNOFILE = 1048576;
          LimitMEMLOCK = "infinity";
          TasksMax = "infinity";
        };
      };
    };
  };
}
