#!/bin/sh
# Boot systemd as PID 1 of a throw-away overlay of a cached Debian rootfs.
# Run as: unshare --pid --fork --mount --uts --propagation private sh boot-rootfs.sh LOWER UPPER WORK ROOT HOSTNAME
# Every mount lives in the new mount namespace, so killing this PID namespace's init removes them all.
set -eu
lower=$1 upper=$2 work=$3 root=$4 name=$5
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=755 tmpfs "$root/run"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
hostname "$name"
# pivot_root, not chroot: a chrooted process may not create user namespaces (PrivateUsers=).
mkdir "$root/run/.oldroot"
cd "$root"
pivot_root . run/.oldroot
umount -l /run/.oldroot
rmdir /run/.oldroot
# systemd marks / shared only outside containers, and needs shared propagation to hand credentials
# (LoadCredential=) to services. unshare made every mount private, so this stays in the namespace.
mount --make-rshared /
exec /usr/bin/env container=nspawn /lib/systemd/systemd --system
