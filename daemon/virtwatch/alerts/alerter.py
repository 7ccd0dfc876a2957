"""The :class:`Alerter` facade the daemon talks to.

It keeps the set of active (firing) alerts, turns events into alert actions
with the pure rules of :mod:`virtwatch.alerts.rules`, queues every state change
for delivery at once, and re-posts firing alerts every ``resend_interval`` so
Alertmanager keeps them active.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from ..model import Event
from . import rules
from .client import AlertmanagerClient, AlertMetrics, Clock, SessionFactory, Sleep
from .config import AlertSettings, default_instance
from .record import AlertRecord
from .rules import AlertAction, AlertKey, RuleContext
from .spool import Spool

#: The spool file in the state directory.
SPOOL_NAME = "alerts-spool.json"


class Alerter:
    """Instant alerts to Alertmanager.

    Args:
        settings: the ``[alerts]`` section (no URLs: alerts are tracked, never sent).
        registry: registry for the self-metrics (``virtwatch_alerts_*``).
        clock: wall clock, epoch seconds (``time.time`` by default).
        sleep: awaitable sleep for retries and the resend schedule.
        session_factory: makes the aiohttp session (tests inject a fake).
        jitter: returns [0, 1) for retry jitter.
        logger: structlog logger.
        metrics: the self-metrics of the alerter this one replaces (a reload), else None.
        active: the firing alerts of the alerter this one replaces: kept firing, and posted
            again at :meth:`start` (the new ``[alerts]`` may name other Alertmanagers).
        state_dir: the daemon's state directory: undelivered alerts are kept across restarts in
            ``<state_dir>/alerts-spool.json`` (:data:`SPOOL_NAME`); None: they are dropped at :meth:`stop`.

    All methods except :meth:`start` and :meth:`stop` are synchronous, never
    block, and must be called on the event loop thread.
    """

    def __init__(
        self,
        settings: AlertSettings,
        registry: CollectorRegistry,
        *,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        session_factory: SessionFactory | None = None,
        jitter: Callable[[], float] | None = None,
        logger: Any = None,
        metrics: AlertMetrics | None = None,
        active: Mapping[AlertKey, AlertRecord] | None = None,
        state_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings = settings
        #: the ``instance`` label: ``[alerts] instance``, else set by :meth:`listening_on`
        self.instance = settings.instance or socket.gethostname()
        self._clock = clock
        self._sleep = sleep
        self._log = logger or structlog.get_logger("virtwatch.alerts")
        self.client = AlertmanagerClient(
            settings, registry, clock=clock, sleep=sleep, session_factory=session_factory, jitter=jitter,
            logger=self._log, metrics=metrics,
            spool=Spool(os.path.join(state_dir, SPOOL_NAME)) if state_dir is not None else None,
        )
        self._active: dict[AlertKey, AlertRecord] = dict(active or {})
        self._handed_over = list(self._active)
        self._resend_task: asyncio.Task[None] | None = None

    @property
    def active(self) -> Mapping[AlertKey, AlertRecord]:
        """Firing alerts by ``(alertname, domain)`` (a copy)."""
        return dict(self._active)

    def listening_on(self, host: str | None, bound: tuple[str, int] | None) -> None:
        """The metrics listener listens on ``host`` (``http.listen``'s; None: every address) and is
        bound to ``bound`` (address, port; None: not bound): unless ``[alerts] instance`` is set,
        the ``instance`` label becomes what a default scrape config gives this daemon
        (:func:`~.config.default_instance`), the one the rule alerts carry."""
        if self.settings.instance is None and bound is not None:
            self.instance = default_instance(host, bound[1], socket.gethostname())

    async def start(self, listen_host: str | None = None, bound: tuple[str, int] | None = None) -> None:
        """Start delivery (first what the spool held) and the periodic re-post of firing alerts.

        ``listen_host`` and ``bound``: the metrics listener's, for :meth:`listening_on` (the default
        ``instance``); left out, the ``instance`` stays ``[alerts] instance`` or the host name."""
        self.listening_on(listen_host, bound)
        await self.client.start()
        for key in self._handed_over:  # firing before a reload: post them now, not a resend later
            if key in self._active:
                self.client.submit(self._active[key])
        self._handed_over = []
        if self.settings.enabled:
            self._resend_task = asyncio.create_task(self._resend_loop(), name="alerts-resend")

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Stop re-posting, deliver what is queued for up to ``flush_timeout`` s, close."""
        if self._resend_task is not None:
            self._resend_task.cancel()
            await asyncio.gather(self._resend_task, return_exceptions=True)
            self._resend_task = None
        await self.client.stop(flush_timeout)

    async def _resend_loop(self) -> None:
        while True:
            await self._sleep(self.settings.resend_interval)
            for rec in list(self._active.values()):
                self.client.submit(rec)

    # -- inputs -----------------------------------------------------------

    def on_event(self, event: Event, *, decision: str | None = None, console: str | None = None,
                 migrating_in: bool = False) -> list[AlertAction]:
        """Apply the alert rules to ``event``; queue what they fire or resolve.

        ``decision`` (policy decision text) and ``console`` (last console lines)
        become annotations of alerts fired by this event; ``migrating_in``: the guest was
        the incoming copy of a migration when the event came. Returns the actions.
        """
        ctx = RuleContext(self.instance, frozenset(self._active), decision, console, migrating_in)
        try:
            actions = rules.actions_for_event(event, ctx)
        except Exception:  # a rule bug must never break the event pump
            self._log.exception("alert_rules_failed", seq=event.seq, kind=event.kind, domain=event.name)
            return []
        for a in actions:
            self.apply(a)
        return actions

    def apply(self, action: AlertAction) -> None:
        """Apply one fire/resolve action (resolving an inactive alert does nothing)."""
        now = self._clock()
        if action.op == "fire":
            labels = {**self.settings.labels, "alertname": action.alertname,
                      "severity": action.severity or "warning", "instance": self.instance}
            if action.domain:
                labels["domain"] = action.domain
            if action.uuid:
                labels["uuid"] = action.uuid
            annotations = {"summary": action.summary, "description": action.description, **action.annotations}
            old = self._active.get(action.key)
            starts = action.at if action.at is not None else now
            if old is not None:
                starts = old.starts_at
                annotations = {**old.annotations, **annotations}
            rec = AlertRecord(labels, annotations, starts)
            self._active[action.key] = rec
            self._log.info("alert_fire", alertname=action.alertname, domain=action.domain or None,
                           severity=labels["severity"])
            self.client.submit(rec)
        else:
            old = self._active.pop(action.key, None)
            if old is None:
                return
            ends = action.at if action.at is not None else now
            self._log.info("alert_resolve", alertname=action.alertname, domain=action.domain or None)
            self.client.submit(AlertRecord(old.labels, old.annotations, old.starts_at, max(ends, old.starts_at)))

    def fire(
        self,
        alertname: str,
        domain: str = "",
        uuid: str = "",
        severity: str = "warning",
        summary: str = "",
        description: str = "",
        extra_annotations: Mapping[str, str] | None = None,
    ) -> None:
        """Fire (or update) the alert ``(alertname, domain)``, starting now."""
        self.apply(AlertAction(op="fire", alertname=alertname, domain=domain, uuid=uuid, severity=severity,
                               summary=summary, description=description, annotations=dict(extra_annotations or {})))

    def resolve(self, alertname: str, domain: str = "") -> None:
        """Resolve the alert ``(alertname, domain)`` now, if it is active."""
        self.apply(AlertAction(op="resolve", alertname=alertname, domain=domain))

    def annotate(self, alertname: str, domain: str, **annotations: str) -> bool:
        """Add annotations (e.g. ``console=...``) to an active alert and re-post it.

        Returns False when the alert is not active.
        """
        old = self._active.get((alertname, domain))
        if old is None:
            return False
        rec = AlertRecord(old.labels, {**old.annotations, **annotations}, old.starts_at)
        self._active[(alertname, domain)] = rec
        self.client.submit(rec)
        return True

    # -- alerts the daemon raises itself ----------------------------------

    def given_up(self, domain: str, uuid: str, reason: str, decision: str | None = None) -> None:
        """Fire ``VirtwatchGivenUp`` (resolve with ``resolve(GIVEN_UP, domain)`` on operator reset)."""
        self.apply(rules.given_up(domain, uuid, self.instance, reason, decision))

    def restore_failed(self, domain: str, uuid: str, error: str, decision: str | None = None) -> None:
        """Fire ``VirtwatchRestoreFailed`` (resolved when the guest runs again)."""
        self.apply(rules.restore_failed(domain, uuid, self.instance, error, decision))

    def connection_lost(self, uri: str, reason: str = "") -> None:
        """Fire ``VirtwatchLibvirtConnectionLost``."""
        self.apply(rules.connection_lost(uri, self.instance, reason))

    def connection_restored(self) -> None:
        """Resolve ``VirtwatchLibvirtConnectionLost``."""
        self.apply(rules.connection_restored())
