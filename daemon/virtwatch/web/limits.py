"""Bounds on what an HTTP client may send: body size, header sizes, idle time.

aiohttp's names (checked against aiohttp 3.14): the request body limit is
``web.Application(client_max_size=...)`` (a larger body -> 413 when the
handler reads it); header limits are ``RequestHandler`` arguments passed
through ``web.Application(handler_args={...})``: ``max_line_size`` (request
line and each header line, bytes), ``max_field_size`` (one header value,
bytes), ``max_headers`` (count; aiohttp >= 3.11) and ``keepalive_timeout``
(seconds). Oversize headers get 400 (request line: 414 / 431 per aiohttp).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from aiohttp import web_protocol

__all__ = ["HTTPLimits"]


@dataclass(frozen=True)
class HTTPLimits:
    """Request bounds for the HTTP endpoint.

    ``max_body_bytes``: largest request body (bytes; Prometheus scrapes and
    the JSON API send none). ``max_line_size``: request line / header line
    (bytes). ``max_field_size``: one header (bytes; fits a long basic-auth
    header). ``max_headers``: number of header lines. ``keepalive_timeout``:
    idle keep-alive connection lifetime (seconds; longer than any sane
    scrape interval so Prometheus keeps its connection).
    """

    max_body_bytes: int = 64 * 1024
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 64
    keepalive_timeout: float = 75.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_line_size", "max_field_size", "max_headers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.keepalive_timeout < 0:
            raise ValueError("keepalive_timeout must be >= 0")

    def handler_args(self) -> dict[str, Any]:
        """``handler_args`` for ``web.Application`` (only names this aiohttp accepts)."""
        args: dict[str, Any] = {
            "max_line_size": self.max_line_size,
            "max_field_size": self.max_field_size,
            "max_headers": self.max_headers,
            "keepalive_timeout": self.keepalive_timeout,
        }
        accepted = inspect.signature(web_protocol.RequestHandler.__init__).parameters
        return {k: v for k, v in args.items() if k in accepted}

    def application_kwargs(self) -> dict[str, Any]:
        """``client_max_size`` and ``handler_args`` for ``web.Application(**kw)``."""
        return {"client_max_size": self.max_body_bytes, "handler_args": self.handler_args()}
