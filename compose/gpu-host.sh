#!/usr/bin/env bash
# Runs the restorer and the freezer of one GPU host in one container. If either exits, stop the
# other and exit with its status, so that Docker's restart policy brings both back together.
#
# `gpu-host.sh check` is the container's healthcheck: it fails unless both are alive, by the pid
# files written here (a `pgrep -f` run by `sh -c` matches the shell's own command line).
# The restorer serves /metrics on SNAPSCALE_METRICS_PORT, the freezer on the port after it.
set -uo pipefail
run="${SNAPSCALE_RUN_DIR:-/run/snapscale}"

alive() {  # alive ROLE: the pid file names a live `snapscale ROLE` process (not a reused pid)
    local pid
    pid="$(cat "$run/$1.pid" 2>/dev/null)" && [ -n "$pid" ] || return 1
    tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline" | grep -q "snapscale $1 "
}

if [ "${1:-}" = check ]; then
    alive restorer || { echo "restorer is down" >&2; exit 1; }
    alive freezer || { echo "freezer is down" >&2; exit 1; }
    exit 0
fi

host="${SNAPSCALE_HOST_ID:?SNAPSCALE_HOST_ID is required}"
port="${SNAPSCALE_METRICS_PORT:-}"
mkdir -p "$run"
SNAPSCALE_METRICS_PORT="$port" OTEL_SERVICE_NAME=snapscale-restorer snapscale restorer --host "$host" &
restorer=$!
echo "$restorer" > "$run/restorer.pid"
SNAPSCALE_METRICS_PORT="${port:+$((port + 1))}" OTEL_SERVICE_NAME=snapscale-freezer \
    snapscale freezer --host "$host" &
freezer=$!
echo "$freezer" > "$run/freezer.pid"
# SIGTERM from `docker stop` drains both (each handles SIGTERM itself).
trap 'kill -TERM "$restorer" "$freezer" 2>/dev/null' TERM INT
wait -n "$restorer" "$freezer"
rc=$?
kill -TERM "$restorer" "$freezer" 2>/dev/null
wait
rm -f "$run/restorer.pid" "$run/freezer.pid"
exit "$rc"
