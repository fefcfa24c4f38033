#!/usr/bin/env bash
# Property-based tests of the admin API against its own OpenAPI document:
# schemathesis (PyPI) generates requests from /v1/openapi.json and checks that
# none is answered 5xx and every answer matches the documented schema.
#
# Runs the built binary (OPTOUT_RELAY_BIN, else target/release, else
# target/debug) on a throwaway SQLite file with an admin token; schemathesis
# lives in a venv under target/ so the system Python is left alone. The run is
# bounded (SCHEMATHESIS_MAX_EXAMPLES per operation, default 100) so it adds
# about a minute to CI, and seeded (SCHEMATHESIS_SEED, default 12) so a failure
# in CI is the same failure on a laptop; set another seed to explore further.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SCHEMATHESIS_VERSION=4.32.5
MAX_EXAMPLES=${SCHEMATHESIS_MAX_EXAMPLES:-100}
BIN=${OPTOUT_RELAY_BIN:-}
if [ -z "$BIN" ]; then
    for candidate in target/release/optout-relay target/debug/optout-relay; do
        if [ -x "$candidate" ]; then BIN=$candidate; break; fi
    done
fi
[ -n "$BIN" ] && [ -x "$BIN" ] || { echo "api-fuzz: no optout-relay binary; build it first"; exit 1; }
BIN=$(realpath "$BIN")

VENV=target/api-fuzz-venv
if [ ! -x "$VENV/bin/schemathesis" ]; then
    echo "api-fuzz: installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
    PIP_ROOT_USER_ACTION=ignore "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "schemathesis==$SCHEMATHESIS_VERSION"
fi

work=$(mktemp -d)
port=$("${PYTHON:-python3}" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
token="api-fuzz-$(date +%s)-$RANDOM"
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

(
    cd "$work"
    exec env -i PATH="$PATH" \
        OPTOUT_RELAY__SERVER__LISTEN="127.0.0.1:$port" \
        OPTOUT_RELAY__SERVER__PUBLIC_URL="http://127.0.0.1:$port" \
        OPTOUT_RELAY__TWILIO__AUTH_TOKENS="api-fuzz-twilio-token" \
        OPTOUT_RELAY__ADMIN__TOKENS="$token" \
        OPTOUT_RELAY__DATABASE__URL="sqlite://$work/api-fuzz.db?mode=rwc" \
        RUST_LOG=warn \
        "$BIN" serve
) >"$work/server.log" 2>&1 &
server_pid=$!

ready() {
    "${PYTHON:-python3}" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "http://127.0.0.1:$port/readyz" >/dev/null 2>&1
}
for _ in $(seq 1 150); do
    if ready; then break; fi
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log"; echo "api-fuzz: the server exited"; exit 1; }
    sleep 0.2
done
ready || { cat "$work/server.log"; echo "api-fuzz: the server never became ready"; exit 1; }

status=0
venv=$(realpath "$VENV")
# From the scratch directory: schemathesis keeps its example database in ./.schemathesis.
(cd "$work" && "$venv/bin/schemathesis" run "http://127.0.0.1:$port/v1/openapi.json" \
    --header "Authorization: Bearer $token" \
    --checks not_a_server_error,response_schema_conformance \
    --max-examples "$MAX_EXAMPLES" \
    --seed "${SCHEMATHESIS_SEED:-12}" \
    --no-color) \
    || status=$?
if [ "$status" -ne 0 ]; then
    echo "api-fuzz: server log follows"
    tail -n 100 "$work/server.log"
fi
exit "$status"
