"""The liveness monitor: probes on the agent's lane, and the detectors fed from events, console
and statistics; each failure alerted at once and handed to the policy engine.

Per guest, from its merged policy (``probe*``, ``console_failure_patterns``, ``reboot_*``,
``hang_after``):

* **probes** (``probe = agent_ping | exec``): the first ``probe_initial_delay`` seconds after
  each start or guest reboot, then every ``probe_interval`` seconds while the guest runs, one at
  a time per guest, each bounded by ``probe_timeout`` (:func:`~virtwatch.liveness.probes.run_probe`
  on :meth:`~virtwatch.agent.lane.GuestAgent.agent_command`). ``probe_failure_threshold``
  consecutive failures make a ``probe_failed`` failure; the next passing probe resolves it.
* **console patterns**: every byte the console capture reads (:meth:`on_console`) is cut into
  lines and searched; a match is a ``console_panic`` failure (once per boot).
* **reboot loops**: REBOOT events not caused by our own reset count per guest, a burst of them
  (:data:`~virtwatch.liveness.detect.REBOOT_COALESCE`) as one reboot
  (``libvirt_domain_reboots_total{domain}`` counts our resets too); more than ``reboot_limit``
  within ``reboot_interval`` is a ``reboot_loop`` failure, resolved once the window calms down.
* **busy but silent** (``hang_after`` > 0): from each statistics poll (:meth:`on_snapshot`),
  :class:`~virtwatch.liveness.detect.HangTracker`, not during the ``probe_initial_delay`` after a
  start or reboot (a booting kernel is busy and silent too: seen in the e2e tests); a ``hung``
  failure, resolved by I/O or idling.

A failure fires its instant alert (:data:`ALERTS`) first, then goes to the policy engine's
:meth:`~virtwatch.policy.engine.PolicyEngine.on_liveness` (``(guest, cause, detail)``,
whose decision becomes the alert's ``decision`` annotation). A guest that stops or starts
resolves its liveness alerts: they were about the run that ended.

Metrics (:class:`LivenessCollector`, collector ``liveness``):
``libvirt_domain_probe_success{domain,probe}`` (last probe passed: 1/0),
``libvirt_domain_probe_duration_seconds{domain,probe}`` (last probe),
``libvirt_domain_probe_failures_total{domain,probe,reason}`` (failed probes by reason),
``libvirt_domain_liveness_failures_total{domain,cause}`` (failures declared),
``libvirt_domain_hung{domain}`` (guests with ``hang_after`` set), and
``libvirt_domain_reboots_total{domain}``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..infra.tasks import TaskSet
from ..model import RUNNING, Event, Kind, Lifecycle, Source
from ..policy.config import GuestPolicy
from ..state import GuestLookup
from .detect import ConsoleMatcher, HangTracker, ProbeStreak, RebootWindow, activity_sample, compile_patterns
from .probes import OUR_SIDE, AgentPort, ProbeResult, run_probe

log = structlog.get_logger("virtwatch.liveness")

#: cause -> (instant alert, severity, what it says).
ALERTS: dict[str, tuple[str, str, str]] = {
    "probe_failed": ("VirtwatchProbeFailed", "warning", "liveness probe failing"),
    "console_panic": ("VirtwatchConsolePanic", "critical", "kernel failure on the console"),
    "reboot_loop": ("VirtwatchRebootLoop", "critical", "reboot loop"),
    "hung": ("VirtwatchGuestHung", "critical", "busy but silent (hung)"),
}

#: Seconds a guest's merged policy is cached: a selection change (metadata, override, rules at
#: a reload) drops it at once, so this is only a safety net. Short, it cost the most of any
#: part of the daemon's loop at 20 guests (a merge per guest every 2 s, for a tick every 0.25 s).
POLICY_TTL = 30.0

#: Seconds between two passes of the probe schedule over every guest when nothing is due sooner.
FULL_PASS = 5.0

#: Probe results kept per guest for ``virtwatch explain``.
KEEP_RESULTS = 5


class PolicyPort(Protocol):
    """What the monitor needs from the policy engine (:class:`~virtwatch.policy.engine.PolicyEngine`)."""

    selection_listeners: list[Callable[[str], None]]

    def on_liveness(self, name: str, cause: str, detail: str) -> None:
        """Take one liveness failure of guest ``name`` (never blocks)."""

    def own_operation(self, name: str) -> str | None:
        """The policy's own operation on ``name`` now (``reset``...), or None."""


