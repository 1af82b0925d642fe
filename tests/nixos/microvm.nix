# A multi-tenant compute node running microVM sandboxes under nested KVM:
# the agent drives cloud-hypervisor with the flake's guest image (kernel +
# kiln-guest initramfs). Deploy the probe function, invoke it, and check that
# it ran in a cloud-hypervisor VM and not in a container. Needs a builder
# whose KVM exposes virtualisation to guests (declared as the `nested-kvm`
# system feature).
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
in
{
  name = "kiln-microvm";

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
          ])
        ];
        system.extraDependencies = [ probe ];
        environment.systemPackages = [
          kilnPackages.kiln
          pkgs.jq
        ];
        # The example's sealing key (modules/examples/gateway.json): a fixed
        # test key, root-only; the module hands it over with LoadCredential.
        environment.etc."kiln/gateway-secrets.key" = {
          text = "5f3c0d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d";
          mode = "0600";
        };
        environment.etc."kiln/credentials.json".text = builtins.toJSON (
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
      };

    compute1 =
      { lib, ... }:
      {
        imports = [
          kilnModules.default
          (installPki "compute1" [
            "ca.pem"
            "agent.pem"
            "agent-key.pem"
          ])
        ];
        virtualisation = {
          memorySize = 4096;
          cores = 2;
          # Expose the host CPU's virtualisation extensions to this VM.
          qemu.options = [
            "-cpu"
            "host"
          ];
        };
        boot.kernelModules = [
          "kvm-intel"
          "kvm-amd"
        ];
        services.kiln.agent = {
          enable = true;
          openFirewall = true;
          runtimeRootfs.custom = kilnPackages.rootfs-custom;
          guestImage = kilnPackages.guest-image;
          settings = lib.recursiveUpdate (lib.importJSON "${examples}/agent.json") {
            runtimes = [ "custom" ];
            node.tenancy = "multi-tenant";
            sandbox.backend = "microvm";
          };
        };
      };
  };

  testScript = ''
    KILN = "KILN_CREDENTIALS=/etc/kiln/credentials.json kiln"

    start_all()
    compute1.succeed("test -c /dev/kvm")
    control.wait_for_unit("kiln-scheduler.service")
    control.wait_for_unit("kiln-gateway.service")
    compute1.wait_for_unit("kiln-agent.service")
    compute1.wait_for_open_port(7443)

    with subtest("a function runs in a cloud-hypervisor microVM"):
        control.succeed(
            f"{KILN} deploy ${probe} --name probe --runtime custom "
            "--command /code/server --memory 128"
        )
        out = control.wait_until_succeeds(f"{KILN} invoke probe", timeout=120)
        assert "probe ok" in out, out
        # The instance is a cloud-hypervisor process on the compute node.
        compute1.succeed("pgrep -f cloud-hypervisor")

    with subtest("async calls reach the microVM too"):
        control.succeed(f"{KILN} invoke probe --async --task-id microvm-1")
        control.wait_until_succeeds(
            f"{KILN} tasks get probe microvm-1 | jq -e '.status == \"Succeeded\"'",
            timeout=60,
        )
  '';
}
