#!/usr/bin/env bash
# The slow tier of the object-storage tests: a three-node Garage cluster on 127.0.0.1
# (tests/e2e/garage.rs). Builds Garage once into /var/cache/cairn/garage (most of an
# hour on two cores; AGPL, so it is built here and never shipped), then runs the tests
# the main suite leaves ignored.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
"$here/scripts/install-deps.sh" --test
garage=/var/cache/cairn/garage/bin/garage
if [ ! -x "$garage" ]; then
  mkdir -p /var/cache/cairn/garage
  CARGO_TARGET_DIR=/var/cache/cairn/garage-build \
    cargo install -q --locked garage@2.5.0 --root /var/cache/cairn/garage -j "$(nproc)"
  rm -rf /var/cache/cairn/garage-build
fi
cd "$here"
export REPO_CACHE_DIR="${REPO_CACHE_DIR:-$here/target/test-cache}"
CI="${CI:-1}" CAIRN_GARAGE="$garage" cargo test -p cairn-cli --test e2e -- garage:: --ignored
