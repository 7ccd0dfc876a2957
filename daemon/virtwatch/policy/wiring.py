"""Connects the policy engine to the daemon: store, hypervisor, alerts, metrics.

:class:`PolicyRuntime` owns everything the engine needs when
``[policy] enabled = true``: the SQLite store under ``daemon.state_dir``,
the :class:`LibvirtHypervisor` on the daemon's connection, the alert bridge,
a prometheus-client collector over :meth:`PolicyEngine.snapshot` and the
event journal's retention (:class:`~virtwatch.policy.journal.JournalPruner`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..alerts.alerter import Alerter
from .clock import Clock, SystemClock
from .config import PolicySettings
from .engine import PolicyEngine
from .journal import JournalPruner
from .libvirt_port import LibvirtHypervisor
from .model import PolicyAlert
from .store import AsyncStore

log = structlog.get_logger("virtwatch.policy")

#: PolicyAlert kind -> (instant alert name, severity) for kinds that have no event alert of their own.
_ALERTS = {
    "start_failed": ("VirtwatchStartFailed", "critical"),
    "image_not_used": ("VirtwatchManagedSaveNotUsed", "warning"),
    "api_error": ("VirtwatchGuestPausedAPIError", "critical"),
    "breaker_open": ("VirtwatchPolicyBreakerOpen", "critical"),
}
#: kinds already alerted from the event itself: the decision is attached as an annotation.
#: The liveness causes' alerts are fired by the liveness monitor (virtwatch.liveness.monitor.ALERTS).
_ANNOTATE = {"crash": "VirtwatchGuestCrashed", "io_error": "VirtwatchGuestIOError",
             "watchdog": "VirtwatchWatchdogFired", "qemu_failure": "VirtwatchQemuFailed",
             "probe_failed": "VirtwatchProbeFailed", "console_panic": "VirtwatchConsolePanic",
             "reboot_loop": "VirtwatchRebootLoop", "hung": "VirtwatchGuestHung"}


class PolicyCollector:
    """Policy metrics from :meth:`PolicyEngine.snapshot` (rendered on the loop, per scrape).

    * ``libvirt_domain_restarts_total{domain,reason}`` restarts performed, by cause
    * ``virtwatch_policy_given_up{domain}`` 1 once the restart budget is exhausted
    * ``virtwatch_policy_actions_total{action,result}``
    * ``virtwatch_policy_next_retry_timestamp_seconds{domain}`` when a retry is scheduled
    * ``virtwatch_policy_guest_info{domain,intent,managed,mode}`` (value 1)
    * ``virtwatch_policy_ready``, ``virtwatch_policy_breaker_open``
    """

    def __init__(self, engine: PolicyEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        """Yield the families."""
        snap = self._engine.snapshot()
        restarts = CounterMetricFamily("libvirt_domain_restarts", "Guest restarts performed by policy, by cause.",
                                       labels=["domain", "reason"])
        given_up = GaugeMetricFamily("virtwatch_policy_given_up",
                                     "1 if the restart budget is exhausted (virtwatch reset GUEST clears it).",
                                     labels=["domain"])
        next_retry = GaugeMetricFamily("virtwatch_policy_next_retry_timestamp_seconds",
                                       "Unix time of the next scheduled recovery action.", labels=["domain"])
        info = GaugeMetricFamily("virtwatch_policy_guest_info", "Policy state of a guest (value 1).",
                                 labels=["domain", "intent", "managed", "mode"])
        for name, g in sorted(snap.guests.items()):
            for reason, n in sorted(g.restarts.items()):
                restarts.add_metric([name, reason], n)
            given_up.add_metric([name], 1 if g.given_up else 0)
            if g.next_retry is not None:
                next_retry.add_metric([name], g.next_retry)
            info.add_metric([name, g.intent, "true" if g.managed else "false", g.mode], 1)
        actions = CounterMetricFamily("virtwatch_policy_actions", "Policy actions by action and result.",
                                      labels=["action", "result"])
        for (action, result), n in sorted(snap.actions.items()):
            actions.add_metric([action, result], n)
        yield from (restarts, given_up, next_retry, info, actions)
        yield GaugeMetricFamily("virtwatch_policy_ready", "1 while the policy engine may decide.",
                                value=1 if snap.ready else 0)
        yield GaugeMetricFamily(
            "virtwatch_policy_breaker_open",
            "1 while max_actions_per_minute holds actions back.",
            value=1 if snap.breaker_open else 0,
        )

    def describe(self) -> list[Metric]:
        """No up-front description."""
        return []


class PolicyRuntime:
    """The engine and what it runs on.

    Args:
        settings: ``[policy]``.
        state_dir: directory for ``virtwatch.sqlite`` (created, mode 0750; the store opens it in :meth:`start`,
            on its own thread).
        connection: returns the policy's ready ``virConnect`` or None (its own
            connection: actions never queue behind statistics calls).
        alerter: instant alerts.
        boot_id_path: file holding the host boot id.
        calls: the :class:`~virtwatch.virt.calls.Calls` of that connection (one thread).
        clock: time source of the engine and the journal pruner (``SystemClock()``).
        action_counts: the previous runtime's action counters at a reload.
    """

    def __init__(
        self,
        settings: PolicySettings,
        state_dir: str,
        connection: Callable[[], Any],
        alerter: Alerter,
        boot_id_path: str,
        calls: Any = None,
        clock: Clock | None = None,
        action_counts: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        os.makedirs(state_dir, mode=0o750, exist_ok=True)
        self.store = AsyncStore(Path(state_dir) / "virtwatch.sqlite")
        runner = None
        if calls is not None:  # share the daemon's thread budget; our own deadline stays the policy's

            def runner(what: str, fn: Callable[[], Any]) -> Any:
                return calls.run(what, fn, timeout=86400, count_errors=False)

        self.hypervisor = LibvirtHypervisor(connection, timeout=settings.action_timeout, runner=runner)
        self._alerter = alerter
        clock = clock or SystemClock()
        self.engine = PolicyEngine(
            settings,
            self.hypervisor,
            self.store,
            clock=clock,
            alert=self._on_alert,
            boot_id_path=boot_id_path,
            action_counts=action_counts,
        )
        self.engine.decision_listeners.append(self._on_decision)
        self.collector = PolicyCollector(self.engine)
        self.pruner = JournalPruner(self.store.path, settings.journal_max_age, settings.journal_max_events, clock)
        self._prune_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the store, start the engine, then the journal pruner (prunes at once, then hourly).

        Raises :class:`~virtwatch.policy.store.StoreError` (an OSError) when not even a fresh
        database can be created under ``state_dir``.
        """
        await self.store.open()
        await self.engine.start()
        if self._prune_task is None:
            self._prune_task = asyncio.get_running_loop().create_task(self.pruner.run(), name="policy-journal-prune")

    def _on_decision(self, guest: str, cause: str, text: str) -> None:
        """A decision that raised no alert of its own (a restart after a crash): the event's
        instant alert, if one is firing, gets it as its ``decision`` annotation."""
        if cause in _ANNOTATE:
            self._alerter.annotate(_ANNOTATE[cause], guest, decision=text)

    def _on_alert(self, a: PolicyAlert) -> None:
        if a.kind == "given_up":
            self._alerter.given_up(a.guest, a.uuid, a.message, decision=a.message)
        elif a.kind == "restore_failed":
            self._alerter.restore_failed(a.guest, a.uuid, a.message, decision=a.message)
        elif a.kind in _ANNOTATE:
            self._alerter.annotate(_ANNOTATE[a.kind], a.guest, decision=a.message)
        elif a.kind in _ALERTS:
            name, severity = _ALERTS[a.kind]
            self._alerter.fire(
                name,
                domain=a.guest,
                uuid=a.uuid,
                severity=severity,
                summary=f"{a.guest}: {a.kind.replace('_', ' ')}",
                description=a.message,
            )

    # ConnectionListener of the policy's own connection (SideConnection "policy")
    def connection_ready(self, _conn: Any) -> None:
        """The policy's connection is open: decisions may be taken (the engine reconciles)."""
        self.engine.set_ready(True)

    def connection_lost(self) -> None:
        """The policy's connection is gone: nothing is decided until it is back."""
        self.engine.set_ready(False)

    async def reset(self, name: str) -> Any:
        """Operator reset: clears given-up and resolves its alert."""
        snap = await self.engine.reset(name)
        self._alerter.resolve("VirtwatchGivenUp", name)
        return snap

    async def stop(self) -> None:
        """Stop the pruner and the engine (pending retries stay persisted), close the store."""
        self.pruner.stop()
        if self._prune_task is not None:
            self._prune_task.cancel()
            try:
                await self._prune_task
            except asyncio.CancelledError:
                pass
            self._prune_task = None
        await self.engine.stop()
        await self.store.close()
