#!/usr/bin/env bash
# Runs ../shared/bench/peers.sh with our release binary beside borg, restic and rustic in
# one run, then writes its table and the speed issue's target ratios (benches/targets.py)
# into docs/BENCHMARKS.md, between the markers "<!-- peers:begin -->" and "<!-- peers:end -->".
# Run as root on an otherwise idle machine, after ../shared/bench/install-peers.sh and
# make-data.sh. Takes ~30 min on 2 cores with the defaults.
# Env: CONFIGS (default: cairn cairn-image borg-lz4 borg-zstd3 restic rustic),
#      DATASETS (default: vm vmi files), WORK (default /var/tmp/bench-work), BENCH_DIR.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bench=${BENCH_DIR:-$root/../shared/bench}
export WORK=${WORK:-/var/tmp/bench-work}
export CONFIGS=${CONFIGS:-cairn cairn-image borg-lz4 borg-zstd3 restic rustic}
export DATASETS=${DATASETS:-vm vmi files}
(cd "$root" && cargo build --release -p cairn-cli)
table=$(mktemp)
started=$(date -u +%Y-%m-%dT%H:%MZ)
REPO_BIN=$root/target/release/repo OUT_MD=$table bash "$bench/peers.sh"
targets=$(python3 "$root/benches/targets.py" "$WORK/results.tsv")
python3 - "$root/docs/BENCHMARKS.md" "$table" "$started" "$CONFIGS" "$DATASETS" "$targets" <<'PY'
import sys
doc, table, started, configs, datasets, targets = sys.argv[1:]
body = open(table).read().strip()
section = f"""<!-- peers:begin -->
## cairn beside borg, restic and rustic: one run of peers.sh (speed issue)

`bash benches/peers.sh` (started {started}; CONFIGS="{configs}" DATASETS="{datasets}"):
the whole output of `../shared/bench/peers.sh` for this run, then the targets of the speed
issue as ratios to the best peer of the same run (`benches/targets.py`).

### Targets

{targets}

### The run

{body}
<!-- peers:end -->"""
text = open(doc).read()
if "<!-- peers:begin -->" in text:
    head, rest = text.split("<!-- peers:begin -->", 1)
    tail = rest.split("<!-- peers:end -->", 1)[1]
    text = head + section + tail
else:
    text = text.rstrip() + "\n\n" + section + "\n"
open(doc, "w").write(text)
PY
echo "docs/BENCHMARKS.md updated"
