"""Host prerequisites for the e2e tests: who may run them, and starting libvirtd."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
START_SCRIPT = REPO_ROOT / ".ci" / "start-libvirtd.sh"
LIBVIRTD = Path("/usr/sbin/libvirtd")


def host_skip_reason() -> str | None:
    """Why e2e tests cannot run on this host (not root, no libvirtd), or None if they can."""
    if os.geteuid() != 0:
        return "e2e tests need root (they start libvirtd and QEMU guests on qemu:///system)"
    if not LIBVIRTD.exists():
        return f"{LIBVIRTD} missing: install the packages in .ci/apt-packages.txt"
    return None


def start_libvirtd(timeout: float = 120.0) -> None:
    """Run ``.ci/start-libvirtd.sh`` (idempotent); raise RuntimeError with its output on failure."""
    proc = subprocess.run(
        ["bash", str(START_SCRIPT)], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{START_SCRIPT} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )


def check_guest_net_free() -> None:
    """Fail if the guests' link subnet (hostlib.domain.GUEST_IP/24) is in use on the host.

    libvirt puts HOST_TAP_IP on each guest tap; if the host's own network used that
    subnet, the tap routes would compete with it. Raises RuntimeError naming the interface.
    """
    import ipaddress

    from .domain import GUEST_IP, GUEST_NET_PREFIX

    net = ipaddress.ip_network(f"{GUEST_IP}/{GUEST_NET_PREFIX}", strict=False)
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        fields = line.split()
        ifname, addr = fields[1], fields[3]
        if ifname.startswith("vnet"):
            continue  # a guest tap of ours
        if ipaddress.ip_interface(addr).network.overlaps(net):
            raise RuntimeError(
                f"host interface {ifname} has {addr}, which overlaps the e2e guest link "
                f"subnet {net}: change GUEST_IP/HOST_TAP_IP in hostlib/domain.py and "
                "guest-init.sh"
            )


def libvirtd_pid() -> int:
    """PID of the live (not zombie) ``libvirtd`` process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        state = stat[stat.rindex(")") + 2]
        if comm == "libvirtd" and state not in ("Z", "X"):
            return int(entry)
    raise RuntimeError("no live libvirtd process")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in ("Z", "X")


def thaw(pid: int) -> bool:
    """SIGCONT libvirtd; True when it is still alive a second later.

    libvirt 9.0's libvirtd itself sometimes segfaults on waking (kernel log:
    ``rpc-libvirtd[...]: segfault ... in libvirtd``) when requests from a client
    that keepalive has meanwhile closed are still queued. That is libvirtd's
    bug, not ours: it is restarted so that the rest of the suite has one, and
    our daemon must reconnect either way.
    """
    os.kill(pid, signal.SIGCONT)
    time.sleep(1.0)
    if _alive(pid):
        return True
    start_libvirtd()
    return False
