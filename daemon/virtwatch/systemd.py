"""The systemd service-manager notification protocol, implemented directly.

systemd passes a ``Type=notify`` service the address of a datagram socket in
``NOTIFY_SOCKET``; the service sends newline-separated ``KEY=VALUE`` lines to
it (see sd_notify(3)). This module speaks that protocol without libsystemd:

- :class:`Notifier` -- ``READY=1``, ``RELOADING=1`` (+ ``MONOTONIC_USEC``),
  ``STOPPING=1``, ``STATUS=...``, ``WATCHDOG=1``, ``EXTEND_TIMEOUT_USEC=...``.
- :func:`watchdog_task` -- an asyncio task that pings ``WATCHDOG=1`` from the
  event loop at half of ``WATCHDOG_USEC``: a wedged loop stops pinging and
  systemd restarts the service; so does an unhealthy daemon.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a silent no-op, so the
daemon calls these unconditionally. Sending never raises: notification is
best effort, and a failure is logged and reported as ``False``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass

import structlog

__all__ = ["SD_LISTEN_FDS_START", "Notifier", "listen_fds", "monotonic_usec", "watchdog_task"]

_log = structlog.get_logger("virtwatch.systemd")

#: First file descriptor systemd passes to a socket-activated service (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3

# Environment variables systemd sets for socket activation.
_LISTEN_KEYS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

# Environment variables systemd sets for the notification protocol.
_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

# A send to systemd's socket should never block: PID 1 drains it promptly.
# Bound it anyway so a stuck manager cannot stall the event loop for long.
_SEND_TIMEOUT_S = 1.0


def monotonic_usec() -> int:
    """Current ``CLOCK_MONOTONIC`` in microseconds (what ``MONOTONIC_USEC=`` wants)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _parse_address(value: str) -> bytes | None:
    """``NOTIFY_SOCKET`` value -> AF_UNIX address bytes, or None if unsupported.

    ``/path`` is a file-system socket; ``@name`` an abstract one (leading NUL).
    Anything else (empty, relative, ``vsock:...``) is unsupported here.
    """
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    return None


def _parse_watchdog(environ: Mapping[str, str], pid: int) -> int | None:
    """``WATCHDOG_USEC`` in µs if it is set, valid, and meant for ``pid``."""
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        _log.warning("systemd_watchdog_env_invalid", WATCHDOG_USEC=raw)
        return None
    if usec <= 0:
        return None
    wpid = environ.get("WATCHDOG_PID")
    if wpid:
        try:
            if int(wpid) != pid:
                # The variables were meant for another process (e.g. our parent).
                return None
        except ValueError:
            _log.warning("systemd_watchdog_env_invalid", WATCHDOG_PID=wpid)
            return None
    return usec


