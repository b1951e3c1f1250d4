#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine, as root: installs the packages the
# tests drive (FUSE, qemu, PostgreSQL, MariaDB, Docker), starts dockerd and builds the
# database images, then runs every test. Tests that need a missing component fail
# (CI=1) instead of being skipped.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
"$here/scripts/install-deps.sh" --test
"$here/scripts/start-services.sh"
cd "$here"
# Repository caches (index, manifests) of the tests' repositories: under target/, not in
# the home of whoever runs the suite (the end-to-end tests give each test a HOME).
export REPO_CACHE_DIR="${REPO_CACHE_DIR:-$here/target/test-cache}"
# Build first, then make sure the tests have room: they write multi-GiB images, trees and
# repositories under the temporary directory, and a full disk fails dozens of them at once
# with errors that do not say why. (docs/TESTING.md)
CI="${CI:-1}" cargo test --workspace --no-run
need_gib=${CAIRN_TEST_FREE_GIB:-10}
tmp="${TMPDIR:-/tmp}"
free_gib=$(( $(df --output=avail -k "$tmp" | tail -1) / 1024 / 1024 ))
if [ "$free_gib" -lt "$need_gib" ]; then
  echo "test.sh: only $free_gib GiB free in $tmp; the suite needs $need_gib GiB (CAIRN_TEST_FREE_GIB)" >&2
  df -h "$tmp" >&2
  exit 1
fi
CI="${CI:-1}" cargo test --workspace
