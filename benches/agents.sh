#!/usr/bin/env bash
# benches/agents.sh — many hosts, one repository (issue 21's figures), release build:
#
#   1. three agents push to one `repo serve` at once (each its own HOME: its own cache
#      and index, as on three hosts), over HTTP on 127.0.0.1: agent 1 the files dataset
#      v1, agent 2 its v2 (5 % changed), agent 3 the VM image v1. Aggregate MB/s of
#      source data, and what the repository stored against the sum of the inputs;
#   2. a fourth host, new (empty cache), backs up files v1 again: what it sends and how
#      many packs it indexes (known-chunk negotiation) against the repository's;
#   3. `repo copy` of the VM dataset's snapshots (v1 and v2, as images) from a local
#      repository to a second one with its own key: MB/s, and what a second run moves.
#
# Data: the shared bench datasets (../shared/bench/make-data.sh, /var/tmp/bench-data).
# Usage: bash benches/agents.sh    (prints Markdown; page cache dropped between phases)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${REPO_BIN:-$here/target/release/repo}"
data="${DATA:-/var/tmp/bench-data}"
work="${WORK:-/var/tmp/cairn-bench-agents}"
port="${PORT:-18300}"
[ -x "$bin" ] || { echo "no $bin: cargo build --release" >&2; exit 1; }
for d in files-v1 files-v2 vm-v1.raw vm-v2.raw; do
  [ -e "$data/$d" ] || { echo "no $data/$d: bash ../shared/bench/make-data.sh" >&2; exit 1; }
done
rm -rf "$work"
mkdir -p "$work/state"
echo bench-not-a-secret > "$work/password"
export REPO_PASSWORD_FILE="$work/password" REPO_CONFIG=/nonexistent CAIRN_STATE_DIR="$work/state"

drop() { if [ "$(id -u)" = 0 ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi; }
now() { date +%s.%N; }
bytes_in() { du -sb --apparent-size "$1" | cut -f1; }
stored() { du -sb "$1/data" | cut -f1; }
mb() { echo "scale=0; $1 / 1000000" | bc; }
rate() { echo "scale=1; $1 / 1000000 / $2" | bc; }

# --- the server ------------------------------------------------------------------------
"$bin" -r "$work/repo" init > /dev/null
cat > "$work/serve.toml" <<EOF
state_dir = "$work/state"
[repositories.default]
path = "$work/repo"
password_file = "$work/password"
EOF
token=$("$bin" serve --config "$work/serve.toml" token create --name agents --repository default --append-only)
# The site's own token, for the prune: through the server, so that the packs it rewrites
# are reported to the blob directory the agents ask (a prune by path is not).
admin=$("$bin" serve --config "$work/serve.toml" token create --name admin --repository default)
"$bin" serve --config "$work/serve.toml" --listen "127.0.0.1:$port" 2> "$work/serve.log" &
pid=$!
# Gigabytes of repositories: removed at exit unless KEEP_WORK=1.
trap 'kill $pid 2>/dev/null || true; [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$work"' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/api/v1/health" > /dev/null && break
  sleep 0.1
done
url="http://127.0.0.1:$port/repo/default"

agent() { # n args...: runs `repo` as host n (its own home), to the server
  local n=$1; shift
  mkdir -p "$work/host$n"
  HOME="$work/host$n" REPO_TOKEN="$token" "$bin" -r "$url" "$@"
}

# --- 1. three agents at once ---------------------------------------------------------------
in1=$(bytes_in "$data/files-v1"); in2=$(bytes_in "$data/files-v2"); in3=$(bytes_in "$data/vm-v1.raw")
drop
t0=$(now)
agent 1 --json backup --host host1 "$data/files-v1" > "$work/a1.json" &
p1=$!
agent 2 --json backup --host host2 "$data/files-v2" > "$work/a2.json" &
p2=$!
agent 3 --json backup --host host3 --image "$data/vm-v1.raw" --name vm > "$work/a3.json" &
p3=$!
wait $p1 $p2 $p3
t1=$(now)
secs=$(echo "$t1 - $t0" | bc)
total=$((in1 + in2 + in3))
after_push=$(stored "$work/repo")

echo "| figure | value |"
echo "|---|---|"
echo "| three agents at once: source data | $(mb $total) MB (files v1 $(mb $in1), files v2 $(mb $in2), vm image $(mb $in3) MB apparent) |"
echo "| wall time, aggregate rate | $(printf '%.1f' "$secs") s, $(rate $total "$secs") MB/s |"
echo "| stored after the three pushes | $(mb $after_push) MB |"
mkdir -p "$work/host0"
HOME="$work/host0" REPO_TOKEN="$admin" "$bin" -r "$url" prune --max-unused 0% > /dev/null
after_prune=$(stored "$work/repo")
echo "| stored after prune (duplicates of concurrent pushes dropped) | $(mb $after_prune) MB |"

# --- 2. a new host ------------------------------------------------------------------------------
packs=$(find "$work/repo/data" -type f | wc -l)
drop
t0=$(now)
agent 4 --json backup --host host4 "$data/files-v1" > "$work/a4.json"
t1=$(now)
sent=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["snapshot"]["summary"]["bytes_stored"])' "$work/a4.json")
indexed=$(python3 -c 'import sqlite3,sys,glob; print(sqlite3.connect(glob.glob(sys.argv[1]+"/.cache/cairn/*/index.sqlite")[0]).execute("SELECT count(*) FROM packs").fetchone()[0])' "$work/host4")
echo "| a new host backs up files v1 again | $(printf '%.1f' "$(echo "$t1 - $t0" | bc)") s, sent $sent B, indexed $indexed of $packs packs |"

# --- 3. repo copy of the vm snapshots --------------------------------------------------------
src="$work/vm-src"
"$bin" -r "$src" init > /dev/null
"$bin" -r "$src" backup --image "$data/vm-v1.raw" --name vm > /dev/null
"$bin" -r "$src" backup --image "$data/vm-v2.raw" --name vm > /dev/null
echo other-key > "$work/password2"
REPO_PASSWORD_FILE="$work/password2" "$bin" -r "$work/vm-dst" init > /dev/null
vm_in=$(( $(bytes_in "$data/vm-v1.raw") + $(bytes_in "$data/vm-v2.raw") ))
src_stored=$(stored "$src")
drop
t0=$(now)
"$bin" -r "$src" --json copy --to "$work/vm-dst" --to-password-file "$work/password2" > "$work/copy1.json"
t1=$(now)
secs=$(echo "$t1 - $t0" | bc)
drop
t0=$(now)
"$bin" -r "$src" --json copy --to "$work/vm-dst" --to-password-file "$work/password2" > "$work/copy2.json"
t2=$(now)
field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
echo "| repo copy, vm v1 + v2 ($(mb $vm_in) MB of images, $(mb $src_stored) MB stored) | $(printf '%.1f' "$secs") s: $(rate $src_stored "$secs") MB/s of stored data, $(field "$work/copy1.json" blobs_read) blobs read, $(mb "$(field "$work/copy1.json" bytes_stored)") MB stored |"
echo "| repo copy again | $(printf '%.1f' "$(echo "$t2 - $t0" | bc)") s, $(field "$work/copy2.json" blobs_read) blobs read, $(field "$work/copy2.json" bytes_stored) B stored |"
echo
echo "repo: $("$bin" --version); $(nproc) cores"
