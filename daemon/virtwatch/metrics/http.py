"""The HTTP endpoint (aiohttp): ``/metrics``, health, landing page, JSON API.

Nothing here calls libvirt: every handler reads in-memory state, so a hung
libvirtd can never hang a scrape.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from .. import __version__
from ..console.query import ConsolePort, console_query
from ..eventlog import RecentEvents
from ..state import GuestRegistry, GuestView
from ..virt.decode import state_name, state_reason_name
from ..virt.stats import Snapshot
from .collector import Exposition
from .gzipbody import accepts_gzip
from .history import GuestHistory
from .landing import GuestRow, render_page

MAX_BODY_BYTES = 64 * 1024
#: on a ``/metrics`` answer whose guest state text is one render behind the state (a change
#: arrived while its render ran; the scrape did not wait for it): value ``1``
RENDER_BEHIND_HEADER = "X-Virtwatch-Render-Behind"


class StatusPort(Protocol):
    """Daemon status the HTTP layer shows (implemented by the app)."""

    def status(self) -> dict[str, Any]:
        """JSON-ready summary: connected, uri, guests, last poll, ..."""

    def guest_extra(self, name: str) -> dict[str, Any]:
        """Extra per-guest data (policy state, agent info); {} if none."""


def guest_json(g: GuestView, snap: Snapshot | None) -> dict[str, Any]:
    """A guest as the JSON API returns it (state names decoded, stats summary).

    ``cpu_time_seconds`` comes from ``cpu.time``; memory values from the
    balloon group, converted from KiB to bytes; absent values are null (so is
    ``memory_usable_bytes`` while ``memory_stats_stale`` is true).
    """
    ds = snap.domains.get(g.uuid) if snap else None
    st = ds.stats if ds else {}

    def kib(key: str) -> int | None:
        v = st.get(key)
        return v * 1024 if isinstance(v, int) else None

    cpu = st.get("cpu.time")
    return {
        "name": g.name,
        "uuid": g.uuid,
        "state": state_name(g.state),
        "state_code": g.state,
        "reason": state_reason_name(g.state, g.reason),
        "reason_code": g.reason,
        "persistent": g.persistent,
        "autostart": g.autostart,
        "last_event": {"event": g.last_event, "detail": g.last_detail, "time": g.last_event_time}
        if g.last_event else None,
        "agent_connected": g.agent_connected,
        "stats_stale": ds.stale if ds else None,
        "memory_stats_stale": ds.memory_stale if ds else None,
        "cpu_time_seconds": cpu / 1e9 if isinstance(cpu, int) else None,
        "memory_balloon_current_bytes": kib("balloon.current"),
        "memory_maximum_bytes": kib("balloon.maximum"),
        "memory_usable_bytes": kib("balloon.usable"),
        "memory_rss_bytes": kib("balloon.rss"),
    }


class HTTPApp:
    """Builds the aiohttp application.

    Args:
        exposition: renders ``/metrics``.
        guests: guest registry.
        snapshot: returns the latest stats snapshot.
        events: recent events ring buffer.
        status: daemon status port.
        ready: returns True when libvirt is connected and resynced (``/readyz``).
        middlewares: extra aiohttp middlewares (auth), applied in order.
        console: the console capture; None (the default, and the daemon's unless
            ``http.serve_console``) leaves out ``/api/v1/guests/{name}/console``.
        history: recent CPU and memory per guest for the status page's sparklines (None: none).
        wall: seconds since the epoch (the status page's ages).
    """

    def __init__(self, exposition: Exposition, guests: GuestRegistry, snapshot: Callable[[], Snapshot | None],
                 events: RecentEvents, status: StatusPort, ready: Callable[[], bool],
                 middlewares: list[Callable[..., Awaitable[Any]]] | None = None,
                 console: ConsolePort | None = None, history: GuestHistory | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self._exposition = exposition
        self._guests = guests
        self._snapshot = snapshot
        self._events = events
        self._status = status
        self._ready = ready
        self._middlewares = middlewares or []
        self._console = ConsoleAPI(console) if console is not None else None
        self._history = history
        self._wall = wall

    def build(self, app_kwargs: dict[str, Any] | None = None) -> web.Application:
        """The application. ``app_kwargs`` go to ``web.Application`` (middlewares,
        size limits from the web config); without them the body is bounded to 64 KiB."""
        kwargs: dict[str, Any] = {"client_max_size": MAX_BODY_BYTES, **(app_kwargs or {})}
        kwargs["middlewares"] = [*kwargs.get("middlewares", []), *self._middlewares]
        app = web.Application(**kwargs)
        app.router.add_get("/", self.index)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/api/v1/status", self.api_status)
        app.router.add_get("/api/v1/guests", self.api_guests)
        app.router.add_get("/api/v1/guests/{name}", self.api_guest)
        app.router.add_get("/api/v1/events", self.api_events)
        if self._console is not None:
            self._console.add_routes(app)
        return app

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text exposition; gzip when ``Accept-Encoding`` admits it (as
        Prometheus' scrapes do), from the state text deflated once per poll."""
        gzip = accepts_gzip(request.headers.get("Accept-Encoding", ""))
        body = await self._exposition.render_async(gzip=gzip)
        headers = {"Content-Type": Exposition.CONTENT_TYPE, "Vary": "Accept-Encoding"}
        if self._exposition.answered_behind:  # the state changed while its render ran: the next scrape has it
            headers[RENDER_BEHIND_HEADER] = "1"
        if gzip:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    async def healthz(self, _request: web.Request) -> web.Response:
        """Liveness: the loop answers."""
        return web.Response(text="ok\n")

    async def readyz(self, _request: web.Request) -> web.Response:
        """Readiness: 200 when libvirt is connected and state resynced, else 503."""
        if self._ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="libvirt not connected\n")

    async def api_status(self, _request: web.Request) -> web.Response:
        """Daemon status as JSON."""
        return web.json_response(self._status.status())

    async def api_guests(self, _request: web.Request) -> web.Response:
        """Every guest as JSON."""
        snap = self._snapshot()
        return web.json_response({"guests": [guest_json(g, snap) for g in self._guests.guests()]})

    async def api_guest(self, request: web.Request) -> web.Response:
        """One guest with its recent events; 404 if unknown."""
        name = request.match_info["name"]
        g = self._guests.by_name(name)
        if g is None:
            return web.json_response({"error": f"no guest named {name!r}"}, status=404)
        out = guest_json(g, self._snapshot())
        out["events"] = [e.as_dict() for e in self._events.since(0, name=name, limit=50)]
        out.update(self._status.guest_extra(name))
        return web.json_response(out)

    async def api_events(self, request: web.Request) -> web.Response:
        """Events after ``since`` (a sequence number), at most ``limit`` (≤ 1000): see
        :meth:`~virtwatch.eventlog.RecentEvents.page` (a tail without ``since``, a cursor with it)."""
        try:
            since = int(request.query.get("since", "0"))
            limit = int(request.query.get("limit", "500"))
        except ValueError:
            return web.json_response({"error": "since and limit must be integers"}, status=400)
        if not 0 < limit <= 1000:
            return web.json_response({"error": "limit must be between 1 and 1000"}, status=400)
        if since < 0:
            return web.json_response({"error": "since must be 0 or a sequence number"}, status=400)
        return web.json_response(self._events.page(since, limit, name=request.query.get("domain")))

    async def index(self, _request: web.Request) -> web.Response:
        """The status page (no JavaScript): daemon status and one row per guest with CPU and
        memory sparklines of its recent polls, state and reason, last event, policy state and
        links to its JSON and console (:mod:`~virtwatch.metrics.landing`)."""
        snap = self._snapshot()
        capacity = self._history.points if self._history is not None else 0
        rows = [GuestRow(guest_json(g, snap), self._status.guest_extra(g.name),
                         self._history.series(g.uuid) if self._history is not None else (), capacity,
                         console_served=self._console is not None)
                for g in self._guests.guests()]
        body = render_page(self._status.status(), rows, self._wall(), __version__)
        return web.Response(text=body, content_type="text/html")


class ConsoleAPI:
    """``GET /api/v1/guests/{name}/console`` over a :class:`ConsolePort` (``http.serve_console``)."""

    def __init__(self, console: ConsolePort) -> None:
        self._console = console

    def add_routes(self, app: web.Application) -> None:
        """Add the console route to ``app``."""
        app.router.add_get("/api/v1/guests/{name}/console", self.console)

    async def console(self, request: web.Request) -> web.Response:
        """``?lines=N`` (default ``crash_lines``): live tail; ``?crash=N``: the N-th most
        recent crash record (:func:`~virtwatch.console.query.console_query`)."""
        status, body = await console_query(self._console, request.match_info["name"], request.query)
        return web.json_response(body, status=status)
