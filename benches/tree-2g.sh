#!/usr/bin/env bash
# Backup and restore throughput of a ~2 GiB file tree (a copy of parts of /usr), with
# peak memory, for the engine issue's figures. Run as root (drops the page cache before
# each timed phase). Usage: benches/tree-2g.sh [path/to/repo-binary]
set -euo pipefail
bin="${1:-$(cd "$(dirname "$0")/.." && pwd)/target/release/repo}"
work="${WORK:-/var/tmp/cairn-bench-2g}"
data="$work/data"
mkdir -p "$work"
if [ ! -f "$work/.data-done" ]; then
  rm -rf "$data"; mkdir -p "$data"
  # Real files of every size, about 2 GiB in all.
  for d in /usr/share /usr/bin /usr/lib/x86_64-linux-gnu /usr/lib/python3 /usr/libexec /usr/include /usr/lib/llvm-14 /usr/lib/gcc /usr/lib/jvm /usr/lib; do
    [ -d "$d" ] && cp -a "$d" "$data/$(echo "$d" | tr / _)"
    [ "$(du -sb "$data" | cut -f1)" -gt 2147483648 ] && break
  done
  touch "$work/.data-done"
fi
bytes=$(du -sb --apparent-size "$data" | cut -f1)
files=$(find "$data" -type f | wc -l)
export REPO_REPOSITORY="$work/repo" REPO_PASSWORD=bench REPO_CONFIG=/nonexistent
rm -rf "$work/repo" "$work/restore"
"$bin" init -q
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
phase() { # name, command...
  local name=$1; shift
  drop
  local t0; t0=$(date +%s.%N)
  /usr/bin/time -f "%M" -o "$work/rss" "$@" >/dev/null
  sync
  local t1; t1=$(date +%s.%N)
  local s; s=$(echo "$t1 - $t0" | bc)
  printf '| %s | %.2f | %.0f | %d |\n' "$name" "$s" "$(echo "$bytes / $s / 1000000" | bc -l)" "$(( $(cat "$work/rss") / 1024 ))"
}
echo "data: $files files, $bytes bytes ($(numfmt --to=iec "$bytes")) in $data; $(nproc) cores"
echo
echo "| phase | seconds | MB/s | peak RSS MiB |"
echo "|---|---:|---:|---:|"
phase "first backup" "$bin" backup -q "$data"
echo "| repository after first backup | $(du -sb "$work/repo" | cut -f1) bytes | | |"
phase "unchanged backup" "$bin" backup -q "$data"
phase "restore" "$bin" restore -q latest --target "$work/restore"
diff -r --no-dereference "$data" "$work/restore$data" >/dev/null && echo "restore verified: identical (diff -r)"
