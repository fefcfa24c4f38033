#!/usr/bin/env bash
# Converge benchmark (issue #8): the relay's figures with DEFAULT settings,
# on PostgreSQL and on SQLite.
#
#   bench/converge.sh                               # both backends, the issue's numbers
#   BACKENDS=postgres bench/converge.sh             # one backend
#   bench/converge.sh --long-outage-secs 120        # extra arguments go to converge_bench
#   INGEST=0 bench/converge.sh                      # skip the ingest comparison
#   CONVERGE=0 bench/converge.sh                    # only the ingest comparison
#
# Per backend:
#   examples/converge_bench.rs (the application in-process, fake REDCap
#   projects answering after 50 ms, fresh database per phase):
#     - 90 s outage, 20 opt-outs waiting: seconds from REDCap answering again
#       to the last stamped (figure: <= 30 s); REDCap calls during the
#       outage (figure: <= 15);
#     - 600 s outage (--long-outage-secs), the same two numbers, reported;
#       it runs alongside the phases below and recovers after they end;
#     - 5,000 opt-outs recorded while REDCap is down, then drained: record
#       exports (figure: <= 12), imports, seconds;
#     - webhook-to-stamped p50/p90 at 50 webhooks/s for 20 s with 1 REDCap
#       sink and with 3 ([sinks.a|b|c], each its own project; stamped = in
#       every sink);
#   ingest with 3 sinks vs 1 (figure: >= 0.9x): the release binary `serve`
#     with [sinks.a] or [sinks.a|b|c] pointing at fake projects (served by
#     `converge_bench --serve-fakes 3`, 5,000 records each, 50 ms per call;
#     the relay runs), examples/loadgen.rs sending REQUESTS distinct signed
#     STOP webhooks over CONCURRENCY connections after a WARMUP, as
#     bench/ingest.sh does; ROUNDS rounds of (1 sink, 3 sinks), the ratio of
#     the mean webhooks/s, and drained_s (seconds from the end of the load
#     until nothing is pending). With YIELD_BASELINE=1 (default) each round
#     also runs 1 and 3 sinks with relay.yield_above = 0, the relay working
#     beside the load instead of stepping aside: the baseline.
#     With INGEST_DIAG=1 (default) each round also runs
#     no sink, and 1 and 3 sinks pointing at a closed port: the relay backs
#     off and stays idle, so those runs show the ingest path's own cost (a
#     sink_phones row per sink and webhook) apart from the relay's work.
#
# About 17 minutes per backend after the build (the 10-minute outage
# sets the pace). Needs: cargo, curl, ss; psql for the PostgreSQL ingest
# runs (sqlite3 optional, for the SQLite row counts); PostgreSQL with trust
# auth at PG_ADMIN_URL (default postgres://postgres@127.0.0.1:5432/postgres).
# Loopback only. Databases created are named optout_bench_* and dropped.
# Output is written to bench/results/converge-<UTC time>.txt (gitignored)
# and the markdown tables are printed at the end. Exit status 1 if a figure
# is not met or a check failed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BACKENDS=${BACKENDS:-"postgres sqlite"}
PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
STEP_TIMEOUT=${STEP_TIMEOUT:-2400}   # seconds, per converge_bench run
INGEST=${INGEST:-1}
CONVERGE=${CONVERGE:-1}
REQUESTS=${REQUESTS:-20000}
CONCURRENCY=${CONCURRENCY:-32}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-2}
YIELD_BASELINE=${YIELD_BASELINE:-1}  # also 1 and 3 sinks with relay.yield_above = 0 (the relay never steps aside)
INGEST_DIAG=${INGEST_DIAG:-1}      # also 1 and 3 sinks with REDCap unreachable (relay idle)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
APP="$TARGET_DIR/release/optout-relay"
BIN="$TARGET_DIR/release/examples/converge_bench"
LOADGEN="$TARGET_DIR/release/examples/loadgen"
OUT_DIR="$ROOT/bench/results"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT="$OUT_DIR/converge-$STAMP.txt"
mkdir -p "$OUT_DIR"

