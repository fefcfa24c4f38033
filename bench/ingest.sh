#!/usr/bin/env bash
# Ingest benchmark (issue 2): distinct signed STOP webhooks against the release
# binary on PostgreSQL, a pgbench baseline of the same rows written one
# transaction per webhook, then the same load on SQLite.
#
#   bench/ingest.sh                      # 20 000 requests, 32 connections
#   REQUESTS=50000 CONCURRENCY=32 bench/ingest.sh
#   KEEP_TMP=1 bench/ingest.sh           # keep server logs, pgbench logs, top frames
#
# Needs: cargo, psql, pgbench, sqlite3, curl; PostgreSQL reachable with trust
# auth (PGHOST/PGPORT/PGUSER, default 127.0.0.1:5432 postgres). Only loopback
# traffic. Creates and drops databases named optout_bench_<pid>_*.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REQUESTS=${REQUESTS:-20000}
CONCURRENCY=${CONCURRENCY:-32}
WARMUP=${WARMUP:-2}
PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
PGUSER=${PGUSER:-postgres}
STEP_TIMEOUT=${STEP_TIMEOUT:-600}   # seconds, per build/load/pgbench step
export PGHOST PGPORT PGUSER

TOKEN=bench-auth-token-0123456789abcdef
PUBLIC_URL=https://optout.bench.example     # what Twilio would sign over behind a proxy
ACCOUNT_SID=AC00000000000000000000000000000001
MG_SID=MG00000000000000000000000000000001
TO=+14155550100

TMP=$(mktemp -d "${TMPDIR:-/tmp}/optout-bench.XXXXXX")
DB_SRV="optout_bench_$$_srv"
DB_BASE="optout_bench_$$_base"
SERVER_PID=""

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }
psql_q() { psql -X -q -v ON_ERROR_STOP=1 -At "$@"; }

