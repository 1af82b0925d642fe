# A compute node: the agent with both runtimes' root filesystems built by
# Nix, nftables and Open vSwitch. One image serves every node: what differs
# per node (its address, its size) is written at boot to
# /etc/kiln/agent.local.toml, which the agent merges over these settings.
{
  lib,
  pkgs,
  kilnPackages,
  ...
}:
let
  site = lib.importJSON ../site.json;
  clustered = (site.cluster or null) != null;
  pki = name: "/etc/kiln/pki/${name}";
in
{
  networking.hostName = lib.mkDefault "kiln-compute";

  services.kiln.agent = {
    enable = true;
    openFirewall = true;
    runtimeRootfs = {
      custom = kilnPackages.rootfs-custom;
    }
    // lib.optionalAttrs (kilnPackages ? "rootfs-custom-debian12") {
      "custom.debian12" = kilnPackages."rootfs-custom-debian12";
    }
    # The built-in runtimes (python3.11, nodejs18) share this tree.
    // lib.optionalAttrs (kilnPackages ? "rootfs-debian12-builtin") {
      "debian12-builtin" = kilnPackages."rootfs-debian12-builtin";
    };
    settings = {
      inherit (site) region;
      # The built-in runtimes whose tree the image ships (no debootstrap at
      # first start).
      runtimes = [
        "custom"
        "custom.debian12"
      ]
      ++ lib.optionals (kilnPackages ? "rootfs-debian12-builtin") [
        "python3.11"
        "nodejs18"
      ];
      # A clustered control plane: every scheduler (the agent follows the
      # leader) and any gateway through HAProxy's internal frontend.
      scheduler_url =
        if clustered then
          lib.concatStringsSep "," site.cluster.schedulers
        else
          "https://${site.controlHost}:9443";
      gateway_internal_url =
        if clustered then "https://${site.controlHost}:7443" else "https://${site.controlHost}:8444";
      tls = {
        ca = pki "ca.pem";
        cert = pki "agent.pem";
        key = pki "agent-key.pem";
      };
      # A node joins with a single-use token installed here (or with a
      # certificate installed as agent.pem/agent-key.pem); docs/joining.md.
      bootstrap = {
        url = "https://${site.controlHost}:9444";
        token_file = pki "bootstrap-token";
      };
      node = {
        inherit (site) zone;
        # Overwritten at boot from the machine's real size (below).
        memory_mb = 1024;
        cpu_milli = 1000;
        max_instances = 100;
      };
      sandbox = {
        instance_subnet = site.instanceSubnet;
        # Where instances' internet traffic leaves; null: any interface
        # that is neither an instance's nor a VPC's.
        network.uplink_interface = site.uplinkInterface;
      };
    };
  };

  # This node's address and size, for the agent: the first global IPv4
  # address, the memory less 10% (at least 1 GiB) for the host, and every
  # CPU but one. Not overwritten when an operator wrote the file.
  systemd.services.kiln-agent-local-settings = {
    description = "Write this node's Kiln agent settings";
    wantedBy = [ "kiln-agent.service" ];
    before = [ "kiln-agent.service" ];
    wants = [ "network-online.target" ];
    after = [ "network-online.target" ];
    unitConfig.ConditionPathExists = "!/etc/kiln/agent.local.toml";
    serviceConfig.Type = "oneshot";
    path = [
      pkgs.iproute2
      pkgs.gawk
      pkgs.coreutils
    ];
    script = ''
      addr=$(ip -4 -o addr show scope global | awk 'NR == 1 { split($4, a, "/"); print a[1] }')
      if [ -z "$addr" ]; then
        echo "no global IPv4 address yet" >&2
        exit 1
      fi
      total_mb=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
      reserve_mb=$(( total_mb / 10 > 1024 ? total_mb / 10 : 1024 ))
      memory_mb=$(( total_mb - reserve_mb > 128 ? total_mb - reserve_mb : 128 ))
      cpus=$(nproc)
      cpu_milli=$(( cpus > 1 ? (cpus - 1) * 1000 : 1000 ))
      mkdir -p /etc/kiln
      cat > /etc/kiln/agent.local.toml.tmp <<TOML
      advertise_url = "https://$addr:7443"

      [node]
      memory_mb = $memory_mb
      cpu_milli = $cpu_milli
      TOML
      mv /etc/kiln/agent.local.toml.tmp /etc/kiln/agent.local.toml
    '';
  };
}
