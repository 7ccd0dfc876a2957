"""Carrying out a guest's pending action: restart, resume or kill, behind the circuit breaker.

:class:`ActionRunner` runs the action a decision scheduled, once it is due
(the engine's per-guest worker calls :meth:`ActionRunner.run_pending`), and
starts or restores guests for the boot flow (:meth:`ActionRunner.start_guest`).
Every action is journalled (intent before act, :class:`~virtwatch.policy.guests.ActionJournal`);
starts and restores are bounded by ``max_parallel_starts`` / ``max_parallel_restores``; beyond
``max_actions_per_minute`` actions are deferred (the breaker). A failed start is a failure
for the restart budget (retry with backoff, or give up on a permanent error); a managed-save
image that cannot be restored follows ``on_restore_failure``.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from ..model import ACTIVE, RUNNING, DomainState, RunningReason
from . import budget
from .classify import LIVENESS_CAUSES
from .decide import restore_failure_plan
from .guests import ActionJournal, GuestTable, Outcome
from .model import GuestEntry
from .ports import ErrorCode, HypervisorError
from .select import Selection

#: Window of the ``max_actions_per_minute`` circuit breaker, seconds.
BREAKER_WINDOW = 60.0


def _ok_unless_invalid(detail: str) -> Callable[[HypervisorError], Outcome]:
    """Read an action's error: OPERATION_INVALID (the guest is already where the action would
    take it) is ``ok`` with ``detail``; any other error is ``failed`` with its message."""
    def read(err: HypervisorError) -> Outcome:
        return Outcome("ok", detail) if err.code == ErrorCode.OPERATION_INVALID else Outcome("failed", err.message, err)
    return read


class ActionRunner:
    """Runs pending actions and starts for the engine, through its guest table and journal.

    Args:
        table: the engine's :class:`~virtwatch.policy.guests.GuestTable`.
        journal: its :class:`~virtwatch.policy.guests.ActionJournal`.
        rand: random source in [0, 1) for the backoff's jitter.

    Attributes:
        breaker_open: True while ``max_actions_per_minute`` holds actions back.
    """

    def __init__(self, table: GuestTable, journal: ActionJournal, rand: Callable[[], float]) -> None:
        self._t = table
        self._journal = journal
        self._rand = rand
        self._hv = table.hv
        self._store = table.store
        self._clock = table.clock
        self._settings = table.settings
        self._log = table.log
        self._starts = asyncio.Semaphore(table.settings.max_parallel_starts)
        self._restores = asyncio.Semaphore(table.settings.max_parallel_restores)
        self._action_times: collections.deque[float] = collections.deque()
        self.breaker_open = False

    def _breaker_wait(self) -> float:
        """0 when an action may run now, else seconds until the window frees (breaker open)."""
        now = self._clock.monotonic()
        while self._action_times and now - self._action_times[0] >= BREAKER_WINDOW:
            self._action_times.popleft()
        if len(self._action_times) < self._settings.max_actions_per_minute:
            if self.breaker_open:
                self.breaker_open = False
                self._log.warning("policy_breaker_closed")
            return 0.0
        return BREAKER_WINDOW - (now - self._action_times[0])

    async def run_pending(self, g: GuestEntry) -> None:
        """Run the guest's pending action (it is due): unless the breaker defers it, or the guest
        is no longer to be acted on (mode, intent, given up), in which case it is dropped."""
        action = g.st.pending_action
        if action is None:
            g.pending_due = None
            return
        wait = self._breaker_wait()
        if wait > 0:
            g.pending_due = self._clock.monotonic() + wait
            if not self.breaker_open:
                self.breaker_open = True
                self._journal.count("breaker", "deferred")
                self._t.raise_alert("breaker_open", g, f"more than {self._settings.max_actions_per_minute} policy "
                                    f"actions per minute: actions deferred (next in {wait:.0f} s)")
            return
        sel = self._t.selection(g)
        if sel.mode != "enforce" or g.st.intent != "running" or g.st.history.given_up:
            self._log.info("policy_pending_dropped", guest=g.st.name, action=action, mode=sel.mode, intent=g.st.intent,
                           given_up=g.st.history.given_up)
            g.pending_due = None
            await self._t.persist(g, g.st.replace(pending_action=None, history=g.st.history.replace(next_retry=None)))
            return
        if g.last_cause in LIVENESS_CAUSES and action in ("reset", "kill") and await self._busy(g):
            return
        g.pending_due = None
        self._action_times.append(self._clock.monotonic())
        if action == "resume":
            await self._do_resume(g, sel)
        elif action == "kill":
            await self._do_kill(g, sel)
        elif action == "reset":
            await self._do_reset(g, sel)
        else:
            await self._do_restart(g, sel, action)

    async def _do_resume(self, g: GuestEntry, sel: Selection) -> None:
        now = self._clock.time()
        g.st = g.st.replace(pending_action=None, history=budget.record_resume(g.st.history, now))
        out = await self._journal.run(g, "resume", "I/O error pause",
                                      lambda: self._t.tagged(g, "resume", self._hv.resume(g.st.name)),
                                      on_error=_ok_unless_invalid("not paused any more"))
        self._journal.log_action(g, "resume", out)

    async def _busy(self, g: GuestEntry) -> bool:
        """A liveness action is never taken while libvirt runs a job on the guest (a migration,
        a save): True (the action dropped, logged) when one runs or the check itself failed."""
        try:
            job = await self._t.call("job", self._hv.job(g.st.name))
        except HypervisorError as err:
            job = f"unknown (job check failed: [{err.code}] {err.message})"
        if job is None:
            return False
        self._log.info("policy_pending_dropped", guest=g.st.name, action=g.st.pending_action, job=job)
        g.pending_due = None
        await self._t.persist(g, g.st.replace(pending_action=None, history=g.st.history.replace(next_retry=None)))
        return True

    async def _do_reset(self, g: GuestEntry, sel: Selection) -> None:
        """``on_probe_failure = reset``: virDomainReset, counted as a restart by its cause."""
        cause = g.last_cause or "probe_failed"
        h = budget.record_restart(g.st.history.replace(next_retry=None), cause)
        g.st = g.st.replace(pending_action=None, history=h)
        out = await self._journal.run(g, "reset", f"policy on_probe_failure = reset ({cause})",
                                      lambda: self._t.tagged(g, "reset", self._hv.reset(g.st.name)),
                                      on_error=_ok_unless_invalid("not running"))
        if out.error is None:
            g.st = g.st.replace(history=budget.record_start(g.st.history, self._clock.time(), sel.policy))
            await self._t.persist(g, g.st)
        self._journal.log_action(g, "reset", out)

    async def _do_kill(self, g: GuestEntry, sel: Selection) -> None:
        g.st = g.st.replace(pending_action="restart")
        key = "on_probe_failure" if g.last_cause in LIVENESS_CAUSES else "on_io_error"
        out = await self._journal.run(g, "kill", f"policy {key} = {getattr(sel.policy, key)}",
                                      lambda: self._t.tagged(g, "kill", self._hv.destroy(g.st.name)),
                                      on_error=_ok_unless_invalid("not running"))
        self._journal.log_action(g, "kill", out)
        nr = g.st.history.next_retry
        delay = max(0.0, (nr - self._clock.time())) if nr is not None else 0.0
        g.pending_due = self._clock.monotonic() + delay

    async def _do_restart(self, g: GuestEntry, sel: Selection, action: str) -> None:
        name = g.st.name
        try:
            state, reason = await self._t.call("state", self._hv.state(name))
        except HypervisorError as err:
            await self._after_start_error(g, sel, err, "state")
            return
        g.live = (state, reason)
        if state in RUNNING:
            history = budget.record_start(g.st.history, self._clock.time(), sel.policy)
            st = g.st.replace(pending_action=None, history=history)
            await self._t.persist(g, st)
            self._journal.count("restart", "already_running")
            self._journal.log_action(g, "restart", Outcome("already_running"))
            return
        if state in ACTIVE:
            try:
                await self._t.tagged(g, "destroy", self._hv.destroy(name))
            except HypervisorError as err:
                if err.code != ErrorCode.OPERATION_INVALID:
                    await self._after_start_error(g, sel, err, "destroy")
                    return
        h = g.st.history
        why = f"restart, attempt {h.attempt}" if h.attempt else "restart (recover)"
        await self.start_guest(g, sel, reason_text=why, count_restart=True)

    async def start_guest(self, g: GuestEntry, sel: Selection, reason_text: str, count_restart: bool) -> str:
        """Start (or restore, when it has a managed-save image) a guest under the semaphores, journalled;
        ``count_restart`` counts it as a restart by the cause being recovered from. Returns the
        result: ``ok``, ``restored``, ``already_running``, ``discarded`` (image discarded, cold
        boot) or ``failed``. Raises HypervisorError only from the boot flow's own checks."""
        name = g.st.name
        try:
            has_save = await self._t.call("has_managed_save", self._hv.has_managed_save(name))
        except HypervisorError:
            has_save = False
        sem = self._restores if has_save else self._starts
        action = "restore" if has_save else "start"
        cause = (g.last_cause or await self._last_cause(g) or "recover") if count_restart else ""
        h = g.st.history.replace(next_retry=None)
        if count_restart:
            h = budget.record_restart(h, cause)
        st = g.st.replace(pending_action=None, history=h)

        async def start() -> Outcome:
            try:
                await self._t.tagged(g, "start", self._hv.start(name))
                out = Outcome("restored" if has_save else "ok")
            except HypervisorError as err:
                if not err.already_running and not err.permanent and await self._is_running(name):
                    err = HypervisorError(ErrorCode.OPERATION_INVALID, err.message)  # some drivers use other codes
                if not err.already_running:
                    raise err from None
                out = Outcome("already_running", err.message)
            g.st = g.st.replace(history=budget.record_start(g.st.history, self._clock.time(), sel.policy),
                                intent=g.st.intent if g.st.intent == "held" else "running")
            if out.result == "restored":
                try:
                    state, reason = await self._t.call("state", self._hv.state(name))
                    g.live = (state, reason)
                    if state == DomainState.RUNNING and reason == RunningReason.BOOTED:
                        self._t.raise_alert("image_not_used", g, f"{name}: managed-save image was not used "
                                            "(STARTED_BOOTED, not STARTED_RESTORED): the guest cold-booted")
                        out = Outcome(out.result, "image not used: cold boot")
                except HypervisorError:
                    pass
            return out

        async with sem:
            g.st = st
            out = await self._journal.run(g, action, reason_text, start)
            if out.error is not None:
                if has_save:
                    return await self._restore_failed(g, sel, out.error)
                await self._after_start_error(g, sel, out.error, action)
                return "failed"
        self._journal.log_action(g, action, out)
        return out.result

    async def _is_running(self, name: str) -> bool:
        try:
            state, _ = await self._t.call("state", self._hv.state(name))
        except HypervisorError:
            return False
        return state in RUNNING

    async def _last_cause(self, g: GuestEntry) -> str | None:
        rows = await self._store.events(g.st.name, limit=20)
        for r in rows:
            if r["cause"] and r["cause"] not in ("ours", "host_shutdown"):
                return str(r["cause"])
        return None

    async def _restore_failed(self, g: GuestEntry, sel: Selection, err: HypervisorError) -> str:
        """The managed-save image could not be restored (that restore is journalled as failed):
        follow ``on_restore_failure``. Returns ``failed`` or ``discarded``."""
        name = g.st.name
        how = sel.policy.on_restore_failure
        plan = restore_failure_plan(name, how, err.code, err.message)
        if plan.boot_action is None:
            self._t.raise_alert("restore_failed", g, plan.alert)
            await self._t.persist(g, g.st.replace(history=budget.give_up(g.st.history, plan.give_up_reason or "")))
            return "failed"
        self._log.warning("policy_restore_discard", guest=name, uuid=g.st.uuid, how=how, code=err.code,
                          msg=plan.warning)
        self._t.raise_alert("restore_failed", g, plan.alert)

        async def boot_without_image() -> None:
            try:
                if plan.remove_image:
                    await self._t.tagged(g, "remove_managed_save", self._hv.remove_managed_save(name))
                    await self._t.tagged(g, "start", self._hv.start(name))
                else:
                    await self._t.tagged(g, "start", self._hv.start(name, force_boot=True))
            except HypervisorError as err2:
                if not err2.already_running:
                    raise
            g.st = g.st.replace(history=budget.record_start(g.st.history, self._clock.time(), sel.policy))

        out = await self._journal.run(g, plan.boot_action, "restore failed", boot_without_image, count_as=how)
        if out.error is not None:
            await self._after_start_error(g, sel, out.error, how)
            return "failed"
        return "discarded"

    async def _after_start_error(self, g: GuestEntry, sel: Selection, err: HypervisorError, what: str) -> None:
        """A start (or its preparation) failed: give up on permanent errors, else count a failure and retry."""
        now = self._clock.time()
        pol = sel.policy
        if err.permanent:
            h = budget.give_up(g.st.history, f"{what} failed permanently: [{err.code}] {err.message}")
        else:
            h = budget.record_failure(g.st.history, now, pol, f"{what} failed: [{err.code}] {err.message}")
        if h.given_up:
            g.pending_due = None
            await self._t.persist(g, g.st.replace(history=h, pending_action=None))
            self._journal.count("give_up", "ok")
            self._t.raise_alert("given_up", g, f"give up {g.st.name}: {h.given_up_reason}")
            return
        delay = budget.backoff_delay(h.attempt, pol, self._rand())
        h = budget.schedule(h, now + delay)
        g.pending_due = self._clock.monotonic() + delay
        await self._t.persist(g, g.st.replace(history=h, pending_action="restart"))
        self._t.raise_alert("start_failed", g, f"{what} {g.st.name} failed ([{err.code}] {err.message}); "
                            f"retry in {delay:.0f} s, attempt {len(budget.window(h, now, pol))}/{pol.limit_burst}")
