"""The boot flow: once per host boot, start or restore the guests that should run.

After libvirt's own autostart has settled, :class:`BootFlow` lists the guests,
marks the candidates (:func:`~virtwatch.policy.decide.boot_candidate`) together
with the boot id in one transaction, and starts them by priority then name,
``start_delay`` apart, restores bounded by ``max_parallel_restores``. Each guest
is cleared as it is handled, so a daemon restart mid-flow resumes and replays
nothing; a guest stopped under our eyes in this boot is left to that stop's
own decision.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..model import ACTIVE
from .actions import ActionRunner
from .decide import boot_candidate
from .guests import POLL_INTERVAL, GuestTable
from .host import read_boot_id
from .model import BootReport, GuestEntry, GuestState
from .ports import HypervisorError


class BootFlow:
    """The boot flow of the engine whose guest table and action runner it is given.

    Args:
        table: the engine's :class:`~virtwatch.policy.guests.GuestTable`.
        actions: its :class:`~virtwatch.policy.actions.ActionRunner` (starts and restores).
        boot_id_path: file holding the host boot id.
        wait_ready: returns once the engine may act (connected and resynced).

    Attributes:
        boot_id: the current host's boot id (None when unreadable).
        handled: the boot id whose flow has been recorded as begun (persisted meta ``boot_id``).
    """

    def __init__(self, table: GuestTable, actions: ActionRunner, boot_id_path: str | Path,
                 wait_ready: Callable[[], Awaitable[object]]) -> None:
        self._t = table
        self._actions = actions
        self._boot_id_path = boot_id_path
        self._wait_ready = wait_ready
        self._hv = table.hv
        self._store = table.store
        self._clock = table.clock
        self._settings = table.settings
        self._log = table.log
        self._lock = asyncio.Lock()
        self.boot_id: str | None = None
        self.handled: str | None = None

    def load(self, handled: str | None) -> None:
        """At start: the persisted handled boot id, and the current one (a read failure is logged)."""
        self.handled = handled
        try:
            self.boot_id = read_boot_id(self._boot_id_path)
        except OSError as err:
            self.boot_id = None
            self._log.warning("policy_boot_id_unreadable", path=str(self._boot_id_path), error=str(err))

    def pending(self) -> bool:
        """True while the boot flow of the current host boot has not completed."""
        if self.boot_id is None:
            return False
        if self.handled != self.boot_id:
            return True
        return any(g.st.boot_pending == self.boot_id for g in self._t.guests.values())

    async def _settle(self) -> None:
        s = self._settings
        if s.boot_settle_timeout <= 0:
            return
        start = self._clock.monotonic()
        last: list[tuple[str, int]] | None = None
        quiet_since = start
        while self._clock.monotonic() - start < s.boot_settle_timeout:
            try:
                cur = sorted((i.name, i.state) for i in await self._t.call("list_guests", self._hv.list_guests()))
            except HypervisorError:
                cur = None
            now = self._clock.monotonic()
            if cur != last:
                last, quiet_since = cur, now
            elif now - quiet_since >= s.boot_settle_quiet:
                self._log.info("policy_boot_settled", after_seconds=round(now - start, 3))
                return
            await self._clock.sleep(POLL_INTERVAL)
        self._log.warning("policy_boot_settle_timeout", timeout=s.boot_settle_timeout)

    async def run(self) -> BootReport:
        """Once per host boot: start/restore candidate guests by priority then name.

        Candidates: managed, persistent, shut off after libvirt's autostart
        settled, not held or given up, not seen stopping by a lifecycle event
        since this daemon started (that event's own decision stands), and
        ``autostart`` is ``always`` or ``was-running`` with intent running or
        saved by the save path. The boot
        id and the candidate list are persisted first, each guest is cleared
        as it is handled: a daemon restart mid-flow resumes, replaying nothing.
        Raises OSError when the boot id cannot be read.
        """
        async with self._lock:
            return await self._run()

    async def _run(self) -> BootReport:
        boot_id = read_boot_id(self._boot_id_path)
        self.boot_id = boot_id
        await self._wait_ready()
        log = self._log.bind(boot_id=boot_id)
        if self.handled != boot_id:
            await self._settle()
            infos = await self._t.call("list_guests", self._hv.list_guests())
            marked: list[GuestState] = []
            for info in infos:
                g = self._t.get(info.name, info.uuid)
                g.live = (info.state, info.reason)
                await self._t.refresh_metadata(g)
                sel = self._t.selection(g)
                self._t.first_sight(g, sel, info.state)
                if boot_candidate(autostart=sel.policy.autostart, managed=sel.managed, persistent=info.persistent,
                                  state=info.state, intent=g.st.intent, was_running=g.st.was_running,
                                  given_up=g.st.history.given_up, stopped_this_boot=g.stop_seen == boot_id,
                                  migrated_away=g.st.migrated_to is not None):
                    g.st = g.st.replace(boot_pending=boot_id)
                    marked.append(g.st)
            self.handled = boot_id
            await self._store.begin_boot(boot_id, marked)
            log.info("policy_boot_flow", candidates=[s.name for s in marked])
        else:
            log.info("policy_boot_flow_resume")
        todo = [g for g in self._t.guests.values() if g.st.boot_pending == boot_id and not g.gone]
        todo.sort(key=lambda g: (-self._t.selection(g).policy.priority, g.st.name))
        if not todo:
            return BootReport(boot_id, skipped=True)
        started: list[str] = []
        restored: list[str] = []
        failed: list[str] = []
        would: list[str] = []

        async def one(g: GuestEntry) -> None:
            sel = self._t.selection(g)
            name = g.st.name
            try:
                if sel.mode != "enforce":
                    would.append(name)
                    log.info("policy_boot_would_start", guest=name, mode=sel.mode)
                    return
                state, _ = await self._t.call("state", self._hv.state(name))
                if state in ACTIVE:
                    return
                if g.stop_seen == boot_id or g.st.intent == "held":
                    # started and stopped again while the flow waited (an admin destroy, a crash):
                    # that stop's own event decides, the boot flow must not undo it
                    log.info("policy_boot_skip", guest=name, intent=g.st.intent,
                             why="stopped while watched" if g.stop_seen == boot_id else f"intent {g.st.intent}")
                    return
                res = await self._actions.start_guest(g, sel, "boot flow", count_restart=False)
                if res == "restored":
                    restored.append(name)
                elif res in ("ok", "already_running", "discarded"):
                    started.append(name)
                else:
                    failed.append(name)
            except HypervisorError as err:
                failed.append(name)
                log.warning("policy_boot_start_failed", guest=name, code=err.code, error=err.message)
            finally:
                await self._t.persist(g, g.st.replace(boot_pending=None, was_running=False))

        tasks = []
        for i, g in enumerate(todo):
            if i and self._settings.start_delay > 0:
                await self._clock.sleep(self._settings.start_delay)
            tasks.append(asyncio.ensure_future(one(g)))
        await asyncio.gather(*tasks)
        report = BootReport(boot_id, False, tuple(started), tuple(restored), tuple(failed), tuple(would))
        log.info("policy_boot_flow_done", started=report.started, restored=report.restored, failed=report.failed,
                 would_start=report.would_start)
        return report
