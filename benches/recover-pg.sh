#!/usr/bin/env bash
# Instant recovery against restore plus start, for a PostgreSQL database of rows of
# random text (an orders table of md5 strings: it does not compress 22:1 like pgbench's
# filler), on the mount's block layer and on overlayfs, from the same run. Run as root
# with dockerd running and the postgres:15 image built (scripts/start-services.sh).
# Prints a Markdown table; page cache dropped before each timed step.
# Usage: benches/recover-pg.sh [path/to/repo-binary]
#   GIB=2: the table's size in GiB; CHUNKS="64K": the block layer's copy-on-write chunk
#   sizes to run (one row each, e.g. "16K 64K 256K"); SESSIONS=10: concurrent sessions.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-$here/../target/release/repo}"
work="${WORK:-/var/tmp/cairn-bench-recover}"
gib="${GIB:-2}"
PG=/usr/lib/postgresql/15/bin
export REPO_PASSWORD=bench-not-a-secret REPO_CONFIG=/nonexistent REPO_REPOSITORY=$work/repo
export CAIRN_STATE_DIR=$work/state
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", b-a}'; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
as_pg() { runuser -u postgres -- "$@"; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }
mib() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1048576}'; }

"$bin" recover stop --all >/dev/null 2>&1 || true
for p in $(pgrep -f "$work/" || true); do kill "$p" 2>/dev/null || true; done
rm -rf "$work"; mkdir -p "$work/sock" "$work/src"; chmod 755 "$work"
chown postgres:postgres "$work/sock" "$work/src"
as_pg $PG/initdb -A trust -U postgres --no-sync -D "$work/src" >/dev/null
as_pg $PG/postgres -D "$work/src" -k "$work/sock" -p 25999 -c listen_addresses= \
  -c max_wal_size=8GB -c checkpoint_timeout=1h >"$work/src.log" 2>&1 &
src_pid=$!
trap 'kill $src_pid 2>/dev/null || true' EXIT
until $PG/pg_isready -q -h "$work/sock" -p 25999; do sleep 0.2; done
src() { as_pg psql -h "$work/sock" -p 25999 -XAtqc "$1" postgres; }
# ~190 bytes a row on disk with its index share: GIB GiB of rows.
rows=$((gib * 5600000))
src "CREATE TABLE orders (id bigint, customer text, item text, note text)"
# Up to 2 GiB of rows made with md5 (CPU-bound: about 8 minutes for 2 GiB here); beyond
# that, copies of those rows under new ids (as incompressible, no two pages alike, and
# ten times quicker to make). The primary key is built once, at the end.
base_rows=$(( rows < 11200000 ? rows : 11200000 ))
step=2000000
for ((from = 1; from <= base_rows; from += step)); do
  to=$((from + step - 1)); [ $to -le $base_rows ] || to=$base_rows
  src "INSERT INTO orders SELECT g, md5(g::text || 'c'), md5(random()::text), md5(random()::text) || md5(random()::text) FROM generate_series($from, $to) g"
done
for ((copied = base_rows; copied < rows; copied += base_rows)); do
  src "INSERT INTO orders SELECT id + $copied, customer, item, note FROM orders WHERE id <= $base_rows AND id + $copied <= $rows"
done
src "ALTER TABLE orders ADD PRIMARY KEY (id)"
# An established table has been vacuumed: without this the backup would catch
# autovacuum's first pass over the new rows, and every recovery would replay it.
src "VACUUM ANALYZE orders"
src "CHECKPOINT"
db_bytes=$(src "SELECT pg_database_size('postgres')")
conn="host=$work/sock port=25999 user=postgres dbname=postgres"
point="SELECT customer FROM orders WHERE id = $((rows / 2))"
scan="SELECT count(*), md5(string_agg(item, '' ORDER BY id)) FROM orders WHERE id % 1000 = 0"
full="SELECT count(*), sum(length(note)) FROM orders"
expected_point=$(src "$point")
expected_full=$(src "$full")

