"""Structured logging: structlog JSON lines (or console) and libvirt's errors.

libvirt prints its own errors to stderr unless an error handler is
registered; :func:`route_libvirt_errors` sends them through structlog with
the error code, domain and level instead. For deeper libvirt debugging set
``LIBVIRT_DEBUG=1`` or ``LIBVIRT_LOG_FILTERS`` / ``LIBVIRT_LOG_OUTPUTS`` in
the daemon's environment (libvirt's own client-side logging).

**journald priorities.** When the output stream is the journal (systemd sets
``JOURNAL_STREAM=DEV:INODE`` to the stream's device and inode, and documents
comparing them with ``fstat`` of the stream, since the variable is inherited by
children whose output goes elsewhere), every line starts with its syslog
priority as ``<N>`` (sd-daemon.h: ``<7>`` debug, ``<6>`` info, ``<4>`` warning,
``<3>`` error, ``<2>`` critical). journald strips the prefix
(``SyslogLevelPrefix=yes``, systemd's default) and files the line at that
priority, so ``journalctl -p warning`` works; the message stays the same JSON
line. Anywhere else the lines are unchanged.

The prefix rather than journald's native protocol: it needs no library (the
native protocol wants libsystemd's Python binding or a hand-written datagram
client), keeps one output path with the same ordering as everything else on
stdout, and ``journalctl -o cat`` shows exactly the JSON line a non-systemd
run prints. The native protocol's extra fields would repeat what the JSON has.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import libvirt
import structlog

from .model import Event, Source
from .virt.decode import constant_names

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

#: structlog level name -> syslog priority (sd-daemon.h ``SD_*``).
SYSLOG_PRIORITY = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "warn": 4, "error": 3, "exception": 3,
                   "critical": 2, "fatal": 2}


def writes_to_journal(stream: Any, environ: Mapping[str, str]) -> bool:
    """Whether ``stream`` is the journal: ``JOURNAL_STREAM`` (``DEV:INODE``, decimal)
    names the device and inode of the stream's file descriptor. False when the
    variable is unset or malformed, or the stream has no descriptor."""
    dev, sep, ino = environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class SyslogPrefix:
    """Renderer wrapper: ``<N>`` (the event's syslog priority) before the rendered line."""

    def __init__(self, renderer: Any) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> str:
        prio = SYSLOG_PRIORITY.get(str(event_dict.get("level", method)), 6)
        return f"<{prio}>{self._renderer(logger, method, event_dict)}"


class _SyslogPrefixFormatter(logging.Formatter):
    """The same prefix for the standard library's log records (asyncio, aiohttp)."""

    def format(self, record: logging.LogRecord) -> str:
        prio = SYSLOG_PRIORITY.get(record.levelname.lower(), 6)
        return f"<{prio}>{super().format(record)}"


def configure_logging(fmt: str = "json", level: str = "info", stream: TextIO | None = None,
                      environ: Mapping[str, str] | None = None) -> None:
    """Configure structlog for the process.

    Args:
        fmt: ``json`` (one JSON object per line, for journald) or ``console``.
        level: minimum level name.
        stream: where lines go (default stdout).
        environ: the environment read for ``JOURNAL_STREAM`` (default ``os.environ``):
            when it names ``stream``, each line starts with its ``<N>`` syslog priority.
    """
    out = stream or sys.stdout
    journal = writes_to_journal(out, os.environ if environ is None else environ)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: Any = (structlog.processors.JSONRenderer(sort_keys=False) if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=out.isatty() if hasattr(out, "isatty") else False))
    if journal:
        renderer = SyslogPrefix(renderer)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    fmt_cls = _SyslogPrefixFormatter if journal else logging.Formatter
    handler.setFormatter(fmt_cls("%(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=max(_LEVELS[level], logging.INFO), handlers=[handler], force=True)


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
