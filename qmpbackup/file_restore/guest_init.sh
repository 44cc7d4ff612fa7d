#!/bin/sh
# /init of the qmpbackup file-restore helper VM (PID 1: must never exit).
# Everything the host sees is mounted read-only; nothing here writes to the archive's devices.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/virtio-ports /run /tmp /mnt
mount -t tmpfs -o mode=0755 tmpfs /run
exec </dev/console >/dev/console 2>&1
say() { read up _ </proc/uptime; echo "[helper $up] $*"; }

for mod in $(cat /lib/modules/load-order); do
  insmod /lib/modules/$mod.ko 2>/dev/null || say "insmod $mod failed"
done

PORT=org.qmpbackup.file-restore.0
i=0
while [ $i -lt 500 ]; do
  for n in /sys/class/virtio-ports/*/name; do
    [ -f "$n" ] || continue
    name=$(cat "$n"); port=${n%/name}; port=${port##*/}
    [ -n "$name" ] && ln -sf ../$port /dev/virtio-ports/$name
  done
  [ -e /dev/virtio-ports/$PORT ] && break
  sleep 0.02; i=$((i + 1))
done
[ -e /dev/virtio-ports/$PORT ] || say "no $PORT port"

say READY
while :; do
  /usr/bin/python3.11 -I -S -B -c 'import sys; sys.path.insert(0, "/usr/lib/qmpbackup")
from qmpbackup.file_restore.guest_service import serve; serve(sys.argv[1])' /dev/virtio-ports/$PORT
  say "service exited ($?), restarting"
  sleep 2
done
