#!/usr/bin/env bash
# Builds the test guest of the VM tests: a tiny Linux that boots under TCG in seconds,
# with its whole system on its disk (so a backup of the disk is a backup of the OS) and
# the QEMU guest agent running (freeze, thaw, exec, file writes from the host).
#
#   vmlinuz      Debian 12's kernel (the package is downloaded and unpacked, not installed)
#   initrd.img   busybox + the virtio and ext4 modules; mounts /dev/vda and switches to it
#   disk.qcow2   ext4, 256 MiB: busybox, qemu-ga and its libraries, /etc/inittab, a login
#                prompt on the serial console ("cairn-guest login:"), busybox httpd on
#                port 80, the agent on the org.qemu.guest_agent.0 port
#
# Output: $CAIRN_TEST_GUEST (default /var/cache/cairn/test-guest); rebuilt when this
# script changes (its hash is recorded). Needs root for nothing but the package
# downloads; no mount, no loop device (mke2fs -d fills the filesystem).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${CAIRN_TEST_GUEST:-/var/cache/cairn/test-guest}"
stamp="$(sha256sum "$0" | cut -c1-16)"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/disk.qcow2" ]; then
  exit 0
fi
for tool in busybox qemu-ga cpio depmod mke2fs qemu-img; do
  command -v "$tool" >/dev/null || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null \
    || { echo "make-test-guest: $tool is missing (scripts/install-deps.sh --test)" >&2; exit 1; }
done
export PATH="$PATH:/usr/sbin:/sbin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

# The kernel and its modules, from Debian's package.
kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
(cd "$work" && apt-get download "$kpkg" >/dev/null 2>&1)
dpkg-deb -x "$work"/"$kpkg"_*.deb "$work/k"
kver=${kpkg#linux-image-}
depmod -b "$work/k" "$kver"
cp "$work/k/boot/vmlinuz-$kver" "$work/vmlinuz"

# The modules the guest needs, with their dependencies, in load order.
mods=(virtio_pci virtio_blk virtio_console virtio_net crc32c_generic ext4)
moddir="$work/k/lib/modules/$kver"
order=()
add_mod() {
  local name=$1 line path deps d
  line=$(grep -E "(^|/)$name\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | head -1) || true
  [ -n "$line" ] || return 0
  path=${line%%:*}
  for p in "${order[@]:-}"; do [ "$p" = "$path" ] && return 0; done
  deps=${line#*:}
  for d in $deps; do add_mod "$(basename "$d" | sed 's/\.ko.*//')"; done
  order+=("$path")
}
for m in "${mods[@]}"; do add_mod "$m"; done

# initrd: load the modules, mount the disk, switch to it.
ird="$work/initrd"
mkdir -p "$ird"/{bin,dev,proc,sys,newroot,modules}
cp "$(command -v busybox)" "$ird/bin/busybox"
for a in sh mount insmod switch_root sleep echo mkdir cat; do ln -s busybox "$ird/bin/$a"; done
: > "$ird/modules/order"
for p in "${order[@]}"; do
  cp "$moddir/$p" "$ird/modules/"
  echo "$(basename "$p")" >> "$ird/modules/order"
done
cat > "$ird/init" <<'EOF'
#!/bin/sh
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
while read -r m; do insmod "/modules/$m" 2>/dev/null; done < /modules/order
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 -o rw /dev/vda /newroot || { echo "cairn-guest: cannot mount /dev/vda"; exec sh; }
mount --move /dev /newroot/dev
umount /proc /sys 2>/dev/null
exec switch_root /newroot /sbin/init
EOF
chmod +x "$ird/init"
(cd "$ird" && find . | cpio -o -H newc --quiet | gzip -9 > "$work/initrd.img")

# The system on the disk.
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/init.d,proc,sys,dev,run,tmp,var,data,www,root,lib64}
cp "$(command -v busybox)" "$root/bin/busybox"
for a in $("$root/bin/busybox" --list); do
  [ -e "$root/bin/$a" ] || ln -s busybox "$root/bin/$a"
done
for a in init getty poweroff reboot halt; do ln -sf ../bin/busybox "$root/sbin/$a"; done
cp "$(command -v qemu-ga)" "$root/usr/sbin/qemu-ga"
for lib in $(ldd "$(command -v qemu-ga)" | awk '/=> \//{print $3} /^\s*\/lib/{print $1}'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# qemu-ga shuts the guest down with `shutdown -P +0`: busybox has poweroff.
cat > "$root/sbin/shutdown" <<'EOF'
#!/bin/sh
case " $* " in *" -r "*) exec /sbin/reboot ;; esac
exec /sbin/poweroff
EOF
chmod +x "$root/sbin/shutdown"
echo cairn-guest > "$root/etc/hostname"
printf 'root::0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"
printf 'cairn test guest\n' > "$root/www/index.html"
cat > "$root/etc/inittab" <<'EOF'
::sysinit:/etc/init.d/rcS
::respawn:/etc/init.d/agent
::respawn:/bin/busybox httpd -f -p 80 -h /www
ttyS0::respawn:/sbin/getty -L 115200 ttyS0 vt100
::ctrlaltdel:/sbin/poweroff
::shutdown:/bin/sync
::shutdown:/bin/umount -a -r
EOF
cat > "$root/etc/init.d/rcS" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
mount -o remount,rw /
hostname -F /etc/hostname
ip link set lo up 2>/dev/null
for dev in /sys/class/net/eth*; do
  [ -e "$dev" ] || continue
  ip link set "$(basename "$dev")" up
  udhcpc -q -n -t 5 -i "$(basename "$dev")" >/dev/null 2>&1 &
done
echo "cairn-guest: booted"
EOF
cat > "$root/etc/init.d/agent" <<'EOF'
#!/bin/sh
# The agent's port: the virtio-serial port named org.qemu.guest_agent.0.
for p in /sys/class/virtio-ports/*; do
  if [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
    exec /usr/sbin/qemu-ga -m virtio-serial -p "/dev/$(basename "$p")" -t /run
  fi
done
sleep 5
EOF
chmod +x "$root/etc/init.d/rcS" "$root/etc/init.d/agent"
# udhcpc's lease script (where Debian's busybox looks for it): configures the address it leased,
# so that a verification lab's DHCP server gives the guest an address it can be pinged on.
mkdir -p "$root/etc/udhcpc"
cat > "$root/etc/udhcpc/default.script" <<'EOF'
#!/bin/sh
case "$1" in
  deconfig) ifconfig "$interface" 0.0.0.0 up ;;
  bound|renew) ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up ;;
esac
exit 0
EOF
chmod +x "$root/etc/udhcpc/default.script"
: > "$root/etc/fstab"
# mke2fs -d fills the filesystem from the directory, owned by root.
truncate -s 256M "$work/disk.raw"
mke2fs -q -t ext4 -L cairn-guest -d "$root" -E root_owner=0:0 "$work/disk.raw"
qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$work/disk.qcow2"

mv "$work/vmlinuz" "$work/initrd.img" "$work/disk.qcow2" "$out/"
echo "$stamp" > "$out/stamp"
chmod 755 "$out"
chmod 644 "$out"/*
echo "test guest in $out (kernel $kver)"
