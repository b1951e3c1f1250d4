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
CI="${CI:-1}" cargo test --workspace
