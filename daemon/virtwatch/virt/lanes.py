"""Lanes: libvirt connections with one calling thread each, for calls that may hang.

A call that meets a hung QEMU (SIGSTOPped, or stuck on dead NFS storage) blocks
in libvirtd until QEMU answers, which may be never, and a timed-out Python wait
does not cancel it. libvirt 9.0's client must never have two calling threads on
one connection (it crashes when such a connection closes), so a stuck call holds
its connection's only thread and everything queued behind it. Isolation
therefore comes from more connections, never from more threads on one.

A *lane* is one connection plus one calling thread. :class:`LanePool` keeps one
active lane per *role*:

``stats``
    the bulk guest statistics call of each poll, and the control-state check that
    finds the guest a timed-out call is stuck on;
``host``
    host figures (node info, memory, CPU, storage pools, networks): a pool on dead
    NFS must not cost guest statistics, nor the other way round;
``probe``
    suspect guests, one at a time, so that one that wakes up rejoins; open only
    while some guest is suspect.

The main connection (events, keepalive, resync, console open) and the agent and
policy side connections are lanes of their own outside this pool.

**Quarantine.** A call that outlives its deadline quarantines its lane: the lane
leaves its role and takes no new call, and its connection is closed on its own
thread right after the stuck call returns (never while it is in flight). The
role's next call opens a fresh lane. At most ``max_stuck`` lanes are quarantined
at once, since each holds a libvirtd worker (20 by default). Once that many are,
a lane whose call times out stays in its role, busy, and the role's calls are
refused (:class:`LaneUnavailable`, reason ``busy``) until its call returns.

So at any time the pool holds at most ``len(ROLES) + max_stuck`` connections and
as many threads, and pins at most that many libvirtd workers.

**No socket watch.** Given ``unwatched`` (the event implementation's
:meth:`~virtwatch.virt.aio.ThreadSafeAsyncIOImpl.unwatched`), a lane opens its
connection without one: its calls do their own I/O on the lane's thread and never
wake the loop (with a watch, each call disabled and re-enabled it from the lane's
thread: five calls into the event implementation per call, and the loop woke to
apply them; with 20 guests the daemon's CPU per poll fell from 3.9 to 3.2 ms without
it). A lane needs neither events nor keepalive: its calls have deadlines, and
the main connection's keepalive and close callback retire every lane when
libvirtd goes away.

Private in-process drivers (``test:///path.xml``: a new host per connection)
make every lane share the main connection instead (``shared=True``): there is
no RPC client to crash and no QEMU to hang, and separate connections would
each see another copy of the host.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import libvirt
import structlog
from prometheus_client.core import GaugeMetricFamily, Metric

from ..config import LibvirtSettings
from ..infra.tasks import TaskSet
from .calls import Calls, CallTimeout
from .connection import is_alive, open_connection
from .ports import VirtInstruments

log = structlog.get_logger("virtwatch.lanes")

T = TypeVar("T")

ROLES = ("stats", "host", "probe")


class LaneUnavailable(Exception):
    """The role has no usable lane now; the call was not made.

    ``reason``: ``disconnected`` (the main connection is down), ``cap``
    (``max_stuck`` lanes are quarantined), ``busy`` (its lane still runs a call
    that outlived its deadline), ``open_failed`` or ``open_timeout``.
    """

    def __init__(self, role: str, reason: str) -> None:
        super().__init__(f"no {role} lane: {reason}")
        self.role = role
        self.reason = reason


def shares_main_connection(uri: str) -> bool:
    """Whether lanes must reuse the main connection: ``test://`` URIs other than
    ``test:///default`` open a private copy of the host per connection."""
    if not uri.startswith("test:"):
        return False
    return uri.split("?", 1)[0].rstrip("/") not in ("test:///default", "test://default")


class Lane:
    """One libvirt connection with its one calling thread.

    Attributes:
        role: one of :data:`ROLES`.
        name: ``<role>-<n>``, for logs.
        calls: the executor with this lane's single thread.
        conn: the open connection (set on the lane's thread by the open), or None.
        owns: close ``conn`` when the lane closes (False when shared).
        quarantined_at: monotonic time it was quarantined, or None.
    """

    def __init__(self, role: str, seq: int, instruments: VirtInstruments, call_timeout: float) -> None:
        self.role = role
        self.name = f"{role}-{seq}"
        self.calls = Calls(instruments, 1, call_timeout, name=f"virtwatch-lane-{self.name}")
        self.conn: libvirt.virConnect | None = None
        self.owns = True
        self.quarantined_at: float | None = None

    @property
    def busy(self) -> bool:
        """A call (possibly one past its deadline) is running on the lane's thread."""
        return self.calls.in_flight > 0


