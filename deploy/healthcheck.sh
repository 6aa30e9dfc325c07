#!/usr/bin/env bash
# Container health check of the Strata image: exits 0 when GET /readyz on the
# broker's operator HTTP endpoint answers 200, 1 otherwise.
#
# The address comes from STRATA_HTTP (HOST:PORT, as the broker reads it); a wildcard
# host (0.0.0.0, [::] or none) is probed on loopback. Needs nothing but bash: the
# request goes through bash's /dev/tcp.
set -uo pipefail

addr=${STRATA_HTTP:-127.0.0.1:9644}
port=${addr##*:}
host=${addr%:*}
host=${host#[}
host=${host%]}
case $host in
    '' | 0.0.0.0 | ::) host=127.0.0.1 ;;
esac

if ! { exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null; then
    echo "unhealthy: cannot connect to $host:$port" >&2
    exit 1
fi
printf 'GET /readyz HTTP/1.0\r\nHost: %s\r\n\r\n' "$host" >&3
status=
IFS=' ' read -r -t 4 _ status _ <&3 || true
exec 3<&-
if [[ $status != 200 ]]; then
    echo "unhealthy: /readyz on $host:$port answered ${status:-nothing}" >&2
    exit 1
fi
