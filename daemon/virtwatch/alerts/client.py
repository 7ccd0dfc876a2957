"""Alertmanager v2 API client: per-Alertmanager bounded queues, retries, self-metrics.

Every configured Alertmanager gets its own queue and sender task, so one dead
member of a cluster neither delays nor starves the others, and each receives
every alert once it is reachable again. A queue holds the *latest state* of
each alert (keyed by ``(alertname, domain)``): a newer update replaces a pending
one, so repeated re-posts during an outage do not grow it. Past ``queue_size``
the oldest pending alert is dropped and counted.

Every alert goes to every Alertmanager of ``alertmanager_urls`` (the members of a cluster,
never a load balancer in front of them: the cluster does not share alerts, only silences and
who-notified-what, so each member must hold each alert to deduplicate notifications).

Payloads are built when sent, not when queued: a firing alert gets
``endsAt = now + 4 x resend_interval`` (like Prometheus does, so the alerts of a
dead daemon expire by themselves); a resolved one gets ``endsAt =
max(resolved time, startsAt + min_firing_duration)`` (for a rule twin, at least
``now + RESOLVE_GRACE``). A resolved alert whose firing
state no Alertmanager ever accepted (it healed during an outage) is *late*: it
keeps its ``startsAt`` and gets ``endsAt = now + late_resolved_hold``, so the incident
is still notified once instead of arriving already resolved (never notified). The
resolve of an alert another member accepted firing goes to one that never held it (or was
unreachable since: it may have restarted) with its real, past ``endsAt`` (rule twins: not
at all): an ``endsAt`` ahead would be a new alert there, after the cluster had notified
and resolved it. See :func:`delivery`.

With a :class:`~.spool.Spool`, what is queued (and in flight) is written to the state
directory shortly after it changes and at :meth:`AlertmanagerClient.stop`, and read
back at :meth:`AlertmanagerClient.start`: an outage survives a daemon restart.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import datetime
import random
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from ..infra.backoff import Backoff
from .config import AlertSettings
from .record import AlertRecord
from .rules import RULE_TWINS
from .spool import Spool, encode

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
SessionFactory = Callable[[], Any]

MAX_BATCH = 64
#: The resolve of a rule twin (VirtwatchGuestCrashed, VirtwatchQemuFailed) has an endsAt at least
#: this many seconds after it is sent, unless ``rule_window`` is 0. Alertmanager merges it into the
#: alert Prometheus may still hold firing under the same labels: an endsAt already past would end
#: that alert early, and the rule's next re-send would start it again (a second page). A future
#: endsAt never shortens an alert Alertmanager holds: it ends when Prometheus resolves the twin,
#: or 4 x resend_interval after the last post.
RESOLVE_GRACE = 5.0
#: Seconds between a change of the queues and the spool write (one write for a burst).
SPOOL_DELAY = 0.2
_RETRYABLE_4XX = frozenset({408, 429})


def rfc3339(t: float) -> str:
    """Epoch seconds as an RFC 3339 UTC timestamp with milliseconds."""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def alert_payload(rec: AlertRecord, now: float, settings: AlertSettings, late: bool = False,
                  past: bool = False) -> dict[str, Any]:
    """The Alertmanager v2 JSON object for ``rec`` sent at time ``now``.

    ``past``: a resolve goes with ``endsAt`` = when it resolved, nothing added (see :func:`delivery`).

    ``late``: ``rec`` is resolved and no Alertmanager accepted it firing; it is held active
    until ``late_resolved_hold`` after its first late delivery (``rec.late_at``, else ``now``:
    every cluster member gets the same ``endsAt``, so they resolve it together) and annotated
    ``resolved_at``, so that Alertmanager notifies it once. A late rule twin
    (:data:`~.rules.RULE_TWINS`) first delivered more than ``rule_window`` after it resolved
    also gets the label ``delivery="late"``: a copy of its own, not merged with (and ended by)
    the resolved twin Prometheus re-sends.

    Every alert gets a ``runbook_url`` annotation (unless ``runbook_base_url`` is empty or the
    record sets one) and a ``generatorURL``: the guest's page on this daemon for guest alerts,
    its landing page for host alerts (see :meth:`AlertSettings.link`).
    """
    if rec.ends_at is None:
        ends = now + 4 * settings.resend_interval
    else:
        ends = max(rec.ends_at, rec.starts_at + settings.min_firing_duration)
        if settings.rule_window > 0 and rec.labels.get("alertname") in RULE_TWINS:
            ends = max(ends, now + RESOLVE_GRACE)
        if past:
            ends = rec.ends_at
    annotations = dict(rec.annotations)
    labels = {k: v for k, v in rec.labels.items() if v}
    if late and rec.ends_at is not None:
        first = rec.late_at if rec.late_at is not None else now
        ends = max(ends, first + settings.late_resolved_hold)
        annotations.setdefault("resolved_at", rfc3339(rec.ends_at))
        if labels.get("alertname") in RULE_TWINS and first > rec.ends_at + settings.rule_window:
            # Its rule twin has resolved: Prometheus re-sends that resolved copy for 15 minutes,
            # which Alertmanager would merge into this one (same labels) and end it un-notified.
            labels["delivery"] = "late"
    runbook = settings.runbook_url(rec.labels.get("alertname", ""))
    if runbook and not annotations.get("runbook_url"):
        annotations["runbook_url"] = runbook
    out: dict[str, Any] = {
        "labels": labels,
        "annotations": {k: v for k, v in annotations.items() if v},
        "startsAt": rfc3339(rec.starts_at),
        "endsAt": rfc3339(ends),
    }
    link = settings.link(rec.labels.get("domain", ""))
    if link:
        out["generatorURL"] = link
    return out


def delivery(rec: AlertRecord, here: Mapping[tuple[str, str], float],
             anywhere: Mapping[tuple[str, str], float], settings: AlertSettings) -> str:
    """How ``rec`` goes to one Alertmanager.

    - ``send``: firing, or a resolve of an alert it accepted firing (and has been reachable since);
    - ``late``: a resolve no configured Alertmanager accepted firing: never notified;
    - ``past``: a resolve some Alertmanager accepted firing, this one not (or it was unreachable
      since: it may have restarted without it): the cluster notified it, so it goes with its real
      ``endsAt``, already past: any ``endsAt`` ahead would make it a new alert there;
    - ``skip``: the same for a rule twin (:data:`~.rules.RULE_TWINS`, ``rule_window`` > 0): not sent,
      since a past ``endsAt`` would end the merged alert Prometheus still fires; the rule resolves it.

    ``here`` and ``anywhere`` map the alerts accepted firing by this one / by any to their ``startsAt``.
    """
    if rec.ends_at is None or here.get(rec.key) == rec.starts_at:
        return "send"
    if anywhere.get(rec.key) != rec.starts_at:
        return "late"
    twin = settings.rule_window > 0 and rec.labels.get("alertname") in RULE_TWINS
    return "skip" if twin else "past"


def alerts_endpoint(base: str) -> str:
    """``base`` + ``/api/v2/alerts`` unless it already names the endpoint."""
    base = base.rstrip("/")
    return base if base.endswith("/api/v2/alerts") else base + "/api/v2/alerts"


def retry_backoff(settings: AlertSettings, rand: Callable[[], float]) -> Backoff:
    """Delays after failed POSTs: doubling from ``retry_min_delay`` up to ``retry_max_delay``
    seconds, with equal jitter (each between 50 % and 100 % of that)."""
    return Backoff(settings.retry_min_delay, settings.retry_max_delay, jitter=(0.5, 1.0), rand=rand)


class AlertMetrics:
    """The client's self-metrics, registered in the caller's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sent = Counter(
            "virtwatch_alerts_sent_total", "Alerts accepted by an Alertmanager", ["alertmanager"], registry=registry
        )
        self.failed = Counter(
            "virtwatch_alerts_failed_total",
            "Alerts in POSTs that failed (each attempt counts; retried unless rejected)",
            ["alertmanager"],
            registry=registry,
        )
        self.dropped = Counter(
            "virtwatch_alerts_dropped_total",
            "Alerts given up: queue_full (oldest dropped), rejected (4xx), shutdown (unsent at stop)",
            ["alertmanager", "reason"],
            registry=registry,
        )
        self.queue_length = Gauge(
            "virtwatch_alerts_queue_length", "Alerts waiting to be sent", ["alertmanager"], registry=registry
        )


