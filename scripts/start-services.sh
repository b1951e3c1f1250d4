#!/usr/bin/env bash
# Starts what the tests drive and builds what they start: the Docker engine (when none
# answers; logs to /var/log/cairn-dockerd.log) and the local database images
# (scripts/build-db-images.sh: postgres:<major>, mariadb:<major> from the host's own
# installations, since there is no image registry here). Needs root. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || { echo "dockerd not found: scripts/install-deps.sh --test" >&2; exit 1; }
  nohup dockerd >/var/log/cairn-dockerd.log 2>&1 &
  for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start:" >&2; tail -20 /var/log/cairn-dockerd.log >&2; exit 1; }
fi
"$here/scripts/build-db-images.sh"
