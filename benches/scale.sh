#!/usr/bin/env bash
# benches/scale.sh — the curves behind docs/SCALE.md: how the host's index, the memory of
# backup, check, prune and the mount, and the S3 requests of a backup and a prune grow
# with the number of blobs in a repository.
#
#   bash benches/scale.sh                 # 10k, 100k and 1M blobs
#   SIZES="10000 100000" bash benches/scale.sh
#
# A repository in S3 (s3s-fs on 127.0.0.1) cut with tiny chunks (--chunk-sizes 64,256,1K)
# so that N blobs take N x 256 bytes of random data: the per-blob costs are what is
# measured, without terabytes. Each size: a backup of the data (N blobs), a second
# backup with half of it changed, `forget` of the first, `prune`, `check`, and the mount
# reading 4 MiB of the file. Memory is the peak RSS (`/usr/bin/time -f %M`, the mount's
# VmHWM); requests are counted by the server. Output: a Markdown table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO_BIN=${REPO_BIN:-$PWD/target/release/repo}
S3S=${S3S:-/var/cache/cairn/s3s/bin/s3s-fs}
WORK=${WORK:-/var/tmp/cairn-bench-scale}
PORT=${PORT:-18101}
SIZES=${SIZES:-"10000 100000 1000000"}

rm -rf "$WORK"; mkdir -p "$WORK/s3/scale" "$WORK/mnt"
RUST_LOG=s3s=debug "$S3S" --host 127.0.0.1 --port "$PORT" --access-key scale --secret-key scale-secret \
  "$WORK/s3" > "$WORK/s3.log" 2>&1 &
S3PID=$!
trap 'kill $S3PID 2>/dev/null || true; fusermount -u "$WORK/mnt" 2>/dev/null || true' EXIT
sleep 1
export AWS_ACCESS_KEY_ID=scale AWS_SECRET_ACCESS_KEY=scale-secret
export HOME=$WORK/home REPO_PASSWORD=scale

requests() { grep -c 's3s::service: req: Request' "$WORK/s3.log" || true; }
# run LABEL cmd...: sets SECS, RSS_KB, REQ
run() {
  local before; before=$(requests)
  local t0; t0=$(date +%s.%N)
  /usr/bin/time -f %M -o "$WORK/rss" "$@" > "$WORK/last.log" 2>&1 || { cat "$WORK/last.log" >&2; exit 1; }
  SECS=$(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)")
  RSS_KB=$(tail -1 "$WORK/rss")
  REQ=$(( $(requests) - before ))
}

echo "| blobs | index B | B/blob | backup s | backup MiB | backup req | check s | check MiB | prune s | prune MiB | prune req | mount MiB | open req |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for n in $SIZES; do
  R="s3://scale/n$n?endpoint=http://127.0.0.1:$PORT"
  data=$WORK/data-$n; mkdir -p "$data"
  head -c $(( n * 256 )) /dev/urandom > "$data/blob-source"
  "$REPO_BIN" -r "$R" init --chunk-sizes 64,256,1K > /dev/null
  run "$REPO_BIN" -r "$R" backup "$data"
  b_s=$SECS b_rss=$RSS_KB b_req=$REQ
  first=$("$REPO_BIN" -r "$R" snapshots --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
  index=$(du -b "$HOME"/.cache/cairn/*/index.sqlite | sort -n | tail -1 | cut -f1)
  # Half the data changed, the first snapshot forgotten: prune has half to delete.
  head -c $(( n * 128 )) /dev/urandom | dd of="$data/blob-source" conv=notrunc status=none
  "$REPO_BIN" -r "$R" backup "$data" > /dev/null
  "$REPO_BIN" -r "$R" forget "$first" > /dev/null
  run "$REPO_BIN" -r "$R" prune --max-unused 0%
  p_s=$SECS p_rss=$RSS_KB p_req=$REQ
  run "$REPO_BIN" -r "$R" check
  c_s=$SECS c_rss=$RSS_KB
  # An open of an unchanged repository by this host: its cost in requests.
  run "$REPO_BIN" -r "$R" snapshots
  o_req=$REQ
  "$REPO_BIN" -r "$R" mount "$WORK/mnt" --daemon > /dev/null
  pid=$(pgrep -n -f "mount $WORK/mnt")
  # 4 MiB read through it (16k blobs of 256 B: each is one ranged GET the first time).
  dd if="$(ls -d "$WORK"/mnt/snapshots/* | tail -1)$data/blob-source" of=/dev/null bs=1M count=4 status=none
  m_kb=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  fusermount -u "$WORK/mnt"
  echo "| $n | $index | $(( index / n )) | $b_s | $(( b_rss / 1024 )) | $b_req | $c_s | $(( c_rss / 1024 )) | $p_s | $(( p_rss / 1024 )) | $p_req | $(( m_kb / 1024 )) | $o_req |"
  rm -rf "$data"
done
echo
echo "repo: $("$REPO_BIN" --version)"
