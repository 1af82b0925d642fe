#!/usr/bin/env bash
# Static checks of every tracked .nix file (nixpkgs and the binary cache are
# not reachable here, so nothing is built): it must parse
# (`nix-instantiate --parse`), pass `statix check` and have no dead code
# (`deadnix --fail`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
for tool in nix-instantiate deadnix; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "check-nix: $tool is missing (run scripts/install-deps.sh)" >&2
    exit 1
  }
done
# statix, the Nix linter, is not on crates.io (a web server has the name
# there); scripts/install-deps.sh builds it from a source checkout.
run_statix=1
if ! statix --version 2>/dev/null | grep -q '^statix 0\.'; then
  echo "SKIPPED statix: the Nix linter is not installed (scripts/install-deps.sh with KILN_STATIX_SRC)"
  run_statix=0
fi
mapfile -t files < <(git ls-files -- '*.nix')
if [ ${#files[@]} -eq 0 ]; then
  echo "check-nix: no tracked .nix files"
  exit 0
fi
status=0
for f in "${files[@]}"; do
  if ! nix-instantiate --parse "$f" >/dev/null; then
    echo "check-nix: $f does not parse" >&2
    status=1
  fi
  if [ "$run_statix" -eq 1 ] && ! statix check --format errfmt "$f"; then
    echo "check-nix: statix found problems in $f" >&2
    status=1
  fi
done
if ! deadnix --fail "${files[@]}"; then
  echo "check-nix: deadnix found unused code" >&2
  status=1
fi
if [ "$status" -eq 0 ]; then
  echo "check-nix: ${#files[@]} files parse$([ "$run_statix" -eq 1 ] && echo ", pass statix") and have no dead code"
fi
exit "$status"
