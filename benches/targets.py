#!/usr/bin/env python3
"""The speed issue's targets as ratios to the best peer, from one peers.sh results.tsv.

Usage: benches/targets.py results.tsv  -> a Markdown table on stdout.
Ours = the better of the cairn configs present (cairn, cairn-image) per dataset and
target; peers = borg-lz4, borg-zstd3, restic, rustic. Time targets compare wall seconds
(ratio = best peer / ours, higher is better); size compares repository bytes (ours /
smallest); memory compares peak RSS (ours / lightest); mount reads compare reads/s and MB/s.
"""
import csv
import sys
from collections import defaultdict

OURS = ["cairn", "cairn-image"]
PEERS = ["borg-lz4", "borg-zstd3", "restic", "rustic"]

rows = defaultdict(dict)  # (config, dataset) -> phase -> row
with open(sys.argv[1]) as f:
    for r in csv.DictReader(f, delimiter="\t"):
        rows[(r["config"], r["dataset"])][r["phase"]] = r


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def metric(cfg, ds, kind):
    p = rows.get((cfg, ds), {})
    if kind in ("backup-v1", "backup-v1-unchanged", "backup-v2", "restore-v2"):
        return num(p.get(kind, {}).get("wall_s"))
    if kind == "repo-bytes":
        return num(p.get(kind, {}).get("bytes"))
    if kind == "backup-rss":
        v = [num(p.get(k, {}).get("maxrss_kB")) for k in ("backup-v1", "backup-v1-unchanged", "backup-v2")]
        v = [x for x in v if x]
        return max(v) if v else None
    if kind == "restore-rss":
        return num(p.get("restore-v2", {}).get("maxrss_kB"))
    if kind == "randread":
        note = p.get("mount-randread-4k", {}).get("note", "")
        if note.startswith("reads/s="):
            return num(note.split()[0].split("=")[1])
        return None
    if kind == "seqread":
        return num(p.get("mount-seqread", {}).get("MBps"))
    raise KeyError(kind)


# name, metric, lower_is_better, required ratio (as "ours is X times better")
TARGETS = [
    ("first backup 2x faster", "backup-v1", True, 2.0),
    ("unchanged backup 2x faster", "backup-v1-unchanged", True, 2.0),
    ("5% change backup 2x faster", "backup-v2", True, 2.0),
    ("restore 2x faster", "restore-v2", True, 2.0),
    ("repository within 2% of smallest", "repo-bytes", True, 1 / 1.02),
    ("backup peak RSS at most half", "backup-rss", True, 2.0),
    ("restore peak RSS at most half", "restore-rss", True, 2.0),
    ("mount random 4 KiB reads 3x", "randread", False, 3.0),
    ("mount sequential read 2x", "seqread", False, 2.0),
]

datasets = sorted({d for (_, d) in rows}, key=lambda d: ["vm", "vmi", "files", "db"].index(d) if d in ["vm", "vmi", "files", "db"] else 9)
print("| target | dataset | ours | best peer | advantage (x) | met |")
print("|---|---|---:|---:|---:|---|")
for name, kind, lower, need in TARGETS:
    for ds in datasets:
        ours = [(metric(c, ds, kind), c) for c in OURS if (c, ds) in rows]
        peers = [(metric(c, ds, kind), c) for c in PEERS if (c, ds) in rows]
        ours = [x for x in ours if x[0] is not None]
        peers = [x for x in peers if x[0] is not None]
        if not ours or not peers:
            continue
        pick = min if lower else max
        o, oc = pick(ours)
        p, pc = pick(peers)
        adv = (p / o if lower else o / p) if o and p else float("inf")
        fmt = (lambda v: f"{v:.2f}") if kind not in ("repo-bytes", "backup-rss", "restore-rss") else (
            (lambda v: f"{v / 2**20:.0f} MiB") if kind == "repo-bytes" else (lambda v: f"{v / 1024:.0f} MiB"))
        print(f"| {name} | {ds} | {fmt(o)} ({oc}) | {fmt(p)} ({pc}) | {adv:.2f} | {'yes' if adv >= need else 'no'} |")
