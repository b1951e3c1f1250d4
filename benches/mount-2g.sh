#!/usr/bin/env bash
# Reads through the FUSE mount of a 2 GiB file, against a restore of the same file, for
# cairn, borg and restic (the mount issue's figures). Run as root after
# ../shared/bench/install-peers.sh. Prints a Markdown table.
# Usage: benches/mount-2g.sh [path/to/repo-binary]   (CONFIGS="cairn borg restic")
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-$here/../target/release/repo}"
bench="${BENCH_DIR:-$here/../../shared/bench}"
work="${WORK:-/var/tmp/cairn-bench-mount}"
configs="${CONFIGS:-cairn borg restic}"
BORG=/opt/peers/borg/bin/borg
RESTIC=${RESTIC:-/usr/bin/restic}
export BENCH_PASSWORD=bench-not-a-secret REPO_CONFIG=/nonexistent
export BORG_PASSPHRASE=$BENCH_PASSWORD RESTIC_PASSWORD=$BENCH_PASSWORD REPO_PASSWORD=$BENCH_PASSWORD
export BORG_BASE_DIR=$work/home/borg RESTIC_CACHE_DIR=$work/home/restic-cache
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
mkdir -p "$work/data"
big="$work/data/big.bin"
if [ ! -f "$big" ]; then
  # Real, mixed content: a tar of /usr, cut at 2 GiB.
  tar -cf - /usr 2>/dev/null | head -c 2147483648 > "$big" || true
fi
size=$(stat -c %s "$big")
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", b-a}'; }

echo "| tool | restore s | restore MB/s | mount seq read s | seq MB/s | seq / restore | random 4 KiB reads/s | p50 ms | p99 ms |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for c in $configs; do
  repo="$work/repo-$c" mnt="$work/mnt-$c" dest="$work/restore-$c"
  rm -rf "$repo" "$dest"; mkdir -p "$mnt" "$dest"
  case $c in
    cairn)  REPO_REPOSITORY=$repo "$bin" init -q; REPO_REPOSITORY=$repo "$bin" backup -q "$work/data" ;;
    borg)   "$BORG" init -e repokey-blake2 "$repo"; "$BORG" create --compression lz4 "$repo::v1" "$work/data" ;;
    restic) "$RESTIC" -r "$repo" init -q; "$RESTIC" -r "$repo" backup -q "$work/data" ;;
  esac >/dev/null 2>&1
  drop; t0=$(date +%s.%N)
  case $c in
    cairn)  REPO_REPOSITORY=$repo "$bin" restore -q latest --target "$dest" ;;
    borg)   (cd "$dest" && "$BORG" extract "$repo::v1") ;;
    restic) "$RESTIC" -r "$repo" restore -q latest --target "$dest" ;;
  esac >/dev/null 2>&1
  sync; t1=$(date +%s.%N); restore=$(secs "$t0" "$t1")
  cmp -s "$big" "$dest$big" || { echo "$c: restored file differs" >&2; exit 1; }
  case $c in
    cairn)  REPO_REPOSITORY=$repo "$bin" mount "$mnt" ;;
    borg)   "$BORG" mount -f "$repo::v1" "$mnt" ;;
    restic) "$RESTIC" -r "$repo" mount --allow-other=false "$mnt" ;;
  esac >"$work/mount-$c.log" 2>&1 &
  pid=$!
  f=""
  for _ in $(seq 600); do
    f=$(find "$mnt" -maxdepth 12 -name big.bin -path "*$work/data/big.bin" 2>/dev/null | head -1)
    [ -n "$f" ] && break; sleep 0.2
  done
  [ -n "$f" ] || { echo "$c: file not visible in the mount" >&2; kill $pid; exit 1; }
  drop; t0=$(date +%s.%N); dd if="$f" of=/dev/null bs=1M status=none; t1=$(date +%s.%N); seq=$(secs "$t0" "$t1")
  drop; rr=$(python3 "$bench/randread.py" "$f" 2000 4096 1)
  fusermount3 -u "$mnt" 2>/dev/null || umount -l "$mnt"; wait $pid 2>/dev/null || true
  rm -rf "$dest"
  python3 - "$c" "$restore" "$seq" "$size" "$rr" <<'PY'
import json, sys
c, restore, seq, size, rr = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
mb = size / 1e6
print(f"| {c} | {restore:.2f} | {mb/restore:.0f} | {seq:.2f} | {mb/seq:.0f} | {restore/seq:.2f} | {rr['reads_per_s']} | {rr['p50_ms']} | {rr['p99_ms']} |")
PY
done