"$bin" init -q
drop; t0=$(now)
"$bin" backup -q --postgres "$conn"
t1=$(now); backup_s=$(secs "$t0" "$t1")
repo_bytes=$(du -sb "$work/repo" | cut -f1)
snap=$("$bin" snapshots --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')
# The source is no longer needed: its disk space goes to the layers and the restore.
kill -INT "$(head -1 "$work/src/postmaster.pid")"; wait $src_pid || true; rm -rf "$work/src"

layer_bytes() { "$bin" recover list --json | python3 -c "import json,sys; print([s for s in json.load(sys.stdin) if s['id']=='$1'][0]['layer_bytes'])"; }
mount_rss() {
  local pid; pid=$("$bin" recover list --json | python3 -c "import json,sys; print([s for s in json.load(sys.stdin) if s['id']=='$1'][0]['mount_pid'])")
  awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$pid/status"
}

# One layer: recover -> first answered query, point query, full scan, layer bytes after
# the read-only scan and after a 1-row UPDATE (writable session), the mount's peak RSS.
run_layer() {
  local layer=$1 chunk=${2:-}
  drop; local t0; t0=$(now)
  local session; session=$("$bin" recover db "$snap" --writable --layer "$layer" ${chunk:+--chunk-size "$chunk"} --json)
  local c; c=$(printf '%s' "$session" | field connection)
  psql "$c" -XAtc "SELECT 1" >/dev/null
  local t1; t1=$(now); local first_s; first_s=$(secs "$t0" "$t1")
  local id; id=$(printf '%s' "$session" | field id)
  local started; started=$(layer_bytes "$id")
  t0=$(now); local got; got=$(psql "$c" -XAtc "$point"); t1=$(now)
  [ "$got" = "$expected_point" ] || { echo "point query: $got != $expected_point" >&2; exit 1; }
  local point_s; point_s=$(secs "$t0" "$t1")
  t0=$(now); got=$(psql "$c" -XAtc "$full"); t1=$(now)
  [ "$got" = "$expected_full" ] || { echo "full scan: $got != $expected_full" >&2; exit 1; }
  local full_s; full_s=$(secs "$t0" "$t1")
  psql "$c" -XAtc "$scan" >/dev/null
  local ro; ro=$(layer_bytes "$id")
  psql "$c" -XAtqc "UPDATE orders SET note = 'changed' WHERE id = 7; CHECKPOINT"
  local rw; rw=$(layer_bytes "$id")
  local rss; rss=$(mount_rss "$id")
  "$bin" recover stop "$id" >/dev/null
  echo "| $layer${chunk:+ $chunk} | $first_s | $point_s | $full_s | $(mib "$started") MiB | $(mib "$ro") MiB | +$(mib $((rw - ro))) MiB | $rss MiB |"
}
block=""
for chunk in ${CHUNKS:-64K}; do block+="$(run_layer block "$chunk")"$'\n'; done
overlay=$(run_layer overlay)

# For comparison: a full restore, then the server started on it, to the first query.
drop; t0=$(now)
"$bin" restore -q "$snap" --target "$work/restored"
chown postgres:postgres "$work/restored"; chmod 700 "$work/restored"
t_restored=$(now)
mkdir -p "$work/sock2"; chown postgres:postgres "$work/sock2"
as_pg $PG/postgres -D "$work/restored" -k "$work/sock2" -p 25998 -c listen_addresses= \
  >"$work/restored.log" 2>&1 &
r_pid=$!
until as_pg psql -h "$work/sock2" -p 25998 -XAtc "SELECT 1" >/dev/null 2>&1; do sleep 0.1; done
t1=$(now)
restore_s=$(secs "$t0" "$t_restored"); restore_total_s=$(secs "$t0" "$t1")
kill -INT "$(head -1 "$work/restored/postmaster.pid")"; wait $r_pid || true

echo "database: $rows rows of random text, $(mib "$db_bytes") MiB; backup ${backup_s} s; repository $(mib "$repo_bytes") MiB"
echo "restore ${restore_s} s; restore + start -> first query ${restore_total_s} s"
echo
echo "| layer | recover db -> first query s | point query s | full scan s | layer at first query | layer after the scans | 1-row UPDATE + CHECKPOINT | mount peak RSS |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
printf '%s' "$block"
echo "$overlay"

# Many sessions at once (block layer, read-only, Docker): the host's memory.
sessions="${SESSIONS:-10}"
if [ "$sessions" -gt 0 ]; then
  avail() { awk '/MemAvailable/ {print $2}' /proc/meminfo; }
  before=$(avail); ids=()
  for ((i = 0; i < sessions; i++)); do
    s=$("$bin" recover db "$snap" --json)
    ids+=("$(printf '%s' "$s" | field id)")
    psql "$(printf '%s' "$s" | field connection)" -XAtc "$point" >/dev/null
  done
  rss=(); for id in "${ids[@]}"; do rss+=("$(mount_rss "$id")"); done
  after=$(avail)
  "$bin" recover stop --all >/dev/null
  echo
  echo "$sessions concurrent sessions: mount peak RSS each ${rss[*]} MiB; host MemAvailable $((before / 1024)) -> $((after / 1024)) MiB"
fi