TOKEN=bench-auth-token-0123456789abcdef
PUBLIC_URL=https://optout.bench.example
PG_ROOT=${PG_ADMIN_URL%/*}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/optout-converge.XXXXXX")
SERVER_PID=""
FAKES_PID=""
DBS=()

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }

cleanup() {
    local rc=$?
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        timeout 20 tail --pid="$SERVER_PID" -f /dev/null 2>/dev/null || kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ -n "$FAKES_PID" ]] && kill -0 "$FAKES_PID" 2>/dev/null; then
        kill -TERM "$FAKES_PID" 2>/dev/null || true
    fi
    for db in "${DBS[@]}"; do
        psql "$PG_ADMIN_URL" -X -q -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    done
    if [[ $rc -ne 0 || -n "${KEEP_TMP:-}" ]]; then
        log "exit $rc; server logs kept in $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in cargo timeout; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
if [[ "$INGEST" != 0 ]]; then
    for tool in curl ss; do command -v "$tool" >/dev/null || die "$tool not found (INGEST=0 skips the ingest runs)"; done
    if [[ " $BACKENDS " == *" postgres "* ]]; then
        command -v psql >/dev/null || die "psql not found (needed for the PostgreSQL ingest runs; INGEST=0 skips them)"
    fi
fi

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
    echo "# Converge benchmark"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- command: bench/converge.sh${*:+ $*} (BACKENDS=\"$BACKENDS\" CONVERGE=$CONVERGE INGEST=$INGEST INGEST_DIAG=$INGEST_DIAG YIELD_BASELINE=$YIELD_BASELINE REQUESTS=$REQUESTS CONCURRENCY=$CONCURRENCY WARMUP=$WARMUP ROUNDS=$ROUNDS)"
    echo "- machine: $(nproc) CPUs, $(cpu_model), $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo)"
    echo "- kernel: $(uname -srm)"
    echo "- load average before the build: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- rustc: $(rustc -V 2>/dev/null || echo '?')"
    echo "- PostgreSQL: $(pg_version)"
} | tee "$OUT"

log "cargo build --release --bin optout-relay --example converge_bench --example loadgen"
cargo build --release --bin optout-relay --example converge_bench --example loadgen 2>&1 | tail -n 3 >&2
[[ -x "$APP" && -x "$BIN" && -x "$LOADGEN" ]] || die "built binaries not found under $TARGET_DIR/release"
# Others may commit while this runs: say what the binary was built from.
echo "- built from: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src migrations 2>/dev/null || echo ' + uncommitted changes in src/ or migrations/') at $(date -u '+%H:%M:%S UTC')" | tee -a "$OUT"

# ---------------------------------------------------------------- ingest helpers

# A port below the ephemeral range (so no outgoing connection holds it) that no socket uses.
free_port() {
    local lo p
    lo=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range)
    (( lo > 11000 )) || lo=32768
    for _ in $(seq 100); do
        p=$(( 10000 + RANDOM % (lo - 10000) ))
        [[ -z "$(ss -Htan "sport = :$p")" ]] && { echo "$p"; return; }
    done
    die "no free port"
}

# The fake projects the ingest runs' sinks point at, started once.
start_fakes() {
    [[ -n "$FAKES_PID" ]] && return
    "$BIN" --serve-fakes 3 --others 5000 --redcap-ms 50 >"$TMP/fakes.out" 2>"$TMP/fakes.err" </dev/null &
    FAKES_PID=$!
    for _ in $(seq 300); do
        grep -q '^READY' "$TMP/fakes.out" 2>/dev/null && return
        kill -0 "$FAKES_PID" 2>/dev/null || { cat "$TMP/fakes.err" >&2; die "fake REDCap projects did not start"; }
        sleep 0.1
    done
    die "fake REDCap projects not ready after 30 s"
}

# sink_config N FILE [unreachable]: [sinks.a] … for the first N fakes, or
# (unreachable) the same sinks pointing at a closed port: the relay backs off
# after its first try and stays idle, which isolates the ingest path's cost.
sink_config() {
    local n=$1 file=$2 unreachable=${3:-}
    : >"$file"
    head -n "$n" <(grep '^FAKE ' "$TMP/fakes.out") | while read -r _ name url token; do
        [[ -z "$unreachable" ]] || url="http://127.0.0.1:9/api/"
        cat >>"$file" <<TOML
[sinks.$name]
type = "redcap"
url = "$url"
token = "$token"
phone_field = "phone"
optout_field = "opted_out_at"

TOML
    done
}

# count_rows BACKEND DB_URL SQL -> one number, or "?" without a client
count_rows() {
    local backend=$1 url=$2 sql=$3
    if [[ $backend == postgres ]]; then
        psql "$url" -X -At -c "$sql" 2>/dev/null || echo "?"
    elif command -v sqlite3 >/dev/null; then
        local file=${url#sqlite://}
        sqlite3 "${file%%\?*}" "$sql" 2>/dev/null || echo "?"
    else
        echo "?"
    fi
}

# ingest_run BACKEND SINKS ROUND [unreachable] -> prints a line, sets RPS
ingest_run() {
    local backend=$1 sinks=$2 round=$3 unreachable=${4:-} db_url port
    local label="ingest-$1-$2sinks${unreachable:+-unreachable}${NO_YIELD:+-noyield}-$3"
    if [[ $backend == postgres ]]; then
        local db="optout_bench_$$_ingest_${sinks}${unreachable:+u}${NO_YIELD:+n}_${round}"
        psql "$PG_ADMIN_URL" -X -q -c "CREATE DATABASE $db" >/dev/null
        DBS+=("$db")
        db_url="$PG_ROOT/$db"
    else
        db_url="sqlite://$TMP/$label.db?mode=rwc"
    fi
    sink_config "$sinks" "$TMP/$label.toml" "$unreachable"
    port=$(free_port)
    # A clean environment: no stray OPTOUT_RELAY__* or RUST_LOG from the caller;
    # logging at the default level (info), as in production.
    (cd "$TMP" && exec env -i PATH="$PATH" \
        OPTOUT_RELAY_CONFIG="$TMP/$label.toml" \
        OPTOUT_RELAY__DATABASE__URL="$db_url" \
        OPTOUT_RELAY__SERVER__LISTEN="127.0.0.1:$port" \
        OPTOUT_RELAY__SERVER__PUBLIC_URL="$PUBLIC_URL" \
        OPTOUT_RELAY__TWILIO__AUTH_TOKENS="$TOKEN" \
        ${NO_YIELD:+OPTOUT_RELAY__RELAY__YIELD_ABOVE=0} \
        "$APP" serve >"$TMP/server-$label.log" 2>&1) &
    SERVER_PID=$!
    local ready=""
    for _ in $(seq 150); do
        kill -0 "$SERVER_PID" 2>/dev/null || { tail -20 "$TMP/server-$label.log" >&2; die "$label: server exited"; }
        if curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$port/readyz" 2>/dev/null; then ready=1; break; fi
        sleep 0.2
    done
    [[ -n "$ready" ]] || { tail -20 "$TMP/server-$label.log" >&2; die "$label: server not ready after 30 s"; }
    timeout 600 "$LOADGEN" --url "http://127.0.0.1:$port" --public-url "$PUBLIC_URL" --token "$TOKEN" \
        --concurrency "$CONCURRENCY" --requests "$REQUESTS" --warmup "$WARMUP" --kind stop \
        --watch "server=pid:$SERVER_PID" --watch "fakes=pid:$FAKES_PID" ${PG_POSTMASTER:+--watch "postgres=tree:$PG_POSTMASTER"} \
        >"$TMP/loadgen-$label.out" 2>"$TMP/loadgen-$label.err" \
        || { cat "$TMP/loadgen-$label.err" >&2; tail -20 "$TMP/server-$label.log" >&2; die "$label: loadgen"; }
    local load_end
    load_end=$(date +%s.%N)
    # What the relay had left when the load ended (it kept running meanwhile),
    # once the fan-out (asynchronous to ingest) has taken the last changes.
    local rows pending waiting
    for _ in $(seq 50); do
        waiting=$(count_rows "$backend" "$db_url" "SELECT count(*) FROM changes")
        [[ "$waiting" == 0 || "$waiting" == "?" ]] && break
        sleep 0.2
    done
    rows=$(count_rows "$backend" "$db_url" "SELECT count(*) FROM sink_phones")
    pending=$(count_rows "$backend" "$db_url" "SELECT count(*) FROM sink_phones WHERE status = 'pending'")
    # How long the relay takes to catch up once the load has ended (it steps
    # aside during a burst, relay.yield_above): seconds from the end of the
    # load until no row is pending. Not with REDCap unreachable (it never does).
    local drained="-" left=$pending
    if [[ -z "$unreachable" && "$sinks" != 0 && "$pending" != "?" ]]; then
        for _ in $(seq 600); do
            [[ "$left" == 0 ]] && break
            sleep 0.2
            left=$(count_rows "$backend" "$db_url" "SELECT count(*) FROM sink_phones WHERE status = 'pending'")
        done
        if [[ "$left" == 0 ]]; then
            drained=$(awk -v a="$load_end" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
        else
            drained=">120"
        fi
    fi
    kill -TERM "$SERVER_PID"
    timeout 20 tail --pid="$SERVER_PID" -f /dev/null || die "$label: server did not stop within 20 s of SIGTERM"
    wait "$SERVER_PID" || true
    SERVER_PID=""
    local line cpu
    line=$(grep '^RESULT ' "$TMP/loadgen-$label.out")
    cpu=$(grep '^CPU ' "$TMP/loadgen-$label.out" || true)
    for kv in ${line#RESULT }; do printf -v "R_${kv%%=*}" '%s' "${kv#*=}"; done
    RPS=$R_rps
    echo "INGEST backend=$backend sinks=$sinks${unreachable:+ redcap=unreachable}${NO_YIELD:+ yield=off} round=$round rps=$R_rps p50_ms=$R_p50_ms p99_ms=$R_p99_ms errors=$R_errors ok_total=$R_ok_total sink_phones=$rows pending_at_end=$pending drained_s=$drained (${cpu#CPU })"
    if [[ "$rows" != "?" && "$rows" != "$(( R_ok_total * sinks ))" ]]; then
        echo "CHECK FAILED: $label: $rows sink_phones rows, expected $(( R_ok_total * sinks ))"
        INGEST_BAD=1
    fi
    [[ "$R_errors" == 0 ]] || { echo "CHECK FAILED: $label: $R_errors requests not answered 200"; INGEST_BAD=1; }
}

# The postmaster serving PG_ADMIN_URL, for CPU accounting, when its data directory is readable.
PG_POSTMASTER=""
if [[ "$INGEST" != 0 && " $BACKENDS " == *" postgres "* ]]; then
    PG_POSTMASTER=$(head -1 "$(psql "$PG_ADMIN_URL" -X -At -c 'SHOW data_directory' 2>/dev/null)/postmaster.pid" 2>/dev/null || true)
fi

mean() { printf '%s\n' "$@" | awk '{s += $1} END {printf "%.0f", s / NR}'; }

ingest() {
    local backend=$1 round sinks
    local -a one=() three=() zero=() one_u=() three_u=() one_n=() three_n=()
    INGEST_BAD=0
    start_fakes
    for round in $(seq "$ROUNDS"); do
        for sinks in 1 3; do
            log "$backend ingest, $sinks sink(s), round $round"
            ingest_run "$backend" "$sinks" "$round"
            if [[ $sinks == 1 ]]; then one+=("$RPS"); else three+=("$RPS"); fi
        done
        if [[ "$YIELD_BASELINE" != 0 ]]; then
            for sinks in 1 3; do
                log "$backend ingest, $sinks sink(s), relay.yield_above = 0 (the relay never steps aside), round $round"
                NO_YIELD=1 ingest_run "$backend" "$sinks" "$round"
                if [[ $sinks == 1 ]]; then one_n+=("$RPS"); else three_n+=("$RPS"); fi
            done
        fi
        if [[ "$INGEST_DIAG" != 0 ]]; then
            log "$backend ingest, no sink, round $round"
            ingest_run "$backend" 0 "$round"
            zero+=("$RPS")
            for sinks in 1 3; do
                log "$backend ingest, $sinks sink(s), REDCap unreachable, round $round"
                ingest_run "$backend" "$sinks" "$round" unreachable
                if [[ $sinks == 1 ]]; then one_u+=("$RPS"); else three_u+=("$RPS"); fi
            done
        fi
    done
    local m1 m3 ratio ok
    m1=$(mean "${one[@]}")
    m3=$(mean "${three[@]}")
    ratio=$(awk -v a="$m3" -v b="$m1" 'BEGIN {printf "%.2f", a / b}')
    ok=$(awk -v r="$ratio" 'BEGIN {print (r >= 0.9) ? "met" : "**NOT MET**"}')
    echo
    echo "### Ingest with 3 sinks vs 1, $backend (release binary, $REQUESTS webhooks over $CONCURRENCY connections per run, $ROUNDS rounds)"
    echo
    echo "| figure | measured | required | verdict |"
    echo "|---|---:|---:|---|"
    echo "| webhooks/s with 1 sink (runs: ${one[*]}) | $m1 | — | baseline |"
    echo "| webhooks/s with 3 sinks (runs: ${three[*]}) | $m3 | — | reported |"
    echo "| ratio 3 sinks / 1 sink | ${ratio}× | ≥ 0.9× | $ok |"
    if [[ "$YIELD_BASELINE" != 0 ]]; then
        local n1 n3
        n1=$(mean "${one_n[@]}")
        n3=$(mean "${three_n[@]}")
        echo "| baseline, relay.yield_above = 0: 1 sink (runs: ${one_n[*]}) / 3 sinks (runs: ${three_n[*]}) | $n1 / $n3 ($(awk -v a="$n3" -v b="$n1" 'BEGIN {printf "%.2f", a / b}')×) | — | reported |"
    fi
    if [[ "$INGEST_DIAG" != 0 ]]; then
        local u1 u3
        u1=$(mean "${one_u[@]}")
        u3=$(mean "${three_u[@]}")
        echo "| diagnostic, no sink (runs: ${zero[*]}) | $(mean "${zero[@]}") | — | reported |"
        echo "| diagnostic, REDCap unreachable (relay idle, backing off): 1 sink (runs: ${one_u[*]}) / 3 sinks (runs: ${three_u[*]}) | $u1 / $u3 ($(awk -v a="$u3" -v b="$u1" 'BEGIN {printf "%.2f", a / b}')×) | — | reported |"
    fi
    echo
    [[ $ok == met && $INGEST_BAD == 0 ]]
}

# ---------------------------------------------------------------- runs

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
    rc=0
    if [[ "$CONVERGE" != 0 ]]; then
        set +e
        timeout "$STEP_TIMEOUT" "${cmd[@]}" 2>&1 | tee -a "$OUT"
        rc=${PIPESTATUS[0]}
        set -e
    fi
    if [[ $rc -ne 0 ]]; then
        echo "converge_bench --backend $backend exited with $rc" | tee -a "$OUT" >&2
        status=1
    fi
    if [[ "$INGEST" != 0 ]]; then
        echo "- ingest runs from $(date -u '+%H:%M:%S UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT"
        # In this shell (not a pipeline's subshell), so the cleanup knows
        # the server, the fakes and the databases it started.
        if ! ingest "$backend" > >(tee -a "$OUT"); then
            status=1
        fi
        sleep 0.2   # let tee flush before the next lines
    fi
done

echo
echo "# Summary ($OUT)"
grep -E '^(RESULT .*phase=summary|INGEST |NOTE |CHECK FAILED|### |\|)' "$OUT" || true
exit "$status"
