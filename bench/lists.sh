#!/usr/bin/env bash
# Lists benchmark (issue #11), on PostgreSQL, with the release binary:
#
#   1. `optout-relay import` of a 10,000-row list (the baseline, for scale)
#      and then of a 100,000-row list, each into its own fresh database:
#      wall time and peak RSS (/usr/bin/time -v). Target: 100,000 rows in
#      <= 20 s with RSS <= 100 MB.
#   2. The same 100,000-row file imported again (idempotent: records nothing).
#   3. `POST /v1/phones/check` of 1 number (the baseline) and of 10,000
#      numbers against the 100,000-row store, each 20 times after 3 unmeasured,
#      with the server's own latency (the `handled` log line's latency_ms) and
#      curl's total. Target: 10,000 numbers in <= 300 ms server time.
#   4. `optout-relay export` of the 100,000 opt-outs: wall time and peak RSS.
#
#   bench/lists.sh                  # 100,000 rows
#   ROWS=200000 bench/lists.sh      # another size
#
# Needs: cargo, curl, jq, /usr/bin/time; PostgreSQL with trust auth at
# PG_ADMIN_URL (default postgres://postgres@127.0.0.1:5432/postgres), started
# here the way .ci/run does it when it is not running. Loopback only. Creates
# and drops its own databases (optout_bench_lists_<hex>). Output goes to
# bench/results/lists-<UTC time>.txt (gitignored); the summary is printed at
# the end.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
ROWS=${ROWS:-100000}
BASELINE_ROWS=${BASELINE_ROWS:-10000}
CHECK_N=${CHECK_N:-10000}
REPEAT=${REPEAT:-20}
PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
PG_ROOT=${PG_ADMIN_URL%/*}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN="$TARGET_DIR/release/optout-relay"
OUT_DIR="$ROOT/bench/results"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT="$OUT_DIR/lists-$STAMP.txt"
WORK=$(mktemp -d)
mkdir -p "$OUT_DIR"
T0=$(date +%s)
DBS=()
SERVER_PID=""

for tool in cargo curl jq psql /usr/bin/time; do
    command -v "$tool" >/dev/null || { echo "$tool not found" >&2; exit 1; }
done

cleanup() {
    if [[ -n "$SERVER_PID" ]]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    for db in "${DBS[@]}"; do
        psql "$PG_ADMIN_URL" -X -q -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

if command -v pg_isready >/dev/null && ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    if command -v pg_ctlcluster >/dev/null && [[ -d /etc/postgresql ]]; then
        echo "== starting PostgreSQL" >&2
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start || true
        for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
    fi
fi

cpu_model() {
    local m
    m=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo | head -n1)
    echo "${m:-unknown CPU}"
}

{
    echo "# Lists benchmark"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- command: bench/lists.sh (ROWS=$ROWS BASELINE_ROWS=$BASELINE_ROWS CHECK_N=$CHECK_N REPEAT=$REPEAT)"
    echo "- machine: $(nproc) CPUs, $(cpu_model), $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo)"
    echo "- kernel: $(uname -srm)"
    echo "- load average before the build: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- rustc: $(rustc -V 2>/dev/null || echo '?')"
    echo "- PostgreSQL: $(psql "$PG_ADMIN_URL" -X -At -c 'SHOW server_version' 2>/dev/null || echo unreachable)"
} | tee "$OUT"

if [[ -z "${SKIP_BUILD:-}" ]]; then   # SKIP_BUILD=1: use the release binary already there
    echo "== cargo build --release --locked --bin optout-relay" >&2
    cargo build --release --locked --bin optout-relay 2>&1 | tail -n 3 >&2
fi
echo "- built from: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src migrations 2>/dev/null || echo ' + uncommitted changes')" | tee -a "$OUT"

# A Numero-shaped list: contact id, names, Primary Phone, Opt Out Date; valid
# US numbers (415) 2XX-XXXX, distinct, dated over 2024.
make_list() {
    awk -v n="$1" 'BEGIN {
        print "Numero Contact ID,First Name,Last Name,Primary Phone,Opt Out Date"
        for (i = 0; i < n; i++) {
            printf "%d,First%d,Last%d,(415) %03d-%04d,%02d/%02d/2024\n", 100000 + i, i, i, 200 + int(i / 10000), i % 10000, 1 + i % 12, 1 + i % 28
        }
    }' > "$2"
}

new_db() {
    local name="optout_bench_lists_$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
    psql "$PG_ADMIN_URL" -X -q -c "CREATE DATABASE $name" >/dev/null
    DBS+=("$name")
    echo "$PG_ROOT/$name"
}

relay() { # DATABASE_URL, args…
    local url=$1; shift
    env -i PATH="$PATH" OPTOUT_RELAY__DATABASE__URL="$url" OPTOUT_RELAY__LOG__FORMAT=json "$BIN" "$@"
}

# Runs an import under /usr/bin/time -v; prints "seconds rss_mb".
timed() { # label, DATABASE_URL, args…
    local label=$1 url=$2; shift 2
    local tv="$WORK/time-$label.txt"
    env -i PATH="$PATH" OPTOUT_RELAY__DATABASE__URL="$url" OPTOUT_RELAY__LOG__FORMAT=json \
        /usr/bin/time -v "$BIN" "$@" > "$WORK/out-$label.txt" 2> "$tv"
    local wall rss
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; print s}' "$tv")
    rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.1f", $2 / 1024}' "$tv")
    echo "$wall $rss"
}

make_list "$BASELINE_ROWS" "$WORK/baseline.csv"
make_list "$ROWS" "$WORK/list.csv"
echo "- list files: $BASELINE_ROWS rows = $(du -h "$WORK/baseline.csv" | cut -f1), $ROWS rows = $(du -h "$WORK/list.csv" | cut -f1)" | tee -a "$OUT"

DB_BASE=$(new_db); relay "$DB_BASE" migrate
DB=$(new_db); relay "$DB" migrate

echo "== import" >&2
read -r b_s b_rss < <(timed baseline "$DB_BASE" import "$WORK/baseline.csv")
read -r i_s i_rss < <(timed import "$DB" import "$WORK/list.csv")
read -r r_s r_rss < <(timed again "$DB" import "$WORK/list.csv")
{
    echo
    echo "## import (CLI, PostgreSQL)"
    echo
    echo "baseline $BASELINE_ROWS rows:"; sed 's/^/    /' "$WORK/out-baseline.txt"
    echo "$ROWS rows:"; sed 's/^/    /' "$WORK/out-import.txt"
    echo "same file again:"; sed 's/^/    /' "$WORK/out-again.txt"
    echo
    echo "RESULT step=import rows=$BASELINE_ROWS seconds=$b_s rss_mb=$b_rss"
    echo "RESULT step=import rows=$ROWS seconds=$i_s rss_mb=$i_rss"
    echo "RESULT step=reimport rows=$ROWS seconds=$r_s rss_mb=$r_rss"
} | tee -a "$OUT"

echo "== check" >&2
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ADMIN_TOKEN="bench-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
env -i PATH="$PATH" OPTOUT_RELAY__DATABASE__URL="$DB" OPTOUT_RELAY__LOG__FORMAT=json \
    OPTOUT_RELAY__SERVER__LISTEN="127.0.0.1:$PORT" OPTOUT_RELAY__ADMIN__TOKENS="$ADMIN_TOKEN" \
    OPTOUT_RELAY__TWILIO__AUTH_TOKENS="0123456789abcdef0123456789abcdef" RUST_LOG=info \
    "$BIN" serve > "$WORK/serve.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.2; done

# Half of them opted out (from the list), half not, a few not numbers.
awk -v n="$CHECK_N" 'BEGIN { printf "{\"phones\":["; for (i = 0; i < n; i++) { if (i) printf ","; if (i % 500 == 7) printf "\"not a number\""; else printf "\"(415) %03d-%04d\"", 200 + (i % 2) * 50 + int(i / 10000), i % 10000 }; print "]}" }' > "$WORK/check.json"
echo '{"phones":["(415) 200-0001"]}' > "$WORK/check1.json"

check_run() { # label, body file; prints p50 and max of server and curl ms
    local label=$1 body=$2 i
    : > "$WORK/curl-$label.txt"; : > "$WORK/server-$label.txt"
    for i in $(seq 1 $((REPEAT + 3))); do
        local before
        before=$(grep -c '"handled"' "$WORK/serve.log" || true)
        curl -fs -o "$WORK/answer-$label.json" -w '%{time_total}\n' -H "authorization: Bearer $ADMIN_TOKEN" \
            -H 'content-type: application/json' --data-binary "@$body" "http://127.0.0.1:$PORT/v1/phones/check" \
            >> "$WORK/curl-$label.txt"
        sleep 0.05
        [[ $i -gt 3 ]] && grep '"handled"' "$WORK/serve.log" | sed -n "$((before + 1)),\$p" | grep '/v1/phones/check' \
            | jq -r '.fields.latency_ms // .latency_ms' >> "$WORK/server-$label.txt" || true
    done
    tail -n "$REPEAT" "$WORK/curl-$label.txt" | awk '{print $1 * 1000}' > "$WORK/curlms-$label.txt"
    local s_p50 s_max c_p50
    s_p50=$(sort -n "$WORK/server-$label.txt" | awk '{a[NR] = $1} END {printf "%.1f", a[int((NR + 1) / 2)]}')
    s_max=$(sort -n "$WORK/server-$label.txt" | tail -n1 | awk '{printf "%.1f", $1}')
    c_p50=$(sort -n "$WORK/curlms-$label.txt" | awk '{a[NR] = $1} END {printf "%.1f", a[int((NR + 1) / 2)]}')
    echo "$s_p50 $s_max $c_p50"
}
read -r c1_p50 c1_max c1_curl < <(check_run one "$WORK/check1.json")
read -r cn_p50 cn_max cn_curl < <(check_run many "$WORK/check.json")
opted=$(jq '[.results[] | select(.opted_out)] | length' "$WORK/answer-many.json")
invalid=$(jq '[.results[] | select(.["e164"] == null)] | length' "$WORK/answer-many.json")
{
    echo
    echo "## check (POST /v1/phones/check, $REPEAT runs after 3 unmeasured, store of $ROWS opt-outs)"
    echo
    echo "answer of the $CHECK_N-number call: $opted opted out, $invalid not numbers"
    echo "RESULT step=check phones=1 server_p50_ms=$c1_p50 server_max_ms=$c1_max curl_p50_ms=$c1_curl"
    echo "RESULT step=check phones=$CHECK_N server_p50_ms=$cn_p50 server_max_ms=$cn_max curl_p50_ms=$cn_curl"
} | tee -a "$OUT"
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""

echo "== export" >&2
tv="$WORK/time-export.txt"
env -i PATH="$PATH" OPTOUT_RELAY__DATABASE__URL="$DB" OPTOUT_RELAY__LOG__FORMAT=json \
    /usr/bin/time -v "$BIN" export > "$WORK/export.csv" 2> "$tv"
e_s=$(awk -F': ' '/Elapsed \(wall clock\)/ {n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; print s}' "$tv")
e_rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.1f", $2 / 1024}' "$tv")
{
    echo
    echo "## export (CLI, CSV)"
    echo
    echo "RESULT step=export rows=$(( $(wc -l < "$WORK/export.csv") - 1 )) seconds=$e_s rss_mb=$e_rss"
} | tee -a "$OUT"

{
    echo
    echo "# Summary ($OUT)"
    echo
    echo "| step | figure |"
    echo "|---|---:|"
    echo "| import $BASELINE_ROWS rows (baseline) | $b_s s, peak RSS $b_rss MB |"
    echo "| import $ROWS rows | $i_s s, peak RSS $i_rss MB |"
    echo "| same $ROWS rows again (nothing recorded) | $r_s s, peak RSS $r_rss MB |"
    echo "| check 1 number (baseline) | server p50 $c1_p50 ms (max $c1_max), curl p50 $c1_curl ms |"
    echo "| check $CHECK_N numbers | server p50 $cn_p50 ms (max $cn_max), curl p50 $cn_curl ms |"
    echo "| export $ROWS opt-outs (CSV) | $e_s s, peak RSS $e_rss MB |"
    echo
    echo "whole script: $(( $(date +%s) - T0 )) s including the build"
} | tee -a "$OUT"
