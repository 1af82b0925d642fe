# The NixOS VM tests (flake `checks`), run by `nix flake check` on a builder
# with KVM. cluster: a control node and two compute nodes on a test VLAN.
# microvm: one compute node running microVM sandboxes under nested KVM
# (x86_64 only; the builder must declare the `nested-kvm` system feature).
{
  pkgs,
  kilnModules,
  kilnPackages,
}:
let
  inherit (pkgs) lib;
  args = {
    inherit kilnModules kilnPackages;
    pki = import ./pki.nix { inherit pkgs; };
    probe = import ./probe.nix { inherit pkgs; };
  };
in
{
  nixos-cluster = pkgs.testers.runNixOSTest (import ./cluster.nix args);
}
// lib.optionalAttrs pkgs.stdenv.hostPlatform.isx86_64 {
  nixos-microvm = (pkgs.testers.runNixOSTest (import ./microvm.nix args)).overrideTestDerivation (
    old: {
      requiredSystemFeatures = old.requiredSystemFeatures ++ [ "nested-kvm" ];
    }
  );
}
