"""Fakes for the alert unit tests: the shared fake clock (its sleep ends only when the test
advances it) and an HTTP session."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import aiohttp
import pytest

from virtwatch.policy.clock import FakeClock


async def settle(turns: int = 30) -> None:
    """Let every ready task run (no real waiting)."""
    for _ in range(turns):
        await asyncio.sleep(0)


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
    return FakeClock(settle=settle)


@pytest.fixture
def session() -> FakeSession:
    return FakeSession()


@pytest.fixture
def fakes():
    """Access to helpers without importing conftest."""
    return type("Fakes", (), {"settle": staticmethod(settle), "conn_error": staticmethod(conn_error)})
