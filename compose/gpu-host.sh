#!/usr/bin/env bash
# Runs the restorer and the freezer of one GPU host in one container. If either exits, stop the
# other and exit with its status, so that Docker's restart policy brings both back together.
set -uo pipefail
host="${SNAPSCALE_HOST_ID:?SNAPSCALE_HOST_ID is required}"
OTEL_SERVICE_NAME=snapscale-restorer snapscale restorer --host "$host" &
restorer=$!
OTEL_SERVICE_NAME=snapscale-freezer snapscale freezer --host "$host" &
freezer=$!
# SIGTERM from `docker stop` drains both (each handles SIGTERM itself).
trap 'kill -TERM "$restorer" "$freezer" 2>/dev/null' TERM INT
wait -n "$restorer" "$freezer"
rc=$?
kill -TERM "$restorer" "$freezer" 2>/dev/null
wait
exit "$rc"
