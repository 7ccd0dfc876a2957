"""Shared test fixtures: recorded real libvirt data and paths."""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
from collections import Counter
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


_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remember the session's exit status for :func:`pytest_unconfigure`, and arm a
    last-resort watchdog: should the process still be alive 5 minutes later (a hang
    in some plugin's teardown, before ours runs), every thread's stack is written to
    stderr and the process exits 1, instead of CI waiting out its 90 minutes."""
    session.config.stash[_EXIT_STATUS] = int(exitstatus)
    faulthandler.dump_traceback_later(300, exit=True, file=sys.__stderr__)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without interpreter finalization, as ``virtwatch run`` does.

    Finalization frees every libvirt object still referenced, and joins the
    non-daemon threads of ``asyncio.to_thread``. One libvirt call stuck in C
    since a libvirtd freeze or restart (e2e tests make both happen) holds its
    connection's lock forever, so either step can block for good: a suite that
    had passed then never exited (seen in CI, which gave up after 90 minutes).
    Threads still alive are named on stderr, then the process exits with the
    session's status.
    """
    status = config.stash.get(_EXIT_STATUS, None)
    if status is None:  # no session ran (usage error, --help): exit normally
        return
    alive = Counter(f"{t.name}{'' if t.daemon else ' (non-daemon)'}" for t in threading.enumerate()
                    if t is not threading.main_thread() and t.is_alive())
    if alive:
        names = ", ".join(f"{name} x{n}" for name, n in sorted(alive.items()))
        print(f"conftest: exiting past {sum(alive.values())} live thread(s): {names}", file=sys.stderr)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(status)
