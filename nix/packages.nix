# The Rust workspace with crane: its dependencies are built once
# (`cargoArtifacts`) and shared by every binary, clippy and the tests.
{
  lib,
  pkgs,
  craneLib,
}:
let
  root = ../.;
  # Only what cargo reads: the workspace, its crates, and the files their
  # tests read (examples, config examples, module examples, SDK lockfile).
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../crates
      ../services
      ../examples
      ../modules
      ../tests
    ];
  };

  commonArgs = {
    inherit src;
    pname = "kiln-workspace";
    version = "0.1.0";
    strictDeps = true;
    # ring and the bundled SQLite compile C with the stdenv's compiler.
    nativeBuildInputs = [ pkgs.pkg-config ];
    # kiln-sandbox's build.rs links kiln-init (PID 1 of pre-made container
    # sandboxes) statically: the `custom` root filesystem has no C library.
    buildInputs = [ pkgs.glibc.static ];
  };

  cargoArtifacts = craneLib.buildDepsOnly commonArgs;

  # One binary of the workspace, built against the shared dependencies.
  binary =
    name: description:
    craneLib.buildPackage (
      commonArgs
      // {
        inherit cargoArtifacts;
        pname = name;
        cargoExtraArgs = "--locked --package ${name} --bin ${name}";
        # The workspace's tests run once, in checks.tests.
        doCheck = false;
        meta = {
          inherit description;
          mainProgram = name;
          license = lib.licenses.asl20;
          platforms = lib.platforms.linux;
        };
      }
    );

  kiln-guest = binary "kiln-guest" "PID 1 of a Kiln microVM sandbox";

  rootfs = import ./rootfs.nix { inherit lib pkgs; };
in
{
  packages = {
    kiln = binary "kiln" "Kiln's operator and developer CLI";
    kiln-gateway = binary "kiln-gateway" "Kiln's access service (FC 2023-03-30 API)";
    kiln-scheduler = binary "kiln-scheduler" "Kiln's scheduling service";
    kiln-agent = binary "kiln-agent" "Kiln's compute-node agent";
    inherit kiln-guest;
    kiln-deps = cargoArtifacts;
    # The cluster CA and service certificates (docs/joining.md).
    kiln-pki = pkgs.writeShellApplication {
      name = "kiln-pki";
      runtimeInputs = [
        pkgs.openssl
        pkgs.coreutils
      ];
      text = builtins.readFile ./kiln-pki.sh;
    };
    guest-image = pkgs.callPackage ../images/guest { inherit kiln-guest; };
    "rootfs-custom" = rootfs.custom;
  }
  // lib.optionalAttrs (rootfs ? debian12) {
    "rootfs-custom-debian12" = rootfs.debian12;
    "rootfs-debian12-builtin" = rootfs.debian12Builtin;
  };

  checks = {
    clippy = craneLib.cargoClippy (
      commonArgs
      // {
        inherit cargoArtifacts;
        cargoClippyExtraArgs = "--workspace --all-targets -- -D warnings";
      }
    );
    rustfmt = craneLib.cargoFmt {
      inherit src;
      pname = "kiln-workspace";
      version = "0.1.0";
    };
    # Inside the build sandbox there is no root, runc or network: the tests
    # that need them print why they skip, the rest run.
    tests = craneLib.cargoNextest (
      commonArgs
      // {
        inherit cargoArtifacts;
        cargoNextestExtraArgs = "--workspace --no-fail-fast";
        nativeBuildInputs = commonArgs.nativeBuildInputs ++ [
          pkgs.python3
          pkgs.openssl
        ];
      }
    );
  };
}
