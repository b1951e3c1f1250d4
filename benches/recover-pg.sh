#!/usr/bin/env bash
# Instant recovery against restore, for a PostgreSQL database of >= 1 GiB (the database
# issue's figures). Run as root with dockerd running and the postgres:15 image built
# (scripts/start-services.sh). Prints a Markdown table.
# Usage: benches/recover-pg.sh [path/to/repo-binary]   (SCALE=70: pgbench scale, ~1.05 GiB)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-$here/../target/release/repo}"
work="${WORK:-/var/tmp/cairn-bench-recover}"
scale="${SCALE:-70}"
PG=/usr/lib/postgresql/15/bin
export REPO_PASSWORD=bench-not-a-secret REPO_CONFIG=/nonexistent REPO_REPOSITORY=$work/repo
export CAIRN_STATE_DIR=$work/state
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", b-a}'; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
as_pg() { runuser -u postgres -- "$@"; }

"$bin" recover stop --all >/dev/null 2>&1 || true
for p in $(pgrep -f "$work/" || true); do kill "$p" 2>/dev/null || true; done
rm -rf "$work"; mkdir -p "$work/sock" "$work/src"; chmod 755 "$work"
chown postgres:postgres "$work/sock" "$work/src"
as_pg $PG/initdb -A trust -U postgres --no-sync -D "$work/src" >/dev/null
as_pg $PG/postgres -D "$work/src" -k "$work/sock" -p 25999 -c listen_addresses= \
  -c max_wal_size=4GB >"$work/src.log" 2>&1 &
src_pid=$!
trap 'kill $src_pid 2>/dev/null || true' EXIT
until $PG/pg_isready -q -h "$work/sock" -p 25999; do sleep 0.2; done
as_pg $PG/pgbench -i -q -s "$scale" -h "$work/sock" -p 25999 postgres >/dev/null 2>&1
db_bytes=$(as_pg psql -h "$work/sock" -p 25999 -XAtc "SELECT pg_database_size('postgres')")
conn="host=$work/sock port=25999 user=postgres dbname=postgres"
q="SELECT count(*), sum(abalance) FROM pgbench_accounts"
expected=$(as_pg psql -h "$work/sock" -p 25999 -XAtc "$q")

"$bin" init -q
drop; t0=$(now)
"$bin" backup -q --postgres "$conn"
t1=$(now); backup_s=$(secs "$t0" "$t1")
repo_bytes=$(du -sb "$work/repo" | cut -f1)
snap=$("$bin" snapshots --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')

# Instant recovery: from the command to the first answered query.
drop; t0=$(now)
session=$("$bin" recover db "$snap" --json)
conn_r=$(printf '%s' "$session" | python3 -c 'import json,sys; print(json.load(sys.stdin)["connection"])')
got=$(psql "$conn_r" -XAtc "SELECT 1")
t1=$(now); recover_s=$(secs "$t0" "$t1")
# The first full scan through the mount (cold) and what it copied up.
t0=$(now); got=$(psql "$conn_r" -XAtc "$q"); t1=$(now); scan_s=$(secs "$t0" "$t1")
[ "$got" = "$expected" ] || { echo "recovered answer $got != $expected" >&2; exit 1; }
id=$(printf '%s' "$session" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
upper_ro=$(du -sb "$work/state/sessions/$id/upper" | cut -f1)
"$bin" recover stop "$id" >/dev/null
# A writable session: one row updated in the big table.
session=$("$bin" recover db "$snap" --writable --json)
conn_w=$(printf '%s' "$session" | python3 -c 'import json,sys; print(json.load(sys.stdin)["connection"])')
id=$(printf '%s' "$session" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
t0=$(now); psql "$conn_w" -XAtqc "UPDATE pgbench_accounts SET abalance = 1 WHERE aid = 1"; t1=$(now)
update_s=$(secs "$t0" "$t1")
upper_rw=$(du -sb "$work/state/sessions/$id/upper" | cut -f1)
"$bin" recover stop "$id" >/dev/null

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

mib() { awk -v b="$1" 'BEGIN{printf "%.0f", b/1048576}'; }
echo "| database | backup s | repository | recover db -> first query s | first full scan s | copied up (read-only scan) | UPDATE 1 row s | copied up (1 row) | restore s | restore + start -> first query s |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
echo "| pgbench -s $scale, $(mib "$db_bytes") MiB | $backup_s | $(mib "$repo_bytes") MiB | $recover_s | $scan_s | $(mib "$upper_ro") MiB | $update_s | $(mib "$upper_rw") MiB | $restore_s | $restore_total_s |"
