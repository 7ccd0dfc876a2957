"""The QEMU guest agent: what the guest says about itself.

:class:`GuestAgent` is a pump subscriber and connection listener. While a
guest's agent is connected (``AGENT_LIFECYCLE`` events, kept in
:class:`~virtwatch.state.GuestRegistry` as ``agent_connected``; guests whose
state is unknown, e.g. after a daemon start, are tried too) it refreshes every
``[agent] interval`` seconds, on a drift-free schedule (each next deadline is
the previous deadline plus the interval, never "when the work ended"):

* ``virDomainGetGuestInfo(OS | HOSTNAME | TIMEZONE)``: keys ``hostname``,
  ``os.name``, ``os.version`` (falling back to ``os.version-id``),
  ``timezone.name``;
* ``virDomainInterfaceAddresses`` with the AGENT source, falling back to the
  DHCP LEASE source and then the host's ARP table (ARP);
* ``virDomainGetTime`` (guest clock via the agent) against the host's wall
  clock at the midpoint of the call.

Agent calls block forever by default when the agent hangs after its
handshake (design doc §3a), so ``agentSetResponseTimeout(timeout)`` is called
on every guest after each start (STARTED event) and after every (re)connect,
and every call also has our own deadline (``timeout + 2`` s). All agent work
runs in one lane: at most **one** of the daemon's call slots is used for the
agent at any time, and a call that outlives our deadline keeps the lane
blocked until its C call returns (it still holds its slot), so a dead or hung
agent cannot delay anything else.

Agent commands need a read-write connection (``libvirt.read_only = "no"`` or
policy enabled); on a read-only connection libvirt refuses them
(``VIR_ERR_OPERATION_DENIED``) and the agent lane idles until the next connect.

Metrics (:class:`AgentCollector`, added to the exposition as collector ``agent``):
``libvirt_domain_guest_info{domain,hostname,os_name,os_version,timezone}``,
``libvirt_domain_interface_address_info{domain,interface,mac,address,family}``
(``interface`` is the guest's name for it, ``eth0``; ``mac`` joins it to
``libvirt_domain_interface_info``), ``libvirt_domain_guest_time_offset_seconds{domain}``
(guest minus host; positive: the guest clock is ahead).

Addresses that say nothing about how to reach the guest are left out by default
(:class:`AddressFilter`, ``[agent] skip_*``): loopback, link-local
(169.254/16, fe80::/10), and every address of container and virtual-bridge
interfaces inside the guest (``docker0``, ``veth*``, ``cni*``, ``flannel*``...):
a Kubernetes node would otherwise export one series per pod.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import libvirt
import libvirt_qemu
import structlog
from prometheus_client.core import GaugeMetricFamily, Metric

from ..infra.timing import next_deadline, wait_event
from ..model import ACTIVE, RUNNING, Event, Kind, Lifecycle, Source
from ..state import GuestLookup
from ..virt.calls import Calls, CallTimeout, error_code_name
from .settings import AddressFilter, AgentSettings

log = structlog.get_logger("virtwatch.agent")

_INFO_FLAGS = (libvirt.VIR_DOMAIN_GUEST_INFO_OS | libvirt.VIR_DOMAIN_GUEST_INFO_HOSTNAME
               | libvirt.VIR_DOMAIN_GUEST_INFO_TIMEZONE)

_SOURCES = (("agent", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT),
            ("lease", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE),
            ("arp", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP))

_AGENT_DOWN = ("timeout", "VIR_ERR_AGENT_UNRESPONSIVE", "VIR_ERR_AGENT_UNSYNCED")

@dataclasses.dataclass(frozen=True, slots=True)
class Address:
    """One guest address: ``interface`` name, ``address`` (no prefix),
    ``family`` (``ipv4``/``ipv6``), ``prefix`` length, ``source`` (agent/lease/arp),
    ``mac`` of the interface (lower case, "" when not given)."""

    interface: str
    address: str
    family: str
    prefix: int
    source: str
    mac: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class AgentInfo:
    """What one refresh learned; a field the guest did not give is None.

    Attributes:
        hostname, os_name, os_version, timezone: from ``guestInfo``.
        addresses: from ``interfaceAddresses`` (first source that answered).
        time_offset: guest clock minus host clock, seconds (``getTime``).
        updated_at: wall time of the refresh, seconds since the epoch.
        errors: ``{call: libvirt error code name or "timeout"}`` of this refresh.
    """

    hostname: str | None = None
    os_name: str | None = None
    os_version: str | None = None
    timezone: str | None = None
    addresses: tuple[Address, ...] = ()
    time_offset: float | None = None
    updated_at: float = 0.0
    errors: dict[str, str] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


def parse_guest_info(info: dict[str, Any]) -> dict[str, str | None]:
    """``guestInfo`` typed parameters → hostname, os_name, os_version, timezone."""
    def s(key: str) -> str | None:
        v = info.get(key)
        return str(v) if v not in (None, "") else None
    return {"hostname": s("hostname"), "os_name": s("os.name") or s("os.id"),
            "os_version": s("os.version") or s("os.version-id"), "timezone": s("timezone.name")}


def parse_addresses(ifaces: dict[str, Any], source: str,
                    skip: AddressFilter = AddressFilter()) -> tuple[Address, ...]:
    """``interfaceAddresses`` result → addresses, without those ``skip`` leaves out
    (by default loopback, link-local and container-bridge interfaces).

    Input shape: ``{ifname: {"hwaddr": str, "addrs": [{"type": 0|1, "addr": str, "prefix": int}]}}``
    (type 0 = IPv4, 1 = IPv6)."""
    out = []
    for ifname, data in sorted((ifaces or {}).items()):
        mac = str((data or {}).get("hwaddr") or "").lower()
        for a in (data or {}).get("addrs") or []:
            addr = a.get("addr")
            if not addr:
                continue
            try:
                if skip.skips(ifname, ipaddress.ip_address(addr)):
                    continue
            except ValueError:
                continue
            family = "ipv6" if a.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV6 else "ipv4"
            out.append(Address(ifname, addr, family, int(a.get("prefix") or 0), source, mac))
    return tuple(out)


class GuestAgent:
    """Refreshes guest-agent information; one call slot at most.

    Args:
        settings: the ``[agent]`` section.
        calls: the daemon's bounded executor.
        guests: guest state (agent connected flag, running state, UUID).
        wall: wall clock, seconds since the epoch (guest time offset, timestamps).
        mono: monotonic clock for the schedule (default: the loop's clock).
        kept: the previous agent's :meth:`all_info` at a reload (dropped if ``[agent]`` is off).

    Wiring: ``pump.subscribe(agent.on_event)``, ``connection.add_listener(agent)``,
    run :meth:`run` as a task, ``exposition.add_collector("agent", agent.collector)``.
    """

    def __init__(self, settings: AgentSettings, calls: Calls, guests: GuestLookup,
                 wall: Callable[[], float] = time.time, mono: Callable[[], float] | None = None,
                 kept: Mapping[str, AgentInfo] | None = None) -> None:
        self.settings = settings
        self._calls = calls
        self._guests = guests
        self._wall = wall
        self._mono = mono
        self._conn: libvirt.virConnect | None = None
        self._denied = False
        # A reload hands over what the agents last said (shown until each guest's next refresh).
        self._info: dict[str, AgentInfo] = dict(kept or {}) if settings.enabled else {}
        self._due: dict[str, float] = {}
        self._unsupported: set[str] = set()
        self._pending_timeout: list[str] = []
        self._wake = asyncio.Event()
        self._lane = asyncio.Lock()  # one agent call at a time: refreshes and liveness probes
        self.collector = AgentCollector(self)
        self.in_flight = 0
        self.max_in_flight_seen = 0
        self.stuck_calls = 0
        self.refreshes = 0

    # -- reading -------------------------------------------------------------------
    def info(self, name: str) -> AgentInfo | None:
        """The latest refresh of ``name`` (None if none, or the agent went away)."""
        return self._info.get(name)

    def all_info(self) -> dict[str, AgentInfo]:
        """Every guest's latest refresh, by name."""
        return dict(self._info)

    # -- listener / subscriber ------------------------------------------------------
    def connection_ready(self, conn: libvirt.virConnect) -> None:
        """(Re)connected: set the response timeout on every active guest, then refresh."""
        self._conn = conn
        self._denied = False
        if not self.settings.enabled:
            return
        now = self._now()
        for g in self._guests.guests():
            if g.state in ACTIVE:
                self._queue_timeout(g.name)
                self._due.setdefault(g.name, now)
        self._wake.set()

    def connection_lost(self) -> None:
        """Drop the connection (no libvirt objects are kept between calls)."""
        self._conn = None

    def on_event(self, ev: Event) -> None:
        """STARTED → set the response timeout; agent CONNECTED → refresh soon;
        DISCONNECTED / STOPPED / UNDEFINED → forget the guest's info."""
        if ev.source != Source.DOMAIN or not self.settings.enabled:
            return
        if ev.kind == Kind.LIFECYCLE:
            if ev.event == Lifecycle.STARTED:
                self._unsupported.discard(ev.name)
                self._queue_timeout(ev.name)
                self._wake.set()
            elif ev.event in (Lifecycle.STOPPED, Lifecycle.UNDEFINED, Lifecycle.CRASHED):
                self._forget(ev.name)
        elif ev.kind == Kind.AGENT_LIFECYCLE:
            if ev.event == "CONNECTED":
                self._unsupported.discard(ev.name)
                self._due[ev.name] = self._now() + self.settings.startup_delay
                self._wake.set()
            else:
                self._info.pop(ev.name, None)

    # -- the lane ---------------------------------------------------------------------
    async def run(self) -> None:
        """The agent lane: one call at a time until cancelled (idles when disabled)."""
        if not self.settings.enabled:
            await asyncio.Event().wait()
        while True:
            if self._conn is not None and not self._denied and self._pending_timeout:
                await self._set_timeout(self._pending_timeout.pop(0))
                continue
            name, due = self._next_due()
            now = self._now()
            if name is not None and due <= now and self._conn is not None and not self._denied:
                self._advance(name, due, now)
                if self._eligible(name):
                    await self.refresh(name)
                continue
            self._wake.clear()
            wait = None if name is None or self._conn is None or self._denied else max(0.0, due - now)
            await wait_event(self._wake, wait)

    async def refresh(self, name: str) -> AgentInfo | None:
        """Query ``name``'s agent now (three to five calls, one at a time).
        Returns the new info, or None when the guest has no agent channel
        or the connection is gone."""
        conn = self._conn
        g = self._guests.by_name(name)
        if conn is None or g is None:
            return None
        uuid = g.uuid
        errors: dict[str, str] = {}
        fields: dict[str, str | None] = {}
        try:
            raw = await self._call("guestInfo", _guest_info, conn, uuid)
            fields = parse_guest_info(raw)
        except AgentError as err:
            errors["guestInfo"] = err.code
            if err.code == "VIR_ERR_ARGUMENT_UNSUPPORTED":  # no agent channel configured
                self._unsupported.add(name)
                self._forget(name)
                return None
            if err.code == "VIR_ERR_OPERATION_DENIED":
                self._denied = True
                log.warning("agent_denied_read_only", guest=name)
                return None
        # A silent or dead agent: skip the other agent calls this round (each would wait too).
        agent_ok = errors.get("guestInfo") not in _AGENT_DOWN
        addresses: tuple[Address, ...] = ()
        for source, code in _SOURCES:
            if source == "agent" and not agent_ok:
                continue
            try:
                addresses = parse_addresses(await self._call("interfaceAddresses", _addresses, conn, uuid, code),
                                            source, self.settings.address_filter)
            except AgentError as err:
                errors[f"interfaceAddresses.{source}"] = err.code
                continue
            if addresses:
                break
        offset = None
        if agent_ok:
            try:
                t0 = self._wall()
                gt = await self._call("getTime", _get_time, conn, uuid)
                t1 = self._wall()
                offset = gt["seconds"] + gt.get("nseconds", 0) / 1e9 - (t0 + t1) / 2
            except AgentError as err:
                errors["getTime"] = err.code
        current = self._guests.by_name(name)
        if current is None or current.uuid != uuid or current.state not in ACTIVE:
            return None
        info = AgentInfo(hostname=fields.get("hostname"), os_name=fields.get("os_name"),
                         os_version=fields.get("os_version"), timezone=fields.get("timezone"),
                         addresses=addresses, time_offset=offset, updated_at=self._wall(), errors=errors)
        if agent_ok or addresses:
            self._info[name] = info
        else:
            self._info.pop(name, None)
        self.refreshes += 1
        if errors:
            log.debug("agent_refresh_errors", guest=name, errors=errors)
        return info

    async def agent_command(self, name: str, command: str, timeout: float) -> str:
        """Send one guest agent command (JSON text, ``virDomainQemuAgentCommand``) to ``name`` on
        the agent's lane, within ``timeout`` seconds in all: waiting for the lane included, and
        libvirt told the rest as the command's own timeout. Returns the agent's JSON answer.
        Raises :class:`AgentError` (``timeout``, ``lane_busy`` (other calls held the lane the whole
        time), ``not_connected``, or libvirt's error code name)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn = self._conn
        g = self._guests.by_name(name)
        if conn is None or self._denied or g is None:
            raise AgentError("not_connected", "no agent connection" if g else "unknown guest")
        if timeout <= 0:
            raise AgentError("timeout")
        try:
            async with asyncio.timeout(timeout):
                await self._lane.acquire()
        except TimeoutError:
            raise AgentError("lane_busy", f"agent lane busy for {timeout:g} s") from None
        try:
            left = deadline - loop.time()
            if left <= 0:
                raise AgentError("timeout")
            return await self._call_now("qemuAgentCommand", left + 1.0, _agent_command, conn, g.uuid, command,
                                        max(1, math.ceil(left)))
        finally:
            self._lane.release()

    # -- internals ---------------------------------------------------------------------
    def _now(self) -> float:
        return self._mono() if self._mono is not None else asyncio.get_running_loop().time()

    def _queue_timeout(self, name: str) -> None:
        if name not in self._pending_timeout:
            self._pending_timeout.append(name)

    def _forget(self, name: str) -> None:
        self._info.pop(name, None)
        self._due.pop(name, None)

    def _next_due(self) -> tuple[str | None, float]:
        if not self._due:
            return None, 0.0
        name = min(self._due, key=self._due.__getitem__)
        return name, self._due[name]

    def _advance(self, name: str, due: float, now: float) -> None:
        """Drift-free: next deadline = this deadline + interval; missed
        deadlines are skipped (never run twice to catch up)."""
        self._due[name], _ = next_deadline(due, self.settings.interval, now)

    def _eligible(self, name: str) -> bool:
        g = self._guests.by_name(name)
        if g is None or g.state not in ACTIVE:
            self._forget(name)
            return False
        # A paused guest keeps what its agent said, but is not asked: its agent cannot answer.
        return g.state in RUNNING and name not in self._unsupported and g.agent_connected is not False

    async def _set_timeout(self, name: str) -> None:
        conn = self._conn
        g = self._guests.by_name(name)
        if conn is None or g is None or g.state not in ACTIVE:
            return
        self._due.setdefault(name, self._now() + self.settings.startup_delay)
        try:
            await self._call("agentSetResponseTimeout", _set_response_timeout, conn, g.uuid, self.settings.timeout)
        except AgentError as err:
            if err.code == "VIR_ERR_OPERATION_DENIED":
                self._denied = True
                log.warning("agent_denied_read_only", guest=name)
            else:
                log.debug("agent_set_timeout_failed", guest=name, error=err.code)

    async def _call(self, call: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one agent call on the lane in a worker thread with our own deadline
        (``timeout + 2`` s). Raises :class:`AgentError`."""
        async with self._lane:
            return await self._call_now(call, self.settings.timeout + 2.0, fn, *args)

    async def _call_now(self, call: str, deadline: float, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one agent call in a worker thread within ``deadline`` seconds (hold the lane).
        After a timeout, wait until the C call really returns before the lane
        goes on (it still holds a call slot). Raises :class:`AgentError`."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def wrapped() -> Any:
            try:
                return fn(*args)
            finally:
                try:
                    loop.call_soon_threadsafe(done.set)
                except RuntimeError:
                    pass

        self.in_flight += 1
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
        try:
            return await self._calls.run(call, wrapped, timeout=deadline)
        except CallTimeout:
            self.stuck_calls += 1
            log.warning("agent_call_timeout", call=call, timeout=deadline)
            await done.wait()
            raise AgentError("timeout") from None
        except libvirt.libvirtError as err:
            raise AgentError(error_code_name(err)) from None
        finally:
            self.in_flight -= 1


class AgentError(Exception):
    """A guest agent call that did not answer: ``code`` is libvirt's error code name
    (``VIR_ERR_AGENT_UNRESPONSIVE``...), ``timeout`` or ``not_connected``; ``message`` says more."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


def _guest_info(conn: libvirt.virConnect, uuid: str) -> dict[str, Any]:
    return conn.lookupByUUIDString(uuid).guestInfo(_INFO_FLAGS, 0)


def _addresses(conn: libvirt.virConnect, uuid: str, source: int) -> dict[str, Any]:
    return conn.lookupByUUIDString(uuid).interfaceAddresses(source, 0)


def _get_time(conn: libvirt.virConnect, uuid: str) -> dict[str, int]:
    return conn.lookupByUUIDString(uuid).getTime(0)


def _agent_command(conn: libvirt.virConnect, uuid: str, command: str, seconds: int) -> str:
    return str(libvirt_qemu.qemuAgentCommand(conn.lookupByUUIDString(uuid), command, seconds, 0))


def _set_response_timeout(conn: libvirt.virConnect, uuid: str, seconds: int) -> None:
    conn.lookupByUUIDString(uuid).agentSetResponseTimeout(seconds, 0)


class AgentCollector:
    """prometheus-client collector over :class:`GuestAgent` data (no libvirt calls)."""

    def __init__(self, agent: GuestAgent) -> None:
        self._agent = agent

    def describe(self) -> list[Metric]:
        """No up-front description."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The three agent families; guests without data produce no samples."""
        info = GaugeMetricFamily("libvirt_domain_guest_info",
                                 "Guest identity reported by the guest agent (virDomainGetGuestInfo), value 1.",
                                 labels=["domain", "hostname", "os_name", "os_version", "timezone"])
        addr = GaugeMetricFamily("libvirt_domain_interface_address_info",
                                 "Guest interface addresses (virDomainInterfaceAddresses: agent, else DHCP lease, "
                                 "else ARP), value 1; interface is the guest's name for it, mac joins "
                                 "libvirt_domain_interface_info.", labels=["domain", "interface", "mac", "address",
                                                                           "family"])
        offset = GaugeMetricFamily("libvirt_domain_guest_time_offset_seconds",
                                   "Guest clock minus host clock (virDomainGetTime via the agent).",
                                   labels=["domain"])
        for name, i in sorted(self._agent.all_info().items()):
            if i.hostname is not None or i.os_name is not None:
                info.add_metric([name, i.hostname or "", i.os_name or "", i.os_version or "", i.timezone or ""], 1)
            for a in i.addresses:
                addr.add_metric([name, a.interface, a.mac, a.address, a.family], 1)
            if i.time_offset is not None:
                offset.add_metric([name], i.time_offset)
        yield info
        yield addr
        yield offset
