#!/bin/busybox sh
# /init of the virtwatch e2e guest (busybox initramfs, see hostlib/image.py).
#
# Behaviour comes from the kernel command line, so one image serves every scenario:
#   vw.name=NAME         printed in the banner
#   vw.hostname=H        sets the hostname (default: vw.name, else "vwguest")
#   vw.print=TOKEN       prints "VWLINE TOKEN n" for n=1..5 to ttyS0 (and hvc0 if present)
#   vw.flood=BYTES       prints that many bytes to the console in one burst
#   vw.io=1              every second: write 64 KiB to /dev/vda (fsync), read it back (O_DIRECT)
#   vw.fill=MIB          writes MIB MiB to /dev/vda at once (disk-full scenarios)
#   vw.net=1             eth0 = 198.51.100.2/24 (TEST-NET-2); ARP requests every 0.5 s for
#                        198.51.100.1, which libvirt puts on the host side of the tap, so
#                        the host answers and rx/tx both move. Nothing is routed off the host.
#   vw.agent=1           starts qemu-ga on /dev/virtio-ports/org.qemu.guest_agent.0
#   vw.agent_kill_after=S  kills qemu-ga S seconds after it started (agent goes DISCONNECTED)
#   vw.tick=SECONDS      prints "VWTICK n" to the console every SECONDS, forever
#   vw.panic=SECONDS     kernel panic (sysrq c) after SECONDS
#   vw.panic_on_boot=1   kernel panic right after "VW READY"
#   vw.poweroff=SECONDS  poweroff -f after SECONDS
#   vw.kpanic=N          kernel.panic after a panic: 0 (default) halts, -1 reboots at once
#   vw.touch=PATH        creates PATH at boot (an exec liveness probe's "healthy" file)
#   vw.rm_after=SECONDS  removes the vw.touch file SECONDS after boot
#   vw.once=1            the timers (panic, agent_kill_after, rm_after, poweroff) run on the
#                        first boot of the disk only: a marker on /dev/vda says it booted before
# Prints "VW READY name=NAME" once the modules are loaded and the services started.

/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /run /var/run /mnt
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts

# Parse vw.KEY=VALUE into VW_KEY (only [a-z0-9_] keys; values are never evaluated).
for word in $(cat /proc/cmdline); do
    case "$word" in
        vw.*=*)
            key=${word%%=*}; key=${key#vw.}; val=${word#*=}
            case "$key" in *[!a-z0-9_]*|'') continue ;; esac
            eval "VW_$key=\$val"
            ;;
    esac
done

say() {
    echo "$*" > /dev/ttyS0
    [ -c /dev/hvc0 ] && echo "$*" > /dev/hvc0 2>/dev/null
    return 0
}

say "VW BOOT name=${VW_name:-} kernel=$(uname -r)"

# Panic handling: an oops panics, a panic halts (no reboot) so pvpanic's report to QEMU
# decides what happens (<on_crash>destroy</on_crash> -> CRASHED/PANICKED, STOPPED/CRASHED).
echo 1 > /proc/sys/kernel/panic_on_oops
echo "${VW_kpanic:-0}" > /proc/sys/kernel/panic
echo 1 > /proc/sys/kernel/sysrq

# Modules in dependency order (written at image build time).
while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$mod" 2>/dev/null || say "VW WARN insmod $mod failed"
done < /lib/modules/load-order

# virtio-serial port names -> /dev/virtio-ports/NAME (udev's job normally).
i=0
while [ $i -lt 50 ]; do
    ls /sys/class/virtio-ports/ >/dev/null 2>&1 && break
    [ -n "${VW_agent:-}" ] || break
    i=$((i + 1)); sleep 0.1
done
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
    [ -f "$p/name" ] || continue
    ln -sf "/dev/${p##*/}" "/dev/virtio-ports/$(cat "$p/name")"
done

# vw.once: a guest restarted on the same disk (reset, destroy + start) runs no timer again.
if [ -n "${VW_once:-}" ] && [ -b /dev/vda ]; then
    if [ "$(dd if=/dev/vda bs=8 count=1 2>/dev/null)" = "VWBOOTED" ]; then
        say "VW AGAIN (vw.once: timers off)"
        VW_panic=; VW_agent_kill_after=; VW_rm_after=; VW_poweroff=
    else
        printf VWBOOTED | dd of=/dev/vda bs=8 count=1 conv=fsync 2>/dev/null
    fi
fi
[ -n "${VW_touch:-}" ] && touch "$VW_touch"

hostname "${VW_hostname:-${VW_name:-vwguest}}"
ip link set lo up

if [ -n "${VW_net:-}" ]; then
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do i=$((i + 1)); sleep 0.1; done
    ip link set eth0 up
    ip addr add 198.51.100.2/24 dev eth0
    # L2 only: ARP request/reply with the host side of the tap; nothing is routed.
    ( while :; do arping -q -c 1 -w 1 -I eth0 198.51.100.1 >/dev/null 2>&1; sleep 0.5; done ) &
fi

if [ -n "${VW_io:-}" ] && [ -b /dev/vda ]; then
    (
        n=0
        while :; do
            dd if=/dev/urandom of=/dev/vda bs=64k count=1 seek=$((n % 256)) conv=fsync 2>/dev/null
            dd if=/dev/vda of=/dev/null bs=64k count=1 skip=$((n % 256)) iflag=direct 2>/dev/null
            n=$((n + 1)); sleep 1
        done
    ) &
fi

if [ -n "${VW_fill:-}" ] && [ -b /dev/vda ]; then
    ( dd if=/dev/urandom of=/dev/vda bs=1M count="$VW_fill" oflag=direct 2>/dev/null; sync ) &
fi

if [ -n "${VW_agent:-}" ]; then
    if [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ]; then
        /usr/sbin/qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 \
            -t /run > /dev/ttyS0 2>&1 &
        if [ -n "${VW_agent_kill_after:-}" ]; then
            ga_pid=$!
            ( sleep "$VW_agent_kill_after"; say "VW AGENT KILL"; kill -9 "$ga_pid" ) &
        fi
    else
        say "VW WARN no guest agent port"
    fi
fi

say "VW READY name=${VW_name:-}"

if [ -n "${VW_print:-}" ]; then
    for n in 1 2 3 4 5; do say "VWLINE $VW_print $n"; done
fi

if [ -n "${VW_flood:-}" ]; then
    head -c "$VW_flood" /dev/zero | tr '\0' 'x' > /dev/ttyS0
    say ""
    say "VW FLOOD DONE"
fi

if [ -n "${VW_tick:-}" ]; then
    ( n=0; while :; do n=$((n + 1)); say "VWTICK $n"; sleep "$VW_tick"; done ) &
fi

if [ -n "${VW_panic_on_boot:-}" ]; then
    echo c > /proc/sysrq-trigger
fi
if [ -n "${VW_panic:-}" ]; then
    ( sleep "$VW_panic"; say "VW PANIC"; echo c > /proc/sysrq-trigger ) &
fi
if [ -n "${VW_rm_after:-}" ] && [ -n "${VW_touch:-}" ]; then
    ( sleep "$VW_rm_after"; rm -f "$VW_touch"; say "VW RM $VW_touch" ) &
fi
if [ -n "${VW_poweroff:-}" ]; then
    ( sleep "$VW_poweroff"; say "VW POWEROFF"; poweroff -f ) &
fi

# PID 1 must never exit.
while :; do sleep 3600; done