@dataclass(frozen=True)
class Notifier:
    """Sends sd_notify(3) messages to the service manager.

    Build one with :meth:`from_environ`. ``address`` is the AF_UNIX address
    (bytes; abstract addresses start with ``b"\\0"``) or None when not running
    under a notify-aware manager, in which case every method is a no-op that
    returns False. ``watchdog_usec`` is the watchdog timeout in microseconds
    granted to this process, or None when the watchdog is off.

    All senders return True when the datagram was sent, False when disabled
    or on a send error (logged as ``systemd_notify_failed``); none raise.
    """

    address: bytes | None = None
    watchdog_usec: int | None = None

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str],
        *,
        pid: int | None = None,
        unset_environment: bool = False,
    ) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        ``environ`` is usually ``os.environ``. ``pid`` is this process' id
        (default ``os.getpid()``): the watchdog is enabled only if
        ``WATCHDOG_PID`` is unset or equals it. With ``unset_environment``
        (``environ`` must then be mutable) the three variables are removed so
        child processes do not inherit them, like sd_notify's
        ``unset_environment``. An unsupported ``NOTIFY_SOCKET`` value is
        logged and yields a disabled notifier. Raises TypeError only for
        ``unset_environment`` with an immutable mapping.
        """
        pid = os.getpid() if pid is None else pid
        raw = environ.get("NOTIFY_SOCKET") or ""
        address = _parse_address(raw) if raw else None
        if raw and address is None:
            _log.warning("systemd_notify_socket_unsupported", NOTIFY_SOCKET=raw)
        watchdog = _parse_watchdog(environ, pid) if address is not None else None
        if unset_environment:
            if not isinstance(environ, MutableMapping):
                raise TypeError("unset_environment=True needs a mutable mapping")
            for key in _ENV_KEYS:
                environ.pop(key, None)
        return cls(address=address, watchdog_usec=watchdog)

    @property
    def enabled(self) -> bool:
        """True when a notification socket is configured."""
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``"KEY=VALUE"`` strings) as one datagram.

        Raises ValueError if a field contains a newline or lacks ``=`` (a
        programming error); I/O errors are logged and give False.
        """
        for f in fields:
            if "\n" in f or "=" not in f:
                raise ValueError(f"invalid sd_notify field {f!r}")
        if self.address is None or not fields:
            return False
        payload = "\n".join(fields).encode("utf-8") + b"\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(_SEND_TIMEOUT_S)
                sock.sendto(payload, self.address)
        except OSError as err:
            _log.warning("systemd_notify_failed", error=str(err), fields=[f.split("=", 1)[0] for f in fields])
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (startup or reload finished), optionally with ``STATUS=``."""
        return self.notify("READY=1", *self._status_field(status))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` + ``MONOTONIC_USEC=<now>``: a reload started.

        Send :meth:`ready` when the reload is done (successful or not).
        """
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", *self._status_field(status))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: orderly shutdown started."""
        return self.notify("STOPPING=1", *self._status_field(status))

    def status(self, text: str) -> bool:
        """``STATUS=<text>``: one human-readable line for ``systemctl status``.

        Newlines in ``text`` are replaced by spaces (the protocol is
        line-based).
        """
        return self.notify(*self._status_field(text))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: keep-alive ping. A no-op (False) when the watchdog is off."""
        if self.watchdog_usec is None:
            return False
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC=``: ask for ``seconds`` more to start/stop/reload."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of ``WATCHDOG_USEC``; None when off."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    @staticmethod
    def _status_field(text: str | None) -> tuple[str, ...]:
        if text is None:
            return ()
        return ("STATUS=" + " ".join(text.splitlines()),)


async def watchdog_task(
    notifier: Notifier,
    is_healthy: Callable[[], bool],
    *,
    interval: float | None = None,
) -> None:
    """Ping ``WATCHDOG=1`` from the event loop while ``is_healthy()`` holds.

    Runs until cancelled. ``interval`` (seconds) defaults to
    ``notifier.watchdog_interval()``; when the watchdog is off and no
    interval is given, returns at once. Each tick calls ``is_healthy()`` (on
    the loop; keep it cheap and non-blocking): True -> ping; False, or an
    exception (logged) -> no ping, so systemd's watchdog fires and restarts
    the service unless health returns in time. Because the pings come from
    the loop itself, a blocked loop also stops them.
    """
    if interval is None:
        interval = notifier.watchdog_interval()
        if interval is None:
            return
    if interval <= 0:
        raise ValueError(f"watchdog interval must be positive, got {interval!r}")
    healthy_before = True
    while True:
        try:
            healthy = bool(is_healthy())
        except Exception as err:  # a broken health check is unhealthy, not a crash
            _log.error("systemd_watchdog_health_check_failed", error=repr(err))
            healthy = False
        if healthy:
            notifier.watchdog()
            if not healthy_before:
                _log.info("systemd_watchdog_resumed")
        elif healthy_before:
            _log.error("systemd_watchdog_withheld", reason="daemon unhealthy")
        healthy_before = healthy
        await asyncio.sleep(interval)


def listen_fds(environ: MutableMapping[str, str], pid: int, *, unset_environment: bool = True) -> dict[str, int]:
    """Sockets systemd passed by socket activation, as ``{name: fd}`` (sd_listen_fds(3)).

    ``LISTEN_FDS`` sockets start at fd 3 when ``LISTEN_PID`` is ``pid``;
    ``LISTEN_FDNAMES`` (colon-separated, from ``FileDescriptorName=``) names
    them, ``"unknown"`` when absent. The passed descriptors are marked
    close-on-exec and, with ``unset_environment``, the variables are removed
    so no child process mistakes them for its own. Returns ``{}`` when nothing
    was passed or the variables are malformed or meant for another process
    (logged). Never raises.
    """
    raw_pid, raw_n = environ.get("LISTEN_PID"), environ.get("LISTEN_FDS")
    names_raw = environ.get("LISTEN_FDNAMES")
    if unset_environment:
        for key in _LISTEN_KEYS:
            environ.pop(key, None)
    if not raw_pid or not raw_n:
        return {}
    try:
        if int(raw_pid) != pid:
            return {}
        n = int(raw_n)
    except ValueError:
        _log.warning("systemd_listen_env_invalid", LISTEN_PID=raw_pid, LISTEN_FDS=raw_n)
        return {}
    if n <= 0:
        return {}
    names = names_raw.split(":") if names_raw else []
    out: dict[str, int] = {}
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError as err:
            _log.warning("systemd_listen_fd_invalid", fd=fd, error=str(err))
            continue
        name = names[i] if i < len(names) and names[i] else "unknown"
        out.setdefault(name, fd)
    return out
