#!/usr/bin/env bash
# Property bench (issue #12 item 17): pushes generated inputs through the
# property checks of tests/properties/checks.rs — the webhook form decoder,
# the signature verifier, the phone normaliser, the keyword classifier and
# REDCap's answer parsers — 1,000,000 by default, a fifth per parser. The
# baseline, in the same run and from the same seed, is the generators alone;
# the difference is the code under test and its assertions. Any property
# that fails aborts with the input.
#
#   bench/properties.sh              # 1 000 000 inputs
#   INPUTS=5000000 bench/properties.sh
#
# Needs: cargo. No network, no database.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
INPUTS=${INPUTS:-1000000}
cd "$ROOT"

printf '== building the example (release)\n' >&2
cargo build --locked --release --example properties >&2
printf '== machine: %s, %s cores, %s\n' "$(uname -m)" "$(nproc)" \
  "$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ *//')" >&2
printf '== commit %s, %s\n' "$(git rev-parse --short HEAD 2>/dev/null || echo '?')" "$(date -u '+%Y-%m-%d %H:%M UTC')" >&2
started=$(date +%s)
"$ROOT/target/release/examples/properties" "$INPUTS"
printf '== wall time %ss\n' "$(( $(date +%s) - started ))" >&2
