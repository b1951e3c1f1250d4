#!/usr/bin/env bash
# Dashboard page load times (issue 19) with the release build: a daemon whose state
# holds 100 jobs and 1,000 finished runs, on a repository of 10,001 snapshots
# (server/examples/serve_fixture.rs), measured in chromium by benches/dashboard.py.
#
# Usage: benches/dashboard.sh [path/to/repo-binary]   (needs chromium, chromedriver; prints Markdown)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$here/target/release/repo}"
work="${WORK:-/var/tmp/cairn-bench-dashboard}"
rm -rf "$work"
mkdir -p "$work/data" "$work/state"
echo bench-not-a-secret > "$work/password"
export REPO_PASSWORD_FILE="$work/password" REPO_CONFIG=/nonexistent CAIRN_STATE_DIR="$work/state"
cp -a /usr/share/doc/. "$work/data/"
"$bin" -r "$work/repo" init >/dev/null
"$bin" -r "$work/repo" backup "$work/data" >/dev/null
(cd "$here" && cargo run -q --release -p cairn-server --example serve_fixture -- \
  "$work/state" "$work/repo" "$work/password" 100 1000 10000)
cat > "$work/serve.toml" <<TOML
state_dir = "$work/state"
[repositories.default]
path = "$work/repo"
password_file = "$work/password"
TOML
token=$("$bin" serve --config "$work/serve.toml" token create --name bench)
"$bin" serve --config "$work/serve.toml" --listen 127.0.0.1:18088 2>"$work/serve.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -sf http://127.0.0.1:18088/api/v1/health >/dev/null && break
  sleep 0.1
done
python3 "$here/benches/dashboard.py" http://127.0.0.1:18088 "$token"