class AlertSink(Protocol):
    """The instant alerts the monitor raises (:class:`~virtwatch.alerts.alerter.Alerter`)."""

    def fire(self, alertname: str, domain: str = "", uuid: str = "", severity: str = "warning",
             summary: str = "", description: str = "",
             extra_annotations: Mapping[str, str] | None = None) -> None:
        """Fire (or update) ``(alertname, domain)``."""

    def resolve(self, alertname: str, domain: str = "") -> None:
        """Resolve ``(alertname, domain)`` if it fires."""


@dataclasses.dataclass
class GuestLiveness:
    """The monitor's state of one guest (mutated on the loop thread only).

    ``run`` changes at every start, stop and reboot: a probe that ends in another run than
    it began is dropped. ``next_probe`` is monotonic seconds (None: not scheduled).
    """

    name: str
    uuid: str = ""
    run: int = 0
    next_probe: float | None = None
    in_flight: bool = False
    probe: str = "none"
    streak: ProbeStreak = dataclasses.field(default_factory=ProbeStreak)
    results: collections.deque[ProbeResult] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=KEEP_RESULTS))
    probe_failures: collections.Counter[tuple[str, str]] = dataclasses.field(default_factory=collections.Counter)
    causes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    console: ConsoleMatcher = dataclasses.field(default_factory=ConsoleMatcher)
    reboots: RebootWindow = dataclasses.field(default_factory=RebootWindow)
    reboots_total: int = 0
    hang: HangTracker = dataclasses.field(default_factory=HangTracker)
    hang_watched: bool = False
    firing: set[str] = dataclasses.field(default_factory=set)
    passing: bool | None = None          # the probe's state in this run (None: no result yet)
    grace_until: float | None = None     # monotonic: no hang detection before (a booting guest is busy and silent)
    last_failure: tuple[str, str, float] | None = None   # cause, detail, wall time

    def start_over(self, due: float | None) -> None:
        """A new run (start, reboot) or none (``due`` None: stopped): detectors start over."""
        self.run += 1
        self.next_probe = due
        self.grace_until = due
        self.passing = None
        self.streak.reset()
        self.console.reset()
        self.hang.reset()


