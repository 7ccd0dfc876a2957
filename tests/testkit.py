"""Helpers shared by the test suites: wait for a condition, scrape a daemon, read a sample.

Importable as ``testkit`` from every test (pytest puts ``tests/``, the
directory of the root conftest, on ``sys.path``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


async def until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
                interval: float = 0.01) -> float:
    """Wait until ``cond()`` is truthy, checking every ``interval`` seconds;
    returns the seconds it took. Raises AssertionError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not cond():
        if loop.time() - start > timeout:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(interval)
    return loop.time() - start


async def scrape(d: Any, path: str = "/metrics") -> tuple[int, str]:
    """GET ``path`` from a running in-process :class:`~virtwatch.app.Daemon`; (status, body)."""
    host, port = d.listen_address
    async with aiohttp.ClientSession() as s, s.get(f"http://{host}:{port}{path}") as r:
        return r.status, await r.text()


def sample(text: str, name: str, **labels: str) -> float | None:
    """Value of the first sample ``name`` in exposition ``text`` whose labels include ``labels``."""
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


class ReadyConnection:
    """Connection port for a :class:`~virtwatch.virt.stats.StatsPoller`: ``conn``
    (a test-driver connection), always ready."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.ready = asyncio.Event()
        self.ready.set()


class PollerRig:
    """What a :class:`~virtwatch.virt.stats.StatsPoller` test needs on the test driver:
    settings (``test:///default`` plus ``overrides``), a registry with the daemon's
    instruments, and a lane pool whose main connection is ``conn`` (ready).
    Call :meth:`close` after the test (it waits for idle lanes to close)."""

    def __init__(self, conn: Any, **overrides: Any) -> None:
        from prometheus_client import CollectorRegistry

        from virtwatch.config import load_settings
        from virtwatch.metrics.instruments import Instruments
        from virtwatch.virt.lanes import LanePool

        self.settings = load_settings(None, {"libvirt.uri": "test:///default", **overrides})
        self.registry = CollectorRegistry()
        self.instruments = Instruments(self.registry)
        self.lanes = LanePool(self.settings.libvirt, True, self.instruments, self.settings.stats.max_stuck_lanes)
        self.registry.register(self.lanes)
        self.lanes.connection_ready(conn)
        self.connection = ReadyConnection(conn)

    def value(self, name: str, **labels: str) -> float | None:
        """A sample of the rig's registry (None when absent)."""
        return self.registry.get_sample_value(name, labels)

    async def close(self) -> None:
        """Retire every lane and wait (bounded) for the idle ones to close."""
        await self.lanes.stop(timeout=5.0)


def labels_of(text: str, name: str, **labels: str) -> dict[str, str] | None:
    """All labels of the first sample ``name`` in exposition ``text`` whose labels include
    ``labels`` (e.g. the ``device`` of ``libvirt_domain_interface_info{target="vnet3"}``)."""
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return dict(s.labels)
    return None
