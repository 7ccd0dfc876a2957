"""Domain XML for the e2e guests, qcow2 disks, and the tiny-filesystem (disk-full) trick.

Guests are TCG (``type='qemu'``: nested /dev/kvm is unreliable on CI), boot the cached
kernel + initramfs directly, and get every device virtwatch reads stats or events from:
virtio disk, virtio NIC on a libvirt-made tap, virtio balloon with stats, ISA pvpanic,
serial console (optionally logged to a file), optional guest-agent channel and VNC.
"""

from __future__ import annotations

import subprocess
import uuid as uuidlib
from collections.abc import Mapping
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

#: Per-test directories for disks and serial logs live under here.
IMAGES_ROOT = Path("/var/lib/libvirt/images/virtwatch-e2e")

#: Guest side of the NIC (set by the init script with vw.net=1). TEST-NET-2, not
#: TEST-NET-1: the CI machines themselves live on 192.0.2.0/24 (eth0 192.0.2.2, gateway
#: 192.0.2.1), and a host-side tap address in that subnet would hijack the host's routes.
GUEST_IP = "198.51.100.2"
#: Host side of every guest's tap (libvirt sets it from <source><ip/>), so the host
#: answers the guest's ARP requests and both rx and tx counters move. ip_forward stays
#: off: nothing the guest sends leaves the machine.
HOST_TAP_IP = "198.51.100.1"
GUEST_NET_PREFIX = 24


def kernel_cmdline(options: Mapping[str, object] | None = None, *, name: str = "") -> str:
    """Kernel command line: serial console, quiet, plus ``vw.KEY=VALUE`` for each option.

    ``True`` becomes ``1``; ``None``/``False`` options are left out. Values must not
    contain spaces (the init splits the command line on whitespace).
    """
    # no_timer_check: on a loaded host a TCG guest's kernel sometimes finds its timer too slow
    # and panics at boot ("IO-APIC + timer doesn't work!"); seen here with ~30 guests on 2 cores.
    parts = ["console=ttyS0", "quiet", "loglevel=4", "panic=0", "no_timer_check"]
    if name:
        parts.append(f"vw.name={name}")
    for key, value in (options or {}).items():
        if value is None or value is False:
            continue
        value = 1 if value is True else value
        text = str(value)
        if any(c.isspace() for c in text):
            raise ValueError(f"vw.{key} value must not contain whitespace: {text!r}")
        parts.append(f"vw.{key}={text}")
    return " ".join(parts)


