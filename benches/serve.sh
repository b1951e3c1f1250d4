#!/usr/bin/env bash
# The control plane's figures (issue 17), with the release build: a daemon whose state
# holds 100 jobs and 10,000 finished runs, on a repository of 10,001 snapshots
# (server/examples/serve_fixture.rs makes them).
#
#   1. idle RSS and CPU ticks over 60 s;
#   2. the cost of a /metrics scrape (5 scrapes);
#   3. API latency and throughput under load (wrk, 4 connections, 10 s each): runs,
#      jobs, 10,000 snapshots listed, repositories.
#
# Usage: benches/serve.sh [path/to/repo-binary]   (needs wrk and curl; prints Markdown)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$here/target/release/repo}"
work="${WORK:-/var/tmp/cairn-bench-serve}"
rm -rf "$work"
mkdir -p "$work/data" "$work/state"
echo bench-not-a-secret > "$work/password"
export REPO_PASSWORD_FILE="$work/password" REPO_CONFIG=/nonexistent CAIRN_STATE_DIR="$work/state"
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }

# --- the site ----------------------------------------------------------------------
cp -a /usr/share/doc/. "$work/data/"
"$bin" -r "$work/repo" init >/dev/null
"$bin" -r "$work/repo" backup "$work/data" >/dev/null
(cd "$here" && cargo run -q --release -p cairn-server --example serve_fixture -- \
  "$work/state" "$work/repo" "$work/password" 100 10000 10000)
cat > "$work/serve.toml" <<EOF
state_dir = "$work/state"
[repositories.default]
path = "$work/repo"
password_file = "$work/password"
EOF
token=$("$bin" serve --config "$work/serve.toml" token create --name bench)
"$bin" serve --config "$work/serve.toml" --listen 127.0.0.1:18087 2>"$work/serve.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -sf http://127.0.0.1:18087/api/v1/health >/dev/null && break
  sleep 0.1
done
url=http://127.0.0.1:18087

# --- idle ----------------------------------------------------------------------------
sleep 5
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
t0=$(ticks); r0=$(rss)
sleep 60
t1=$(ticks); r1=$(rss)
echo "| figure | value |"
echo "|---|---|"
echo "| idle RSS after start / after 60 s | $((r0 / 1024)) MB / $((r1 / 1024)) MB |"
echo "| CPU ticks in 60 s idle | $((t1 - t0)) |"

# --- scrapes -------------------------------------------------------------------------
times=()
for _ in 1 2 3 4 5; do
  times+=("$(curl -s -o "$work/metrics.txt" -w '%{time_total}' "$url/metrics")")
done
size=$(wc -c < "$work/metrics.txt")
echo "| /metrics scrape (5 scrapes, $((size / 1024)) KB) | $(printf '%s ' "${times[@]}")s |"

# --- the API under load --------------------------------------------------------------
load() { # name path
  local out
  out=$(wrk -t1 -c4 -d10s --latency -H "Authorization: Bearer $token" "$url$2")
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  echo "| $1 | $rps req/s, p50 $p50, p99 $p99 |"
}
load "GET /api/v1/runs?limit=100 (of 10,000)" "/api/v1/runs?limit=100"
load "GET /api/v1/runs?limit=1000" "/api/v1/runs?limit=1000"
load "GET /api/v1/jobs (100, each with its last run)" "/api/v1/jobs"
load "GET /api/v1/repositories/default/snapshots?limit=10001 (all)" "/api/v1/repositories/default/snapshots?limit=10001"
load "GET /api/v1/repositories/default/snapshots?limit=100" "/api/v1/repositories/default/snapshots?limit=100"
load "GET /api/v1/repositories (figures)" "/api/v1/repositories"
load "GET /api/v1/health (no token, no state)" "/api/v1/health"
echo "| RSS after the load | $(( $(rss) / 1024 )) MB |"