cleanup() {
    local rc=$?
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    for db in "$DB_SRV" "$DB_BASE"; do
        psql_q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null || true
    done
    if [[ $rc -ne 0 || -n "${KEEP_TMP:-}" ]]; then
        log "exit $rc; logs kept in $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in cargo psql pgbench sqlite3 curl ss timeout; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
(( REQUESTS >= CONCURRENCY )) || die "REQUESTS must be at least CONCURRENCY"

# ---------------------------------------------------------------- machine
echo "# Ingest benchmark"
echo
echo "- command: \`REQUESTS=$REQUESTS CONCURRENCY=$CONCURRENCY WARMUP=$WARMUP bench/ingest.sh\`"
echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
echo "- machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/MemTotal/ {printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
echo "- PostgreSQL: $(psql_q -d postgres -c 'SHOW server_version') (synchronous_commit=$(psql_q -d postgres -c 'SHOW synchronous_commit'), fsync=$(psql_q -d postgres -c 'SHOW fsync'), shared_buffers=$(psql_q -d postgres -c 'SHOW shared_buffers')); $(pgbench --version); SQLite $(sqlite3 --version | cut -d' ' -f1)"
echo "- $(rustc --version); load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

# The postmaster serving PGHOST:PGPORT, for CPU accounting (other clusters on the host are left out).
PG_POSTMASTER=$(head -1 "$(psql_q -d postgres -c 'SHOW data_directory')/postmaster.pid" 2>/dev/null) \
    || die "cannot read postmaster.pid of $PGHOST:$PGPORT (run as a user that can read the data directory)"

# ---------------------------------------------------------------- build
log "building (release)"
(cd "$ROOT" && timeout "$STEP_TIMEOUT" cargo build --release --quiet --bin optout-relay --example loadgen) \
    || die "cargo build"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN="$TARGET_DIR/release/optout-relay"
LOADGEN="$TARGET_DIR/release/examples/loadgen"
[[ -x "$BIN" && -x "$LOADGEN" ]] || die "built binaries not found under $TARGET_DIR/release"

# ---------------------------------------------------------------- helpers
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

# start_server LABEL DATABASE_URL -> sets SERVER_PID, PORT (retries if another process took the port)
start_server() {
    local attempt
    for attempt in 1 2 3; do
        start_server_once "$@" && return
        grep -q 'Address already in use' "$TMP/server-$1.log" || break
        log "port $PORT taken meanwhile, retrying"
    done
    tail -20 "$TMP/server-$1.log" >&2
    die "$1 server did not start"
}

start_server_once() {
    local label=$1 db_url=$2
    PORT=$(free_port)
    # A clean environment and working directory: no optout-relay.toml, no stray
    # OPTOUT_RELAY__* or RUST_LOG from the caller. Logging stays at the default (info).
    (cd "$TMP" && exec env -i PATH="$PATH" \
        OPTOUT_RELAY__DATABASE__URL="$db_url" \
        OPTOUT_RELAY__SERVER__LISTEN="127.0.0.1:$PORT" \
        OPTOUT_RELAY__SERVER__PUBLIC_URL="$PUBLIC_URL" \
        OPTOUT_RELAY__TWILIO__AUTH_TOKENS="$TOKEN" \
        "$BIN" serve >"$TMP/server-$label.log" 2>&1) &
    SERVER_PID=$!
    for _ in $(seq 150); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            wait "$SERVER_PID" 2>/dev/null || true
            SERVER_PID=""
            return 1
        fi
        if curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$PORT/readyz" 2>/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    die "$label server not ready after 30 s"
}

stop_server() {
    local label=$1
    kill -TERM "$SERVER_PID"
    local rc=0
    timeout 20 tail --pid="$SERVER_PID" -f /dev/null || die "$label server did not stop within 20 s of SIGTERM"
    wait "$SERVER_PID" || rc=$?
    SERVER_PID=""
    [[ $rc -eq 0 ]] || die "$label server exited with $rc after SIGTERM"
}

# run_load LABEL -> sets RESULT_* from the loadgen summary, RSS_MB from VmHWM
run_load() {
    local label=$1
    # Two frames a second apart; the second shows the CPU of that second.
    ( sleep $(( WARMUP + 1 )); top -b -n2 -d1 -w 200 | awk '/^top -/ {n++} n == 2' | head -16 ) >"$TMP/top-$label.txt" 2>&1 &
    local top_pid=$!
    timeout "$STEP_TIMEOUT" "$LOADGEN" \
        --url "http://127.0.0.1:$PORT" --public-url "$PUBLIC_URL" --token "$TOKEN" \
        --concurrency "$CONCURRENCY" --requests "$REQUESTS" --warmup "$WARMUP" --kind stop \
        --account-sid "$ACCOUNT_SID" --messaging-service-sid "$MG_SID" --to "$TO" \
        --watch "server=pid:$SERVER_PID" --watch "postgres=tree:$PG_POSTMASTER" \
        >"$TMP/loadgen-$label.out" 2>"$TMP/loadgen-$label.err" || {
            cat "$TMP/loadgen-$label.err" >&2; tail -20 "$TMP/server-$label.log" >&2; die "$label loadgen"; }
    wait "$top_pid" 2>/dev/null || true
    RSS_KB=$(awk '/^VmHWM:/ {print $2}' "/proc/$SERVER_PID/status")
    RSS_MB=$(awk -v k="$RSS_KB" 'BEGIN {printf "%.1f", k/1024}')
    local line; line=$(grep '^RESULT ' "$TMP/loadgen-$label.out")
    for kv in ${line#RESULT }; do printf -v "R_${kv%%=*}" '%s' "${kv#*=}"; done
    CPU_LINE=$(grep '^CPU ' "$TMP/loadgen-$label.out" || true)
    echo "### $label"
    echo
    echo '```'
    echo "$line"
    echo "$CPU_LINE (percent of one core over the measured window; postgres = the postmaster of $PGHOST:$PGPORT and its backends; host = all CPUs busy out of 100% per CPU)"
    echo "server peak RSS (VmHWM) = ${RSS_KB} kB"
    echo '```'
    echo
    echo "top, $(( WARMUP + 1 ))–$(( WARMUP + 2 )) s into the run (warm-up included):"
    echo
    echo '```'
    sed -n '1,3p;7,16p' "$TMP/top-$label.txt"
    echo '```'
    echo
}

# ---------------------------------------------------------------- PostgreSQL: the server
log "PostgreSQL: server run"
psql_q -d postgres -c "CREATE DATABASE $DB_SRV"
start_server postgres "postgres://$PGUSER@$PGHOST:$PGPORT/$DB_SRV"
run_load postgres
PG_REQ=$R_requests PG_ERR=$R_errors PG_RPS=$R_rps PG_P50=$R_p50_ms PG_P99=$R_p99_ms PG_MAX=$R_max_ms PG_RSS=$RSS_MB PG_OK=$R_ok_total
stop_server postgres
PG_EVENTS=$(psql_q -d "$DB_SRV" -c "SELECT count(*) FROM events")
PG_STATE=$(psql_q -d "$DB_SRV" -c "SELECT count(*) FROM opt_out_state WHERE opted_out")
PG_DELIV=$(psql_q -d "$DB_SRV" -c "SELECT count(*) FROM sink_phones")
# Rows one transaction inserted share its xmin: the group-commit batch sizes.
# "per event" is the size of the batch the median event was written in.
PG_BATCH=$(psql_q -d "$DB_SRV" -F' ' -c "
    WITH b AS (SELECT count(*) AS n FROM events GROUP BY xmin::text)
    SELECT (SELECT count(*) FROM b), (SELECT round(avg(n), 1) FROM b),
           (SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY n) FROM b),
           (SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY b.n) FROM b, generate_series(1, b.n)),
           (SELECT max(n) FROM b)")
read -r PG_COMMITS PG_BATCH_AVG PG_BATCH_P50 PG_BATCH_EP50 PG_BATCH_MAX <<<"$PG_BATCH"
echo "rows: events=$PG_EVENTS (expected $PG_OK), opt_out_state opted out=$PG_STATE, sink_phones=$PG_DELIV (no sink configured);"
echo "group commit (events sharing an xmin, warm-up included): $PG_COMMITS transactions, events per transaction avg=$PG_BATCH_AVG p50=$PG_BATCH_P50 max=$PG_BATCH_MAX; median event's batch=$PG_BATCH_EP50"
echo "server log: $(wc -l <"$TMP/server-postgres.log") lines, $(du -k "$TMP/server-postgres.log" | cut -f1) kB at the default level (info)"
echo
[[ "$PG_EVENTS" == "$PG_OK" ]] || die "events table has $PG_EVENTS rows, loadgen had $PG_OK successful requests"
[[ "$PG_STATE" == "$PG_OK" ]] || die "opt_out_state has $PG_STATE opted-out rows, expected $PG_OK"

# ---------------------------------------------------------------- PostgreSQL: pgbench baseline
log "PostgreSQL: pgbench baseline"
psql_q -d postgres -c "CREATE DATABASE $DB_BASE"
for f in "$ROOT"/migrations/postgres/*.sql; do psql_q -d "$DB_BASE" -f "$f" >/dev/null; done
# Per transaction, the rows one STOP webhook makes the server write (no sink
# configured: no sink_phones row): the events row, same columns and the same
# params document, then the opt_out_state upsert.
cat >"$TMP/webhook.sql" <<SQL
\\set phone random(2012000000, 9899999999)
BEGIN;
INSERT INTO events (message_sid, account_sid, messaging_service_sid, scope, phone, from_raw,
                    to_number, kind, body, params, received_at)
SELECT s.sid, '$ACCOUNT_SID', '$MG_SID', '$MG_SID', s.ph, s.ph, '$TO', 'opt_out', 'STOP',
       jsonb_build_object('ToCountry', 'US', 'ToState', 'CA', 'SmsMessageSid', s.sid, 'NumMedia', '0',
           'ToCity', 'SAN FRANCISCO', 'FromZip', '94105', 'SmsSid', s.sid, 'FromState', 'CA',
           'SmsStatus', 'received', 'FromCity', 'SAN FRANCISCO', 'Body', 'STOP', 'FromCountry', 'US',
           'To', '$TO', 'MessagingServiceSid', '$MG_SID', 'ToZip', '94105', 'NumSegments', '1',
           'ReferralNumMedia', '0', 'MessageSid', s.sid, 'AccountSid', '$ACCOUNT_SID', 'From', s.ph,
           'ApiVersion', '2010-04-01', 'OptOutType', 'STOP'),
       now()
  FROM (SELECT 'SM' || md5(random()::text) AS sid, '+1' || :phone AS ph) AS s
ON CONFLICT (message_sid) DO NOTHING
RETURNING id AS event_id, phone AS ev_phone
\\gset
INSERT INTO opt_out_state (scope, phone, opted_out, event_id, changed_at, since)
VALUES ('$MG_SID', :ev_phone, true, :event_id, now(), now())
ON CONFLICT (scope, phone) DO UPDATE
   SET opted_out = EXCLUDED.opted_out, event_id = EXCLUDED.event_id, changed_at = EXCLUDED.changed_at,
       since = CASE WHEN opt_out_state.opted_out = EXCLUDED.opted_out THEN opt_out_state.since ELSE EXCLUDED.since END
 WHERE (opt_out_state.changed_at, opt_out_state.event_id) < (EXCLUDED.changed_at, EXCLUDED.event_id);
END;
SQL
PGB=(pgbench -n -M prepared -c "$CONCURRENCY" -j 2 -f "$TMP/webhook.sql")
if [[ "$WARMUP" != 0 ]]; then
    timeout "$STEP_TIMEOUT" "${PGB[@]}" -T "$WARMUP" "$DB_BASE" >"$TMP/pgbench-warmup.out" 2>&1 \
        || { cat "$TMP/pgbench-warmup.out" >&2; die "pgbench warm-up"; }
fi
PER_CLIENT=$(( REQUESTS / CONCURRENCY ))
# utime+stime+cutime+cstime of the postmaster and its children (an exited backend's time moves to the postmaster).
pg_ticks() {
    local t=0 f rest
    for f in /proc/[0-9]*/stat; do
        { read -r rest <"$f"; } 2>/dev/null || continue
        rest=${rest##*) }
        read -r -a v <<<"$rest"
        if [[ ${f//[^0-9]/} == "$PG_POSTMASTER" || ${v[1]} == "$PG_POSTMASTER" ]]; then
            (( t += v[11] + v[12] + v[13] + v[14] ))
        fi
    done
    echo "$t"
}
host_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }
T0=$(pg_ticks); H0=$(host_ticks); S0=$(date +%s.%N)
(cd "$TMP" && timeout "$STEP_TIMEOUT" "${PGB[@]}" -t "$PER_CLIENT" -l --log-prefix=pgb "$DB_BASE") \
    >"$TMP/pgbench.out" 2>&1 || { cat "$TMP/pgbench.out" >&2; die "pgbench"; }
T1=$(pg_ticks); H1=$(host_ticks); S1=$(date +%s.%N)
BASE_TPS=$(awk '/^tps = / {print $3; exit}' "$TMP/pgbench.out")
BASE_TX=$(awk '/number of transactions actually processed/ {print $NF}' "$TMP/pgbench.out" | cut -d/ -f1)
BASE_FAILED=$(awk '/number of failed transactions/ {print $5}' "$TMP/pgbench.out")
cat "$TMP"/pgb.* | awk '{print $3}' | sort -n >"$TMP/pgb-lat.txt"
BASE_P50=$(awk '{a[NR]=$1} END {i=int(NR*0.50); if (i<NR*0.50) i++; printf "%.2f", a[i]/1000}' "$TMP/pgb-lat.txt")
BASE_P99=$(awk '{a[NR]=$1} END {i=int(NR*0.99); if (i<NR*0.99) i++; printf "%.2f", a[i]/1000}' "$TMP/pgb-lat.txt")
BASE_PGCPU=$(awk -v t="$(( T1 - T0 ))" -v s0="$S0" -v s1="$S1" 'BEGIN {printf "%.0f", t / 100 / (s1 - s0) * 100}')
BASE_HOSTCPU=$(awk -v t="$(( H1 - H0 ))" -v s0="$S0" -v s1="$S1" 'BEGIN {printf "%.0f", t / 100 / (s1 - s0) * 100}')
BASE_ROWS=$(psql_q -d "$DB_BASE" -c "SELECT (SELECT count(*) FROM events) || ' events, ' || (SELECT count(*) FROM opt_out_state) || ' opt_out_state rows (incl. warm-up)'")
echo "### pgbench baseline"
echo
echo '```'
echo "${PGB[*]} -t $PER_CLIENT $DB_BASE   (after a ${WARMUP} s warm-up run with -T $WARMUP)"
grep -E '^(number of|latency average|tps)' "$TMP/pgbench.out"
echo "per-transaction latency from the -l log: p50=${BASE_P50} ms p99=${BASE_P99} ms; CPU: postgres ${BASE_PGCPU}%, host ${BASE_HOSTCPU}%/$(( 100 * $(nproc) )) (pgbench itself is in host); $BASE_ROWS"
echo '```'
echo
echo "The pgbench script (one transaction per webhook):"
echo
echo '```sql'
cat "$TMP/webhook.sql"
echo '```'
echo
[[ -n "$BASE_TPS" ]] || die "could not read tps from pgbench"
[[ "${BASE_FAILED:-0}" == 0 && "$BASE_TX" == "$(( PER_CLIENT * CONCURRENCY ))" ]] || die "pgbench had failed transactions"

# ---------------------------------------------------------------- SQLite
log "SQLite: server run"
start_server sqlite "sqlite://$TMP/bench.db?mode=rwc"
run_load sqlite
SQ_REQ=$R_requests SQ_RPS=$R_rps SQ_P50=$R_p50_ms SQ_P99=$R_p99_ms SQ_RSS=$RSS_MB SQ_OK=$R_ok_total
stop_server sqlite
SQ_EVENTS=$(sqlite3 "$TMP/bench.db" "SELECT count(*) FROM events")
echo "rows: events=$SQ_EVENTS (expected $SQ_OK)"
echo
[[ "$SQ_EVENTS" == "$SQ_OK" ]] || die "SQLite events table has $SQ_EVENTS rows, expected $SQ_OK"

# ---------------------------------------------------------------- summary
RATIO=$(awk -v a="$PG_RPS" -v b="$BASE_TPS" 'BEGIN {printf "%.2f", a / b}')
verdict() { awk -v v="$1" -v op="$2" -v lim="$3" 'BEGIN {ok = (op == ">=") ? v >= lim : v <= lim; print ok ? "met" : "MISSED"}'; }
echo "### Summary"
echo
echo "| backend | requests | rps | p50 ms | p99 ms | peak RSS MB | baseline tps | ratio |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
printf '| PostgreSQL | %s | %.0f | %s | %s | %s | %.0f | %s× |\n' "$PG_REQ" "$PG_RPS" "$PG_P50" "$PG_P99" "$PG_RSS" "$BASE_TPS" "$RATIO"
printf '| pgbench baseline (same rows, 1 tx/webhook) | %s | %.0f | %s | %s | — | — | — |\n' "$BASE_TX" "$BASE_TPS" "$BASE_P50" "$BASE_P99"
printf '| SQLite | %s | %.0f | %s | %s | %s | — | — |\n' "$SQ_REQ" "$SQ_RPS" "$SQ_P50" "$SQ_P99" "$SQ_RSS"
echo
echo "Targets (PostgreSQL): rate ≥ 1.0× baseline: $(verdict "$RATIO" '>=' 1.0) (${RATIO}×);" \
     "p99 ≤ 15 ms: $(verdict "$PG_P99" '<=' 15) (${PG_P99} ms);" \
     "peak RSS ≤ 40 MB: $(verdict "$PG_RSS" '<=' 40) (${PG_RSS} MB)."
echo "Load average after the run: $(cut -d' ' -f1-3 /proc/loadavg)."
