#!/usr/bin/env bash
# Operator and relay query benchmark (issue #7): examples/query_bench.rs on
# PostgreSQL and on SQLite. Each backend run times the queries on an empty
# store first (the baseline) and then on a store seeded with 200,000 events,
# so both figures come from the same run on the same machine state.
#
#   bench/queries.sh                        # both backends
#   BACKENDS=sqlite bench/queries.sh        # one backend
#   bench/queries.sh --events 400000        # extra arguments go to query_bench
#
# Measured per store, 200 times each after 20 unmeasured: GET /v1/phones/{phone},
# GET /v1/events?phone=…, GET /v1/deliveries?status=pending&sink=redcap, GET
# /metrics (the queue statistics), a relay claim of 500 and the settle of that
# batch as written, p50/p99 in ms; then the plans of the statements the store
# ran for each.
#
# Needs: cargo; PostgreSQL with trust auth at PG_ADMIN_URL (default
# postgres://postgres@127.0.0.1:5432/postgres) as a superuser (the plans use
# auto_explain); started here the way .ci/run does it when it is not running.
# Loopback only. The example creates and drops its own database
# (optout_bench_<16 hex>). Output goes to bench/results/queries-<UTC time>.txt
# (gitignored); the summary table is printed at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BACKENDS=${BACKENDS:-"postgres sqlite"}
PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
STEP_TIMEOUT=${STEP_TIMEOUT:-900}   # seconds, per backend run
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN="$TARGET_DIR/release/examples/query_bench"
OUT_DIR="$ROOT/bench/results"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT="$OUT_DIR/queries-$STAMP.txt"
mkdir -p "$OUT_DIR"
T0=$(date +%s)

command -v cargo >/dev/null || { echo "cargo not found" >&2; exit 1; }
command -v timeout >/dev/null || { echo "timeout not found" >&2; exit 1; }

# PostgreSQL on 127.0.0.1:5432, as .ci/run starts it (only when it is the
# default local server and not already answering).
if [[ " $BACKENDS " == *" postgres "* ]] && command -v pg_isready >/dev/null \
    && ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    if command -v pg_ctlcluster >/dev/null && [[ -d /etc/postgresql ]]; then
        echo "== starting PostgreSQL" >&2
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start || true
        for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
    fi
fi

cpu_model() {
    local m
    m=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo | head -n1)
    if [[ -z "$m" ]] && command -v lscpu >/dev/null; then
        m=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n1)
    fi
    echo "${m:-unknown CPU}"
}

pg_version() {
    if command -v psql >/dev/null; then
        psql "$PG_ADMIN_URL" -X -At -c 'SHOW server_version' 2>/dev/null || echo "unreachable"
    else
        echo "(psql not installed)"
    fi
}

pg_settings() {
    command -v psql >/dev/null || return 0
    psql "$PG_ADMIN_URL" -X -At -F ' ' -c \
        "SELECT string_agg(name || '=' || setting || COALESCE(unit, ''), ', ' ORDER BY name) FROM pg_settings
          WHERE name IN ('shared_buffers', 'work_mem', 'effective_cache_size', 'random_page_cost', 'jit')" \
        2>/dev/null || true
}

{
    echo "# Query benchmark"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- command: bench/queries.sh${*:+ $*} (BACKENDS=\"$BACKENDS\")"
    echo "- machine: $(nproc) CPUs, $(cpu_model), $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo)"
    echo "- kernel: $(uname -srm)"
    echo "- load average before the build: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- rustc: $(rustc -V 2>/dev/null || echo '?')"
    echo "- PostgreSQL: $(pg_version) ($(pg_settings))"
    echo "- SQLite file in: ${TMPDIR:-/tmp} ($(df -h "${TMPDIR:-/tmp}" | awk 'NR==2 {print $1}'))"
} | tee "$OUT"

echo "== cargo build --release --locked --example query_bench" >&2
cargo build --release --locked --example query_bench 2>&1 | tail -n 3 >&2
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
        echo "query_bench --backend $backend exited with $rc" | tee -a "$OUT" >&2
        status=1
    fi
done

# One table for both backends from the RESULT lines: p50 / p99 in ms.
summary() {
    awk '
        /^RESULT / && / query=/ {
            delete f
            for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
            key = f["backend"] SUBSEP f["query"]
            cell = sprintf("%.2f / %.2f", f["p50_ms"], f["p99_ms"])
            if (f["db"] == "empty") empty[key] = cell; else { full[key] = cell; size = f["db"] }
            if (!(f["query"] in seenq)) { seenq[f["query"]] = 1; order[++nq] = f["query"] }
            if (!(f["backend"] in seenb)) { seenb[f["backend"]] = 1; border[++nb] = f["backend"] }
        }
        END {
            if (nq == 0) exit
            header = "| query |"; rule = "|---|"
            for (b = 1; b <= nb; b++) {
                header = header " " border[b] " empty p50 / p99 ms | " border[b] " " size " p50 / p99 ms |"
                rule = rule "---:|---:|"
            }
            print header; print rule
            for (q = 1; q <= nq; q++) {
                line = "| " order[q] " |"
                for (b = 1; b <= nb; b++) {
                    key = border[b] SUBSEP order[q]
                    line = line " " ((key in empty) ? empty[key] : "—") " | " ((key in full) ? full[key] : "—") " |"
                }
                print line
            }
        }' "$OUT"
}

{
    echo
    echo "# Summary ($OUT)"
    echo
    summary
    echo
    echo "whole script: $(( $(date +%s) - T0 )) s including the build"
} | tee -a "$OUT"
exit "$status"