def create_qcow2(path: Path, size: str = "64M") -> Path:
    """Create an empty qcow2 image at path with ``qemu-img create`` (parents are created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), size],
        check=True, capture_output=True, text=True,
    )
    return path


def domain_xml(
    name: str,
    *,
    kernel: Path,
    initrd: Path,
    options: Mapping[str, object] | None = None,
    disk: Path | None = None,
    error_policy: str | None = None,
    memory_mib: int = 128,
    network: bool = True,
    balloon_period: int = 2,
    serial_log: Path | None = None,
    agent: bool = False,
    virtio_console: bool | Path = False,
    graphics: bool = False,
    on_crash: str = "destroy",
    on_poweroff: str = "destroy",
    on_reboot: str = "restart",
    uuid: str | None = None,
    extra_devices: str = "",
    pvpanic: bool = True,
) -> str:
    """Return the domain XML for one e2e guest.

    name         domain name (use the ``vwe2e-`` prefix so cleanup finds it).
    kernel/initrd  the cached guest image (:class:`hostlib.image.GuestImage`).
    options      init behaviour, passed as ``vw.KEY=VALUE`` on the kernel command line
                 (see guest-init.sh: io, net, agent, panic, poweroff, print, flood, fill...).
    disk         qcow2 file attached as virtio ``vda`` (None: no disk).
    error_policy e.g. ``'stop'``: pause the guest on I/O errors (disk-full scenario).
    memory_mib   guest RAM, 96–128 MiB is plenty.
    network      add ``<interface type='ethernet'>`` (libvirt creates the tap and gives its
                 host side HOST_TAP_IP) with a virtio NIC.
    balloon_period  ``<stats period=N/>`` of the virtio balloon (0: no stats).
    serial_log   also log the serial console to this file (``append='off'``).
    agent        add the ``org.qemu.guest_agent.0`` virtio-serial channel.
    virtio_console  add a second console on virtio (``hvc0`` in the guest, libvirt's
                 ``console1`` for openConsole); a Path also logs it to that file.
    graphics     add VNC on 127.0.0.1 (autoport) and a VGA card, for screenshot tests.
    on_*         lifecycle actions; crash defaults to destroy (STOPPED/CRASHED after a panic).
    extra_devices  raw XML appended inside ``<devices>``.
    pvpanic      add the ISA pvpanic device (False: a panic is never reported to libvirt).
    """
    cmdline = kernel_cmdline(options, name=name)
    devices: list[str] = []
    if disk is not None:
        policy = f" error_policy={quoteattr(error_policy)}" if error_policy else ""
        devices.append(
            "<disk type='file' device='disk'>"
            f"<driver name='qemu' type='qcow2' cache='none'{policy}/>"
            f"<source file={quoteattr(str(disk))}/>"
            "<target dev='vda' bus='virtio'/>"
            "</disk>"
        )
    if network:
        devices.append(
            "<interface type='ethernet'>"
            f"<source><ip address='{HOST_TAP_IP}' family='ipv4' prefix='{GUEST_NET_PREFIX}'/>"
            "</source><model type='virtio'/></interface>"
        )
    log = f"<log file={quoteattr(str(serial_log))} append='off'/>" if serial_log else ""
    devices.append(f"<serial type='pty'>{log}<target port='0'/></serial>")
    devices.append("<console type='pty'><target type='serial' port='0'/></console>")
    if virtio_console:
        vlog = ""
        if isinstance(virtio_console, Path):
            vlog = f"<log file={quoteattr(str(virtio_console))} append='off'/>"
        devices.append(f"<console type='pty'>{vlog}<target type='virtio' port='1'/></console>")
    if agent:
        devices.append(
            "<channel type='unix'>"
            "<target type='virtio' name='org.qemu.guest_agent.0'/>"
            "</channel>"
        )
    if graphics:
        devices.append("<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>")
        devices.append("<video><model type='vga'/></video>")
    else:
        devices.append("<video><model type='none'/></video>")
    stats = f"<stats period='{int(balloon_period)}'/>" if balloon_period else ""
    devices.append(f"<memballoon model='virtio'>{stats}</memballoon>")
    if pvpanic:
        devices.append("<panic model='isa'/>")
    if extra_devices:
        devices.append(extra_devices)

    uuid_xml = f"<uuid>{uuid or uuidlib.uuid4()}</uuid>"
    return (
        "<domain type='qemu'>"
        f"<name>{escape(name)}</name>{uuid_xml}"
        f"<memory unit='MiB'>{int(memory_mib)}</memory>"
        f"<currentMemory unit='MiB'>{int(memory_mib)}</currentMemory>"
        "<vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type>"
        f"<kernel>{escape(str(kernel))}</kernel>"
        f"<initrd>{escape(str(initrd))}</initrd>"
        f"<cmdline>{escape(cmdline)}</cmdline>"
        "</os>"
        "<features><acpi/></features>"
        "<clock offset='utc'/>"
        f"<on_poweroff>{on_poweroff}</on_poweroff>"
        f"<on_reboot>{on_reboot}</on_reboot>"
        f"<on_crash>{on_crash}</on_crash>"
        "<devices>"
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>"
        + "".join(devices)
        + "</devices></domain>"
    )


class TinyFilesystem:
    """A small tmpfs mounted on a directory, for disk-full (ENOSPC) scenarios.

    A qcow2 with a virtual size larger than the tmpfs, attached with
    ``error_policy='stop'``, pauses the guest (PAUSED/IOERROR, reason ``enospc``) as soon
    as the guest writes more than the tmpfs holds (``vw.fill=8``). Use as a context
    manager or call :meth:`mount` / :meth:`unmount`.
    """

    def __init__(self, directory: Path, size: str = "2M") -> None:
        self.directory = Path(directory)
        self.size = size
        self.mounted = False

    def mount(self) -> TinyFilesystem:
        """Mount the tmpfs (creating the directory)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs",
             str(self.directory)],
            check=True, capture_output=True, text=True,
        )
        self.mounted = True
        return self

    def disk(self, name: str = "disk.qcow2", size: str = "64M") -> Path:
        """Create a qcow2 of the given virtual size on the tmpfs and return its path."""
        return create_qcow2(self.directory / name, size)

    def unmount(self) -> None:
        """Unmount (lazily, in case a dying QEMU still holds the file). Idempotent."""
        if self.mounted or is_mountpoint(self.directory):
            subprocess.run(["umount", "-l", str(self.directory)], capture_output=True)
        self.mounted = False

    def __enter__(self) -> TinyFilesystem:
        return self.mount()

    def __exit__(self, *exc: object) -> None:
        self.unmount()


def is_mountpoint(path: Path) -> bool:
    """True if path is currently a mount point (per /proc/self/mountinfo)."""
    target = str(Path(path).resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)