class LivenessMonitor:
    """Liveness of every guest whose policy asks for it; a pump subscriber.

    Args:
        agent: the agent's lane (:class:`~virtwatch.agent.lane.GuestAgent`).
        guests: guest state (running or not, UUID).
        policy_for: a guest name -> its merged :class:`~virtwatch.policy.config.GuestPolicy`.
        alerts: instant alerts.
        policy: the policy engine, or None (policy disabled: alerts only). Each failure goes to
            its ``on_liveness``; a REBOOT while ``own_operation`` names one of its operations
            (our reset) is no guest reboot; its ``selection_listeners`` get :meth:`reselect`.
        redact: applied to console lines put in alerts.
        mono, wall: clocks, seconds (monotonic; epoch).
        tick: seconds between two looks at the probe schedule.
        kept: the previous monitor's :meth:`handover` at a reload (counters go on).

    Wiring: ``pump.subscribe(monitor.on_event)``, console capture's ``data_listeners``
    gets :meth:`on_console`, each statistics snapshot goes to :meth:`on_snapshot`, run
    :meth:`run` as a task, ``exposition.add_collector("liveness", monitor.collector)``.
    """

    def __init__(self, agent: AgentPort, guests: GuestLookup, policy_for: Callable[[str], GuestPolicy],
                 alerts: AlertSink, *, policy: PolicyPort | None = None,
                 redact: Callable[[list[str]], list[str]] | None = None,
                 mono: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 tick: float = 0.25, kept: Mapping[str, GuestLiveness] | None = None) -> None:
        self._agent = agent
        self._guests = guests
        self._policy_for = policy_for
        self._alerts = alerts
        self._policy = policy
        if policy is not None:
            policy.selection_listeners.append(self.reselect)
        self._redact = redact
        self._mono = mono
        self._wall = wall
        self._tick = tick
        self._state: dict[str, GuestLiveness] = dict(kept or {})
        for st in self._state.values():
            st.in_flight, st.next_probe = False, None
        self._policies: dict[str, tuple[float, GuestPolicy]] = {}
        # the schedule's next pass (see schedule()): marked dirty by anything that may move it
        self._dirty, self._next_pass, self._seen_version = True, 0.0, -1
        self._wake: asyncio.Event | None = None  # set by _touch while run() waits
        self._patterns: dict[tuple[str, ...], tuple[re.Pattern[str], ...]] = {}
        self._tasks = TaskSet()
        self.collector = LivenessCollector(self)

    # -- policy ----------------------------------------------------------------------
    def policy(self, name: str) -> GuestPolicy:
        """``name``'s merged policy, cached :data:`POLICY_TTL` seconds."""
        now = self._mono()
        hit = self._policies.get(name)
        if hit is not None and now - hit[0] < POLICY_TTL:
            return hit[1]
        pol = self._policy_for(name)
        self._policies[name] = (now, pol)
        return pol

    def reselect(self, name: str) -> None:
        """``name``'s merged policy may have changed (metadata, override): read it again."""
        self._policies.pop(name, None)
        self._touch()

    def _touch(self) -> None:
        """Something may have moved the schedule: the next pass looks at every guest, soon."""
        self._dirty = True
        if self._wake is not None:
            self._wake.set()

    def _entry(self, name: str, uuid: str = "") -> GuestLiveness:
        st = self._state.get(name)
        if st is None:
            st = self._state[name] = GuestLiveness(name, uuid)
        elif uuid:
            st.uuid = uuid
        return st

    # -- inputs ------------------------------------------------------------------------
    def on_event(self, ev: Event) -> None:
        """Pump subscriber: STARTED and REBOOT start a new run (first probe after
        ``probe_initial_delay``), STOPPED ends it; every liveness alert of the guest resolves.
        REBOOT also counts, and may make a reboot loop."""
        if ev.source != Source.DOMAIN or not ev.name:
            return
        self._touch()
        if ev.kind == Kind.LIFECYCLE and ev.event == Lifecycle.UNDEFINED:
            st = self._state.pop(ev.name, None)
            if st is not None:
                self._resolve(st, *ALERTS)
            return
        if ev.kind == Kind.LIFECYCLE and ev.event in (Lifecycle.STARTED, Lifecycle.STOPPED):
            st = self._entry(ev.name, ev.uuid)
            started = ev.event == Lifecycle.STARTED
            st.start_over(self._mono() + self.policy(ev.name).probe_initial_delay if started else None)
            st.reboots.reset()
            self._resolve(st, *ALERTS)
        elif ev.kind == Kind.REBOOT:
            self._on_reboot(self._entry(ev.name, ev.uuid))

    def _on_reboot(self, st: GuestLiveness) -> None:
        pol = self.policy(st.name)
        now = self._mono()
        st.start_over(now + pol.probe_initial_delay)
        self._resolve(st, "probe_failed", "console_panic", "hung")
        if not st.reboots.new_reboot(now):
            return  # one reboot sends a burst of REBOOT events
        st.reboots_total += 1
        ours = self._policy.own_operation(st.name) if self._policy is not None else None
        if ours is not None:
            log.info("liveness_reboot_ours", guest=st.name, operation=ours)
            return
        if st.reboots.record(now, pol.reboot_limit, pol.reboot_interval):
            n = st.reboots.count(now, pol.reboot_interval)
            self._fail(st, "reboot_loop", f"{n} guest reboots within {pol.reboot_interval:g} s "
                                          f"(reboot_limit {pol.reboot_limit})")

    def on_console(self, name: str, data: bytes) -> None:
        """Console bytes of ``name`` as the capture read them: searched for its policy's
        ``console_failure_patterns``."""
        g = self._guests.by_name(name)
        st = self._entry(name, g.uuid if g else "")
        pats = self.policy(name).console_failure_patterns
        compiled = self._patterns.get(pats)
        if compiled is None:
            compiled = self._patterns[pats] = compile_patterns(pats)
        line = st.console.feed(data, compiled)
        if line is not None:
            shown = self._redact([line])[0] if self._redact is not None else line
            self._fail(st, "console_panic", shown[:300])

    def on_snapshot(self, domains: Mapping[str, Any]) -> None:
        """A statistics poll's ``domains`` (:class:`~virtwatch.virt.stats.DomainStats` by UUID):
        the hang detector of every guest whose policy sets ``hang_after``."""
        for d in domains.values():
            if d.stale or not d.name:
                continue
            pol = self.policy(d.name)
            st = self._entry(d.name, d.uuid)
            st.hang_watched = pol.hang_after > 0
            if not st.hang_watched or (st.grace_until is not None and self._mono() < st.grace_until):
                st.hang.reset()  # off, or booting: a kernel starting up is busy and does little I/O
                continue
            sample = activity_sample(d.stats, d.collected_at)
            if sample is None:
                continue
            change = st.hang.update(sample, pol.hang_after)
            if change == "hung" and st.hang.busy_since is not None:
                self._fail(st, "hung", f"vCPU at {st.hang.cpu_ratio or 0:.2f} s/s with no block or network I/O "
                                       f"for {sample.at - st.hang.busy_since:.0f} s (hang_after {pol.hang_after:g} s)")
            elif change == "recovered":
                self._resolve(st, "hung")

    # -- probes -------------------------------------------------------------------------
    async def run(self) -> None:
        """The probe schedule, until cancelled: a pass (:meth:`schedule`) starts the probes that
        are due (one at a time per guest) and resolves reboot loops that calmed down. The task
        then sleeps until the next pass is due or something marks the schedule dirty, passes
        at least ``tick`` seconds apart: every wakeup of the loop costs (300 µs of CPU here),
        so an idle schedule wakes once per :data:`FULL_PASS`, not four times a second."""
        self._wake = asyncio.Event()
        try:
            while True:
                try:
                    self.schedule()
                except Exception as err:  # a bug must not end every guest's probes
                    log.exception("liveness_schedule_failed", error=repr(err))
                await asyncio.sleep(self._tick)
                wait = min(FULL_PASS, self._next_pass - self._mono())
                if not self._dirty and wait > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._wake.wait()
                self._wake.clear()
        finally:
            self._tasks.cancel()

    def schedule(self) -> list[str]:
        """Start every probe that is due now; returns the guests probed.

        A pass over every guest runs only when something may be due: the earliest next probe,
        a reboot loop to look at again, a change of the guest table, an event, a selection
        change or a probe that ended, and at least every :data:`FULL_PASS` seconds. (A pass at
        every tick cost 13 µs per guest, 4 times a second: 52 ms/s at 1,000 guests.)"""
        now = self._mono()
        if not self._dirty and now < self._next_pass and self._guests.version == self._seen_version:
            return []
        self._dirty, self._seen_version = False, self._guests.version
        next_pass = now + FULL_PASS
        started = []
        for g in self._guests.guests():
            st = self._state.get(g.name)
            if g.state not in RUNNING:
                continue
            pol = self.policy(g.name)
            if st is not None and "reboot_loop" in st.firing:
                if st.reboots.calm(now, pol.reboot_limit, pol.reboot_interval):
                    self._resolve(st, "reboot_loop")
                else:
                    next_pass = min(next_pass, now + 1.0)
            if pol.probe == "none":
                if st is not None:
                    st.probe = "none"
                    self._resolve(st, "probe_failed")  # probing was turned off: nothing fails any more
                continue
            st = st or self._entry(g.name, g.uuid)
            if st.next_probe is None:  # first seen running (daemon start): as after a start
                st.next_probe = now + pol.probe_initial_delay
            if st.in_flight:
                continue  # its end marks the schedule dirty
            if now < st.next_probe:
                next_pass = min(next_pass, st.next_probe)
                continue
            st.in_flight = True
            st.probe = pol.probe
            st.next_probe = now + pol.probe_interval
            next_pass = min(next_pass, st.next_probe)
            self._tasks.spawn(self._probe(st, pol), name=f"probe-{g.name}")
            started.append(g.name)
        self._next_pass = next_pass
        return started

    async def _probe(self, st: GuestLiveness, pol: GuestPolicy) -> None:
        run = st.run
        try:
            res = await run_probe(self._agent, st.name, pol.probe, pol.probe_command, pol.probe_timeout,
                                  mono=self._mono, wall=self._wall)
        finally:
            st.in_flight = False
            self._touch()
        if st.run != run or self._state.get(st.name) is not st:
            return  # the guest started over (or went away) while it ran: says nothing now
        self.record(st, pol, res)

    def record(self, st: GuestLiveness, pol: GuestPolicy, res: ProbeResult) -> None:
        """Count one probe result: a failure past the threshold fires, a pass resolves. A probe
        that failed on our side (:data:`~virtwatch.liveness.probes.OUR_SIDE`) is not counted."""
        if res.reason in OUR_SIDE:
            log.info("liveness_probe_skipped", guest=st.name, probe=pol.probe, reason=res.reason, detail=res.detail)
            return
        st.results.append(res)
        if res.ok and not st.passing:  # once per run, and when a failing streak ends
            log.info("liveness_probe_passing", guest=st.name, probe=pol.probe, detail=res.detail,
                     duration=res.duration)
        st.passing = res.ok
        if not res.ok:
            st.probe_failures[(pol.probe, res.reason)] += 1
            log.info("liveness_probe_failed", guest=st.name, probe=pol.probe, reason=res.reason, detail=res.detail,
                     failures=st.streak.failures + 1, threshold=pol.probe_failure_threshold)
        if st.streak.record(res.ok, pol.probe_failure_threshold):
            self._fail(st, "probe_failed", f"{st.streak.failures} consecutive {pol.probe} probes failed, last: "
                                           f"{res.reason} ({res.detail})")
        elif res.ok:
            self._resolve(st, "probe_failed")

    # -- outcome ----------------------------------------------------------------------
    def _fail(self, st: GuestLiveness, cause: str, detail: str) -> None:
        alertname, severity, what = ALERTS[cause]
        st.causes[cause] += 1
        st.last_failure = (cause, detail, self._wall())
        st.firing.add(cause)
        log.warning("liveness_failure", guest=st.name, uuid=st.uuid, cause=cause, detail=detail)
        self._alerts.fire(alertname, domain=st.name, uuid=st.uuid, severity=severity,
                          summary=f"{st.name}: {what}", description=f"{st.name}: {cause}: {detail}",
                          extra_annotations={"cause": cause})
        if self._policy is not None:
            try:
                self._policy.on_liveness(st.name, cause, detail)
            except Exception as err:  # the policy must never break detection
                log.error("liveness_report_failed", guest=st.name, error=repr(err))

    def _resolve(self, st: GuestLiveness, *causes: str) -> None:
        for cause in causes:
            if cause in st.firing:
                st.firing.discard(cause)
                self._alerts.resolve(ALERTS[cause][0], st.name)
                log.info("liveness_recovered", guest=st.name, cause=cause)

    # -- reading ------------------------------------------------------------------------
    def guests(self) -> dict[str, GuestLiveness]:
        """Every guest's liveness state, by name (read-only use)."""
        return dict(self._state)

    def explain(self, name: str) -> dict[str, Any] | None:
        """``name``'s liveness for ``virtwatch explain`` (JSON-ready), None if never seen."""
        st = self._state.get(name)
        if st is None:
            return None
        pol = self.policy(name)
        now = self._mono()
        return {
            "probe": pol.probe,
            "next_probe_in": round(st.next_probe - now, 3) if st.next_probe is not None and pol.probe != "none"
            else None,
            "consecutive_failures": st.streak.failures, "threshold": pol.probe_failure_threshold,
            "results": [r.as_dict() for r in reversed(st.results)],
            "reboots_in_window": st.reboots.count(now, pol.reboot_interval), "reboot_limit": pol.reboot_limit,
            "reboots_total": st.reboots_total,
            "hang_after": pol.hang_after, "hung": st.hang.hung, "cpu_ratio": st.hang.cpu_ratio,
            "console_match": st.console.matched,
            "failing": sorted(st.firing),
            "last_failure": ({"cause": st.last_failure[0], "detail": st.last_failure[1],
                              "time": st.last_failure[2]} if st.last_failure else None),
        }

    def handover(self) -> dict[str, GuestLiveness]:
        """State a reload hands to the next monitor (counters, reboot windows, firing alerts)."""
        return dict(self._state)


