"""The operator Unix socket: ``virtwatch status|explain|hold|release|reset|override|events``.

The running daemon serves a small JSON-over-HTTP API on a Unix socket
(``daemon.socket``, mode 0660): whoever can open the socket may operate the
daemon, exactly like libvirt's own sockets. The CLI side
(:func:`request`) is synchronous stdlib code.

Routes (all answer JSON; errors are ``{"error": "..."}``):

* ``GET  /v1/status``             daemon summary and per-guest policy state
* ``GET  /v1/guests/{name}``      one guest: state, policy state, extras
* ``GET  /v1/explain/{name}``     merged policy, key sources, decision now
* ``POST /v1/guests/{name}/hold|release|reset``
* ``PUT  /v1/guests/{name}/override``  body: a JSON object of policy keys (per-guest
  keys, ``profile``, ``mode``) that *replaces* the guest's runtime override; ``{}``
  clears it. 400 names every bad key or value.
* ``GET  /v1/events?since=SEQ``   recent events
* ``GET  /v1/guests/{name}/console?lines=N|crash=N``  a captured console's tail and crash
  records (:func:`~virtwatch.console.query.console_query`): here by default, since the
  socket's permissions restrict it to root and the ``virtwatch`` group; over HTTP only
  with ``http.serve_console`` and an authenticating web config
"""

from __future__ import annotations

import http.client
import inspect
import json
import os
import socket
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from .console.query import ConsolePort, console_query


class UnknownGuest(KeyError):
    """No guest with that name is known."""


class NotAvailable(Exception):
    """The operation needs a feature that is off (e.g. policy disabled)."""


class BadRequest(ValueError):
    """The operator's input is invalid; the message says what (HTTP 400)."""


class ControlPort(Protocol):
    """What the daemon exposes to operators (implemented by the app)."""

    def control_status(self) -> dict[str, Any]:
        """Daemon summary plus per-guest policy state."""

    def control_guest(self, name: str) -> dict[str, Any]:
        """One guest; raises :class:`UnknownGuest`."""

    def control_explain(self, name: str) -> dict[str, Any]:
        """Explanation; raises :class:`UnknownGuest` / :class:`NotAvailable`."""

    async def control_action(self, name: str, action: str) -> dict[str, Any]:
        """hold/release/reset (answers once persisted); raises :class:`UnknownGuest` / :class:`NotAvailable`."""

    async def control_override(self, name: str, values: dict[str, Any]) -> dict[str, Any]:
        """Replace the runtime policy override (answers once persisted); raises :class:`UnknownGuest` /
        :class:`NotAvailable` / :class:`BadRequest`."""

    def control_events(self, since: int, limit: int) -> dict[str, Any]:
        """Recent events after ``since``."""


