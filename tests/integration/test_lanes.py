"""The lane pool on the test driver: quarantine, the cap, a busy lane kept at the cap,
retirement when the main connection goes, and one thread per lane that ends with it.

Blocking functions stand in for a libvirt call stuck on a hung QEMU: they hold the
lane's only thread exactly as such a call does.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import libvirt
import pytest
import pytest_asyncio

from testkit import PollerRig, until
from virtwatch.virt.calls import CallTimeout
from virtwatch.virt.lanes import LaneUnavailable


def lane_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("virtwatch-lane-")}


def blocked(conn: libvirt.virConnect, gate: threading.Event) -> str:
    gate.wait(30)
    return conn.getHostname()


def hostname(conn: libvirt.virConnect) -> str:
    return conn.getHostname()


@pytest_asyncio.fixture
async def rig(actor: libvirt.virConnect) -> AsyncIterator[PollerRig]:
    r = PollerRig(actor, **{"stats.max_stuck_lanes": 1})
    yield r
    await r.close()


async def test_quarantine_cap_and_busy_lane(rig: PollerRig) -> None:
    lanes = rig.lanes
    gate = threading.Event()
    try:
        assert await lanes.run("host", "getHostname", hostname, timeout=5) == await asyncio.to_thread(
            lambda: libvirt.open("test:///default").getHostname())
        # a stats call hangs: its lane is quarantined, the next stats call gets a new lane
        with pytest.raises(CallTimeout):
            await lanes.run("stats", "getAllDomainStats", blocked, gate, timeout=0.2)
        assert lanes.quarantined == 1 and rig.value("virtwatch_libvirt_lanes", state="quarantined") == 1
        # at the cap: no new lane for a role without one
        with pytest.raises(LaneUnavailable) as exc:
            await lanes.run("stats", "getAllDomainStats", hostname, timeout=1)
        assert exc.value.reason == "cap"
        # the host lane (opened before) hangs too: kept in its role, busy, never a 2nd quarantine
        with pytest.raises(CallTimeout):
            await lanes.run("host", "hostStats", blocked, gate, timeout=0.2)
        assert lanes.quarantined == 1
        with pytest.raises(LaneUnavailable) as exc:
            await lanes.run("host", "hostStats", hostname, timeout=1)
        assert exc.value.reason == "busy"
        assert rig.value("virtwatch_libvirt_lane_unavailable_total", role="host", reason="busy") == 1
        assert rig.value("virtwatch_libvirt_lane_unavailable_total", role="stats", reason="cap") == 1
        assert len(lane_threads()) == 2  # the stuck stats lane and the busy host lane
        # the calls return: the quarantined lane closes and its thread ends; the host lane serves again
        gate.set()
        await until(lambda: lanes.quarantined == 0, 5, "quarantined lane closed")
        assert rig.value("virtwatch_libvirt_lanes_recovered_total", role="stats") == 1
        await until(lambda: not lanes._active["host"].busy, 5, "host lane idle")
        assert isinstance(await lanes.run("host", "getHostname", hostname, timeout=5), str)
        assert isinstance(await lanes.run("stats", "getHostname", hostname, timeout=5), str)
        await until(lambda: len(lane_threads()) == 2, 5, "one thread per open lane")
        assert rig.value("virtwatch_libvirt_lanes", state="active") == 2
    finally:
        gate.set()


async def test_connection_lost_retires_every_lane(rig: PollerRig, actor: libvirt.virConnect) -> None:
    lanes = rig.lanes
    gate = threading.Event()
    before = lane_threads()
    try:
        for role in ("stats", "host", "probe"):
            await lanes.run(role, "getHostname", hostname, timeout=5)
        stuck: Any = asyncio.get_running_loop().create_task(
            lanes.run("probe", "domainListGetStats", blocked, gate, timeout=30))
        await until(lambda: lanes._active["probe"].busy, 5, "probe call running")
        lanes.connection_lost()
        assert lanes.active == 0
        with pytest.raises(LaneUnavailable) as exc:
            await lanes.run("stats", "getAllDomainStats", hostname, timeout=1)
        assert exc.value.reason == "disconnected"
        await until(lambda: lanes.quarantined == 1, 5, "idle lanes closed, the busy one waits")
        gate.set()
        assert isinstance(await stuck, str)  # a call in flight finishes before its lane closes
        await until(lambda: lanes.quarantined == 0 and lane_threads() == before, 5, "every lane closed")
        assert rig.value("virtwatch_libvirt_lanes_recovered_total", role="probe") is None  # retired, not stuck
        lanes.connection_ready(actor)
        assert isinstance(await lanes.run("stats", "getHostname", hostname, timeout=5), str)
    finally:
        gate.set()
