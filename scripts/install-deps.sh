#!/usr/bin/env bash
# Installs the Debian 12 packages cairn needs to build and run (and, with --test, to run
# its whole test suite). Idempotent; uses sudo when not root. The Rust toolchain itself
# is expected to be there (rustup).
set -euo pipefail
packages=(build-essential pkg-config util-linux fuse3 qemu-utils)
if [ "${1:-}" = "--test" ]; then
  packages+=(attr file util-linux-extra fuse-overlayfs postgresql-15 postgresql-client-15 \
    mariadb-server mariadb-backup mariadb-client docker.io)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup first" >&2; exit 1; }