def explain_lines(info: Mapping[str, Any] | None) -> list[str]:
    """:meth:`LivenessMonitor.explain` as ``virtwatch explain`` lines."""
    if info is None:
        return ["liveness: not seen yet"]
    out = [f"liveness: probe {info['probe']}, {info['consecutive_failures']}/{info['threshold']} consecutive "
           f"failures" + (f", next in {info['next_probe_in']:.1f} s" if info["next_probe_in"] is not None else "")]
    for r in info["results"]:
        t = time.strftime("%H:%M:%S", time.localtime(r["at"]))
        out.append(f"  probe at {t}: {'pass' if r['ok'] else 'FAIL'} {r['reason']} ({r['detail']}), "
                   f"{r['duration']:.3f} s")
    out.append(f"  reboots: {info['reboots_in_window']} in window (limit {info['reboot_limit']}), "
               f"{info['reboots_total']} in all")
    if info["hang_after"]:
        ratio = "n/a" if info["cpu_ratio"] is None else f"{info['cpu_ratio']:.2f} s/s"
        out.append(f"  hang detector: {'HUNG' if info['hung'] else 'ok'}, vCPU {ratio}")
    if info["console_match"]:
        out.append(f"  console: {info['console_match']}")
    if info["failing"]:
        out.append(f"  failing: {', '.join(info['failing'])}")
    return out


