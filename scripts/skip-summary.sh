#!/usr/bin/env bash
# Summarise a skip log (lines of "category<TAB>test<TAB>reason", written
# by crates/kiln-test-support): how many tests skipped, per category, with
# each test's name and reason. Usage: scripts/skip-summary.sh LOG
set -euo pipefail
log="${1:?usage: $0 SKIP_LOG}"
if [ ! -s "$log" ]; then
  echo "skipped tests: 0"
  exit 0
fi
sort -u "$log" | awk -F '\t' '
  { n[$1]++; total++; lines[$1] = lines[$1] sprintf("    %s: %s\n", $2, $3) }
  END {
    printf "skipped tests: %d\n", total
    for (c in n) { printf "  %s: %d\n%s", c, n[c], lines[c] }
  }'
