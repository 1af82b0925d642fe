{
  description = "Kiln: a self-hosted Function Compute data plane, its NixOS modules and host images";

  inputs = {
    # nixos-25.05, pinned to one commit.
    nixpkgs.url = "github:NixOS/nixpkgs/ac62194c3917d5f474c1a844b6fd6da2db95077d";
    # crane has no inputs of its own; a release tag.
    crane.url = "github:ipetkov/crane/v0.21.0";
  };

  outputs =
    {
      self,
      nixpkgs,
      crane,
    }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # The Rust workspace built once per system (see nix/packages.nix).
      kilnFor =
        pkgs:
        import ./nix/packages.nix {
          inherit lib pkgs;
          craneLib = crane.mkLib pkgs;
        };

      # The host images' NixOS systems (see images/default.nix).
      hostsFor =
        system:
        import ./images {
          inherit nixpkgs system;
          kilnModules = self.nixosModules;
          kilnPackages = self.packages.${system};
        };

      # A role's module with its package defaulting to this flake's build.
      withPackage =
        role:
        { pkgs, ... }:
        {
          key = "kiln#nixosModules.${role}";
          _file = "${self}/flake.nix#nixosModules.${role}";
          imports = [ ./modules/${role}.nix ];
          config.services.kiln.${role}.package =
            lib.mkDefault
              self.packages.${pkgs.stdenv.hostPlatform.system}."kiln-${role}";
        };
    in
    {
      packages = forAllSystems (
        pkgs:
        let
          kiln = kilnFor pkgs;
          hosts = hostsFor pkgs.stdenv.hostPlatform.system;
        in
        kiln.packages
        // hosts.packages
        // {
          default = kiln.packages.kiln;
        }
      );

      nixosModules = {
        gateway = withPackage "gateway";
        scheduler = withPackage "scheduler";
        agent = withPackage "agent";
        # PostgreSQL and HAProxy for a clustered control node: no package.
        control-plane = {
          key = "kiln#nixosModules.control-plane";
          imports = [ ./modules/control-plane.nix ];
        };
        default = {
          key = "kiln#nixosModules.default";
          imports = [
            self.nixosModules.gateway
            self.nixosModules.scheduler
            self.nixosModules.agent
            self.nixosModules.control-plane
          ];
        };
      };

      nixosConfigurations =
        let
          hosts = hostsFor "x86_64-linux";
        in
        {
          inherit (hosts.systems) kiln-control kiln-compute kiln-compute-netboot;
        };

      checks = forAllSystems (
        pkgs:
        (kilnFor pkgs).checks
        // import ./tests/nixos {
          inherit pkgs;
          kilnModules = self.nixosModules;
          kilnPackages = self.packages.${pkgs.stdenv.hostPlatform.system};
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.kiln ];
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            cargo-nextest
            rust-analyzer
            runc
            crun
            nftables
            iproute2
            openvswitch
            qemu
            cloud-hypervisor
            debootstrap
            iperf3
            openssl
            python3
            nodejs
            zip
            nginx
            statix
            deadnix
          ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt-rfc-style);
    };
}