class LivenessCollector:
    """prometheus-client collector over the monitor's state (no libvirt calls)."""

    def __init__(self, monitor: LivenessMonitor) -> None:
        self._monitor = monitor

    def describe(self) -> list[Metric]:
        """No up-front description."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The six liveness families."""
        success = GaugeMetricFamily("libvirt_domain_probe_success", "1 if the guest's last liveness probe passed.",
                                    labels=["domain", "probe"])
        duration = GaugeMetricFamily("libvirt_domain_probe_duration_seconds",
                                     "Duration of the guest's last liveness probe.", labels=["domain", "probe"])
        failures = CounterMetricFamily("libvirt_domain_probe_failures", "Failed liveness probes, by reason.",
                                       labels=["domain", "probe", "reason"])
        causes = CounterMetricFamily("libvirt_domain_liveness_failures",
                                     "Liveness failures declared (probe_failed, console_panic, reboot_loop, hung).",
                                     labels=["domain", "cause"])
        hung = GaugeMetricFamily("libvirt_domain_hung", "1 while the guest is busy but silent for hang_after.",
                                 labels=["domain"])
        reboots = CounterMetricFamily("libvirt_domain_reboots",
                                      "Guest reboots (REBOOT events; a burst within 2 s counts once).",
                                      labels=["domain"])
        for name, st in sorted(self._monitor.guests().items()):
            if st.results and st.probe != "none":
                last = st.results[-1]
                success.add_metric([name, st.probe], 1 if last.ok else 0)
                duration.add_metric([name, st.probe], last.duration)
            for (probe, reason), n in sorted(st.probe_failures.items()):
                failures.add_metric([name, probe, reason], n)
            for cause, n in sorted(st.causes.items()):
                causes.add_metric([name, cause], n)
            if st.hang_watched:
                hung.add_metric([name], 1 if st.hang.hung else 0)
            if st.reboots_total:
                reboots.add_metric([name], st.reboots_total)
        yield from (success, duration, failures, causes, hung, reboots)