class LanePool:
    """The stats, host and probe lanes, their quarantine and their cap.

    Args:
        settings: ``[libvirt]``: URI, keepalive, call timeout.
        read_only: open lanes read-only (statistics never need more).
        instruments: quarantine, recovery and unavailability counters.
        max_stuck: ``stats.max_stuck_lanes``, the most lanes quarantined at once.
        opener: blocking ``() -> virConnect`` (default: ``settings.uri``).
        shared: every lane reuses the main connection (see module doc).
        unwatched: context manager in which a connection opens without a socket watch
            (``ThreadSafeAsyncIOImpl.unwatched``; see module doc); None: lanes are
            watched and get keepalive like the main connection.
        monotonic: clock in seconds.
    """

    def __init__(self, settings: LibvirtSettings, read_only: bool, instruments: VirtInstruments, max_stuck: int,
                 opener: Callable[[], libvirt.virConnect] | None = None, shared: bool = False,
                 unwatched: Callable[[], AbstractContextManager[None]] | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.max_stuck = max_stuck
        self.shared = shared
        self._instruments = instruments
        self._opener = opener or (lambda: open_connection(settings.uri, read_only))
        self._unwatched = unwatched
        self._monotonic = monotonic
        self._main: libvirt.virConnect | None = None
        self._active: dict[str, Lane] = {}
        self._out: set[Lane] = set()           # quarantined or retiring, not closed yet
        self._closing = TaskSet()
        self._seq = itertools.count(1)
        self._others: list[Callable[[], bool]] = []
        self.opened = 0
        self.recovered = 0

    # -- ConnectionListener ---------------------------------------------------
    def connection_ready(self, conn: libvirt.virConnect) -> None:
        """The main connection is up: lanes may open (lazily, at first use)."""
        self._main = conn

    def connection_lost(self) -> None:
        """The main connection is gone: every active lane retires (closed once idle)."""
        self._main = None
        for lane in list(self._active.values()):
            self._retire(lane, quarantined=False)

    # -- counts -----------------------------------------------------------------
    @property
    def quarantined(self) -> int:
        """Lanes out of service whose connection is not closed yet (stuck ones)."""
        return len(self._out)

    @property
    def active(self) -> int:
        """Lanes serving a role with an open connection."""
        return sum(1 for lane in self._active.values() if lane.conn is not None)

    def count_also(self, is_open: Callable[[], bool]) -> None:
        """Count another connection (main, agent, policy) as an active lane while ``is_open()``."""
        self._others.append(is_open)

    def collect(self) -> Iterator[Metric]:
        """``virtwatch_libvirt_lanes{state}`` (prometheus-client collector protocol)."""
        g = GaugeMetricFamily("virtwatch_libvirt_lanes",
                              "libvirt connections (one calling thread each), by state: active, or "
                              "quarantined behind a call that outlived its deadline.", labels=["state"])
        g.add_metric(["active"], self.active + sum(1 for f in self._others if f()))
        g.add_metric(["quarantined"], self.quarantined)
        yield g

    def describe(self) -> list[Metric]:
        """Describe without collecting."""
        return list(self.collect())

    # -- calls ------------------------------------------------------------------
    async def run(self, role: str, call: str, fn: Callable[..., T], *args: Any, timeout: float) -> T:
        """Run ``fn(conn, *args)`` on ``role``'s lane with a deadline of ``timeout`` s.

        Raises:
            LaneUnavailable: no lane could take the call (counted by reason).
            CallTimeout: it outlived its deadline; the lane is quarantined (or,
                at the cap, stays busy in its role).
            libvirt.libvirtError: whatever libvirt raised; a lane whose
                connection died is closed, and the next call opens another.
        """
        lane = await self._lane(role, timeout)
        try:
            return await lane.calls.run(call, fn, lane.conn, *args, timeout=timeout)
        except CallTimeout:
            self._on_timeout(lane, call)
            raise
        except libvirt.libvirtError:
            if self._active.get(role) is lane and not self.shared and not is_alive(lane.conn):
                self._retire(lane, quarantined=False)
            raise

    def release(self, role: str) -> None:
        """Close ``role``'s lane if it has one and it is idle (the probe lane once no
        guest is suspect), so the normal lane count comes back after a hang."""
        lane = self._active.get(role)
        if lane is not None and not lane.busy:
            self._retire(lane, quarantined=False)

    async def stop(self, timeout: float) -> None:
        """Retire every lane and wait up to ``timeout`` s for the idle ones to close
        (a lane stuck in a call stays behind: its thread is a daemon thread)."""
        self.connection_lost()
        await self._closing.wait(timeout)

    # -- internals --------------------------------------------------------------
    def _unavailable(self, role: str, reason: str) -> LaneUnavailable:
        self._instruments.lane_unavailable.labels(role=role, reason=reason).inc()
        return LaneUnavailable(role, reason)

    async def _lane(self, role: str, timeout: float) -> Lane:
        lane = self._active.get(role)
        if lane is not None:
            if lane.busy:
                raise self._unavailable(role, "busy")
            if lane.conn is not None and (self.shared or is_alive(lane.conn)):
                return lane
            self._retire(lane, quarantined=False)  # libvirtd restarted under it: open another
        main = self._main
        if main is None:
            raise self._unavailable(role, "disconnected")
        if len(self._out) >= self.max_stuck:
            raise self._unavailable(role, "cap")
        lane = Lane(role, next(self._seq), self._instruments, self.settings.call_timeout)
        self._active[role] = lane
        if self.shared:
            lane.conn, lane.owns = main, False
            return lane
        try:
            await lane.calls.run("open", self._open_on_lane, lane, timeout=min(timeout, self.settings.call_timeout))
        except CallTimeout:
            self._on_timeout(lane, "open")
            raise self._unavailable(role, "open_timeout") from None
        except libvirt.libvirtError as err:
            self._active.pop(role, None)
            lane.calls.shutdown()
            log.warning("lane_open_failed", lane=lane.name, error=str(err).strip())
            raise self._unavailable(role, "open_failed") from None
        if self._main is not main:  # the main connection went away while we opened
            self._retire(lane, quarantined=False)
            raise self._unavailable(role, "disconnected")
        if self._unwatched is None:
            await self._keep_alive(lane, role, timeout)
        self.opened += 1
        log.debug("lane_opened", lane=lane.name, watched=self._unwatched is None)
        return lane

    async def _keep_alive(self, lane: Lane, role: str, timeout: float) -> None:
        """``setKeepAlive`` on a watched lane's connection; raises LaneUnavailable when it times out."""
        try:
            await lane.calls.run("setKeepAlive", _keepalive, lane.conn, self.settings.keepalive_interval,
                                 self.settings.keepalive_count, timeout=min(timeout, self.settings.call_timeout),
                                 count_errors=False)
        except CallTimeout:
            self._on_timeout(lane, "setKeepAlive")
            raise self._unavailable(role, "open_timeout") from None
        except libvirt.libvirtError:
            pass  # in-process drivers (test:///) have no keepalive

    def _open_on_lane(self, lane: Lane) -> libvirt.virConnect:
        # Runs on the lane's thread; the connection is stored there, so that a close
        # queued behind an open that timed out still finds it.
        with self._unwatched() if self._unwatched is not None else contextlib.nullcontext():
            conn = self._opener()
        lane.conn = conn
        return conn

    def _on_timeout(self, lane: Lane, call: str) -> None:
        if self._active.get(lane.role) is not lane:
            return  # already retired (connection lost meanwhile)
        if len(self._out) >= self.max_stuck:
            log.warning("lane_stuck_at_cap", lane=lane.name, call=call, quarantined=len(self._out),
                        max_stuck_lanes=self.max_stuck,
                        detail="kept in its role; its calls wait until the stuck call returns")
            return
        self._instruments.lane_quarantines.labels(role=lane.role).inc()
        self._retire(lane, quarantined=True)
        log.warning("lane_quarantined", lane=lane.name, call=call, quarantined=len(self._out),
                    max_stuck_lanes=self.max_stuck)

    def _retire(self, lane: Lane, quarantined: bool) -> None:
        """Take ``lane`` out of its role; close it on its own thread once idle."""
        if self._active.get(lane.role) is lane:
            del self._active[lane.role]
        if lane.conn is not None and lane.owns:
            lane.calls.retire(lane.conn)
        if quarantined:
            lane.quarantined_at = self._monotonic()
        self._out.add(lane)
        self._closing.spawn(self._close(lane), name=f"lane-close-{lane.name}")

    async def _close(self, lane: Lane) -> None:
        try:
            await lane.calls.run_when_free("close", _close_lane, lane)
        except Exception as err:  # a failed close still frees the lane's slot
            log.debug("lane_close_failed", lane=lane.name, error=repr(err))
        finally:
            lane.calls.shutdown()
            self._out.discard(lane)
        if lane.quarantined_at is not None:
            self.recovered += 1
            self._instruments.lanes_recovered.labels(role=lane.role).inc()
            log.info("lane_recovered", lane=lane.name, stuck_seconds=round(self._monotonic() - lane.quarantined_at, 3),
                     quarantined=len(self._out))


def _keepalive(conn: libvirt.virConnect, interval: int, count: int) -> None:
    conn.setKeepAlive(interval, count)


def _close_lane(lane: Lane) -> None:
    conn, lane.conn = lane.conn, None
    if conn is not None and lane.owns:
        conn.close()
