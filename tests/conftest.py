"""Shared test fixtures: recorded real libvirt data and paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_asyncio

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def recorded_domstats() -> dict:
    """One real ``getAllDomainStats(0, NOWAIT)`` over 25 guests (libvirt 9.0, QEMU 7.2)."""
    return json.loads((FIXTURES / "domstats-libvirt9-qemu7.2.json").read_text())


@pytest.fixture(scope="session")
def recorded_events() -> list[dict]:
    """Real lifecycle / I/O-error event sequences in arrival order."""
    return [json.loads(line) for line in (FIXTURES / "events-libvirt9-qemu7.2.jsonl").read_text().splitlines()
            if line.strip()]


@pytest_asyncio.fixture(scope="session")
async def event_impl():
    """The process's libvirt event implementation (thread-safe libvirtaio) on the
    session loop. libvirt accepts one per process, so every test that runs a
    Daemon in this process (integration and e2e alike) shares this one."""
    from virtwatch.virt.aio import register_event_impl

    return register_event_impl()


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run every test that registers the process's libvirt event implementation last.

    Once it is registered, every libvirt connection in this process answers libvirtd's
    keepalive only while the asyncio loop turns, i.e. during async tests: a sync e2e
    test's idle connection would be dropped by libvirtd after ~30 s ("Broken pipe").
    The sort is stable, so the order within each group is unchanged.
    """
    items.sort(key=lambda item: "event_impl" in getattr(item, "fixturenames", ()))
