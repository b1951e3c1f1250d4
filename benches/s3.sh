#!/usr/bin/env bash
# benches/s3.sh — cairn (and restic and rustic, when installed) over S3 on loopback: a real S3 server
# (s3s-fs, built by scripts/install-deps.sh --test) on 127.0.0.1, the same data for both.
#
#   bash benches/s3.sh                     # a synthetic 1 GiB tree (v1) and a 5%-changed v2
#   V1=/var/tmp/bench-data/files-v1 V2=/var/tmp/bench-data/files-v2 bash benches/s3.sh
#
# Phases per tool: first backup of V1, unchanged re-backup, backup of V2, restore of V2
# (checked with diff -r), and for cairn 2000 random 4 KiB reads through the mount.
# Requests are counted by the server (its debug log: one line per request, by operation);
# object stores bill per request. Output: a Markdown table on stdout. Page cache dropped
# before each phase when run as root. Needs: s3s-fs, a release build of repo.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO_BIN=${REPO_BIN:-$PWD/target/release/repo}
S3S=${S3S:-/var/cache/cairn/s3s/bin/s3s-fs}
RUSTIC=${RUSTIC:-/opt/peers/rustic/bin/rustic}
WORK=${WORK:-/var/tmp/cairn-bench-s3}
PORT=${PORT:-18100}
[ -x "$REPO_BIN" ] || { echo "no $REPO_BIN: cargo build --release" >&2; exit 1; }
[ -x "$S3S" ] || { echo "no $S3S: scripts/install-deps.sh --test" >&2; exit 1; }

rm -rf "$WORK/s3" "$WORK/home" "$WORK/restore-"* "$WORK/mnt"
mkdir -p "$WORK/s3/bench" "$WORK/home" "$WORK/mnt"

if [ -z "${V1:-}" ]; then
  V1=$WORK/data-v1 V2=$WORK/data-v2
  if [ ! -d "$V2" ]; then
    echo "making a synthetic tree in $V1 ..." >&2
    rm -rf "$V1" "$V2"; mkdir -p "$V1"
    python3 - "$V1" <<'EOF'
import os, random, sys
root = sys.argv[1]
rnd = random.Random(7)
# 600 MiB of incompressible files of mixed sizes, and ~400 MiB of text (compressible).
n = 0
total = 0
while total < 600 << 20:
    size = rnd.choice([4 << 10, 64 << 10, 1 << 20, 8 << 20, 32 << 20])
    d = os.path.join(root, f"bin/{n % 37:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{n}"), "wb") as f:
        f.write(rnd.randbytes(size))
    total += size; n += 1
words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9))) for _ in range(5000)]
total = 0
while total < 400 << 20:
    d = os.path.join(root, f"text/{n % 53:02d}")
    os.makedirs(d, exist_ok=True)
    body = b" ".join(rnd.choice(words) for _ in range(rnd.randint(1000, 200000)))
    with open(os.path.join(d, f"t{n}.txt"), "wb") as f:
        f.write(body)
    total += len(body); n += 1
EOF
    cp -a "$V1" "$V2"
    # v2: 5% of the files rewritten.
    find "$V2" -type f | awk 'NR % 20 == 0' | while read -r f; do
      head -c "$(stat -c %s "$f")" /dev/urandom > "$f"
    done
  fi
fi

RUST_LOG=s3s=debug "$S3S" --host 127.0.0.1 --port "$PORT" --access-key bench --secret-key bench-secret \
  "$WORK/s3" > "$WORK/s3.log" 2>&1 &
