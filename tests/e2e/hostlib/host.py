"""Host prerequisites for the e2e tests: who may run them, and starting libvirtd."""

from __future__ import annotations

import os
import subprocess
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
