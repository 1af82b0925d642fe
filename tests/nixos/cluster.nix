# A control node (gateway + scheduler) and two compute nodes (agents) on a
# test VLAN, configured only through the NixOS modules and the example
# settings in modules/examples/. A `web` host stands for the internet on a
# second VLAN. Through the kiln CLI: deploy a function, invoke it sync and
# async, check its egress (FC's default, internet only: the web host yes,
# the control plane and the agents no),
# then crash the compute node running it and see the calls move to the
# other one.
{
  kilnModules,
  kilnPackages,
  pki,
  probe,
}:
let
  examples = ../../modules/examples;
  installPki = dir: files: {
    environment.etc = builtins.listToAttrs (
      map (f: {
        name = "kiln/pki/${f}";
        value.source = "${pki}/${dir}/${f}";
      }) files
    );
  };

  compute =
    index:
    { lib, ... }:
    let
      name = "compute${toString index}";
    in
    {
      imports = [
        kilnModules.default
        (installPki name [
          "ca.pem"
          "agent.pem"
          "agent-key.pem"
        ])
      ];
      virtualisation = {
        vlans = [
          1
          2
        ];
        memorySize = 3072;
        cores = 2;
      };
      # The "internet" side: a public-looking address on the second VLAN.
      networking.interfaces.eth2.ipv4.addresses = lib.mkForce [
        {
          address = "203.0.113.${toString (index + 1)}";
          prefixLength = 24;
        }
      ];
      services.kiln.agent = {
        enable = true;
        openFirewall = true;
        runtimeRootfs.custom = kilnPackages.rootfs-custom;
        settings = lib.recursiveUpdate (lib.importJSON "${examples}/agent.json") {
          advertise_url = "https://${name}:7443";
          runtimes = [ "custom" ];
          # Internet traffic leaves by the "internet" VLAN only; the cluster
          # VLAN (eth1) is not an uplink.
          sandbox.network.uplink_interface = "eth2";
        };
      };
    };
