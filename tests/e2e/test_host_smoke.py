"""Smoke tests of the e2e host infrastructure, with libvirt-python only (no virtwatch code).

All scenario guests of this module boot at once (module fixture ``fleet``) so the module
takes roughly one boot plus the longest scenario, not their sum.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import libvirt
import pytest

from hostlib import GUEST_IP, READY_MARKER, Guest, GuestFactory, GuestImage, open_conn

NOWAIT = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT


@pytest.fixture(scope="module")
def fleet(guest_image: GuestImage) -> Iterator[dict[str, list[Guest]]]:
    """Every scenario's guests, started together; waited for by each test."""
    factory = GuestFactory(guest_image, test_name="smoke")
    try:
        guests = {
            "busy": [factory.create("busy", options={"io": 1, "net": 1}, wait=False)
                     for _ in range(2)],
            # persistent: a transient guest vanishes when on_crash destroys it
            "panic": [factory.create("panic", options={"panic": 3}, persistent=True,
                                     wait=False)],
            "agent": [factory.create("agent", options={"agent": 1, "net": 1}, agent=True,
                                     wait=False)],
            "diskfull": [factory.create("diskfull", options={"fill": 8}, tiny_fs=True,
                                        wait=False)],
        }
        yield guests
    finally:
        factory.cleanup()


def _stats_by_name(conn: libvirt.virConnect, names: set[str]) -> dict[str, dict]:
    return {dom.name(): st for dom, st in conn.getAllDomainStats(0, NOWAIT)
            if dom.name() in names}


def test_counters_grow(fleet: dict[str, list[Guest]]) -> None:
    """cpu, block and net counters of two busy guests grow; balloon guest stats exist."""
    busy = fleet["busy"]
    for guest in busy:
        guest.boot_seconds = guest.wait_for_serial(READY_MARKER)
    time.sleep(2)  # let the balloon driver deliver its first stats (period 2 s)
    conn = busy[0].dom.connect()
    names = {g.name for g in busy}
    before = _stats_by_name(conn, names)
    time.sleep(4)
    after = _stats_by_name(conn, names)
    assert set(before) == set(after) == names
    for name in names:
        a, b = before[name], after[name]
        for key in ("cpu.time", "block.0.rd.bytes", "block.0.wr.bytes",
                    "net.0.rx.bytes", "net.0.tx.bytes"):
            assert b[key] > a[key], f"{name}: {key} did not grow ({a[key]} -> {b[key]})"
        for key in ("balloon.usable", "balloon.available", "balloon.current"):
            assert key in b, f"{name}: {key} missing from {sorted(b)}"


def test_panic_is_stopped_crashed(fleet: dict[str, list[Guest]]) -> None:
    """vw.panic=3 + pvpanic + on_crash=destroy: the guest ends SHUTOFF/CRASHED."""
    (guest,) = fleet["panic"]
    guest.wait_for_serial("VW PANIC", timeout=60)
    state = guest.wait_for_state(libvirt.VIR_DOMAIN_SHUTOFF, timeout=30)
    assert state == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED)


def test_agent_reports_guest_address(fleet: dict[str, list[Guest]]) -> None:
    """qemu-ga in the guest answers interfaceAddresses(SRC_AGENT) with 192.0.2.2."""
    (guest,) = fleet["agent"]
    guest.wait_for_serial(READY_MARKER)
    guest.dom.agentSetResponseTimeout(5)
    deadline = time.monotonic() + 30
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            ifaces = guest.dom.interfaceAddresses(
                libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT)
        except libvirt.libvirtError as exc:  # agent not connected yet
            last_error = exc
            time.sleep(1)
            continue
        addrs = {a["addr"] for i in ifaces.values() for a in (i.get("addrs") or [])}
        if GUEST_IP in addrs:
            return
        last_error = AssertionError(f"agent answered without {GUEST_IP}: {ifaces}")
        time.sleep(1)
    pytest.fail(f"no {GUEST_IP} from the guest agent within 30 s: {last_error}")


def test_disk_full_pauses_on_io_error(fleet: dict[str, list[Guest]]) -> None:
    """A qcow2 on a 2 MiB tmpfs with error_policy=stop: PAUSED/IOERROR (enospc)."""
    (guest,) = fleet["diskfull"]
    state = guest.wait_for_state(libvirt.VIR_DOMAIN_PAUSED, timeout=60)
    assert state == (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR)
    errors = guest.dom.diskErrors()
    assert errors.get("vda") == libvirt.VIR_DOMAIN_DISK_ERROR_NO_SPACE, errors


def test_factory_cleans_up_managed_save(guest_factory: GuestFactory) -> None:
    """A defined guest with a managed-save image is fully removed by cleanup()."""
    guest = guest_factory.create("msave", persistent=True, disk=False, network=False)
    guest.dom.managedSave(0)
    assert guest.dom.hasManagedSaveImage(0) == 1
    guest_factory.cleanup()
    conn = open_conn()
    try:
        with pytest.raises(libvirt.libvirtError) as exc:
            conn.lookupByName(guest.name)
        assert exc.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    finally:
        conn.close()
    assert not guest_factory.directory.exists()
