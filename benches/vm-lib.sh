# The bench VM's image and the helpers the VM benches share (benches/vm.sh,
# benches/verify.sh). Sourced: the caller sets bin, work, cache and guest.
#
# The image: Debian 12 minbase with systemd, udev and the guest agent, /usr/share of the
# host as payload, DHCP on its card (systemd-networkd) and busybox httpd on port 80 (a
# service for a verification to check), on 4 GiB and 40 GiB qcow2 disks; it boots with
# the test guest's kernel and initrd (scripts/make-test-guest.sh). Built once into
# $cache (ready when $cache/ready exists).
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", b-a}'; }
mib() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1048576}'; }

# --- the bench image (cached) ---------------------------------------------------------
build_image() {
  command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
  "$here/../scripts/make-test-guest.sh"   # its kernel and initrd boot the bench VM too
  local root="$cache/root.tmp"
  rm -rf "$root" "$cache/root"
  mkdir -p "$cache"
  # The host's own Debian mirror (its APT sources), the first that serves bookworm.
  local mirror
  mirror=$(awk '/^URIs:/ {print $2}' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1)
  [ -n "$mirror" ] || mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list)
  debootstrap --variant=minbase --include=systemd-sysv,udev,qemu-guest-agent,procps,coreutils,busybox \
    bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1
  echo cairn-bench > "$root/etc/hostname"
  sed -i 's/^root:[^:]*:/root::/' "$root/etc/shadow"
  : > "$root/etc/fstab"
  # DHCP on its card (a verification lab leases it an address), and a web service.
  mkdir -p "$root/etc/systemd/network" "$root/var/www" "$root/etc/systemd/system/multi-user.target.wants"
  printf '[Match]\nName=e*\n\n[Network]\nDHCP=ipv4\n' > "$root/etc/systemd/network/20-wired.network"
  ln -sf /lib/systemd/system/systemd-networkd.service "$root/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
  mkdir -p "$root/etc/systemd/system/sockets.target.wants"
  ln -sf /lib/systemd/system/systemd-networkd.socket "$root/etc/systemd/system/sockets.target.wants/systemd-networkd.socket"
  echo "cairn bench" > "$root/var/www/index.html"
  printf '[Unit]\nDescription=web service\n\n[Service]\nExecStart=/bin/busybox httpd -f -p 80 -h /var/www\nRestart=always\n\n[Install]\nWantedBy=multi-user.target\n' \
    > "$root/etc/systemd/system/cairn-httpd.service"
  ln -sf /etc/systemd/system/cairn-httpd.service "$root/etc/systemd/system/multi-user.target.wants/cairn-httpd.service"
  mkdir -p "$root/data" "$root/opt/payload"
  cp -a /usr/share/. "$root/opt/payload/"
  rm -rf "$root/var/cache/apt/archives/"*.deb
  mv "$root" "$cache/root"
  for size in 4G 40G; do
    rm -f "$cache/disk-$size.raw"
    truncate -s "$size" "$cache/disk-$size.raw"
    mke2fs -q -t ext4 -L cairn-bench -d "$cache/root" -E root_owner=0:0 "$cache/disk-$size.raw"
    qemu-img convert -f raw -O qcow2 "$cache/disk-$size.raw" "$cache/disk-$size.qcow2"
    rm -f "$cache/disk-$size.raw"
  done
  rm -rf "$cache/root"
  touch "$cache/ready"
}

# --- helpers --------------------------------------------------------------------------
undefine() {
  virsh destroy "$1" >/dev/null 2>&1 || true
  virsh undefine --checkpoints-metadata "$1" >/dev/null 2>&1 || true
}
define() { # name disk
  local name=$1 disk=$2
  cat > "$work/$name.xml" <<EOF
<domain type='qemu'><name>$name</name><memory unit='MiB'>1024</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><kernel>$guest/vmlinuz</kernel>
<initrd>$guest/initrd.img</initrd><cmdline>console=ttyS0 quiet</cmdline></os>
<features><acpi/><apic/></features><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$disk'/>
<target dev='vda' bus='virtio'/></disk>
<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
<serial type='file'><source path='$work/$name.console'/><target port='0'/></serial>
</devices></domain>
EOF
  virsh define "$work/$name.xml" >/dev/null
}
wait_agent() { # name; seconds from now until the agent answers
  local t0 i
  t0=$(now)
  for i in $(seq 1 3000); do
    if virsh qemu-agent-command "$1" '{"execute":"guest-ping"}' >/dev/null 2>&1; then
      secs "$t0" "$(now)"
      return 0
    fi
    sleep 0.2
  done
  echo "the agent of $1 never answered" >&2
  return 1
}
guest_sh() { # name script: runs it in the guest, waits for it
  python3 - "$1" "$2" <<'EOF'
import json, subprocess, sys, time
name, script = sys.argv[1], sys.argv[2]
def agent(cmd):
    out = subprocess.run(["virsh", "qemu-agent-command", name, json.dumps(cmd)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["return"]
pid = agent({"execute": "guest-exec", "arguments": {"path": "/bin/sh", "arg": ["-c", script],
             "capture-output": True}})["pid"]
while True:
    st = agent({"execute": "guest-exec-status", "arguments": {"pid": pid}})
    if st.get("exited"):
        sys.exit(st.get("exitcode", 1))
    time.sleep(0.2)
EOF
}
# A clean shutdown from inside (the bench image has no D-Bus, so the agent's own
# guest-shutdown, which goes through logind, fails): systemd powers off, the bitmaps
# are saved. Waits until the domain is off.
guest_poweroff() { # name
  guest_sh "$1" "systemctl poweroff" >/dev/null 2>&1 || true
  for _ in $(seq 1 600); do [ "$(virsh domstate "$1")" = "shut off" ] && return 0; sleep 0.5; done
  echo "$1 did not power off" >&2
  return 1
}
last_snapshot() {
  "$bin" snapshots --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])'
}
