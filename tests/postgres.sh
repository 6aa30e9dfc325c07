#!/usr/bin/env bash
# Throwaway PostgreSQL cluster for the metadata-store tests.
#
#   eval "$(tests/postgres.sh)"            # start; exports STRATA_TEST_POSTGRES_URL
#   cargo test                              # runs the PostgreSQL conformance tests
#   tests/postgres.sh stop "$STRATA_TEST_POSTGRES_DIR"     # stop and delete it
#
# Start installs PostgreSQL (apt) if no initdb is found, creates a cluster in a new
# temp dir (owned by the `postgres` user when run as root, since root cannot run the
# server), listens on a free loopback port only (plus a socket in the temp dir), trusts
# local connections, and creates the database `strata_test`. Only `export` lines go to
# stdout, so the output can be eval'd; progress goes to stderr.
set -euo pipefail

DB_NAME=strata_test

log() { printf '%s\n' "$*" >&2; }

# The newest installed PostgreSQL bin directory, or nothing.
find_bin_dir() {
    local dir
    dir=$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/initdb' 2>/dev/null \
        | sort -V | tail -n 1)
    if [[ -n $dir ]]; then
        dirname "$dir"
    fi
}

# Runs a command as the user that owns the cluster.
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

install_postgres() {
    if [[ $(id -u) -ne 0 ]]; then
        log "PostgreSQL is not installed and this is not root: install the postgresql package"
        exit 1
    fi
    log "installing postgresql ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
}

# A loopback port nobody listens on (checked by connecting; the start retries on a race).
free_port() {
    local port attempt
    for attempt in $(seq 1 200); do
        port=$((20000 + (RANDOM * 32768 + RANDOM + attempt) % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            printf '%s\n' "$port"
            return 0
        fi
    done
    log "no free loopback port found"
    return 1
}

start() {
    local bin_dir dir port attempt started=0
    bin_dir=$(find_bin_dir)
    if [[ -z $bin_dir ]]; then
        install_postgres
        bin_dir=$(find_bin_dir)
        if [[ -z $bin_dir ]]; then
            log "postgresql installed but no initdb found under /usr/lib/postgresql"
            exit 1
        fi
    fi

    dir=$(mktemp -d "${TMPDIR:-/tmp}/strata-pg.XXXXXX")
    chmod 0755 "$dir"
    if [[ $(id -u) -eq 0 ]]; then
        chown postgres: "$dir"
    fi
    log "initialising a cluster in $dir/data with $bin_dir"
    as_owner "$bin_dir/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 \
        >"$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2
        exit 1
    }

    for attempt in 1 2 3 4 5; do
        port=$(free_port)
        log "starting postgres on 127.0.0.1:$port (attempt $attempt)"
        if as_owner "$bin_dir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off" \
            start >&2; then
            started=1
            break
        fi
        tail -n 20 "$dir/server.log" >&2 || true
    done
    if [[ $started -ne 1 ]]; then
        log "postgres did not start; data dir left at $dir"
        exit 1
    fi

    as_owner "$bin_dir/createdb" -h 127.0.0.1 -p "$port" -U postgres "$DB_NAME" >&2

    printf 'export STRATA_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:%s/%s\n' "$port" "$DB_NAME"
    printf 'export STRATA_TEST_POSTGRES_DIR=%s\n' "$dir"
    log "data dir: $dir"
    log "stop with: $0 stop $dir"
}

stop() {
    local dir=${1:-${STRATA_TEST_POSTGRES_DIR:-}} bin_dir
    if [[ -z $dir || ! -d $dir/data ]]; then
        log "usage: $0 stop DIR   (DIR as printed by start, holding data/)"
        exit 2
    fi
    bin_dir=$(find_bin_dir)
    if [[ -z $bin_dir ]]; then
        log "no PostgreSQL installation found to stop $dir with"
        exit 1
    fi
    as_owner "$bin_dir/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
    rm -rf -- "$dir"
    log "stopped and removed $dir"
}

case ${1:-start} in
    start) start ;;
    stop) stop "${2:-}" ;;
    *)
        log "usage: $0 [start] | $0 stop DIR"
        exit 2
        ;;
esac