in
{
  name = "kiln-cluster";

  nodes = {
    control =
      { lib, pkgs, ... }:
      {
        imports = [
          kilnModules.default
          (installPki "control" [
            "ca.pem"
            "gateway.pem"
            "gateway-key.pem"
            "gateway-internal.pem"
            "gateway-internal-key.pem"
            "scheduler.pem"
            "scheduler-key.pem"
            "operator.pem"
            "operator-key.pem"
          ])
        ];
        virtualisation.memorySize = 2048;
        # The function's folder, deployed from the control node.
        system.extraDependencies = [ probe ];
        services.kiln = {
          gateway = {
            enable = true;
            openFirewall = true;
            settings = lib.importJSON "${examples}/gateway.json";
          };
          scheduler = {
            enable = true;
            openFirewall = true;
            settings = lib.importJSON "${examples}/scheduler.json";
          };
        };
        environment = {
          systemPackages = [
            kilnPackages.kiln
            pkgs.jq
          ];
          # The example's bootstrap key, as the CLI reads it.
          etc."kiln/credentials.json".text = builtins.toJSON (
            let
              key = builtins.head (lib.importJSON "${examples}/gateway.json").bootstrap_keys;
            in
            {
              endpoint = "https://control:8443";
              accountId = key.account_id;
              accessKeyId = key.access_key_id;
              accessKeySecret = key.access_key_secret;
              caCert = "/etc/kiln/pki/ca.pem";
            }
          );
          variables.KILN_CREDENTIALS = "/etc/kiln/credentials.json";
          # The example's sealing key (modules/examples/gateway.json): a
          # fixed test key, root-only; the module hands it over with
          # LoadCredential. A real host creates its own, outside the store.
          etc."kiln/gateway-secrets.key" = {
            text = "5f3c0d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d";
            mode = "0600";
          };
        };
      };

    compute1 = compute 1;
    compute2 = compute 2;

    web =
      { lib, pkgs, ... }:
      {
        virtualisation.vlans = [ 2 ];
        networking.interfaces.eth1.ipv4.addresses = lib.mkForce [
          {
            address = "203.0.113.10";
            prefixLength = 24;
          }
        ];
        networking.firewall.allowedTCPPorts = [ 80 ];
        services.nginx = {
          enable = true;
          virtualHosts.default.root = pkgs.writeTextDir "index.html" "web\n";
        };
      };
  };

  testScript = ''
    import json

    KILN = "KILN_CREDENTIALS=/etc/kiln/credentials.json kiln"
    ADMIN = "kiln nodes --state-dir /root/admin"

    start_all()
    web.wait_for_unit("nginx.service")
    control.wait_for_unit("kiln-scheduler.service")
    control.wait_for_unit("kiln-gateway.service")
    control.wait_for_open_port(8443)
    for node in (compute1, compute2):
        node.wait_for_unit("kiln-agent.service")
        node.wait_for_open_port(7443)

    # `kiln nodes` reads cluster.json and pki/ from a state directory.
    control.succeed(
        "mkdir -p /root/admin && ln -sfn /etc/kiln/pki /root/admin/pki && "
        "echo '{\"schedulerUrl\": \"https://control:9443\"}' > /root/admin/cluster.json"
    )

    def nodes():
        return json.loads(control.succeed(f"{ADMIN} list --json"))

    def node_of(agent_host):
        return next(n for n in nodes() if agent_host in n["agent_url"])

    with subtest("both compute nodes register and are ready"):
        control.wait_until_succeeds(
            f"{ADMIN} list --json | jq -e '[.[] | select(.state == \"ready\")] | length == 2'",
            timeout=120,
        )

    with subtest("deploy and invoke synchronously"):
        control.succeed(
            f"{KILN} deploy ${probe} --name probe --runtime custom "
            "--command /code/server --memory 128"
        )
        out = control.succeed(f"{KILN} invoke probe")
        assert "probe ok" in out, out

    with subtest("invoke asynchronously"):
        control.succeed(f"{KILN} invoke probe --async --task-id vmtest-1")
        control.wait_until_succeeds(
            f"{KILN} tasks get probe vmtest-1 | jq -e '.status == \"Succeeded\"'",
            timeout=60,
        )

    with subtest("egress: the internet is reachable, the cluster network is not"):
        def eth1_ip(machine):
            return machine.succeed(
                "ip -4 -o addr show dev eth1 | awk '{print $4}' | cut -d/ -f1"
            ).strip()

        out = control.succeed(f"{KILN} invoke probe --data 'connect 203.0.113.10:80'")
        assert out.startswith("connected"), out
        # The control plane, and the agents (one of them the instance's own
        # node: node services are closed to instances).
        for target in (
            f"{eth1_ip(control)}:9443",
            f"{eth1_ip(control)}:8444",
            f"{eth1_ip(compute1)}:7443",
            f"{eth1_ip(compute2)}:7443",
        ):
            out = control.succeed(f"{KILN} invoke probe --data 'connect {target}'")
            assert out.startswith("blocked"), f"{target}: {out}"

    with subtest("a crashed compute node's calls move to the other node"):
        busy = [n for n in nodes() if n["instances"] > 0]
        assert len(busy) == 1, busy
        victim, survivor = (
            (compute1, "compute2") if "compute1" in busy[0]["agent_url"] else (compute2, "compute1")
        )
        victim.crash()
        # The scheduler writes the silent node off (node_failure_after_ms in
        # the example: 6 s) and places a new instance on the survivor.
        control.wait_until_succeeds(f"{KILN} invoke probe | grep -q 'probe ok'", timeout=120)
        gone = [n for n in nodes() if n["agent_url"] == busy[0]["agent_url"]][0]
        assert gone["state"] == "failed", gone
        assert node_of(survivor)["instances"] >= 1, nodes()
        control.succeed(f"{KILN} invoke probe --async --task-id vmtest-2")
        control.wait_until_succeeds(
            f"{KILN} tasks get probe vmtest-2 | jq -e '.status == \"Succeeded\"'",
            timeout=60,
        )
  '';
}
