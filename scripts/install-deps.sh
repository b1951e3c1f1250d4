#!/usr/bin/env bash
# Installs the Debian 12 packages cairn needs to build and run (and, with --test, to run
# its whole test suite). Idempotent; uses sudo when not root. The Rust toolchain itself
# is expected to be there (rustup).
set -euo pipefail
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
# libvirt-dev: the `virt` crate links libvirt (VM backups through libvirt). iproute2,
# busybox-static, curl: the labs of `repo verify vm` (namespaces, taps, a DHCP server,
# ping; curl for https checks).
packages=(build-essential pkg-config util-linux fuse3 qemu-utils libvirt-dev iproute2 busybox-static curl)
if [ "${1:-}" = "--test" ]; then
  packages+=(attr file util-linux-extra fuse-overlayfs postgresql-15 postgresql-client-15 \
    mariadb-server mariadb-backup mariadb-client docker.io \
    libvirt-daemon-system qemu-system-x86 qemu-guest-agent cpio kmod e2fsprogs \
    prometheus python3-aiosmtpd openssl python3-venv fio \
    chromium chromium-driver fonts-dejavu-core)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  $sudo apt-get update -qq
  extra=()
  # Debian 12's qemu-system-x86 (7.2) needs qemu-utils 7.2; an image may ship a newer
  # qemu-utils from backports, which blocks it: pin the matching one (a downgrade).
  if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]]; then
    want=$(apt-cache madison qemu-system-x86 | awk -F'|' 'NR==1 {gsub(/ /, "", $2); print $2}')
    if [ -n "$want" ] && apt-cache madison qemu-utils | awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep -qx "$want"; then
      extra+=("qemu-utils=$want" --allow-downgrades)
    fi
  fi
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" "${extra[@]}"
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup first" >&2; exit 1; }
# schemathesis (PyPI) fuzzes the daemon's API from its OpenAPI document, and the MCP SDK
# is the tests' MCP client; in a venv of their own, with Debian's python3, so that
# nothing of the system's Python changes.
if [ "${1:-}" = "--test" ]; then
  venv="${CAIRN_TEST_VENV:-/var/cache/cairn/venv}"
  if [ ! -x "$venv/bin/schemathesis" ]; then
    $sudo mkdir -p "$(dirname "$venv")"
    $sudo /usr/bin/python3 -m venv "$venv"
    $sudo "$venv/bin/pip" install -q "schemathesis==4.32.5"
  fi
  # The official MCP Python SDK: the client the `repo mcp` tests drive it with.
  if ! "$venv/bin/python" -c "import mcp.client.stdio" 2>/dev/null; then
    $sudo "$venv/bin/pip" install -q "mcp==1.26.0"
  fi
  # A real S3 server for the object-storage tests: s3s-fs (crates.io), built once and
  # kept beside the venv (0.14.1 is the newest that builds on Rust 1.95).
  s3s="/var/cache/cairn/s3s/bin/s3s-fs"
  if [ ! -x "$s3s" ]; then
    $sudo mkdir -p /var/cache/cairn/s3s
    $sudo cargo install -q --locked s3s-fs@0.14.1 --features binary \
      --root /var/cache/cairn/s3s -j "$(nproc)"
  fi
fi