S3PID=$!
# The repositories and the S3 directory are gigabytes: removed at exit unless KEEP_WORK=1 (the
# synthetic data, when made here, is kept for the next run).
trap 'kill $S3PID 2>/dev/null || true; fusermount -u "$WORK/mnt" 2>/dev/null || true
      [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK/s3" "$WORK/home" "$WORK/restore-"* "$WORK/mnt"' EXIT
sleep 1
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_DEFAULT_REGION=us-east-1
export HOME=$WORK/home REPO_PASSWORD=bench RESTIC_PASSWORD=bench

drop() { if [ "$(id -u)" = 0 ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi; }
requests() { grep -c 's3s::service: req: Request' "$WORK/s3.log" || true; }
timed() { # label command...: seconds on stdout, requests made in $REQ
  local before; before=$(requests); drop
  local t0; t0=$(date +%s.%N)
  "${@:2}" > "$WORK/last.log" 2>&1 || { cat "$WORK/last.log" >&2; exit 1; }
  sync
  local t1; t1=$(date +%s.%N)
  REQ=$(( $(requests) - before ))
  printf '%s|%.1f|%s\n' "$1" "$(echo "$t1 - $t0" | bc)" "$REQ"
}
size_of() { du -sb "$WORK/s3/bench/$1" | cut -f1; }
bytes_in() { du -sb --apparent-size "$1" | cut -f1; }

echo "| tool | phase | s | requests |"
echo "|---|---|---:|---:|"
row() { IFS='|' read -r label secs req <<<"$1"; echo "| $2 | $label | $secs | $req |"; }

R="s3://bench/cairn?endpoint=http://127.0.0.1:$PORT"
row "$(timed init "$REPO_BIN" -r "$R" init)" cairn
row "$(timed "first backup" "$REPO_BIN" -r "$R" backup "$V1")" cairn
row "$(timed "unchanged" "$REPO_BIN" -r "$R" backup "$V1")" cairn
row "$(timed "backup v2" "$REPO_BIN" -r "$R" backup "$V2")" cairn
row "$(timed "restore v2" "$REPO_BIN" -r "$R" restore latest --target "$WORK/restore-cairn")" cairn
diff -r --no-dereference "$V2" "$WORK/restore-cairn$V2" > /dev/null
rm -rf "$WORK/restore-cairn"
CAIRN_SIZE=$(size_of cairn)
"$REPO_BIN" -r "$R" mount "$WORK/mnt" --daemon > /dev/null
# The largest file of the newest snapshot (a VM image, in the vm dataset).
big=$(find "$WORK/mnt/snapshots" -type f -size +1M -printf '%s %p\n' | sort -n | tail -1 | cut -d' ' -f2-)
row "$(timed "mount: 2000 random 4 KiB reads" python3 - "$big" <<'EOF'
import os, random, sys
f = os.open(sys.argv[1], os.O_RDONLY); size = os.fstat(f).st_size; r = random.Random(1)
for _ in range(2000):
    os.pread(f, 4096, r.randrange(0, size - 4096) & ~4095)
EOF
)" cairn
fusermount -u "$WORK/mnt"

if command -v restic > /dev/null; then
  export RESTIC_REPOSITORY="s3:http://127.0.0.1:$PORT/bench/restic"
  row "$(timed init restic init)" restic
  row "$(timed "first backup" restic backup "$V1")" restic
  row "$(timed "unchanged" restic backup "$V1")" restic
  row "$(timed "backup v2" restic backup "$V2")" restic
  row "$(timed "restore v2" restic restore latest --target "$WORK/restore-restic")" restic
  diff -r --no-dereference "$V2" "$WORK/restore-restic$V2" > /dev/null
  rm -rf "$WORK/restore-restic"
  RESTIC_SIZE=$(size_of restic)
fi

if [ -x "$RUSTIC" ]; then
  mkdir -p "$HOME/.config/rustic"
  cat > "$HOME/.config/rustic/rustic.toml" <<EOF
[repository]
repository = "opendal:s3"
password = "bench"
[repository.options]
endpoint = "http://127.0.0.1:$PORT"
bucket = "bench"
root = "/rustic"
region = "us-east-1"
access_key_id = "bench"
secret_access_key = "bench-secret"
EOF
  row "$(timed init "$RUSTIC" init)" rustic
  row "$(timed "first backup" "$RUSTIC" backup "$V1")" rustic
  row "$(timed "unchanged" "$RUSTIC" backup "$V1")" rustic
  row "$(timed "backup v2" "$RUSTIC" backup "$V2")" rustic
  row "$(timed "restore v2" "$RUSTIC" restore latest "$WORK/restore-rustic")" rustic
  diff -r --no-dereference "$V2" "$WORK/restore-rustic$V2" > /dev/null
  rm -rf "$WORK/restore-rustic"
  RUSTIC_SIZE=$(size_of rustic)
fi

echo
echo "data: v1 $(bytes_in "$V1") B, v2 $(bytes_in "$V2") B; stored: cairn $CAIRN_SIZE B${RESTIC_SIZE:+, restic $RESTIC_SIZE B}${RUSTIC_SIZE:+, rustic $RUSTIC_SIZE B}"
echo "repo: $("$REPO_BIN" --version); $(restic version 2>/dev/null || echo 'restic not installed'); $("$RUSTIC" --version 2>/dev/null || echo 'rustic not installed')"
