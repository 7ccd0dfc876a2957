"""The living demo: an operator's hand on libvirt's in-process test driver.

``./dev.sh run`` serves the demo host (``config/demo-host.xml``) of libvirt's test
driver, whose guests never change state on their own: no event, no state reason, an
empty events list. With ``[demo] enabled = true`` this module changes them on a slow
schedule with the calls an operator would make, so every event and state change
the status page, the events list and ``/metrics`` show comes through the real path
(libvirt event -> pump -> guest state, counters, recent events):

* a guest found paused is resumed (``virDomainResume``), one found shut off or
  crashed is started (``virDomainCreate``);
* otherwise one running guest is disturbed, in turn: paused (``virDomainSuspend``),
  shut down (``virDomainShutdown``) or destroyed (``virDomainDestroy``), so the next
  action brings it back and at most one guest is down at a time.

Only persistent guests matching ``[demo] guests`` are touched (a transient guest
that stops is gone). The actions run in a worker thread through
:class:`~virtwatch.virt.calls.Calls`, never on the event loop: on a connection of
the demo's own (:class:`~virtwatch.virt.connection.SideConnection`) for
``test:///default``, which every connection of the process shares, and on the main
connection's thread for a ``test:///path.xml`` host, which is private to each
connection (a second connection would change a copy the daemon never sees).

The demo refuses every URI but a ``test:///`` one: the configuration is rejected
(:func:`~virtwatch.config.cross_section_errors`), and :class:`LivingDemo` raises.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence

import libvirt
import structlog

from .config import DEMO_URI_PREFIX, DemoSettings
from .virt.calls import Calls, CallTimeout

log = structlog.get_logger("virtwatch.demo")

#: What the demo does to a running guest, in turn.
DISTURBANCES = ("pause", "shutdown", "destroy")

#: Each action's virDomain method (libvirt-python) and C API name.
ACTION_CALLS: Mapping[str, tuple[str, str]] = {
    "start": ("create", "virDomainCreate"),
    "resume": ("resume", "virDomainResume"),
    "pause": ("suspend", "virDomainSuspend"),
    "shutdown": ("shutdown", "virDomainShutdown"),
    "destroy": ("destroy", "virDomainDestroy"),
}

_DOWN = (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED)


def next_action(states: Mapping[str, int], turn: int) -> tuple[str, str] | None:
    """The demo's next (guest, action) from the guests' ``virDomainState`` codes.

    The first guest (by name) that is paused is resumed, or shut off or crashed is
    started; when every guest runs, running guest ``turn`` (modulo their number) gets
    disturbance ``turn`` (modulo 3). None when there is nothing to do.
    """
    names = sorted(states)
    for name in names:
        if states[name] == libvirt.VIR_DOMAIN_PAUSED:
            return name, "resume"
        if states[name] in _DOWN:
            return name, "start"
    running = [n for n in names if states[n] == libvirt.VIR_DOMAIN_RUNNING]
    if not running:
        return None
    return running[turn % len(running)], DISTURBANCES[turn % len(DISTURBANCES)]


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    """One action taken: the guest, the action and its libvirt call."""

    guest: str
    action: str
    call: str


def take_step(conn: libvirt.virConnect, globs: Sequence[str], turn: int) -> Step | None:
    """Read the matching persistent guests' states, then make the next action's call.
    Blocking (a worker thread); raises libvirtError when libvirt refuses."""
    doms = {d.name(): d for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
            if any(fnmatch.fnmatchcase(d.name(), g) for g in globs)}
    pick = next_action({name: d.state()[0] for name, d in doms.items()}, turn)
    if pick is None:
        return None
    name, action = pick
    method, call = ACTION_CALLS[action]
    getattr(doms[name], method)()
    return Step(guest=name, action=action, call=call)


class LivingDemo:
    """Runs :func:`take_step` every ``min_interval``..``max_interval`` seconds.

    A connection listener: it acts on the connection it was last told is ready
    (the main one, or its :class:`~virtwatch.virt.connection.SideConnection`).

    Args:
        settings: the ``[demo]`` section.
        uri: the libvirt URI; anything but ``test:///...`` raises ValueError.
        calls: the executor of that connection's one thread.
        call_timeout: deadline of one step, seconds.
        rand: random source in [0, 1) for the pause between actions.
        sleep: ``asyncio.sleep`` (injected for tests).
    """

    def __init__(self, settings: DemoSettings, uri: str, calls: Calls, call_timeout: float = 30.0,
                 rand: Callable[[], float] = random.random,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if not uri.startswith(DEMO_URI_PREFIX):
            raise ValueError(f"the demo runs only on libvirt's in-process test driver ({DEMO_URI_PREFIX}...), "
                             f"not on {uri!r}")
        self.settings = settings
        self._calls = calls
        self._timeout = call_timeout
        self._rand = rand
        self._sleep = sleep
        self._conn: libvirt.virConnect | None = None
        self.turn = 0
        self.steps: list[Step] = []  # the latest ones, newest last (for tests and debugging)

    # ConnectionListener
    def connection_ready(self, conn: libvirt.virConnect) -> None:
        """Act on ``conn`` from now on."""
        self._conn = conn

    def connection_lost(self) -> None:
        """No connection: wait for the next one."""
        self._conn = None

    def delay(self) -> float:
        """Seconds until the next action."""
        s = self.settings
        return s.min_interval + (s.max_interval - s.min_interval) * self._rand()

    async def run(self) -> None:
        """Act on the schedule until cancelled; never raises otherwise."""
        while True:
            await self._sleep(self.delay())
            try:
                await self.step()
            except Exception:  # a bug costs one step, not the demo
                log.exception("demo_step_crashed")

    async def step(self) -> Step | None:
        """Take one action now (None when not connected or nothing to do)."""
        conn = self._conn
        if conn is None:
            return None
        try:
            step = await self._calls.run("demoStep", take_step, conn, self.settings.guests, self.turn,
                                         timeout=self._timeout)
        except (libvirt.libvirtError, CallTimeout) as err:
            log.warning("demo_action_failed", error=str(err).strip())
            return None
        if step is None:
            return None
        if step.action in DISTURBANCES:
            self.turn += 1
        self.steps = [*self.steps[-99:], step]
        log.info("demo_action", guest=step.guest, action=step.action, call=step.call)
        return step
