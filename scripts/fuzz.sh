#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for SECONDS each (default 20), from the
# committed seeds (fuzz/seeds/<target>/) and the growing corpus (fuzz/corpus/<target>/,
# not committed). A crash stops the run: its input is in fuzz/artifacts/<target>/, and
# becomes a regression test once fixed.
#
# Only the stable toolchain exists here. cargo fuzz builds with -Zsanitizer, which
# stable refuses unless RUSTC_BOOTSTRAP=1 is set: it is set for this script alone,
# never for the product's build.
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
seconds="${1:-20}"
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cd "$here/fuzz"
export RUSTC_BOOTSTRAP=1
targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cargo fuzz list)
fi
cargo fuzz build -O --debug-assertions
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "seeds/$t"
  echo "== $t (${seconds}s)"
  # -timeout: an input that takes 10 s is a hang; -rss_limit_mb: one that takes 2 GiB
  # is a memory bomb. Both fail the run like a crash does.
  cargo fuzz run -O --debug-assertions "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=262144 \
    -print_final_stats=1 2>&1 | grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE|==[0-9]+==|SUMMARY|.*ERROR|.*panicked|.*Test unit written)" || true
  if ls "artifacts/$t"/crash-* "artifacts/$t"/timeout-* "artifacts/$t"/oom-* >/dev/null 2>&1; then
    echo "fuzz target $t found a failure: fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
