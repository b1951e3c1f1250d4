#!/usr/bin/env bash
# Retention and verification at scale, beside restic and borg (issue 6's figures):
# N (200) snapshots of a tree into which each step writes one new FILE_MIB (26) MiB file of
# random bytes and from which it deletes the file written WINDOW (40) steps before, so the
# source stays ~1 GiB while every repository accumulates N x FILE_MIB (~5.2 GiB) of unique,
# incompressible data. Then, with the page cache dropped before each phase:
#   check --read-data (restic check --read-data, borg check --verify-data): seconds, MB/s of
#     repository, peak RSS;
#   forget --keep-last KEEP (50) --prune (restic forget --prune; borg prune + compact):
#     seconds, peak RSS, repository size before and after.
# Finally our repository is checked again and its latest snapshot restored and compared.
# Run as root. Usage: benches/maintenance-200.sh [path/to/repo-binary]
# Env: TOOLS="cairn restic borg" N=200 FILE_MIB=26 WINDOW=40 KEEP=50 WORK=/var/tmp/cairn-bench-maint
set -euo pipefail
bin="${1:-$(cd "$(dirname "$0")/.." && pwd)/target/release/repo}"
TOOLS=${TOOLS:-cairn restic borg}
N=${N:-200}; FILE_MIB=${FILE_MIB:-26}; WINDOW=${WINDOW:-40}; KEEP=${KEEP:-50}
work="${WORK:-/var/tmp/cairn-bench-maint}"
BORG=${BORG:-/opt/peers/borg/bin/borg}; RESTIC=${RESTIC:-/usr/bin/restic}
export REPO_PASSWORD=bench-not-a-secret REPO_CONFIG=/nonexistent
export BORG_PASSPHRASE=$REPO_PASSWORD RESTIC_PASSWORD=$REPO_PASSWORD
export BORG_BASE_DIR=$work/home/borg RESTIC_CACHE_DIR=$work/home/restic-cache
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
src=$work/src; repos=$work/repos
rm -rf "$work"; mkdir -p "$src" "$repos" "$work/home"
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
size() { du -sb "$1" | cut -f1; }
for t in $TOOLS; do
  case $t in
    cairn) "$bin" -r "$repos/cairn" init -q ;;
    restic) "$RESTIC" -q -r "$repos/restic" init >/dev/null ;;
    borg) "$BORG" init -e repokey-blake2 "$repos/borg" ;;
  esac
done
declare -A backup_s
t0=$(date +%s)
for i in $(seq 1 "$N"); do
  head -c "${FILE_MIB}M" /dev/urandom > "$src/f$i"
  rm -f "$src/f$((i - WINDOW))"
  date +%s.%N >> "$src/log.txt"
  for t in $TOOLS; do
    s0=$(date +%s.%N)
    case $t in
      cairn) "$bin" -r "$repos/cairn" backup -q "$src" ;;
      restic) "$RESTIC" -q -r "$repos/restic" backup --host bench "$src" >/dev/null ;;
      borg) "$BORG" create "$repos/borg::s$i" "$src" ;;
    esac
    backup_s[$t]=$(echo "${backup_s[$t]:-0} + $(date +%s.%N) - $s0" | bc)
  done
  [ $((i % 20)) = 0 ] && echo "step $i/$N ($(( $(date +%s) - t0 )) s)" >&2
done
timed() { # out-prefix, command...: prints "seconds maxrss_kib"
  local out=$1; shift
  drop
  local a; a=$(date +%s.%N)
  /usr/bin/time -f "%M" -o "$out.rss" "$@" > "$out.log" 2>&1 || { echo "FAILED: $*" >&2; tail "$out.log" >&2; return 1; }
  printf '%.2f %s\n' "$(echo "$(date +%s.%N) - $a" | bc)" "$(cat "$out.rss")"
}
echo
echo "$N snapshots; each step adds one ${FILE_MIB} MiB random file and deletes the one from $WINDOW steps before; $(nproc) cores"
echo
echo "| tool | backups (sum, s) | repository | check --read-data s | MB/s | peak RSS MiB | forget --prune s | peak RSS MiB | repository after |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for t in $TOOLS; do
  r=$repos/$t; before=$(size "$r")
  case $t in
    cairn) c=$(timed "$work/$t-check" "$bin" -r "$r" check --read-data -q)
           p=$(timed "$work/$t-prune" "$bin" -r "$r" forget -q --keep-last "$KEEP" --prune --grace 0) ;;
    restic) c=$(timed "$work/$t-check" "$RESTIC" -q -r "$r" check --read-data)
            p=$(timed "$work/$t-prune" "$RESTIC" -q -r "$r" forget --keep-last "$KEEP" --prune) ;;
    borg) c=$(timed "$work/$t-check" "$BORG" check --verify-data "$r")
          p=$(timed "$work/$t-prune" sh -c "'$BORG' prune --keep-last $KEEP '$r' && '$BORG' compact '$r'") ;;
  esac
  read -r cs crss <<<"$c"; read -r ps prss <<<"$p"
  printf '| %s | %.1f | %s | %s | %.0f | %d | %s | %d | %s |\n' "$t" "${backup_s[$t]}" \
    "$(numfmt --to=iec-i --suffix=B "$before")" "$cs" "$(echo "$before / $cs / 1000000" | bc -l)" \
    "$((crss / 1024))" "$ps" "$((prss / 1024))" "$(numfmt --to=iec-i --suffix=B "$(size "$r")")"
done
if [[ " $TOOLS " == *" cairn "* ]]; then
  "$bin" -r "$repos/cairn" check --read-data -q && echo "cairn: check --read-data after the prune: no problems"
  rm -rf "$work/restore"; "$bin" -r "$repos/cairn" restore -q latest --target "$work/restore"
  diff -r "$src" "$work/restore$src" >/dev/null && echo "cairn: latest snapshot restored identical (diff -r)"
  echo "cairn: $("$bin" -r "$repos/cairn" snapshots --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))') snapshots kept"
fi