class ControlServer:
    """Serves :class:`ControlPort` on a Unix socket.

    Args:
        port: the daemon.
        path: socket path; its directory is created (mode 0750) if missing,
            a stale socket file is replaced.
        mode: permission bits of the socket file.
        fd: a listening ``AF_UNIX`` stream socket passed by systemd socket
            activation (``virtwatch.socket``: root:virtwatch, 0660). When
            given, it is served instead of binding ``path``; the socket file
            belongs to systemd: it is neither re-moded nor removed. The fd
            stays open across stop/start (a SIGHUP rebuild serves a dup of it).
        console: the console capture, read by ``/v1/guests/{name}/console`` (None: 404).
    """

    def __init__(self, port: ControlPort, path: str, mode: int = 0o660, fd: int | None = None,
                 console: ConsolePort | None = None) -> None:
        self._port = port
        self._console = console
        self.path = path
        self._mode = mode
        self._fd = fd
        self._runner: web.AppRunner | None = None

    @property
    def inherited(self) -> bool:
        """Whether the socket came from systemd (socket activation)."""
        return self._fd is not None

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024)
        app.router.add_get("/v1/status", self._status)
        app.router.add_get("/v1/guests/{name}", self._guest)
        app.router.add_get("/v1/explain/{name}", self._explain)
        app.router.add_post("/v1/guests/{name}/{action:hold|release|reset}", self._action)
        app.router.add_put("/v1/guests/{name}/override", self._override)
        app.router.add_get("/v1/events", self._events)
        app.router.add_get("/v1/guests/{name}/console", self._console_read)
        return app

    async def start(self) -> None:
        """Bind the socket (or serve the inherited one). Raises OSError if the
        path is unusable or the inherited fd is not a Unix stream socket."""
        if self._fd is not None:
            sock = socket.socket(fileno=os.dup(self._fd))
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                sock.close()
                raise OSError(f"fd {self._fd} from systemd is not a Unix stream socket")
            name = sock.getsockname()
            self.path = name if isinstance(name, str) and name else self.path
            self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
            return
        directory = Path(self.path).parent
        if not directory.exists():
            directory.mkdir(parents=True, mode=0o750)
        if os.path.exists(self.path):
            _remove_stale(self.path)
        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.UnixSite(self._runner, self.path)
        await site.start()
        os.chmod(self.path, self._mode)

    async def stop(self) -> None:
        """Close the socket and remove its file (unless systemd owns it)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._fd is not None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _call(self, fn: Any, *args: Any) -> web.Response:
        try:
            result = fn(*args)
            if inspect.isawaitable(result):  # the operator commands wait for their commit
                result = await result
            return web.json_response(result)
        except UnknownGuest as err:
            return web.json_response({"error": f"no guest named {err.args[0]!r}"}, status=404)
        except NotAvailable as err:
            return web.json_response({"error": str(err)}, status=409)
        except BadRequest as err:
            return web.json_response({"error": str(err)}, status=400)

    async def _status(self, _r: web.Request) -> web.Response:
        return await self._call(self._port.control_status)

    async def _guest(self, r: web.Request) -> web.Response:
        return await self._call(self._port.control_guest, r.match_info["name"])

    async def _explain(self, r: web.Request) -> web.Response:
        return await self._call(self._port.control_explain, r.match_info["name"])

    async def _action(self, r: web.Request) -> web.Response:
        return await self._call(self._port.control_action, r.match_info["name"], r.match_info["action"])

    async def _override(self, r: web.Request) -> web.Response:
        try:
            values = await r.json()
        except ValueError:
            values = None
        if not isinstance(values, dict):
            return web.json_response({"error": "the body must be a JSON object of policy keys, e.g. "
                                      '{"restart_delay": 2.0}; {} clears the override'}, status=400)
        return await self._call(self._port.control_override, r.match_info["name"], values)

    async def _console_read(self, r: web.Request) -> web.Response:
        if self._console is None:
            return web.json_response({"error": "console capture is not available"}, status=409)
        status, body = await console_query(self._console, r.match_info["name"], r.query)
        return web.json_response(body, status=status)

    async def _events(self, r: web.Request) -> web.Response:
        try:
            since, limit = int(r.query.get("since", "0")), int(r.query.get("limit", "100"))
        except ValueError:
            return web.json_response({"error": "since and limit must be integers"}, status=400)
        return await self._call(self._port.control_events, since, max(1, min(limit, 1000)))


def _remove_stale(path: str) -> None:
    """Remove ``path`` if it is a socket nobody listens on; refuse otherwise."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(f"{path}: another virtwatch is already listening there")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class DaemonUnreachable(Exception):
    """The socket is missing, refused, or not permitted."""


def request(path: str, method: str, url: str, body: Any = None, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    """One request to the daemon's control socket → (HTTP status, JSON body).

    ``body``, when not None, is sent as JSON. Raises :class:`DaemonUnreachable`
    when the daemon cannot be reached.
    """
    conn = _UnixHTTPConnection(path, timeout)
    try:
        if body is None:
            conn.request(method, url)
        else:
            conn.request(method, url, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            body = json.loads(raw or b"{}")
        except ValueError:  # aiohttp's own plain-text errors (404 route, 400 line too long)
            body = {"error": f"HTTP {resp.status}: {raw[:200].decode('utf-8', 'replace').strip()}"}
        return resp.status, body if isinstance(body, dict) else {"error": f"HTTP {resp.status}: unexpected answer"}
    except (TimeoutError, FileNotFoundError, ConnectionRefusedError, PermissionError) as err:
        raise DaemonUnreachable(f"{path}: {err}") from None
    finally:
        conn.close()
