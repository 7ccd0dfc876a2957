"""The HTTP listener, and its web config swapped in place.

:func:`load_web_parts` reads everything the listener takes from ``[http]``'s web
config file (the YAML, the TLS certificate, key and CA files, the users), or
raises :class:`~virtwatch.web.WebConfigError` listing the problems; the daemon
starts with it, ``virtwatch check-config`` runs it, and a reload builds it
completely before it touches the running listener.

:class:`WebServer` binds the listening sockets once and keeps them for its
lifetime. :meth:`WebServer.swap` puts new parts in place without closing them:
users and response headers through one middleware that delegates to the current
chain; a renewed certificate by loading it into the TLS context being served;
other TLS changes by serving a duplicate of each listening socket with the new
context, then closing the old duplicate. The kernel's listening socket stays
open throughout, so a connection arriving during a swap waits in its backlog
instead of being refused; connections already open finish on their context.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from aiohttp import web

from ..config import parse_listen
from . import build_app_kwargs, build_site_kwargs
from .auth import Handler, Middleware
from .limits import HTTPLimits
from .webconfig import WebConfig, WebConfigError, load_web_config

__all__ = ["WebParts", "WebServer", "load_web_parts"]

log = structlog.get_logger("virtwatch.web")

#: Paths served without authentication (systemd and load balancers probe liveness).
EXEMPT_PATHS = ("/healthz",)


@dataclasses.dataclass(frozen=True)
class WebParts:
    """What a web config file gives the listener, fully built.

    Attributes:
        config: the validated file (``WebConfig()`` without one).
        middlewares: response headers and basic auth, outermost first.
        ssl_context: the TLS context with the certificate loaded; None for plain HTTP.
        source: the file's path, for messages.
    """

    config: WebConfig
    middlewares: tuple[Middleware, ...]
    ssl_context: ssl.SSLContext | None
    source: str


def authenticates(config: WebConfig) -> bool:
    """Whether every request must authenticate: basic auth users, or TLS client
    certificates required and verified."""
    tls = config.tls_server_config
    return bool(config.basic_auth_users) or (tls is not None and tls.client_auth_type == "RequireAndVerifyClientCert")


def load_web_parts(path: str | None, serve_console: bool = False) -> WebParts:
    """Read and build the web config at ``path`` (None: plain HTTP, no auth).

    Reads the TLS files (missing or unreadable files, a key that does not match its
    certificate, a bad CA bundle are errors) and builds the basic-auth middleware (one
    bcrypt hash). ``serve_console`` (``http.serve_console``) needs authentication.
    Raises :class:`WebConfigError` listing every problem.
    """
    source = str(path) if path else "<no web config>"
    config = load_web_config(path)
    if serve_console and not authenticates(config):
        raise WebConfigError(source, [
            "http.serve_console: console contents (what was typed or printed on a guest's console) are served over "
            "HTTP only with authentication: set basic_auth_users, or tls_server_config with client_auth_type "
            "RequireAndVerifyClientCert, in http.web_config_file; or leave serve_console off and read consoles "
            "with `virtwatch console-log` over the operator socket"])
    ctx = build_site_kwargs(config, source=source)["ssl_context"]
    middlewares = build_app_kwargs(config, exempt_paths=EXEMPT_PATHS)["middlewares"]
    return WebParts(config, tuple(middlewares), ctx, source)


class MiddlewareChain:
    """One aiohttp middleware running the current chain; :meth:`swap` replaces it."""

    def __init__(self, middlewares: Sequence[Middleware] = ()) -> None:
        self.middlewares: tuple[Middleware, ...] = tuple(middlewares)
        self.middleware = self._build()

    def swap(self, middlewares: Sequence[Middleware]) -> None:
        """Run ``middlewares`` from the next request on."""
        self.middlewares = tuple(middlewares)

    def _build(self) -> Middleware:
        @web.middleware
        async def chain(request: web.Request, handler: Handler) -> web.StreamResponse:
            inner = handler
            for mw in reversed(self.middlewares):
                inner = _bind(mw, inner)
            return await inner(request)

        return chain


def _bind(mw: Middleware, inner: Handler) -> Handler:
    async def call(request: web.Request) -> web.StreamResponse:
        return await mw(request, inner)

    return call


def bind_listeners(listen: str, backlog: int = 128) -> list[socket.socket]:
    """Listening TCP sockets for ``HOST:PORT`` as asyncio's ``create_server`` makes them:
    one per address ``HOST`` resolves to (every address for an empty host), SO_REUSEADDR,
    IPv6 sockets IPv6-only. Raises OSError when one cannot be bound."""
    host, port = parse_listen(listen)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    out: list[socket.socket] = []
    try:
        for family, kind, proto, _name, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in out:
            sock.close()
        raise
    return out


class WebServer:
    """The HTTP listener.

    Args:
        build_app: makes the aiohttp application from ``web.Application`` keyword
            arguments (its middlewares and size limits).
        limits: request size and timeout limits.
    """

    def __init__(self, build_app: Callable[[dict[str, Any]], web.Application],
                 limits: HTTPLimits = HTTPLimits()) -> None:
        self._build_app = build_app
        self._limits = limits
        self._chain = MiddlewareChain()
        self._runner: web.AppRunner | None = None
        self._listeners: list[socket.socket] = []
        self._sites: list[web.SockSite] = []
        self._serving: ssl.SSLContext | None = None  # the context the sites were started with
        self.parts: WebParts | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, listen: str, parts: WebParts) -> None:
        """Bind ``listen`` and serve with ``parts``. Raises OSError when it cannot be bound."""
        self._listeners = bind_listeners(listen)
        self._chain.swap(parts.middlewares)
        app = self._build_app({"middlewares": [self._chain.middleware], **self._limits.application_kwargs()})
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        self._sites = await self._serve(parts.ssl_context)
        self._serving = parts.ssl_context
        self.parts = parts
        name = self._listeners[0].getsockname()
        self.address = (name[0], name[1])

    async def swap(self, parts: WebParts) -> None:
        """Serve ``parts`` from now on, on the same listening sockets (see the module text).

        Users and headers: from the next request. TLS with the same settings and file names
        and no client CA (the certificate renewal case): the new certificate and key are
        loaded into the context being served, for every handshake from now on. Any other TLS
        change (on, off, other files, versions, client certificates): new sites on duplicates
        of the listening sockets, then the old sites closed. asyncio resets a connection
        accepted by an old site in the loop iteration it closes in, so that path can cost a
        client one connection; the in-place path costs none.
        """
        if self._runner is None or self.parts is None:
            raise RuntimeError("WebServer.swap before start")
        self._chain.swap(parts.middlewares)
        tls, old_tls = parts.config.tls_server_config, self.parts.config.tls_server_config
        if self._serving is not None and tls is not None and tls == old_tls and tls.client_ca_file is None:
            # parts.ssl_context proved the pair loads; load it into the context the sockets serve.
            self._serving.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
        else:
            old, self._sites = self._sites, await self._serve(parts.ssl_context)
            for site in old:
                await site.stop()
            self._serving = parts.ssl_context
        self.parts = parts

    async def _serve(self, ctx: ssl.SSLContext | None) -> list[web.SockSite]:
        assert self._runner is not None
        sites = []
        for listener in self._listeners:
            dup = socket.socket(listener.family, listener.type, listener.proto, fileno=os.dup(listener.fileno()))
            dup.setblocking(False)
            site = web.SockSite(self._runner, dup, ssl_context=ctx)
            await site.start()
            sites.append(site)
        return sites

    async def stop(self) -> None:
        """Stop serving and close the listening sockets."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._sites = []
        for sock in self._listeners:
            sock.close()
        self._listeners = []
