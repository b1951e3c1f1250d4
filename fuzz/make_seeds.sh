#!/usr/bin/env bash
# Makes the seed corpus of the fuzz targets (fuzz/seeds/<target>/) from real files: a
# small unencrypted, uncompressed repository made by `repo` (config, key file, packs,
# their blobs, trees and extent lists, a manifest, a damage mark, a lock), tar streams,
# and an NBD server's replies to our client. Run from the repository root after
# `cargo build`; the seeds are committed, so this is only needed to remake them.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
repo_bin="$here/target/debug/repo"
out="$here/fuzz/seeds"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export REPO_REPOSITORY="$work/repo" REPO_PASSWORD=x CAIRN_STATE_DIR="$work/state" CAIRN_TESTONLY_WEAK_KDF=1
rm -rf "$out"
mkdir -p "$out"/{config,keyfile,blob,pack,tree,extent_list,manifest,damage,lock,nbd,tar}

mkdir -p "$work/src/dir/sub"
head -c 200000 /dev/urandom > "$work/src/dir/big"
printf 'hello\n' > "$work/src/dir/small"
ln -s small "$work/src/dir/link"
ln "$work/src/dir/small" "$work/src/dir/hard"
"$repo_bin" init --encryption none --compression 0 --chunk-sizes 16K,32K,64K >/dev/null
CAIRN_TESTONLY_EXTENTS_INLINE=2 "$repo_bin" backup "$work/src" >/dev/null

# A second repository, of small files only, for packs a fuzzer can afford.
REPO_REPOSITORY="$work/small" "$repo_bin" init --encryption none --compression 0 >/dev/null
REPO_REPOSITORY="$work/small" "$repo_bin" backup "$work/src/dir/small" "$work/src/dir/link" >/dev/null
for p in "$work"/small/data/*/*; do cp "$p" "$out/pack/$(basename "$p" | cut -c1-8)"; done

cp "$work/repo/config" "$out/config/config"
for k in "$work"/repo/keys/*; do cp "$k" "$out/keyfile/$(basename "$k" | cut -c1-8)"; done
for s in "$work"/repo/snapshots/*; do cp "$s" "$out/manifest/$(basename "$s" | cut -c1-8)"; done
python3 - "$work/repo" "$out" <<'PY'
import os, struct, sys, glob
repo, out = sys.argv[1], sys.argv[2]
n = 0
for p in sorted(glob.glob(os.path.join(repo, "data", "*", "*"))):
    data = open(p, "rb").read()
    name = os.path.basename(p)[:8]
    if len(data) < 64 * 1024:
        open(os.path.join(out, "pack", name), "wb").write(data)
    tlen = struct.unpack("<I", data[-12:-8])[0]
    trailer = data[len(data) - 12 - tlen:len(data) - 12]
    count = struct.unpack("<I", trailer[:4])[0]
    for i in range(count):
        rec = trailer[4 + 49 * i: 4 + 49 * (i + 1)]
        kind = rec[0]
        off, length, raw = struct.unpack("<QII", rec[33:49])
        stored = data[off:off + length]
        n += 1
        # blob target: flags (kind), raw length, the stored payload
        blob = bytes([kind]) + struct.pack("<I", raw) + stored
        if len(blob) < 20000:
            open(os.path.join(out, "blob", f"{name}-{i}"), "wb").write(blob)
        if kind == 1 and stored[:1] == b"\x00":
            cbor = stored[1:]
            # tree target: a split byte, then the tree
            open(os.path.join(out, "tree", f"{name}-{i}"), "wb").write(bytes([min(255, len(cbor))]) + cbor)
            # extent_list target: lists, size, then the list
            open(os.path.join(out, "extent_list", f"{name}-{i}"), "wb").write(b"\x00" + struct.pack("<Q", 200000) + cbor)
PY

# A damage mark: a flipped byte in the big file's data, recorded by repair.
pack=$(ls -S "$work"/repo/data/*/* | head -1)
python3 - "$pack" <<'PY'
import sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
b[len(b) // 3] ^= 1
open(p, "wb").write(b)
PY
"$repo_bin" repair >/dev/null 2>&1 || true
for d in "$work"/repo/damage/*; do [ -f "$d" ] && cp "$d" "$out/damage/$(basename "$d" | cut -c1-8)"; done

cat > "$out/lock/shared" <<'JSON'
{"version":1,"kind":"shared","operation":"backup","host":"vm","user":"root","pid":1234,"pid_start":5678,"created":"2026-12-01T10:00:00Z","refreshed":"2026-12-01T10:05:00Z"}
JSON
cat > "$out/lock/exclusive" <<'JSON'
{"version":1,"kind":"exclusive","operation":"prune","host":"elsewhere","user":"u","pid":1,"created":"2026-12-01T10:00:00Z","refreshed":"2026-12-01T10:00:00Z"}
JSON

tar -C "$work/src" -cf "$out/tar/plain" dir
tar -C "$work/src" --format=pax -cf "$out/tar/pax" dir
head -c 20000 "$out/tar/plain" > "$out/tar/truncated"

# What a well-behaved NBD server sends our client: greeting, replies to
# STRUCTURED_REPLY, SET_META_CONTEXT and GO (a 4 KiB export), then a read reply
# (cookie 1) and a block-status reply (cookie 2).
python3 - "$out/nbd/session" <<'PY'
import struct, sys
def opt_reply(opt, ty, data=b""):
    return struct.pack(">QIII", 0x0003e889045565a9, opt, ty, len(data)) + data
def chunk(flags, ty, cookie, payload):
    return struct.pack(">IHHQI", 0x668e33ef, flags, ty, cookie, len(payload)) + payload
size = 4096
b = struct.pack(">QQH", 0x4e42444d41474943, 0x49484156454f5054, 3)
b += opt_reply(8, 1)
b += opt_reply(10, 4, struct.pack(">I", 1) + b"base:allocation") + opt_reply(10, 1)
b += opt_reply(7, 3, struct.pack(">HQH", 0, size, 1)) + opt_reply(7, 1)
b += chunk(1, 1, 1, struct.pack(">Q", 0) + b"\x61" * size)
b += chunk(1, 5, 2, struct.pack(">I", 1) + struct.pack(">II", size, 0))
open(sys.argv[1], "wb").write(b)
PY
find "$out" -type f | wc -l | xargs echo "seeds written:"
