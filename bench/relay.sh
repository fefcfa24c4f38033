#!/usr/bin/env bash
# Relay benchmark (batched REDCap delivery): examples/relay_bench.rs on
# PostgreSQL and on SQLite, each run holding its own baseline
# (relay.batch_size = 1), since absolute times drift from run to run.
#
#   bench/relay.sh                         # both backends, the issue's numbers
#   BACKENDS=sqlite bench/relay.sh         # one backend
#   bench/relay.sh --latency-secs 10       # extra arguments go to relay_bench
#
# Per backend (about a minute each after the build):
#   A  10 000 pending opt-outs (distinct phones), fake REDCap holding 20 000
#      records and answering every call after 50 ms, default relay config
#      (2 workers, batch 500, 300 REDCap calls/min): events/s, calls by kind,
#      every benchmark record stamped and no other record changed;
#   baseline  the same with relay.batch_size = 1, for 15 s: events/s, ratio;
#   B  signed STOP webhooks over HTTP at 50/s for 20 s: webhook-to-stamped
#      p50/p90/p99/max, REDCap calls per second.
#
# Needs: cargo; PostgreSQL with trust auth at PG_ADMIN_URL (default
# postgres://postgres@127.0.0.1:5432/postgres). Loopback only. The example
# creates and drops its own database (optout_bench_<16 hex>). Output is
# written to bench/results/relay-<UTC time>.txt (gitignored) and the markdown
# tables are printed at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BACKENDS=${BACKENDS:-"postgres sqlite"}
PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
STEP_TIMEOUT=${STEP_TIMEOUT:-600}   # seconds, per backend run
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN="$TARGET_DIR/release/examples/relay_bench"
OUT_DIR="$ROOT/bench/results"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT="$OUT_DIR/relay-$STAMP.txt"
mkdir -p "$OUT_DIR"

command -v cargo >/dev/null || { echo "cargo not found" >&2; exit 1; }
command -v timeout >/dev/null || { echo "timeout not found" >&2; exit 1; }

cpu_model() {
    if command -v lscpu >/dev/null; then
        lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n1
    else
        sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo | head -n1
    fi
}

pg_version() {
    if command -v psql >/dev/null; then
        psql "$PG_ADMIN_URL" -X -At -c 'SHOW server_version' 2>/dev/null || echo "unreachable"
    else
        echo "(psql not installed)"
    fi
}

{
    echo "# Relay benchmark"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- command: bench/relay.sh${*:+ $*} (BACKENDS=\"$BACKENDS\")"
    echo "- machine: $(nproc) CPUs, $(cpu_model), $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo)"
    echo "- kernel: $(uname -srm)"
    echo "- load average before the build: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- rustc: $(rustc -V 2>/dev/null || echo '?')"
    echo "- PostgreSQL: $(pg_version)"
} | tee "$OUT"

echo "== cargo build --release --example relay_bench" >&2
cargo build --release --example relay_bench 2>&1 | tail -n 3 >&2
# Others may commit while this runs: say what the binary was built from.
echo "- built from: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src migrations 2>/dev/null || echo ' + uncommitted changes in src/ or migrations/') at $(date -u '+%H:%M:%S UTC')" | tee -a "$OUT"

status=0
for backend in $BACKENDS; do
    cmd=("$BIN" --backend "$backend" --pg-admin-url "$PG_ADMIN_URL" "$@")
    {
        echo
        echo "## $backend"
        echo
        echo "- exact command: ${cmd[*]/#$ROOT\//}"
        echo "- load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
        echo
    } | tee -a "$OUT"
    set +e
    timeout "$STEP_TIMEOUT" "${cmd[@]}" 2>&1 | tee -a "$OUT"
    rc=${PIPESTATUS[0]}
    set -e
    if [[ $rc -ne 0 ]]; then
        echo "relay_bench --backend $backend exited with $rc" | tee -a "$OUT" >&2
        status=1
    fi
done

echo
echo "# Summary ($OUT)"
grep -E '^(RESULT .*phase=summary|### |\|)' "$OUT" || true
exit "$status"
