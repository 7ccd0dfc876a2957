"""Fakes for the alert unit tests: a controllable clock/sleep and an HTTP session."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import aiohttp
import pytest


async def settle(turns: int = 30) -> None:
    """Let every ready task run (no real waiting)."""
    for _ in range(turns):
        await asyncio.sleep(0)


class FakeClock:
    """Wall clock plus an awaitable sleep that only ends when :meth:`advance` passes it."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.t = start
        self.sleeps: list[float] = []
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.t + delay, fut))
        await fut

    async def advance(self, seconds: float) -> None:
        self.t += seconds
        for item in list(self._sleepers):
            if item[0] <= self.t + 1e-9:
                self._sleepers.remove(item)
                if not item[1].done():
                    item[1].set_result(None)
        await settle()


class FakeResponse:
    def __init__(self, status: int) -> None:
        self.status = status

    async def text(self) -> str:
        return "" if self.status < 300 else f"error {self.status}"


class _PostCtx:
    def __init__(self, session: FakeSession, url: str, kwargs: dict[str, Any]) -> None:
        self._session, self._url, self._kwargs = session, url, kwargs

    async def __aenter__(self) -> FakeResponse:
        s = self._session
        outcome = s.script[self._url].popleft() if s.script[self._url] else s.default.get(self._url, 200)
        s.requests.append((self._url, self._kwargs, outcome))
        if isinstance(outcome, BaseException):
            raise outcome
        return FakeResponse(outcome)

    async def __aexit__(self, *exc: object) -> None:
        return None


class FakeSession:
    """Records every POST; per-URL scripted outcomes (status code or exception), default 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any], Any]] = []
        self.script: collections.defaultdict[str, collections.deque[Any]] = collections.defaultdict(collections.deque)
        self.default: dict[str, Any] = {}
        self.closed = False

    def post(self, url: str, **kwargs: Any) -> _PostCtx:
        return _PostCtx(self, url, kwargs)

    async def close(self) -> None:
        self.closed = True

    def delivered(self, url: str | None = None) -> list[dict[str, Any]]:
        """Alerts of every successful POST (to ``url`` if given), in order."""
        out = []
        for u, kw, outcome in self.requests:
            if (url is None or u == url) and isinstance(outcome, int) and outcome < 300:
                out.extend(kw["json"])
        return out


def conn_error() -> aiohttp.ClientConnectionError:
    return aiohttp.ClientConnectionError("connection refused")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def session() -> FakeSession:
    return FakeSession()


@pytest.fixture
def fakes():
    """Access to helpers without importing conftest."""
    return type("Fakes", (), {"settle": staticmethod(settle), "conn_error": staticmethod(conn_error)})
