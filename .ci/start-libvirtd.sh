#!/bin/bash
# Start virtlogd + libvirtd (monolithic) for the end-to-end tests, as root, without systemd.
#
# Idempotent: if qemu:///system already answers, nothing is started. Works on a fresh
# Debian 12 machine once the packages in .ci/apt-packages.txt are installed.
#
# Environment:
#   VIRTWATCH_LIBVIRTD_WAIT   seconds to wait for libvirtd to answer (default 60)
set -euo pipefail

URI=qemu:///system
WAIT=${VIRTWATCH_LIBVIRTD_WAIT:-60}

log() { echo "start-libvirtd: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
[ -x /usr/sbin/libvirtd ] || die "/usr/sbin/libvirtd missing: install libvirt-daemon-system (see .ci/apt-packages.txt)"
[ -x /usr/sbin/virtlogd ] || die "/usr/sbin/virtlogd missing: install libvirt-daemon-system"
command -v virsh >/dev/null || die "virsh missing: install libvirt-clients"

answers() {
    timeout 10 virsh -c "$URI" "$@" >/dev/null 2>&1
}

# A live (non-zombie) process with this exact name exists. pgrep alone also matches
# zombies, e.g. a killed daemon whose parent has not reaped it yet.
running() {
    ps -C "$1" -o stat= 2>/dev/null | grep -qv '^Z'
}

# The Debian package's postinst normally creates these; make sure they exist anyway
# (qemu.conf's default user/group for system guests is libvirt-qemu:kvm).
getent group kvm >/dev/null || groupadd --system kvm
getent group libvirt >/dev/null || groupadd --system libvirt
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
if ! getent passwd libvirt-qemu >/dev/null; then
    useradd --system --gid kvm --groups libvirt-qemu --home-dir /var/lib/libvirt \
        --no-create-home --shell /usr/sbin/nologin libvirt-qemu
fi

# /dev/kvm: without udev it stays root:root 0600. libvirt then probes QEMU with KVM
# (as root) but finds /dev/kvm unusable for libvirt-qemu:kvm afterwards, declares its
# capability cache stale and re-probes QEMU (~4 s) on every lookup: each guest start
# took ~60 s. Give it udev's usual permissions. (Guests still use TCG: type='qemu'.)
if [ -c /dev/kvm ]; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

# Directories the daemons expect (normally made by systemd's RuntimeDirectory= / tmpfiles).
mkdir -p /run/libvirt /run/libvirt/qemu /var/log/libvirt/qemu /var/lib/libvirt/images \
    /var/lib/libvirt/qemu /var/cache/libvirt/qemu
chmod 0755 /run/libvirt /var/log/libvirt

# virtlogd must run before libvirtd: QEMU's stdout/stderr and <serial><log> go through it.
if ! running virtlogd; then
    log "starting virtlogd"
    rm -f /run/virtlogd.pid
    /usr/sbin/virtlogd -d
fi

if answers version && answers list; then
    log "libvirtd already answers on $URI"
    exit 0
fi

if ! running libvirtd; then
    # A stale pid file from a killed daemon makes libvirtd refuse to start.
    rm -f /run/libvirtd.pid
    log "starting libvirtd"
    /usr/sbin/libvirtd -d
fi

deadline=$((SECONDS + WAIT))
until answers list; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        pgrep -a libvirtd >&2 || log "libvirtd is not running"
        die "libvirtd did not answer 'virsh -c $URI list' within ${WAIT}s"
    fi
    sleep 0.5
done
log "libvirtd answers on $URI ($(virsh -c "$URI" version 2>/dev/null | grep -i 'running hypervisor' || true))"
