#!/usr/bin/env bash
# Starts what the tests drive and builds what they start: the Docker engine (when none
# answers; logs to /var/log/cairn-dockerd.log) and the local database images
# (scripts/build-db-images.sh: postgres:<major>, mariadb:<major> from the host's own
# installations, since there is no image registry here); libvirt (virtlogd, libvirtd)
# and the test guest of the VM tests (scripts/make-test-guest.sh). Needs root.
# Idempotent. PID 1 here is not systemd: the daemons are started by hand.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || { echo "dockerd not found: scripts/install-deps.sh --test" >&2; exit 1; }
  nohup dockerd >/var/log/cairn-dockerd.log 2>&1 &
  for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start:" >&2; tail -20 /var/log/cairn-dockerd.log >&2; exit 1; }
fi
"$here/scripts/build-db-images.sh"

if command -v libvirtd >/dev/null; then
  # What udev does on a normal host: /dev/kvm for the kvm group. Without it, libvirt
  # finds KVM "unusable" for QEMU's user and probes QEMU again at every domain
  # definition (~50 s each). The tests' guests run under TCG whatever KVM can do.
  if [ -e /dev/kvm ] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 660 /dev/kvm
  fi
  pgrep -x virtlogd >/dev/null || virtlogd -d
  pgrep -x libvirtd >/dev/null || libvirtd -d
  for _ in $(seq 1 60); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.5
  done
  virsh -c qemu:///system version >/dev/null || { echo "libvirtd did not answer" >&2; exit 1; }
  "$here/scripts/make-test-guest.sh"
fi
