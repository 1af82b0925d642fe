#!/usr/bin/env bash
# Bring Kiln up on this machine and run a function: install dependencies,
# build, start `kiln dev` in the background, deploy and invoke
# examples/hello-python. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --locked --bin kiln
KILN=$PWD/target/release/kiln
STATE="${KILN_STATE_DIR:-$HOME/.kiln}"
mkdir -p "$STATE"
export KILN_CREDENTIALS="$STATE/credentials.json"
if ! "$KILN" functions list >/dev/null 2>&1; then
  rm -f "$KILN_CREDENTIALS"
  echo "starting kiln dev (log: $STATE/dev.log); the first start builds the custom.debian12 runtime (a few minutes)"
  nohup "$KILN" dev --state-dir "$STATE" >"$STATE/dev.log" 2>&1 &
  echo $! >"$STATE/dev.pid"
  for _ in $(seq 1 900); do
    [ -f "$KILN_CREDENTIALS" ] && break
    if ! kill -0 "$(cat "$STATE/dev.pid")" 2>/dev/null; then
      echo "kiln dev exited; see $STATE/dev.log" >&2
      tail -20 "$STATE/dev.log" >&2
      exit 1
    fi
    sleep 1
  done
fi
"$KILN" deploy examples/hello-python --name hello --env GREETING=hello-from-quickstart
echo "invoking hello:"
"$KILN" invoke hello --data '{"from": "quickstart"}'
echo
echo "kiln dev runs in the background (pid $(cat "$STATE/dev.pid" 2>/dev/null || echo '?')); stop it with: kill \$(cat $STATE/dev.pid)"