@dataclasses.dataclass
class _Target:
    url: str
    endpoint: str
    pending: collections.OrderedDict[tuple[str, str], AlertRecord] = dataclasses.field(
        default_factory=collections.OrderedDict
    )
    inflight: list[AlertRecord] = dataclasses.field(default_factory=list)
    #: ``startsAt`` of the alerts this Alertmanager accepted firing (until it accepts them resolved)
    accepted: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    attempt: int = 0
    task: asyncio.Task[None] | None = None


class AlertmanagerClient:
    """Delivers :class:`AlertRecord` s to every configured Alertmanager.

    Args:
        settings: the ``[alerts]`` section.
        registry: where the self-metrics are registered.
        clock: wall clock (epoch seconds) used for ``endsAt``.
        sleep: awaitable sleep used for retry backoff.
        session_factory: returns an ``aiohttp.ClientSession``-like object
            (``post(url, json=, headers=, ssl=, timeout=)`` as an async context
            manager, ``close()``); called once in :meth:`start`.
        jitter: returns a float in [0, 1) for backoff jitter.
        logger: a structlog logger.
        metrics: self-metrics already registered in ``registry`` (a reload hands over the
            previous client's, so its counters go on from where they were).
        spool: where undelivered alerts are kept across restarts (None: they are dropped at stop).
    """

    def __init__(
        self,
        settings: AlertSettings,
        registry: CollectorRegistry,
        *,
        clock: Clock,
        sleep: Sleep = asyncio.sleep,
        session_factory: SessionFactory | None = None,
        jitter: Callable[[], float] | None = None,
        logger: Any = None,
        metrics: AlertMetrics | None = None,
        spool: Spool | None = None,
    ) -> None:
        self._settings = settings
        self._spool = spool
        self._spooled: bytes | None = None  # what the file holds (None: unknown)
        self._spool_dirty = asyncio.Event()
        self._spool_task: asyncio.Task[None] | None = None
        #: ``startsAt`` of alerts any Alertmanager accepted firing, until every one has handled the resolve
        self._fired: dict[tuple[str, str], float] = {}
        #: first late delivery of a resolve, by ``(key, startsAt)``, until every one has handled it
        self._late_at: dict[tuple[tuple[str, str], float], float] = {}
        self._clock = clock
        self._sleep = sleep
        self._session_factory = session_factory or aiohttp.ClientSession
        self._backoff = retry_backoff(settings, jitter or random.Random().random)
        self._log = logger or structlog.get_logger("virtwatch.alerts")
        self.metrics = metrics or AlertMetrics(registry)
        self._targets = [_Target(url, alerts_endpoint(url)) for url in settings.alertmanager_urls]
        for t in self._targets:
            t.idle.set()
            self.metrics.queue_length.labels(t.url).set(0)
            self.metrics.sent.labels(t.url)
            self.metrics.failed.labels(t.url)
        self._session: Any = None
        self._headers: dict[str, str] = {}
        self._ssl: Any = True

    # -- queueing ---------------------------------------------------------

    def submit(self, rec: AlertRecord) -> None:
        """Queue ``rec`` for every Alertmanager (never blocks; may drop the oldest)."""
        for t in self._targets:
            t.pending.pop(rec.key, None)
            t.pending[rec.key] = rec
            while len(t.pending) > self._settings.queue_size:
                _, old = t.pending.popitem(last=False)
                self.metrics.dropped.labels(t.url, "queue_full").inc()
                self._log.warning("alert_dropped", alertmanager=t.url, reason="queue_full", alert=old.key)
            self.metrics.queue_length.labels(t.url).set(len(t.pending))
            t.idle.clear()
            t.wake.set()
        self._spool_dirty.set()

    def queue_lengths(self) -> dict[str, int]:
        """Pending alerts per Alertmanager URL."""
        return {t.url: len(t.pending) for t in self._targets}

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        """Read credentials, open the HTTP session and start one sender per Alertmanager."""
        s = self._settings
        if not self._targets:
            return
        if s.basic_auth_username is not None and s.basic_auth_password_file is not None:
            cred = f"{s.basic_auth_username}:{_read_secret(s.basic_auth_password_file)}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(cred).decode("ascii")
        if s.bearer_token_file is not None:
            self._headers["Authorization"] = "Bearer " + _read_secret(s.bearer_token_file)
        if s.tls_insecure_skip_verify:
            self._ssl = False
        elif s.tls_ca_file:
            self._ssl = ssl.create_default_context(cafile=s.tls_ca_file)
        self._session = self._session_factory()
        if self._spool is not None:
            await self._restore(self._spool)
            self._spool_task = asyncio.create_task(self._spool_loop(), name="alerts-spool")
        for t in self._targets:
            t.task = asyncio.create_task(self._run(t), name=f"alerts-sender {t.url}")

    async def _restore(self, spool: Spool) -> None:
        """Queue what the spool holds (before anything new: a newer state of the same alert replaces it)."""
        pending, problem, moved = await asyncio.to_thread(spool.load)
        if problem is not None:
            self._log.error("alert_spool_unreadable", path=str(spool.path), error=problem,
                            moved_to=str(moved) if moved else None,
                            detail="starting without the alerts it held")
            return
        by_url = {t.url: t for t in self._targets}
        for url, recs in pending.items():
            t = by_url.get(url)
            if t is None:
                self._log.warning("alert_spool_unconfigured", alertmanager=url, count=len(recs),
                                  detail="no longer in alerts.alertmanager_urls: not sent")
                continue
            for rec, here, anywhere in recs[-self._settings.queue_size:]:
                t.pending.pop(rec.key, None)
                t.pending[rec.key] = rec
                if here:
                    t.accepted[rec.key] = rec.starts_at
                if anywhere:
                    self._fired[rec.key] = rec.starts_at
            self.metrics.queue_length.labels(t.url).set(len(t.pending))
            t.idle.clear()
            t.wake.set()
        count = sum(len(t.pending) for t in self._targets)
        if count:
            self._log.info("alert_spool_restored", path=str(spool.path), count=count)
        self._spooled = None if pending else encode({})

    def _spool_snapshot(self) -> bytes:
        """The spool bytes for what is pending or in flight now, oldest first."""
        out = {}
        for t in self._targets:
            recs = {r.key: r for r in t.inflight}
            for key, r in t.pending.items():
                recs.pop(key, None)  # a newer state replaces the one in flight
                recs[key] = r
            out[t.url] = [(r, t.accepted.get(r.key) == r.starts_at, self._fired.get(r.key) == r.starts_at)
                          for r in recs.values()]
        return encode(out)

    async def _write_spool(self) -> bool:
        """Write the spool if it changed. Returns False when writing failed (logged)."""
        assert self._spool is not None
        data = self._spool_snapshot()
        if data == self._spooled:
            return True
        try:
            await asyncio.shield(asyncio.to_thread(self._spool.write, data))
        except OSError as err:
            self._log.error("alert_spool_write_failed", path=str(self._spool.path), error=str(err))
            self._spooled = None
            return False
        self._spooled = data
        return True

    async def _spool_loop(self) -> None:
        while True:
            await self._spool_dirty.wait()
            await asyncio.sleep(SPOOL_DELAY)  # real time: one write for a burst of changes
            self._spool_dirty.clear()
            await self._write_spool()

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Try to deliver what is pending for up to ``flush_timeout`` s, then stop.

        Alerts still pending after that are counted as dropped (``shutdown``).
        """
        if flush_timeout > 0 and self._targets:
            try:
                async with asyncio.timeout(flush_timeout):
                    await asyncio.gather(*(t.idle.wait() for t in self._targets if t.task is not None))
            except TimeoutError:
                pass
        for t in self._targets:
            if t.task is not None:
                t.task.cancel()
        await asyncio.gather(*(t.task for t in self._targets if t.task is not None), return_exceptions=True)
        if self._spool_task is not None:
            self._spool_task.cancel()
            await asyncio.gather(self._spool_task, return_exceptions=True)
            self._spool_task = None
        spooled = bool(self._spool is not None and self._targets) and await self._write_spool()
        for t in self._targets:
            t.task = None
            if t.pending and spooled:
                self._log.info("alerts_spooled_at_stop", alertmanager=t.url, count=len(t.pending))
                t.pending.clear()
                self.metrics.queue_length.labels(t.url).set(0)
            elif t.pending:
                self.metrics.dropped.labels(t.url, "shutdown").inc(len(t.pending))
                self._log.warning("alerts_unsent_at_stop", alertmanager=t.url, count=len(t.pending))
                t.pending.clear()
                self.metrics.queue_length.labels(t.url).set(0)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- delivery ---------------------------------------------------------

    async def _run(self, t: _Target) -> None:
        while True:
            if not t.pending:
                t.idle.set()
                t.wake.clear()
                await t.wake.wait()
                continue
            batch: list[AlertRecord] = []
            while t.pending and len(batch) < MAX_BATCH:
                batch.append(t.pending.popitem(last=False)[1])
            modes = [delivery(r, t.accepted, self._fired, self._settings) for r in batch]
            skipped = [r for r, m in zip(batch, modes, strict=True) if m == "skip"]
            batch = [r for r, m in zip(batch, modes, strict=True) if m != "skip"]
            self._forget(skipped)
            if not batch:
                self._spool_dirty.set()
                continue
            batch = [self._with_late_at(r) for r in batch]
            t.inflight = batch
            now = self._clock()
            payload = [alert_payload(r, now, self._settings, late=m == "late", past=m == "past")
                       for r, m in zip(batch, [m for m in modes if m != "skip"], strict=True)]
            try:
                outcome = await self._post(t, payload)
            except asyncio.CancelledError:
                self._requeue(t, batch)  # stopped mid-POST: spooled or counted as unsent by stop()
                t.inflight = []
                raise
            t.inflight = []
            if outcome != "retry":
                self._spool_dirty.set()
            if outcome == "ok":
                self.metrics.sent.labels(t.url).inc(len(batch))
                t.attempt = 0
                for r, m in zip(batch, [m for m in modes if m != "skip"], strict=True):
                    if r.firing:
                        t.accepted[r.key] = self._fired[r.key] = r.starts_at
                    elif t.accepted.get(r.key) == r.starts_at:
                        del t.accepted[r.key]
                    if m == "late" and r.late_at is None:
                        self._first_late(r, now)
                self._forget([r for r in batch if not r.firing])
            elif outcome == "rejected":
                self.metrics.failed.labels(t.url).inc(len(batch))
                self.metrics.dropped.labels(t.url, "rejected").inc(len(batch))
            else:
                self.metrics.failed.labels(t.url).inc(len(batch))
                # It may come back restarted, without the alerts it held: a resolve of one of them
                # would be a new alert there (after the cluster notified and resolved it).
                t.accepted.clear()
                self._requeue(t, batch)
                t.attempt += 1
                delay = self._backoff.delay(t.attempt)
                self._log.info("alerts_retry", alertmanager=t.url, attempt=t.attempt, delay=round(delay, 3),
                               pending=len(t.pending))
                self.metrics.queue_length.labels(t.url).set(len(t.pending))
                await self._sleep(delay)
            self.metrics.queue_length.labels(t.url).set(len(t.pending))

    def _first_late(self, rec: AlertRecord, at: float) -> None:
        """``rec`` was first accepted as a late resolve at ``at``: the other Alertmanagers get it
        with the same ``late_at`` (the same ``endsAt`` and labels), spooled with it too."""
        self._late_at[(rec.key, rec.starts_at)] = at
        for t in self._targets:
            q = t.pending.get(rec.key)
            if q is not None and q.starts_at == rec.starts_at and q.late_at is None:
                t.pending[rec.key] = dataclasses.replace(q, late_at=at)
        self._spool_dirty.set()

    def _with_late_at(self, rec: AlertRecord) -> AlertRecord:
        at = self._late_at.get((rec.key, rec.starts_at)) if rec.late_at is None else None
        return rec if at is None else dataclasses.replace(rec, late_at=at)

    def _forget(self, resolved: list[AlertRecord]) -> None:
        """Drop the cluster-wide "accepted firing" mark of these resolves once no Alertmanager has
        one of them left to handle."""
        for r in resolved:
            if self._due_anywhere(r):
                continue
            if self._fired.get(r.key) == r.starts_at:
                del self._fired[r.key]
            self._late_at.pop((r.key, r.starts_at), None)

    def _due_anywhere(self, rec: AlertRecord) -> bool:
        """Whether a state of ``rec``'s alert with its ``startsAt`` is pending or in flight somewhere."""
        for t in self._targets:
            for q in (t.pending.get(rec.key), *t.inflight):
                if q is not None and q.key == rec.key and q.starts_at == rec.starts_at:
                    return True
        return False

    def _requeue(self, t: _Target, batch: list[AlertRecord]) -> None:
        """Put a failed batch back in front, unless newer states arrived meanwhile."""
        for rec in reversed(batch):
            if rec.key in t.pending:
                continue
            t.pending[rec.key] = rec
            t.pending.move_to_end(rec.key, last=False)
        while len(t.pending) > self._settings.queue_size:
            t.pending.popitem(last=False)
            self.metrics.dropped.labels(t.url, "queue_full").inc()

    async def _post(self, t: _Target, payload: list[dict[str, Any]]) -> str:
        """POST one batch. Returns ``ok``, ``retry`` or ``rejected``."""
        try:
            async with self._session.post(
                t.endpoint,
                json=payload,
                headers=self._headers,
                ssl=self._ssl,
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout),
            ) as resp:
                status = resp.status
                body = await resp.text()
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            self._log.warning("alerts_post_failed", alertmanager=t.url, error=str(err) or type(err).__name__,
                              count=len(payload))
            return "retry"
        if 200 <= status < 300:
            self._log.debug("alerts_posted", alertmanager=t.url, count=len(payload))
            return "ok"
        self._log.warning("alerts_post_status", alertmanager=t.url, status=status, body=body[:500],
                          count=len(payload))
        if 400 <= status < 500 and status not in _RETRYABLE_4XX:
            return "rejected"
        return "retry"


def _read_secret(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip()
