"""In-memory :class:`~virtwatch.policy.ports.Hypervisor` for pure tests (and for the CLI's dry runs).

It models state transitions and the events a real libvirt would emit for
them (``emitted``), can be told to fail or hang specific calls, and records
every call in ``calls``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from ..model import ACTIVE, DomainState, Lifecycle, PausedReason, RunningReason, ShutoffReason
from .ports import ErrorCode, GuestInfo, HypervisorError


@dataclasses.dataclass
class FakeGuest:
    """One fake guest's mutable state."""

    name: str
    uuid: str
    state: int = DomainState.SHUTOFF
    reason: int = ShutoffReason.UNKNOWN
    autostart: bool = False
    persistent: bool = True
    managed_save: bool = False
    metadata: str | None = None
    corrupt_image: bool = False
    job: str | None = None      # a libvirt job running on it (``migration_out``, ``save``...)


class FakeHypervisor:
    """In-memory hypervisor.

    Attributes:
        guests: name -> :class:`FakeGuest`.
        calls: ``(method, name)`` in call order.
        fail: ``(method, name) -> HypervisorError`` raised on every such call (name ``"*"`` = any guest).
        hang: set of ``(method, name)`` that never return (until cancelled).
        emitted: ``(name, event, detail)`` lifecycle events a real libvirt would have emitted.
    """

    def __init__(self) -> None:
        self.guests: dict[str, FakeGuest] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[tuple[str, str], HypervisorError] = {}
        self.hang: set[tuple[str, str]] = set()
        self.emitted: list[tuple[str, str, str]] = []

    def add(self, name: str, uuid: str | None = None, **kw: Any) -> FakeGuest:
        """Define a guest (keyword arguments set :class:`FakeGuest` fields)."""
        g = FakeGuest(name, uuid or f"00000000-0000-0000-0000-{len(self.guests) + 1:012d}", **kw)
        self.guests[name] = g
        return g

    def count(self, method: str, name: str | None = None) -> int:
        """How many times ``method`` was called (for ``name`` or any guest)."""
        return sum(1 for m, n in self.calls if m == method and (name is None or n == name))

    async def _enter(self, method: str, name: str) -> FakeGuest | None:
        self.calls.append((method, name))
        await asyncio.sleep(0)
        if (method, name) in self.hang or (method, "*") in self.hang:
            await asyncio.Event().wait()
        err = self.fail.get((method, name)) or self.fail.get((method, "*"))
        if err is not None:
            raise err
        if name == "":
            return None
        g = self.guests.get(name)
        if g is None:
            raise HypervisorError(ErrorCode.NO_DOMAIN, f"Domain not found: no domain with matching name '{name}'")
        return g

    def _emit(self, g: FakeGuest, event: str, detail: str) -> None:
        self.emitted.append((g.name, event, detail))

    async def start(self, name: str, *, force_boot: bool = False) -> None:
        """Boot, or restore the managed-save image (``corrupt_image`` makes a restore fail)."""
        g = await self._enter("start", name)
        assert g is not None
        if g.state in ACTIVE:
            raise HypervisorError(ErrorCode.OPERATION_INVALID, "domain is already running")
        if g.managed_save and not force_boot:
            if g.corrupt_image:
                raise HypervisorError(ErrorCode.OPERATION_FAILED, "cannot restore managed save image")
            g.managed_save = False
            g.state, g.reason = DomainState.RUNNING, RunningReason.RESTORED
            self._emit(g, Lifecycle.STARTED, "RESTORED")
            return
        g.managed_save = False
        g.state, g.reason = DomainState.RUNNING, RunningReason.BOOTED
        self._emit(g, Lifecycle.RESUMED, "UNPAUSED")
        self._emit(g, Lifecycle.STARTED, "BOOTED")

    async def resume(self, name: str) -> None:
        """Resume a paused guest."""
        g = await self._enter("resume", name)
        assert g is not None
        if g.state != DomainState.PAUSED:
            raise HypervisorError(ErrorCode.OPERATION_INVALID, "domain is not paused")
        g.state, g.reason = DomainState.RUNNING, RunningReason.UNPAUSED
        self._emit(g, Lifecycle.RESUMED, "UNPAUSED")

    async def destroy(self, name: str) -> None:
        """Hard stop."""
        g = await self._enter("destroy", name)
        assert g is not None
        if g.state not in ACTIVE:
            raise HypervisorError(ErrorCode.OPERATION_INVALID, "domain is not running")
        g.state, g.reason = DomainState.SHUTOFF, ShutoffReason.DESTROYED
        self._emit(g, Lifecycle.SHUTDOWN, "HOST")
        self._emit(g, Lifecycle.STOPPED, "DESTROYED")

    async def managed_save(self, name: str) -> None:
        """Save and stop."""
        g = await self._enter("managed_save", name)
        assert g is not None
        if g.state not in ACTIVE:
            raise HypervisorError(ErrorCode.OPERATION_INVALID, "domain is not running")
        g.state, g.reason, g.managed_save = DomainState.SHUTOFF, ShutoffReason.SAVED, True
        self._emit(g, Lifecycle.SUSPENDED, "PAUSED")
        self._emit(g, Lifecycle.STOPPED, "SAVED")

    async def shutdown(self, name: str) -> None:
        """ACPI shutdown: the fake guest obeys at once."""
        g = await self._enter("shutdown", name)
        assert g is not None
        if g.state not in ACTIVE:
            raise HypervisorError(ErrorCode.OPERATION_INVALID, "domain is not running")
        g.state, g.reason = DomainState.SHUTOFF, ShutoffReason.SHUTDOWN
        self._emit(g, Lifecycle.SHUTDOWN, "GUEST")
        self._emit(g, Lifecycle.STOPPED, "SHUTDOWN")

    async def has_managed_save(self, name: str) -> bool:
        """Whether an image exists."""
        g = await self._enter("has_managed_save", name)
        assert g is not None
        return g.managed_save

    async def remove_managed_save(self, name: str) -> None:
        """Delete the image."""
        g = await self._enter("remove_managed_save", name)
        assert g is not None
        g.managed_save = False
        g.corrupt_image = False

    async def state(self, name: str) -> tuple[int, int]:
        """(state, reason)."""
        g = await self._enter("state", name)
        assert g is not None
        return int(g.state), int(g.reason)

    async def list_guests(self) -> list[GuestInfo]:
        """All guests."""
        await self._enter("list_guests", "")
        return [GuestInfo(g.name, g.uuid, int(g.state), int(g.reason), g.autostart, g.persistent)
                for g in self.guests.values()]

    async def metadata(self, name: str) -> str | None:
        """The metadata XML or None."""
        g = await self._enter("metadata", name)
        assert g is not None
        return g.metadata

    async def reset(self, name: str) -> None:
        """Hard reset: the guest keeps running (a real libvirt emits REBOOT, no lifecycle event)."""
        g = await self._enter("reset", name)
        assert g is not None
        if g.state not in ACTIVE:
            raise HypervisorError(ErrorCode.OPERATION_INVALID, "domain is not running")

    async def job(self, name: str) -> str | None:
        """The job set on the fake guest, or None."""
        g = await self._enter("job", name)
        assert g is not None
        return g.job

    # -- test helpers: things that happen to guests behind our back --------------

    def crash(self, name: str, preserve: bool = False) -> None:
        """Guest kernel panic (``<on_crash>destroy`` unless ``preserve``)."""
        g = self.guests[name]
        self._emit(g, Lifecycle.CRASHED, "PANICKED")
        if preserve:
            g.state, g.reason = DomainState.CRASHED, 1
        else:
            g.state, g.reason = DomainState.SHUTOFF, ShutoffReason.CRASHED
            self._emit(g, Lifecycle.STOPPED, "CRASHED")

    def pause_io_error(self, name: str) -> None:
        """Guest paused on an I/O error."""
        g = self.guests[name]
        g.state, g.reason = DomainState.PAUSED, PausedReason.IOERROR
        self._emit(g, Lifecycle.SUSPENDED, "IOERROR")
