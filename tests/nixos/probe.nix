# The tests' function (probe/main.rs) as a static binary in a folder, ready
# for `kiln deploy DIR --runtime custom --command /code/server`.
{ pkgs }:
pkgs.runCommandCC "kiln-probe-function"
  {
    nativeBuildInputs = [ pkgs.rustc ];
    buildInputs = [ pkgs.glibc.static ];
  }
  ''
    mkdir -p $out
    rustc --edition 2021 -O -C target-feature=+crt-static ${./probe/main.rs} -o $out/server
  ''
