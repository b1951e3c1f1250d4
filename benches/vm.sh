#!/usr/bin/env bash
# The VM issue's figures, from one run on the bench VM: a Debian 12 system (debootstrap,
# systemd, the guest agent, /usr/share of the host as payload) on a 4 GiB qcow2 disk,
# booted under TCG.
#
#   1. full backup of the running VM (MB/s of disk data read);
#   2. an incremental after 50 MiB written in the guest: seconds, bytes read;
#   3. the same after a power cycle (shut down through the agent, started again);
#   4. from the command to the guest agent answering: `repo recover vm`, against booting
#      the VM from its local disk, against `repo restore --vm` plus boot;
#   5. `repo recover vm` of the same system on a 40 GiB sparse disk.
#
# Run as root with libvirtd running (scripts/start-services.sh). Prints a Markdown table.
# Usage: benches/vm.sh [path/to/repo-binary]      (the image is cached in $CACHE;
#        BUILD_ONLY=1 builds it and stops)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-$here/../target/release/repo}"
work="${WORK:-/var/tmp/cairn-bench-vm}"
cache="${CACHE:-/var/cache/cairn/bench-vm}"
guest="${CAIRN_TEST_GUEST:-/var/cache/cairn/test-guest}"
export REPO_PASSWORD=bench-not-a-secret REPO_CONFIG=/nonexistent REPO_REPOSITORY=$work/repo
export CAIRN_STATE_DIR=$work/state
export PATH="$PATH:/usr/sbin:/sbin"
vm=cairn-bench-vm
# shellcheck source=benches/vm-lib.sh
. "$here/vm-lib.sh"
[ -f "$cache/ready" ] || build_image
[ -z "${BUILD_ONLY:-}" ] || exit 0

backup() { # prints: seconds bytes_read
  local t0 t1 out
  t0=$(now)
  out=$("$bin" backup --vm "$vm" --json "$@")
  t1=$(now)
  printf '%s %s\n' "$(secs "$t0" "$t1")" \
    "$(printf '%s' "$out" | python3 -c 'import json,sys; print(sum(d["bytes_read"] for d in json.load(sys.stdin)["vms"][0]["disks"]))')"
}
recover_and_wait() { # snapshot name; prints seconds from the command to the agent
  local t0
  t0=$(now)
  "$bin" recover vm "$1" --name "$2" >/dev/null
  wait_agent "$2" >/dev/null
  secs "$t0" "$(now)"
}

# --- the run --------------------------------------------------------------------------
"$bin" recover stop --all >/dev/null 2>&1 || true
for d in $vm $vm-rec $vm-restored $vm-rec40; do undefine "$d"; done
rm -rf "$work"; mkdir -p "$work"; chmod 755 "$work"
cp --sparse=always "$cache/disk-4G.qcow2" "$work/vda.qcow2"
chown libvirt-qemu:libvirt-qemu "$work/vda.qcow2" 2>/dev/null || true
define $vm "$work/vda.qcow2"
"$bin" init -q

# Local boot, from `virsh start` to the agent (the first boot: also the baseline).
t0=$(now); virsh start $vm >/dev/null; wait_agent $vm >/dev/null; local_boot=$(secs "$t0" "$(now)")
used=$(virsh qemu-agent-command $vm '{"execute":"guest-get-fsinfo"}' | python3 -c \
  'import json,sys; print(sum(d.get("used-bytes",0) for d in json.load(sys.stdin)["return"]))' \
  2>/dev/null || echo 0)

read -r full_s full_read < <(backup)
guest_sh $vm "dd if=/dev/urandom of=/data/a bs=1M count=50 2>/dev/null; sync"
read -r inc_s inc_read < <(backup)
# Power cycle: shut down from inside (the agent), start again, change 50 MiB.
guest_poweroff $vm
t0=$(now); virsh start $vm >/dev/null; wait_agent $vm >/dev/null; local_boot2=$(secs "$t0" "$(now)")
guest_sh $vm "dd if=/dev/urandom of=/data/b bs=1M count=50 2>/dev/null; sync"
read -r cyc_s cyc_read < <(backup)
snap=$(last_snapshot)

# Recovery against restore plus boot, the original stopped (no shared CPU).
guest_poweroff $vm
sync; echo 3 > /proc/sys/vm/drop_caches
rec_s=$(recover_and_wait "$snap" $vm-rec)
"$bin" recover stop --all >/dev/null
sync; echo 3 > /proc/sys/vm/drop_caches
t0=$(now)
"$bin" restore "$snap" --vm --name $vm-restored --to "$work/restored" >/dev/null
virsh start $vm-restored >/dev/null; wait_agent $vm-restored >/dev/null
restore_s=$(secs "$t0" "$(now)")
undefine $vm-restored

# The same system on a 40 GiB sparse disk.
undefine $vm
cp --sparse=always "$cache/disk-40G.qcow2" "$work/vda40.qcow2"
chown libvirt-qemu:libvirt-qemu "$work/vda40.qcow2" 2>/dev/null || true
define $vm "$work/vda40.qcow2"
virsh start $vm >/dev/null; wait_agent $vm >/dev/null
t0=$(now); "$bin" backup --vm $vm --full -q; full40_s=$(secs "$t0" "$(now)")
guest_poweroff $vm
t0=$(now); virsh start $vm >/dev/null; wait_agent $vm >/dev/null; local_boot40=$(secs "$t0" "$(now)")
guest_poweroff $vm
snap40=$(last_snapshot)
sync; echo 3 > /proc/sys/vm/drop_caches
rec40_s=$(recover_and_wait "$snap40" $vm-rec40)
"$bin" recover stop --all >/dev/null
undefine $vm

rate=$(awk -v b="$full_read" -v s="$full_s" 'BEGIN{printf "%.0f", b/1048576/s}')
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
cat <<EOF
Bench VM: Debian 12 with systemd and the guest agent, 4 GiB qcow2 disk, $(mib "$used") MiB used, TCG, 1 vCPU.

| step | seconds | read |
|---|---|---|
| full backup, running | $full_s | $(mib "$full_read") MiB ($rate MB/s) |
| incremental after 50 MiB written | $inc_s | $(mib "$inc_read") MiB |
| incremental after a power cycle and 50 MiB | $cyc_s | $(mib "$cyc_read") MiB |
| boot from the local disk to the agent | $local_boot2 (first boot $local_boot) | |
| \`repo recover vm\` to the agent | $rec_s ($(ratio "$rec_s" "$local_boot2")× local) | |
| \`repo restore --vm\` + boot to the agent | $restore_s | |
| 40 GiB sparse disk: full backup | $full40_s | |
| 40 GiB sparse disk: local boot to the agent | $local_boot40 | |
| 40 GiB sparse disk: \`repo recover vm\` to the agent | $rec40_s ($(ratio "$rec40_s" "$local_boot40")× local) | |
EOF
