#!/usr/bin/env bash
# Stops what scripts/docker-up.sh started: the dockerd it launched, if any (an engine that was
# already running is left alone). Images and the local base stay, for the next run.
set -euo pipefail
STATE=${XDG_RUNTIME_DIR:-/tmp}/sled-docker
pidfile=$STATE/dockerd.pid
[ -f "$pidfile" ] || exit 0
pid=$(cat "$pidfile")
rm -f "$pidfile"
kill "$pid" 2>/dev/null || exit 0
for _ in $(seq 30); do
    kill -0 "$pid" 2>/dev/null || exit 0
    sleep 1
done
echo "docker-down: dockerd ($pid) still running after 30 s" >&2
exit 1
