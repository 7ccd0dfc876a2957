"""Test rig: engine + FakeHypervisor + FakeClock + a real SQLite file (on the store's own thread),
and an event pump that turns the fake's emitted lifecycle events into :class:`Event` records the way
the daemon does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from virtwatch.model import Event
from virtwatch.policy.clock import FakeClock
from virtwatch.policy.config import PolicySettings
from virtwatch.policy.engine import PolicyEngine
from virtwatch.policy.fakes import FakeHypervisor
from virtwatch.policy.host import LibvirtGuestsPaths
from virtwatch.policy.store import AsyncStore

LIFECYCLE_CODES = {"DEFINED": 0, "UNDEFINED": 1, "STARTED": 2, "SUSPENDED": 3, "RESUMED": 4, "STOPPED": 5,
                   "SHUTDOWN": 6, "PMSUSPENDED": 7, "CRASHED": 8}


class Rig:
    def __init__(self, tmp: Path, settings: dict, hv: FakeHypervisor | None = None, clock: FakeClock | None = None,
                 boot_id: str = "boot-1", auto_boot_flow: bool = True,
                 on_commit: Callable[[], None] | None = None) -> None:
        self.auto_boot_flow = auto_boot_flow
        self.tmp = tmp
        self.settings = PolicySettings.model_validate({"enabled": True, **settings})
        self.hv = hv or FakeHypervisor()
        self.clock = clock or FakeClock(settle=self.settle)
        self.boot_path = tmp / "boot_id"
        self.boot_path.write_text(boot_id + "\n")
        self.lg = LibvirtGuestsPaths(config_files=(str(tmp / "libvirt-guests"),), unit_dirs=(str(tmp / "systemd"),))
        self.seq = 0
        self.pumped = 0
        self.alerts = []
        self.on_commit = on_commit
        self.store = AsyncStore(tmp / "state.db", clock=self.clock.time, on_commit=on_commit)
        self.engine = self._engine()

    async def settle(self, timeout: float = 60.0) -> None:
        """Let every task run until nothing moves: no task ready on the loop, no store call unanswered.
        Raises AssertionError after ``timeout`` seconds of real time."""
        async with asyncio.timeout(timeout):
            while True:
                for _ in range(50):  # settled: 50 turns of the loop in a row with no store call unanswered
                    if self.store.pending:
                        break
                    await asyncio.sleep(0)
                else:
                    return
                await self.store.idle()

    def _engine(self) -> PolicyEngine:
        return PolicyEngine(self.settings, self.hv, self.store, clock=self.clock, rand=lambda: 0.0,
                            alert=self.alerts.append, boot_id_path=self.boot_path, libvirt_guests=self.lg,
                            auto_boot_flow=self.auto_boot_flow)

    async def start(self, ready: bool = True) -> None:
        await self.store.open()
        await self.engine.start()
        if ready:
            self.engine.set_ready(True)
        await self.settle()

    async def restart_daemon(self) -> None:
        """Stop the engine, reopen the store from disk, start a new engine."""
        await self.engine.stop()
        await self.store.close()
        self.store = AsyncStore(self.tmp / "state.db", clock=self.clock.time, on_commit=self.on_commit)
        self.engine = self._engine()
        await self.start()

    def event(self, name: str, event: str, detail: str, kind: str = "lifecycle", payload=None) -> Event:
        self.seq += 1
        g = self.hv.guests.get(name)
        raw = (LIFECYCLE_CODES.get(event, -1), 0) if kind == "lifecycle" else ()
        return Event(self.clock.time(), self.seq, "domain", kind, name, g.uuid if g else "", event, detail,
                     payload or {}, raw)

    def feed(self, name: str, event: str, detail: str, kind: str = "lifecycle", payload=None) -> None:
        self.engine.on_event(self.event(name, event, detail, kind, payload))

    def pump(self) -> int:
        """Deliver everything the fake hypervisor emitted since the last pump."""
        new = self.hv.emitted[self.pumped:]
        self.pumped = len(self.hv.emitted)
        for name, ev, det in new:
            self.feed(name, ev, det)
        return len(new)

    async def run(self, seconds: float, step: float = 0.25) -> None:
        """Advance fake time in steps, pumping emitted events in between (the clock settles the
        rig after each wake-up and each step)."""
        t = 0.0
        while t < seconds - 1e-9:
            d = min(step, seconds - t)
            self.pump()
            await self.clock.advance(d)
            t += d
        self.pump()
        await self.settle()

    async def close(self) -> None:
        await self.engine.stop()
        await self.store.close()
