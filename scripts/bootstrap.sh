#!/usr/bin/env bash
# Idempotent set-up on Debian 12 / Python 3.11: system packages (redis-server,
# redis-tools, PostgreSQL 15, Varnish with varnish-modules) when missing, then .venv
# with the project installed editable. This is the ONLY place that installs system
# packages: scripts/services.py and the test fixtures never do; they fail naming
# this script. Installing needs root; as non-root it only checks they are there.
# Re-running is cheap: nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

EXTRAS="dev,redis,metrics,http,kafka,debezium"
VENV=.venv
STAMP="$VENV/.tieredcache-install-stamp"
PG_INITDB=/usr/lib/postgresql/15/bin/initdb

log() { printf 'bootstrap: %s\n' "$*" >&2; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
# Run a command quietly; on failure show the tail of its output and stop.
quiet() {
    if ! "$@" >"$OUT" 2>&1; then
        tail -n 40 "$OUT" >&2
        die "failed: $*"
    fi
}

is_root() { [ "$(id -u)" -eq 0 ]; }

APT_UPDATED=0
apt_install() {
    if ! is_root; then
        die "missing system packages: $*. Install them with: sudo apt-get update && sudo apt-get install -y $*"
    fi
    command -v apt-get >/dev/null || die "apt-get not found; install these packages yourself: $*"
    export DEBIAN_FRONTEND=noninteractive
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        quiet apt-get update -qq
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    quiet apt-get install -y -qq --no-install-recommends "$@"
}

# --- system packages -------------------------------------------------------------
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
[ -x "$PG_INITDB" ] || missing+=(postgresql-15)
command -v varnishd >/dev/null 2>&1 || missing+=(varnish)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)  # the HTTP benchmark's load generator
[ -n "$(find /usr/lib -path '*varnish*/vmods/libvmod_xkey.so' -print -quit 2>/dev/null)" ] \
    || missing+=(varnish-modules)
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi
# PostgreSQL refuses to run as root: as root, the test servers run as 'postgres',
# which the postgresql-15 package creates.
if is_root && ! id postgres >/dev/null 2>&1; then
    die "no 'postgres' user after installing postgresql-15; reinstall it: apt-get install --reinstall postgresql-15"
fi

# --- virtualenv ------------------------------------------------------------------
python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

if ! [ -x "$VENV/bin/python" ] || ! python_ok "$VENV/bin/python"; then
    PY=""
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
            PY=$candidate
            break
        fi
    done
    [ -n "$PY" ] || die "Python >= 3.11 not found (on Debian 12: apt-get install python3 python3-venv)"
    rm -rf "$VENV"
    log "creating $VENV with $(command -v "$PY")"
    if ! "$PY" -m venv "$VENV" >"$OUT" 2>&1; then
        # Debian's python3 ships without ensurepip until python3-venv is installed.
        rm -rf "$VENV"
        if is_root && ! "$PY" -c 'import ensurepip' >/dev/null 2>&1; then
            apt_install python3-venv
            quiet "$PY" -m venv "$VENV"
        else
            tail -n 20 "$OUT" >&2
            die "could not create $VENV (on Debian: sudo apt-get install -y python3-venv)"
        fi
    fi
fi

# --- project install -------------------------------------------------------------
[ -f pyproject.toml ] || die "pyproject.toml not found in $PWD"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $EXTRAS"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
    log "pip install -e '.[$EXTRAS]'"
    quiet "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    quiet "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]"
    printf '%s\n' "$want" >"$STAMP"
fi
log "ok ($VENV ready)"
