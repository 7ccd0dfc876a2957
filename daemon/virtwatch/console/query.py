"""Reading captured consoles: one answer for the operator socket and (when opted in) HTTP.

Console contents are whatever was typed or printed on a guest's console, passwords
included: the daemon serves them on the operator socket (``daemon.socket``, root:virtwatch
0660), and over HTTP only with ``http.serve_console`` and an authenticating web config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class ConsolePort(Protocol):
    """The console capture as its readers see it (a :class:`~virtwatch.console.ConsoleCapture`)."""

    @property
    def crash_lines(self) -> int:
        """Lines of the live tail when the request names none."""

    def state(self, name: str) -> dict[str, Any] | None:
        """JSON-ready capture state of ``name``; None when it is not captured."""

    def tail(self, name: str, lines: int | None = None) -> list[str]:
        """The last ``lines`` console lines of ``name`` from memory."""

    async def crash(self, name: str, n: int) -> Any:
        """The ``n``-th most recent crash record (``as_dict()``), or None."""

    async def crashes(self, name: str, limit: int = 20) -> list[Any]:
        """Crash records (``id``, ``time``, ``events``), newest first."""


async def console_query(console: ConsolePort, name: str, query: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """Answer a console request as (HTTP status, JSON body).

    ``query``: ``lines=N`` (default ``crash_lines``): the live tail, the capture state and
    the list of crash records; ``crash=N``: the N-th most recent crash record. 404 when
    neither exists; 400 for a bad number.
    """
    try:
        lines = int(query.get("lines", str(console.crash_lines)))
        crash_n = int(query["crash"]) if "crash" in query else None
    except ValueError:
        return 400, {"error": "lines and crash must be integers"}
    if not 0 <= lines <= 100000:
        return 400, {"error": "lines must be between 0 and 100000"}
    if crash_n is not None:
        rec = await console.crash(name, crash_n)
        if rec is None:
            return 404, {"error": f"no crash {crash_n} recorded for {name!r}"}
        return 200, {"name": name, "crash": rec.as_dict()}
    crashes = await console.crashes(name, 20)
    state = console.state(name)
    if state is None and not crashes:
        return 404, {"error": f"console of {name!r} is not captured"}
    return 200, {"name": name, "capture": state, "lines": console.tail(name, lines),
                 "crashes": [{"n": i + 1, "id": r.id, "time": r.time, "events": r.events}
                             for i, r in enumerate(crashes)]}
