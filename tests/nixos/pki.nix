# The test cluster's certificates, made with the same script operators use
# (nix/kiln-pki.sh): control gets the gateway's public and internal
# identities, the scheduler's and the operator's (for `kiln nodes`); each
# compute node its agent identity, whose node id is the host name.
# Test-only: private keys in the Nix store are world-readable.
{ pkgs }:
pkgs.runCommand "kiln-test-pki"
  {
    nativeBuildInputs = [
      pkgs.bash
      pkgs.openssl
    ];
  }
  ''
    pki="bash ${../../nix/kiln-pki.sh}"
    $pki ca $out/control
    $pki issue-public $out/control gateway control localhost
    $pki issue $out/control gateway-internal control
    $pki issue $out/control scheduler control
    $pki issue $out/control operator
    for node in compute1 compute2; do
      mkdir -p $out/$node
      cp $out/control/ca.pem $out/control/ca-key.pem $out/$node/
      $pki issue $out/$node agent $node $node
      rm $out/$node/ca-key.pem
    done
    rm $out/control/ca-key.pem
  ''
