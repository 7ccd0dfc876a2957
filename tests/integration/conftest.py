"""Integration fixtures: the libvirt test driver in this process, one loop.

libvirt accepts one event implementation per process, so the session-scoped
loop registers it once (``event_impl``) and every test shares it.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as xml_escape

import libvirt
import pytest
import pytest_asyncio

from virtwatch.app import Daemon
from virtwatch.config import load_settings
from virtwatch.virt.aio import ThreadSafeAsyncIOImpl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # the process helpers are shared
from hostlib.promstack import AlertmanagerProcess

TEST_URI = "test:///default"


@pytest.fixture
def alertmanagers(tmp_path: Path) -> Iterator[list[AlertmanagerProcess]]:
    """Two started real Alertmanagers (Debian ``prometheus-alertmanager``) on loopback ports
    (use ``[0]`` when one is enough); stopped after the test."""
    ams = [AlertmanagerProcess(tmp_path / f"am{i}") for i in range(2)]
    try:
        for am in ams:
            am.start()
        yield ams
    finally:
        for am in ams:
            am.stop()


@pytest.fixture
def actor() -> Iterator[libvirt.virConnect]:
    """A second connection to the shared ``test:///default`` driver that
    tests use to change guests (the daemon sees the resulting events)."""
    conn = libvirt.open(TEST_URI)
    yield conn
    conn.close()


def guest_xml(name: str, memory_kib: int = 65536) -> str:
    """Minimal test-driver guest XML with a random UUID."""
    return (f"<domain type='test'><name>{xml_escape(name)}</name><uuid>{uuid.uuid4()}</uuid>"
            f"<memory>{memory_kib}</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>")


@pytest.fixture
def make_guests(actor: libvirt.virConnect) -> Iterator[Any]:
    """Factory creating uniquely named transient or persistent test guests,
    removed again after the test."""
    made: list[libvirt.virDomain] = []

    def make(prefix: str, count: int = 1, persistent: bool = False) -> list[libvirt.virDomain]:
        out = []
        for _ in range(count):
            name = f"{prefix}-{uuid.uuid4().hex[:8]}"
            if persistent:
                dom = actor.defineXML(guest_xml(name))
                dom.create()
            else:
                dom = actor.createXML(guest_xml(name), 0)
            out.append(dom)
        made.extend(out)
        return out

    yield make
    for dom in made:
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError:
            pass
        try:
            dom.undefine()
        except libvirt.libvirtError:
            pass


@pytest_asyncio.fixture
async def daemon(event_impl: ThreadSafeAsyncIOImpl) -> AsyncIterator[Daemon]:
    """A started daemon on the test driver, HTTP on an ephemeral loopback port."""
    settings = load_settings(None, {"libvirt.uri": TEST_URI, "http.listen": "127.0.0.1:0",
                                    "stats.poll_interval": 0.5, "log.events": False})
    d = Daemon(settings, event_impl)
    await d.start()
    await d.connection.ready.wait()
    yield d
    await d.stop()
