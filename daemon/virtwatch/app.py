"""Wiring: the one place that builds every component and hands out ports.

:class:`Daemon` is built from a frozen :class:`~virtwatch.config.Settings`
and the process's libvirt event implementation; :meth:`Daemon.start` and
:meth:`Daemon.stop` bring it up and down in a fixed order. Tests build a
Daemon exactly as the CLI does, on the libvirt test driver.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, disable_created_metrics

from . import __version__
from .agent.lane import GuestAgent
from .alerts.alerter import Alerter
from .config import ConfigError, Settings, parse_listen, wants_read_only, write_denied_warnings
from .console.capture import ConsoleCapture
from .control import BadRequest, ControlServer, NotAvailable, UnknownGuest
from .demo import LivingDemo
from .eventlog import RecentEvents
from .handover import Retained
from .inventory import Inventory
from .liveness.monitor import LivenessMonitor, explain_lines
from .logs import EventLogger
from .metrics.collector import Exposition, StateCollector
from .metrics.history import GuestHistory, cpu_percent, cpu_reference
from .metrics.http import HTTPApp, guest_json
from .metrics.instruments import Instruments
from .model import Event, Kind, ResyncEntry, Source, missed_lifecycle
from .policy.config import GuestPolicy
from .policy.select import select
from .policy.wiring import PolicyRuntime
from .state import GuestRegistry
from .virt.aio import ThreadSafeAsyncIOImpl
from .virt.calls import Calls
from .virt.connection import ConnectionManager, Opener, SideConnection
from .virt.devices import DeviceCache
from .virt.events import EventPump
from .virt.lanes import LanePool, shares_main_connection
from .virt.migration import MigrationTracker
from .virt.stats import Snapshot, StatsPoller
from .web.server import WebServer, load_web_parts

log = structlog.get_logger("virtwatch.app")


class Daemon:
    """virtwatch, assembled.

    Args:
        settings: validated configuration.
        impl: the process's registered libvirt event implementation.
        registry: registry for self-metrics (a fresh one by default).
        wall_clock: seconds since the epoch (injected for tests).
        control_fd: the operator socket passed by systemd socket activation
            (``virtwatch.socket``), served instead of binding ``daemon.socket``.
        retained: the :meth:`handover` of the daemon this one replaces at a reload.
        opener: opens the main connection (``virt.connection.Opener``; libvirt's own by default).

    Attributes are the components (``pump``, ``guests``, ``connection``,
    ``poller``, ``exposition``...), exposed for tests and the CLI.
    """

    # PLR0915: the composition root is one flat list on purpose; its order is the order in
    # which subscribers and listeners are called.
    def __init__(self, settings: Settings, impl: ThreadSafeAsyncIOImpl,  # noqa: PLR0915
                 registry: CollectorRegistry | None = None, wall_clock: Callable[[], float] = time.time,
                 control_fd: int | None = None, retained: Retained | None = None, opener: Opener | None = None) -> None:
        self.settings = settings
        self.impl = impl
        self.loop = asyncio.get_running_loop()
        disable_created_metrics()  # *_created series only add noise for a daemon's counters
        kept = retained
        if kept is None:
            self.registry = registry or CollectorRegistry()
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            self.instruments = Instruments(self.registry)
            self.pump = EventPump(self.loop, wall_clock)
            pump = self.pump  # read at each scrape: no task waking the loop every second to set it
            self.instruments.event_backlog.set_function(lambda: pump.backlog)
            self.guests = GuestRegistry(wall_clock)
            self.recent = RecentEvents()
            self.inventory = Inventory()  # network/pool events overlay the poll snapshot until the next poll
            self.migrations = MigrationTracker()
        else:
            self.registry, self.instruments, self.pump = kept.registry, kept.instruments, kept.pump
            self.guests, self.recent, self.inventory = kept.guests, kept.recent, kept.inventory
            self.migrations = kept.migrations
            self.pump.unsubscribe_all()
        # Figures of another host are not this host's: a new URI starts without them.
        same_host = kept is not None and kept.uri == settings.libvirt.uri
        self.calls = Calls(self.instruments, settings.libvirt.max_calls_in_flight, settings.libvirt.call_timeout)
        self.pump.subscribe(self.guests.on_event)
        self.pump.subscribe(self._count_event)
        self.pump.subscribe(self.recent)
        if settings.log.events:
            self.pump.subscribe(EventLogger())
        self.read_only = wants_read_only(settings)
        self.connection = ConnectionManager(settings.libvirt, self.read_only, self.calls, self.pump,
                                            self._on_resync, self.instruments, opener=opener)
        self._previous = kept.previous if kept and same_host else None
        self._latest = kept.snapshot if kept and same_host else None
        self.history = kept.history if kept and same_host else GuestHistory()
        # Statistics and host figures run on lanes of their own (one connection, one thread
        # each), so a call stuck on a hung QEMU never holds up events, resync or console opens,
        # nor the next poll (issue 9). Statistics never need write access.
        self.lanes = LanePool(settings.libvirt, True, self.instruments, settings.stats.max_stuck_lanes,
                              shared=shares_main_connection(settings.libvirt.uri), unwatched=impl.unwatched)
        self.connection.add_listener(self.lanes)
        self.lanes.count_also(lambda: self.connection.conn is not None)
        # NICs (alias, MAC, tap) and the balloon period from each guest's live XML, read on the
        # stats lane when an event or the stats say it changed (issue 14: series that survive restarts).
        self.devices = DeviceCache(wall=wall_clock)
        self.pump.subscribe(self.devices.on_event)
        self.connection.add_listener(self.devices)
        self.poller = StatsPoller(settings.stats, self.connection, self.lanes, self.instruments,
                                  wall=wall_clock, on_snapshot=self._on_snapshot, kept=self._latest,
                                  devices=self.devices, migrations=self.migrations)
        self.connection.add_listener(self.poller)
        self.pump.subscribe(self.inventory.on_event)
        self.alerter = Alerter(settings.alerts, self.registry, metrics=kept.alert_metrics if kept else None,
                               active=kept.alerts if kept else None, state_dir=settings.daemon.state_dir)
        self.pump.subscribe(self._alert_on_event)
        self.pump.subscribe(self.migrations)  # after the alert rules: they see the phase an event ends
        self.connection.add_listener(self)
        self.exposition = Exposition(self.registry, StateCollector(self.guests,
                                                                   self.inventory.view(lambda: self.poller.latest),
                                                                   lambda: self.connection.info, self.migrations),
                                     max_series=settings.metrics.max_series)
        self.exposition.add_collector("lanes", self.lanes)
        # Console capture and guest agent (issue 5): stopped before the connection (design §3a).
        self.console = ConsoleCapture(settings.console, self.calls, self.guests, settings.daemon.state_dir,
                                      selector=lambda n: self._guest_policy(n).captured_console_kib(),
                                      wall=wall_clock,
                                      call_timeout=min(10.0, settings.libvirt.call_timeout),
                                      kept=kept.consoles if kept else None, writable=self.connection.writable)
        # The agent's calls may block for its response timeout: its own connection and thread
        # (libvirt 9.0's client must never see two calling threads on one connection).
        self.agent_calls = Calls(self.instruments, 1, settings.libvirt.call_timeout)
        self.agent = GuestAgent(settings.agent, self.agent_calls, self.guests, wall=wall_clock,
                                kept=kept.agent_info if kept and same_host else None)
        self.agent_side = SideConnection("agent", settings.libvirt, self.read_only, self.agent_calls, self.agent,
                                         allowed=self.connection.writable)
        self.lanes.count_also(lambda: self.agent_side.conn is not None)
        self.pump.subscribe(self.console.on_event)
        self.connection.add_listener(self.console)
        self.pump.subscribe(self.agent.on_event)
        if settings.agent.enabled:
            self.connection.add_listener(self.agent_side)
        self.exposition.add_collector("agent", self.agent.collector)
        # Policy engine (issue 3): only when enabled; it needs the read-write connection.
        # Its actions (a restore takes seconds) run on a connection and thread of their own, so
        # they never wait behind statistics calls (a guest whose QEMU hangs can stall those).
        self.policy: PolicyRuntime | None = None
        self.policy_side: SideConnection | None = None
        self.policy_calls = Calls(self.instruments, 1, settings.libvirt.call_timeout)
        if settings.policy.enabled:
            self.policy = PolicyRuntime(settings.policy, settings.daemon.state_dir,
                                        lambda: self.policy_side.conn if self.policy_side else None,
                                        self.alerter, settings.daemon.boot_id_file, calls=self.policy_calls,
                                        action_counts=kept.action_counts if kept else None)
            self.policy_side = SideConnection("policy", settings.libvirt, self.read_only, self.policy_calls,
                                              self.policy, allowed=self.connection.writable)
            self.connection.add_listener(self.policy_side)
            self.lanes.count_also(lambda: self.policy_side is not None and self.policy_side.conn is not None)
            self.pump.subscribe(self.policy.engine.on_event)
            self.exposition.add_collector("policy", self.policy.collector)
            self.policy.engine.selection_listeners.append(self.console.reselect)
        # The living demo (issue 14), on the test driver only: its actions run off the loop, on a
        # connection of its own, or on the main connection's thread for a test:///file.xml host
        # (each connection to one of those sees a private copy of the host).
        self.demo: LivingDemo | None = None
        self.demo_side: SideConnection | None = None
        self.demo_calls = Calls(self.instruments, 1, settings.libvirt.call_timeout)
        if settings.demo.enabled:
            shared = self.lanes.shared
            self.demo = LivingDemo(settings.demo, settings.libvirt.uri, self.calls if shared else self.demo_calls,
                                   call_timeout=settings.libvirt.call_timeout)
            if shared:
                self.connection.add_listener(self.demo)
            else:
                self.demo_side = SideConnection("demo", settings.libvirt, False, self.demo_calls, self.demo)
                self.connection.add_listener(self.demo_side)
                self.lanes.count_also(lambda: self.demo_side is not None and self.demo_side.conn is not None)
        # Liveness (issue 12): probes on the agent's lane, console patterns, reboot loops and the
        # hang detector; failures alert at once and go to the policy engine like a crash.
        self.liveness = LivenessMonitor(self.agent, self.guests, self._guest_policy, self.alerter,
                                        policy=self.policy.engine if self.policy is not None else None,
                                        redact=settings.console.redact, wall=wall_clock,
                                        kept=kept.liveness if kept else None)
        self.pump.subscribe(self.liveness.on_event)
        self.pump.subscribe(self.exposition.on_event)  # last: the body follows the guest table at once
        self.console.data_listeners.append(self.liveness.on_console)
        self.exposition.add_collector("liveness", self.liveness.collector)
        # Console contents (issue 13): on the operator socket always, over HTTP only when
        # http.serve_console opts in (the web config must then authenticate: load_web_parts).
        self.control = ControlServer(self, settings.daemon.socket, fd=control_fd, console=self.console)
        self.http = HTTPApp(self.exposition, self.guests, lambda: self.poller.latest, self.recent, self,
                            ready=self.connection.ready.is_set,
                            console=self.console if settings.http.serve_console else None, history=self.history,
                            wall=wall_clock)
        self.web = WebServer(self.http.build)
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False
        self.listen_address: tuple[str, int] | None = None
        self.started_at = kept.started_at if kept else wall_clock()
        self.wall_clock = wall_clock
        self._kept_action_counts = dict(kept.action_counts) if kept else {}  # while policy is off
        self._stopped = False

    # -- subscribers / ports --------------------------------------------------
    def _guest_policy(self, name: str) -> GuestPolicy:
        """``name``'s merged policy: the engine's (with domain metadata and overrides) when
        policy is enabled, else the ``[policy]`` rules, profiles and defaults alone."""
        if self.policy is not None:
            return self.policy.engine.policy_of(name)
        g = self.guests.by_name(name)
        return select(self.settings.policy, name, g.uuid if g else "", None).policy

    def _count_event(self, ev: Event) -> None:
        self.instruments.events.labels(kind=ev.kind, event=ev.event, detail=ev.detail).inc()

    def _on_resync(self, entries: list[ResyncEntry], mark: int) -> None:
        """Apply a resync to the guest table. A state change it finds that no event reported
        (the connection was down: libvirtd restarted, or a reload was under way) goes to the
        alert rules as the lifecycle event it stands for, so a crash in that gap still pages.
        Only the alerter sees it: the policy engine reconciles from its own resync."""
        for before, after in self.guests.apply_resync(entries, mark):
            missed = missed_lifecycle(after.state, after.reason)
            if missed is None:
                continue
            event, detail = missed
            self.instruments.events_missed.labels(event=event, detail=detail).inc()
            log.warning("event_missed", guest=after.name, lifecycle=f"{event}/{detail}",
                        was=f"{before.state}/{before.reason}", found=f"{after.state}/{after.reason}")
            try:  # like every pump subscriber: a rule bug must not fail the resync (and the connection)
                self._alert_on_event(Event(time=self.wall_clock(), seq=0, source=Source.DOMAIN,
                                           kind=Kind.LIFECYCLE, name=after.name, uuid=after.uuid, event=event,
                                           detail=detail, payload={"found_by": "resync"}))
            except Exception as err:
                log.error("event_missed_alert_failed", guest=after.name, error=repr(err))

    def _alert_on_event(self, ev: Event) -> None:
        if ev.source == Source.DOMAIN:
            self.alerter.on_event(ev, console=self.console.alert_text(ev.name),  # opted in, redacted
                                  migrating_in=self.migrations.direction(ev.uuid) == "in")

    # ConnectionListener: instant alert while libvirt is unreachable
    def connection_ready(self, conn: Any) -> None:
        """libvirt is back: resolve the connection-lost alert (policy becomes ready
        when its own connection is open); say once what libvirt's refusal of write access stops."""
        self.alerter.connection_restored()
        if self.connection.write_denied is not None and not self.connection.denied_reported:
            self.connection.denied_reported = True  # once per daemon, not at every reconnect
            for fields in write_denied_warnings(self.settings, self.connection.write_denied):
                log.warning("feature_unavailable", **fields)

    def connection_lost(self) -> None:
        """libvirt went away: policy stops deciding; fire the alert (not during an orderly stop)."""
        if self.policy is not None:
            self.policy.engine.set_ready(False)
        if not self.connection.stopping:
            self.alerter.connection_lost(self.settings.libvirt.uri, self.connection.close_reason or "")

    def _on_snapshot(self, snap: Snapshot) -> None:
        self.history.add(self._latest, snap)
        # the poll before is kept for CPU % only: its cpu.time, not every guest's statistics
        self._previous, self._latest = cpu_reference(self._latest) if self._latest else None, snap
        self.liveness.on_snapshot(snap.domains)
        self.exposition.prerender()  # off the loop, now: the next scrape finds a finished body

    def status(self) -> dict[str, Any]:
        """JSON-ready daemon summary (HTTP ``/api/v1/status``, systemd STATUS=)."""
        snap = self.poller.latest
        return {
            "version": __version__,
            "uri": self.settings.libvirt.uri,
            "connected": self.connection.ready.is_set(),
            "read_only": self.connection.read_only, "write_denied": self.connection.write_denied,
            "last_error": self.connection.last_error,
            "libvirt": dict(self.connection.info),
            "guests": len(self.guests.guests()),
            "stale_guests": len(self.poller.stale),
            "last_poll_time": snap.time if snap else None,
            "last_poll_duration_seconds": snap.duration if snap else None,
            "events_received": self.pump.published,
            "event_backlog": self.pump.backlog,
        }

    def guest_extra(self, name: str) -> dict[str, Any]:
        """Per-guest extras for the API and landing page (CPU %, agent, console, policy, liveness)."""
        g = self.guests.by_name(name)
        if g is None:
            return {}
        agent = self.agent.info(name)
        return {"cpu_percent": cpu_percent(self._previous, self.poller.latest, g.uuid),
                "agent": agent.as_dict() if agent else None, "console": self.console.state(name),
                "policy": self._policy_guest(name), "migrating": self.migrations.direction(g.uuid),
                "liveness": self.liveness.explain(name)}

    # -- ControlPort (operator Unix socket) ---------------------------------------
    def _policy_guest(self, name: str) -> dict[str, Any] | None:
        if self.policy is None:
            return None
        g = self.policy.engine.snapshot().guests.get(name)
        if g is None:
            return None
        return {"intent": g.intent, "managed": g.managed, "mode": g.mode, "given_up": g.given_up,
                "given_up_reason": g.given_up_reason, "next_retry": g.next_retry,
                "pending_action": g.pending_action, "attempt": g.attempt,
                "failures_in_window": g.failures_in_window, "restarts": dict(g.restarts), "override": dict(g.override),
                "migrated_to": g.migrated_to}

    def control_status(self) -> dict[str, Any]:
        """Daemon summary plus every guest's state and policy state."""
        snap = self.poller.latest
        guests = []
        for g in self.guests.guests():
            j = guest_json(g, snap)
            j["policy"] = self._policy_guest(g.name)
            guests.append(j)
        out = self.status()
        out["policy_enabled"] = self.policy is not None
        if self.policy is not None:
            es = self.policy.engine.snapshot()
            out["policy"] = {"ready": es.ready, "breaker_open": es.breaker_open, "mode": self.settings.policy.mode}
        out["guest_list"] = guests
        return out

    def control_guest(self, name: str) -> dict[str, Any]:
        """One guest with policy state and extras; raises UnknownGuest."""
        g = self.guests.by_name(name)
        if g is None:
            raise UnknownGuest(name)
        out = guest_json(g, self.poller.latest)
        out["policy"] = self._policy_guest(name)
        out.update(self.guest_extra(name))
        out["events"] = [e.as_dict() for e in self.recent.since(0, name=name, limit=20)]
        return out

    def control_explain(self, name: str) -> dict[str, Any]:
        """Merged policy with key sources and the decision now."""
        if self.policy is None:
            raise NotAvailable("policy is disabled ([policy] enabled = false): every guest is observed only")
        try:
            ex = self.policy.engine.explain(name)
        except KeyError:
            raise UnknownGuest(name) from None
        live = self.liveness.explain(name)
        return {"name": ex.name, "uuid": ex.uuid, "managed": ex.managed, "mode": ex.mode, "intent": ex.intent,
                "policy": {k: _jsonable(v) for k, v in ex.policy.items()}, "sources": dict(ex.sources),
                "decision_now": ex.decision_now, "liveness": live, "lines": ex.lines() + explain_lines(live)}

    async def control_action(self, name: str, action: str) -> dict[str, Any]:
        """hold / release / reset one guest (returns once the change is committed)."""
        if self.policy is None:
            raise NotAvailable("policy is disabled ([policy] enabled = false)")
        try:
            if action == "reset":
                await self.policy.reset(name)
            else:
                await getattr(self.policy.engine, action)(name)
        except KeyError:
            raise UnknownGuest(name) from None
        log.info("operator_action", action=action, guest=name)
        return {"name": name, "action": action, "policy": self._policy_guest(name)}

    async def control_override(self, name: str, values: dict[str, Any]) -> dict[str, Any]:
        """Replace one guest's runtime policy override ({} clears it; returns once committed)."""
        if self.policy is None:
            raise NotAvailable("policy is disabled ([policy] enabled = false)")
        try:
            await self.policy.engine.set_override(name, values)
        except KeyError:
            raise UnknownGuest(name) from None
        except ValueError as err:
            raise BadRequest(str(err)) from None
        log.info("operator_action", action="override", guest=name)
        return {"name": name, "action": "override", "policy": self._policy_guest(name)}

    def control_events(self, since: int, limit: int) -> dict[str, Any]:
        """Recent events after ``since`` (:meth:`~virtwatch.eventlog.RecentEvents.page`)."""
        return self.recent.page(max(0, since), limit)

    def healthy(self) -> bool:
        """True while every daemon task is alive (for the systemd watchdog)."""
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    def status_line(self) -> str:
        """One human line for systemd ``STATUS=``."""
        s = self.status()
        conn = "connected" if s["connected"] else "libvirt unreachable"
        poll = f"last poll {time.time() - s['last_poll_time']:.0f} s ago" if s["last_poll_time"] else "no poll yet"
        return f"{conn}; {s['guests']} guests; {poll}"

    # -- lifecycle ------------------------------------------------------------
    def handover(self) -> Retained:
        """The state a successor keeps at a reload (call after :meth:`stop`)."""
        return Retained(
            registry=self.registry, instruments=self.instruments, alert_metrics=self.alerter.client.metrics,
            pump=self.pump, guests=self.guests, recent=self.recent, inventory=self.inventory,
            migrations=self.migrations,
            alerts=self.alerter.active, consoles=self.console.handover(), agent_info=self.agent.all_info(),
            action_counts=(dict(self.policy.engine.snapshot().actions) if self.policy is not None
                           else self._kept_action_counts),
            snapshot=self.poller.latest, previous=self._previous, history=self.history, uri=self.settings.libvirt.uri,
            started_at=self.started_at, liveness=self.liveness.handover())

    async def reload_web(self, settings: Settings) -> None:
        """Take ``settings``, which differ from the running ones in ``http.web_config_file`` at
        most, by swapping the HTTP listener's TLS context, users and headers in place
        (:meth:`WebServer.swap`): nothing else restarts. Raises :class:`ConfigError` (the
        running listener untouched) when the web config or its files are unusable."""
        parts = load_web_parts(settings.http.web_config_file, settings.http.serve_console)
        await self.web.swap(parts)
        self.settings = settings
        log.info("web_config_reloaded", source=parts.source, tls=parts.ssl_context is not None,
                 users=len(parts.config.basic_auth_users))

    async def start(self) -> None:
        """Bind the HTTP listener, then start the pump, connection and poller.

        Raises OSError if the listen address cannot be bound. A libvirtd that
        is down is not an error: the connection keeps retrying.
        """
        http = self.settings.http
        await self.web.start(http.listen, load_web_parts(http.web_config_file, http.serve_console))  # ConfigError
        self.listen_address = self.web.address
        await self.console.start()  # opens console.sqlite when capture is enabled
        await self.alerter.start(parse_listen(http.listen)[0], self.listen_address)  # and its `instance` label
        if self.policy is not None:
            await self.policy.start()  # the engine, then the event journal's pruning
        try:
            await self.control.start()
            if self.control.inherited and self.control.path != self.settings.daemon.socket:
                log.warning("control_socket_path_differs", serving=self.control.path,
                            configured=self.settings.daemon.socket,
                            hint="virtwatch.socket ListenStream= and daemon.socket should agree for the CLI")
        except OSError as err:  # e.g. /run/virtwatch not writable: the rest still works
            log.error("control_socket_unavailable", path=self.settings.daemon.socket, error=str(err))
        self._tasks = [
            self.loop.create_task(self.pump.run(), name="event-pump"),
            self.loop.create_task(self.connection.run(), name="connection"),
            self.loop.create_task(self.poller.run(), name="stats-poller"),
            self.loop.create_task(self.agent.run(), name="guest-agent"),
            self.loop.create_task(self.liveness.run(), name="liveness"),
        ]
        if self.demo is not None:
            self._tasks.append(self.loop.create_task(self.demo.run(), name="living-demo"))
        for task in self._tasks:
            task.add_done_callback(lambda t: _report_task_end(t, self._stopping))
        log.info("virtwatch_started", version=__version__, listen=self.settings.http.listen,
                 bound=self.listen_address, uri=self.settings.libvirt.uri, read_only=self.read_only,
                 poll_interval=self.settings.stats.poll_interval)

    async def stop(self) -> None:
        """Stop in order: poller, libvirt connection (teardown order of design
        doc §3a), drain libvirtaio, event pump, HTTP. Bounded by
        ``daemon.shutdown_timeout``. A second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping = True
        deadline = self.loop.time() + self.settings.daemon.shutdown_timeout
        by_name = {t.get_name(): t for t in self._tasks}
        for name in ("living-demo", "stats-poller"):
            await _cancel(by_name.get(name))
        await self.lanes.stop(timeout=max(0.1, min(2.0, deadline - self.loop.time())))
        await self.control.stop()
        if self.policy is not None:
            await self.policy.stop()  # in-flight actions end recorded as interrupted; retries stay persisted
        if self.policy_side is not None:
            await self.policy_side.stop()
        await _cancel(by_name.get("liveness"))  # its probes run on the agent's lane
        await _cancel(by_name.get("guest-agent"))
        await self.agent_side.stop()
        if self.demo_side is not None:
            await self.demo_side.stop()
        await self.console.stop()  # every virStream dropped before the connection closes
        await self.alerter.stop(flush_timeout=max(0.1, min(3.0, deadline - self.loop.time())))
        await self.connection.stop()
        conn_task = by_name.get("connection")
        if conn_task is not None:
            try:
                async with asyncio.timeout(max(0.1, deadline - self.loop.time())):
                    await asyncio.shield(conn_task)
            except TimeoutError:
                log.warning("shutdown_connection_timeout")
                await _cancel(conn_task)
        # A virDomain or virConnect caught in a reference cycle (an exception's traceback
        # holds the frame of the call that raised it, e.g. a refused agentSetResponseTimeout)
        # keeps its connection's socket handle and keepalive timer registered until the cycle
        # collector runs: the drain then waited out its 2 s at every stop.
        gc.collect()
        try:
            async with asyncio.timeout(max(0.1, min(2.0, deadline - self.loop.time()))):
                await self.impl.drain()
        except TimeoutError:
            # A libvirt call still stuck in C holds its connection alive (e.g. one sent
            # to a libvirtd that died mid-request); its threads are daemon threads.
            log.warning("shutdown_drain_timeout", live_callbacks=self.impl.live_callbacks(),
                        calls_in_flight=self.calls.in_flight)
        await _cancel(by_name.get("event-pump"))
        await self.web.stop()
        self.calls.shutdown()
        self.agent_calls.shutdown()
        self.policy_calls.shutdown()
        self.demo_calls.shutdown()
        log.info("virtwatch_stopped")


async def reload(daemon: Daemon, settings: Settings, control_fd: int | None = None) -> Daemon:
    """Replace the running ``daemon`` with one built from ``settings``; return the one running.

    When only ``http.web_config_file`` may differ (or nothing: the web config file or its
    certificates may have changed on disk), only the HTTP listener's web config is swapped
    (:meth:`Daemon.reload_web`); a web config that cannot be used keeps the running one.

    Otherwise everything in :class:`Retained` carries over. What restarts, and why: the libvirt
    connections (main, statistics lanes, agent, policy: ``[libvirt]`` may have changed, and
    a resync on reconnect recovers whatever happened in between), the HTTP listener (its
    address, TLS certificates and password files may have changed), the control socket
    (its path may have changed; an inherited socket is kept), the Alertmanager senders and
    the console streams. The policy engine reads its state back from its store.

    If the new daemon cannot start (say the new listen address is taken), it is stopped and
    one with the old settings is started instead, with the same state; errors are logged.
    """
    if web_only_change(daemon.settings, settings):
        try:
            await daemon.reload_web(settings)
        except ConfigError as err:
            log.error("reload_failed", error=str(err), kept="previous configuration")
        return daemon
    old_settings = daemon.settings
    await daemon.stop()
    fresh = Daemon(settings, daemon.impl, wall_clock=daemon.wall_clock, control_fd=control_fd,
                   retained=daemon.handover())
    try:
        await fresh.start()
    except (OSError, ConfigError) as err:
        log.error("reload_failed", error=str(err), kept="previous configuration")
        await fresh.stop()
        fresh = Daemon(old_settings, daemon.impl, wall_clock=daemon.wall_clock, control_fd=control_fd,
                       retained=fresh.handover())
        await fresh.start()
        return fresh
    return fresh


def web_only_change(old: Settings, new: Settings) -> bool:
    """Whether ``new`` differs from ``old`` in ``http.web_config_file`` at most (an unchanged
    file counts: the web config or its certificates may have changed on disk)."""
    same_http = new.http.model_copy(update={"web_config_file": old.http.web_config_file}) == old.http
    return same_http and new.model_copy(update={"http": old.http}) == old


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


def _report_task_end(task: asyncio.Task[Any], stopping: bool) -> None:
    """Log a daemon task that ended before :meth:`Daemon.stop` (a bug): at once, with
    its traceback if it raised. :meth:`Daemon.healthy` is False from then on, so the
    systemd watchdog stops being fed and ``Restart=on-failure`` restarts the daemon.
    Tasks that end during a stop, or by cancellation, are not reported."""
    if stopping or task.cancelled():
        return
    err = task.exception()
    log.error("task_failed", task=task.get_name(), error=repr(err) if err is not None else "returned",
              exc_info=(type(err), err, err.__traceback__) if err is not None else None,
              detail="watchdog no longer fed; systemd restarts the daemon")


async def _cancel(task: asyncio.Task[Any] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
