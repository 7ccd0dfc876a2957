"""Securing the HTTP endpoint: web config file, TLS, basic auth, request limits.

Integration (what the daemon calls)::

    from virtwatch.web import load_web_config, build_app_kwargs, build_site_kwargs

    webcfg = load_web_config(path_or_None)             # WebConfigError on problems
    app = web.Application(**build_app_kwargs(webcfg, extra_middlewares=[...]))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port, **build_site_kwargs(webcfg))
    await site.start()

Load and build *everything* (both functions) before touching the running
server on SIGHUP, so a bad file or unreadable certificate keeps the old
endpoint up.
"""

from __future__ import annotations

import ssl
from collections.abc import Collection, Iterable
from typing import Any

from .auth import AUTH_USER_KEY, basic_auth_middleware, headers_middleware
from .limits import HTTPLimits
from .tls import build_ssl_context
from .webconfig import WebConfig, WebConfigError, load_web_config, web_config_from_mapping

__all__ = [
    "AUTH_USER_KEY",
    "HTTPLimits",
    "WebConfig",
    "WebConfigError",
    "basic_auth_middleware",
    "build_app_kwargs",
    "build_site_kwargs",
    "build_ssl_context",
    "headers_middleware",
    "load_web_config",
    "web_config_from_mapping",
]


def build_app_kwargs(
    webconfig: WebConfig,
    *,
    limits: HTTPLimits = HTTPLimits(),
    extra_middlewares: Iterable[Any] = (),
    exempt_paths: Collection[str] = (),
) -> dict[str, Any]:
    """Keyword arguments for ``aiohttp.web.Application(**kw)``.

    Returns ``{"middlewares": [...], "client_max_size": int, "handler_args":
    {...}}``. Middlewares, outermost first: configured response headers
    (if any), basic auth (if ``basic_auth_users`` is non-empty; paths in
    ``exempt_paths`` skip it), then ``extra_middlewares``. Building the auth
    middleware computes one bcrypt hash (see :func:`basic_auth_middleware`).
    """
    middlewares: list[Any] = []
    headers = webconfig.http_server_config.headers
    if headers:
        middlewares.append(headers_middleware(headers))
    if webconfig.basic_auth_users:
        middlewares.append(basic_auth_middleware(webconfig.basic_auth_users, exempt_paths=exempt_paths))
    middlewares.extend(extra_middlewares)
    return {"middlewares": middlewares, **limits.application_kwargs()}


def build_site_kwargs(webconfig: WebConfig, source: str = "<web config>") -> dict[str, Any]:
    """Keyword arguments for ``aiohttp.web.TCPSite(runner, host, port, **kw)``.

    ``{"ssl_context": SSLContext | None}``: an ``ssl.SSLContext`` when
    ``tls_server_config`` is set (reads the certificate files now), else
    None (plain HTTP). Raises :class:`WebConfigError` naming ``source`` when
    the TLS files cannot be loaded.
    """
    ctx: ssl.SSLContext | None = None
    if webconfig.tls_server_config is not None:
        ctx = build_ssl_context(webconfig.tls_server_config, source)
    return {"ssl_context": ctx}
