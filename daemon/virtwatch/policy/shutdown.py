"""The host-shutdown save path (``virtwatch guests-save``, the ExecStop of virtwatch-guests-save.service).

Unless libvirt-guests owns host shutdown, :class:`SavePath` marks the host as
shutting down (stops are then never reacted to), records which managed guests
were running (``was_running``: the next boot flow brings them back), and runs
each one's ``on_host_shutdown`` steps in order (``managedsave``, ``shutdown``,
``destroy``), each bounded by its timeout and journalled, until one stops it.
"""

from __future__ import annotations

import asyncio
import functools
from types import MappingProxyType
from typing import Any

from ..model import ACTIVE, DomainState
from .config import ShutdownStep
from .guests import POLL_INTERVAL, ActionJournal, GuestTable
from .host import LibvirtGuestsPaths, libvirt_guests_active
from .model import GuestEntry, SaveReport
from .ports import ErrorCode, HypervisorError
from .select import Selection


class SavePath:
    """The save path of the engine whose guest table and journal it is given.

    Args:
        table: the engine's :class:`~virtwatch.policy.guests.GuestTable` (its ``host_shutdown``
            is set here).
        journal: its :class:`~virtwatch.policy.guests.ActionJournal`.
        libvirt_guests: where to detect libvirt-guests.
    """

    def __init__(self, table: GuestTable, journal: ActionJournal, libvirt_guests: LibvirtGuestsPaths) -> None:
        self._t = table
        self._journal = journal
        self._lg_paths = libvirt_guests
        self._hv = table.hv
        self._store = table.store
        self._clock = table.clock
        self._settings = table.settings
        self._log = table.log

    def libvirt_guests_status(self) -> Any:
        """:func:`~virtwatch.policy.host.libvirt_guests_active` on the configured paths."""
        return libvirt_guests_active(self._lg_paths)

    async def run(self) -> SaveReport:
        """Host-shutdown save path (``virtwatch guests-save``).

        Refuses (and logs why) when libvirt-guests owns host shutdown.
        Otherwise marks the host as shutting down, records which managed guests
        were running (``was_running``), and for each runs the ``on_host_shutdown``
        steps in order, each bounded by its timeout, until one stops the guest.
        """
        status = self.libvirt_guests_status()
        if status.active:
            self._log.warning("policy_save_refused", why=status.why,
                              msg="libvirt-guests handles host shutdown; virtwatch does not save guests")
            return SaveReport(True, status.why)
        self._t.host_shutdown = True
        infos = await self._t.call("list_guests", self._hv.list_guests())
        targets: list[tuple[GuestEntry, Selection]] = []
        for info in infos:
            g = self._t.get(info.name, info.uuid)
            g.live = (info.state, info.reason)
            await self._t.refresh_metadata(g)
            sel = self._t.selection(g)
            if sel.managed and info.state in ACTIVE:
                targets.append((g, sel))
        marked = [g.st.replace(was_running=True) for g, _ in targets]
        for (g, _), st in zip(targets, marked, strict=True):
            g.st = st
        await self._store.save_guests(marked)
        results: dict[str, str] = {}
        sem = asyncio.Semaphore(self._settings.max_parallel_saves)

        async def one(g: GuestEntry, sel: Selection) -> None:
            async with sem:
                if sel.mode != "enforce":
                    results[g.st.name] = f"would {sel.policy.on_host_shutdown[0].action}"
                    return
                results[g.st.name] = await self._save_one(g, sel.policy.on_host_shutdown)

        await asyncio.gather(*(one(g, s) for g, s in targets))
        self._log.info("policy_save_done", results=results)
        return SaveReport(False, status.why, MappingProxyType(results))

    async def _save_one(self, g: GuestEntry, steps: tuple[ShutdownStep, ...]) -> str:
        name = g.st.name
        for step in steps:
            out = await self._journal.run(g, step.action, "host shutdown", functools.partial(self._save_step, g, step))
            if out.error is None:
                self._log.info("policy_save_step", guest=name, uuid=g.st.uuid, step=step.action, result="ok")
                return step.action
            self._log.warning("policy_save_step", guest=name, uuid=g.st.uuid, step=step.action, result="failed",
                              code=out.error.code, error=out.error.message)
        return "failed"

    async def _save_step(self, g: GuestEntry, step: ShutdownStep) -> None:
        name = g.st.name
        if step.action == "managedsave":
            await self._t.tagged(g, "managedsave", self._hv.managed_save(name), step.timeout)
        elif step.action == "destroy":
            await self._t.tagged(g, "destroy", self._hv.destroy(name), step.timeout)
        else:
            await self._t.tagged(g, "shutdown", self._shutdown_and_wait(name, step.timeout), step.timeout + 1)

    async def _shutdown_and_wait(self, name: str, timeout: float) -> None:
        """Ask the guest to shut down, then poll until it is off. Raises HypervisorError
        (``OPERATION_TIMEOUT`` when still on after ``timeout`` seconds of the clock)."""
        # each call under the engine's deadline too, as every other libvirt call of the engine
        await self._t.call("shutdown", self._hv.shutdown(name), timeout)
        start = self._clock.monotonic()
        while self._clock.monotonic() - start < timeout:
            state, _ = await self._t.call("state", self._hv.state(name), timeout)
            if state == DomainState.SHUTOFF:
                return
            await self._clock.sleep(min(POLL_INTERVAL, timeout))
        raise HypervisorError(ErrorCode.OPERATION_TIMEOUT, f"{name} did not power off within {timeout:g} s")
