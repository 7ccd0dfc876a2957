"""Structured logging: structlog JSON lines (or console) and libvirt's errors.

libvirt prints its own errors to stderr unless an error handler is
registered; :func:`route_libvirt_errors` sends them through structlog with
the error code, domain and level instead. For deeper libvirt debugging set
``LIBVIRT_DEBUG=1`` or ``LIBVIRT_LOG_FILTERS`` / ``LIBVIRT_LOG_OUTPUTS`` in
the daemon's environment (libvirt's own client-side logging).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import libvirt
import structlog

from .model import Event, Source
from .virt.decode import constant_names

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog for the process.

    Args:
        fmt: ``json`` (one JSON object per line, for journald) or ``console``.
        level: minimum level name.
        stream: where lines go (default stdout).
    """
    out = stream or sys.stdout
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: Any = (structlog.processors.JSONRenderer(sort_keys=False) if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=out.isatty() if hasattr(out, "isatty") else False))
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(_LEVELS[level], logging.INFO), stream=out,
                        format="%(levelname)s %(name)s %(message)s", force=True)


def route_libvirt_errors() -> None:
    """Register a libvirt error handler that logs through structlog.

    Each libvirt error becomes one ``libvirt_error`` line with ``code``
    (``VIR_ERR_*`` name), ``origin`` (``VIR_FROM_*`` name), ``level`` and the
    message; libvirt then no longer writes to stderr. Process-wide.
    """
    log = structlog.get_logger("virtwatch.libvirt")

    def handler(_ctx: Any, err: Any) -> None:
        try:
            code, domain, message, level = err[0], err[1], err[2], err[3]
            log.debug("libvirt_error", code=_named("VIR_ERR_", code), origin=_named("VIR_FROM_", domain),
                      level={1: "warning", 2: "error"}.get(level, str(level)), message=(message or "").strip())
        except Exception:  # an error handler must never raise into libvirt
            pass

    libvirt.registerErrorHandler(handler, None)


def _named(prefix: str, code: int) -> str:
    name = constant_names(prefix).get(code)
    return f"{prefix}{name}" if name else str(code)


class EventLogger:
    """Pump subscriber writing each event as one structured log line."""

    def __init__(self) -> None:
        self._log = structlog.get_logger("virtwatch.event")

    def __call__(self, ev: Event) -> None:
        """Log ``ev`` as one ``libvirt_event`` line: source, kind, name, uuid,
        type (the decoded event, e.g. STOPPED), detail, seq, payload; ``domain``
        too for guest events."""
        # "event" is structlog's message key ("libvirt_event"); the libvirt event name goes in "type".
        fields: dict[str, Any] = {"source": ev.source, "kind": ev.kind, "name": ev.name, "uuid": ev.uuid,
                                  "type": ev.event, "detail": ev.detail, "seq": ev.seq}
        if ev.source == Source.DOMAIN:
            fields["domain"] = ev.name
        if ev.payload:
            fields["payload"] = dict(ev.payload)
        self._log.info("libvirt_event", **fields)
