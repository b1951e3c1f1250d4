#!/usr/bin/env bash
# The verification issue's figures, from one run:
#
#   1. the bench VM (benches/vm-lib.sh: Debian 12 with systemd, the guest agent, DHCP and
#      a web service, 4 GiB qcow2, TCG) backed up, then `repo verify vm` with each test
#      (boot, boot_ping, boot_ping_services with http, full with a script in the guest):
#      total seconds, and how much of it is the guest's boot and checks against our own
#      work (recovery: mount, overlays, define, lab; cleanup);
#   2. the same snapshot restored in full and booted (`repo restore --vm`, `virsh start`,
#      the agent answering): what a verification by restore would cost before its checks;
#   3. a PostgreSQL database of about 2 GiB (pgbench's tables, scale 140) backed up, then
#      `repo verify db`: total seconds and each step's.
#
# Run as root with libvirtd, dockerd and the postgres:15 image (scripts/start-services.sh).
# Prints Markdown tables; the page cache is dropped before each timed step.
# Usage: benches/verify.sh [path/to/repo-binary]    (SCALE=140: pgbench's scale)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-$here/../target/release/repo}"
work="${WORK:-/var/tmp/cairn-bench-verify}"
cache="${CACHE:-/var/cache/cairn/bench-vm}"
guest="${CAIRN_TEST_GUEST:-/var/cache/cairn/test-guest}"
scale="${SCALE:-140}"
PG=/usr/lib/postgresql/15/bin
export REPO_PASSWORD=bench-not-a-secret REPO_CONFIG=/nonexistent REPO_REPOSITORY=$work/repo
export CAIRN_STATE_DIR=$work/state
export PATH="$PATH:/usr/sbin:/sbin"
vm=cairn-bench-verify
# shellcheck source=benches/vm-lib.sh
. "$here/vm-lib.sh"
[ -f "$cache/ready" ] || build_image
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
as_pg() { runuser -u postgres -- "$@"; }

# A verification's record: "total restore boot checks cleanup" in seconds (checks: ping,
# services and scripts together).
split() {
  python3 -c '
import json, sys
v = json.load(sys.stdin)
steps = {s["name"]: s["seconds"] for s in v["steps"]}
restore = steps.get("restore", steps.get("start", 0))
boot = steps.get("boot", 0)
cleanup = steps.get("cleanup", 0)
checks = sum(s for n, s in steps.items() if n not in ("restore", "start", "boot", "cleanup"))
bad = [s["name"] for s in v["steps"] if s["result"] == "failed"]
print("%.1f %.1f %.1f %.1f %.1f %s %s" % (v["seconds"], restore, boot, checks, cleanup, v["status"], ",".join(bad) or "-"))'
}

# --- the VM -----------------------------------------------------------------------------
"$bin" recover stop --all >/dev/null 2>&1 || true
for d in $vm $vm-restored; do undefine "$d"; done
for p in $(pgrep -f "$work/" || true); do kill "$p" 2>/dev/null || true; done
rm -rf "$work"; mkdir -p "$work/sock" "$work/src"; chmod 755 "$work"
cp --sparse=always "$cache/disk-4G.qcow2" "$work/vda.qcow2"
chown libvirt-qemu:libvirt-qemu "$work/vda.qcow2" 2>/dev/null || true
define $vm "$work/vda.qcow2"
"$bin" init -q
virsh start $vm >/dev/null; wait_agent $vm >/dev/null
"$bin" backup -q --vm $vm
guest_poweroff $vm
snap=$(last_snapshot)
printf 'test -s /etc/hostname && ls /opt/payload >/dev/null && systemctl is-active cairn-httpd\n' > "$work/check.sh"

declare -A row
for test in boot boot_ping boot_ping_services full; do
  args=(--test "$test" --timeout 5m)
  case $test in
    boot_ping_services) args+=(--services http) ;;
    full) args+=(--services http --script "$work/check.sh") ;;
  esac
  drop
  "$bin" verify vm "$snap" "${args[@]}" --json > "$work/$test.json" || true
  row[$test]=$(split < "$work/$test.json")
done

drop
t0=$(now)
"$bin" restore "$snap" --vm --name $vm-restored --to "$work/restored" >/dev/null
t1=$(now)
virsh start $vm-restored >/dev/null; wait_agent $vm-restored >/dev/null
t2=$(now)
restore_s=$(secs "$t0" "$t1"); restore_boot_s=$(secs "$t0" "$t2"); boot_s=$(secs "$t1" "$t2")
undefine $vm-restored
undefine $vm
rm -rf "$work/restored"

# --- the database -----------------------------------------------------------------------
chown postgres:postgres "$work/sock" "$work/src"
as_pg $PG/initdb -A trust -U postgres --no-sync -D "$work/src" >/dev/null
as_pg $PG/postgres -D "$work/src" -k "$work/sock" -p 25998 -c listen_addresses= \
  -c max_wal_size=8GB -c checkpoint_timeout=1h >"$work/src.log" 2>&1 &
src_pid=$!
trap 'kill $src_pid 2>/dev/null || true' EXIT
until $PG/pg_isready -q -h "$work/sock" -p 25998; do sleep 0.2; done
as_pg $PG/pgbench -i -q -s "$scale" -h "$work/sock" -p 25998 postgres >/dev/null 2>&1
as_pg psql -h "$work/sock" -p 25998 -XAtqc "VACUUM ANALYZE" postgres
as_pg psql -h "$work/sock" -p 25998 -XAtqc "CHECKPOINT" postgres
db_bytes=$(as_pg psql -h "$work/sock" -p 25998 -XAtqc "SELECT pg_database_size('postgres')" postgres)
"$bin" backup -q --postgres "host=$work/sock port=25998 user=postgres dbname=postgres"
kill -INT "$(head -1 "$work/src/postmaster.pid")"; wait $src_pid || true
drop
"$bin" verify db latest --query "SELECT aid FROM pgbench_accounts WHERE aid = 1" --expect-rows 1 \
  --json > "$work/db.json" || true
db_steps=$(python3 -c '
import json, sys
v = json.load(open(sys.argv[1]))
print("%.1f s, %s: " % (v["seconds"], v["status"]) + ", ".join("%s %.1f s" % (s["name"], s["seconds"]) for s in v["steps"]))' "$work/db.json")

# --- the tables -------------------------------------------------------------------------
echo "Bench VM: Debian 12 with systemd, the guest agent, DHCP and a web service; 4 GiB qcow2; TCG, 1 vCPU."
echo
echo "| test | total s | status (failed step) | recovery s | boot s | checks s | cleanup s | ours (recovery + cleanup) |"
echo "|---|---:|---|---:|---:|---:|---:|---:|"
for test in boot boot_ping boot_ping_services full; do
  read -r total rec boot checks clean status bad <<<"${row[$test]}"
  ours=$(awk -v a="$rec" -v b="$clean" -v t="$total" 'BEGIN{printf "%.1f (%.0f %%)", a+b, (a+b)*100/t}')
  echo "| $test | $total | $status ($bad) | $rec | $boot | $checks | $clean | $ours |"
done
echo
echo "| by full restore | seconds |"
echo "|---|---:|"
echo "| \`repo restore --vm\` | $restore_s |"
echo "| then boot to the agent | $boot_s |"
echo "| restore + boot, before any check | $restore_boot_s |"
echo
echo "Database: PostgreSQL 15, pgbench scale $scale, $(mib "$db_bytes") MiB: verify db $db_steps"
