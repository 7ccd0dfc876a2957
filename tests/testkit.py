"""Helpers shared by the test suites: wait for a condition, scrape a daemon, read a sample.

Importable as ``testkit`` from every test (pytest puts ``tests/``, the
directory of the root conftest, on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


async def until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
                interval: float = 0.01) -> float:
    """Wait until ``cond()`` is truthy, checking every ``interval`` seconds;
    returns the seconds it took. Raises AssertionError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not cond():
        if loop.time() - start > timeout:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(interval)
    return loop.time() - start


async def rendered(d: Any, timeout: float = 10.0) -> None:
    """Wait until an in-process daemon's cached ``/metrics`` state text is of its state now: a
    scrape answers the latest finished render, which an event starts (it is one render behind
    while that render runs)."""
    exp = d.exposition

    def done() -> bool:
        exp.prerender()  # as a scrape does: a change that no event or poll announced starts one too
        return exp.cached_key is not None and exp.cached_key == exp.current_key()

    await until(done, timeout, "the /metrics render of the current state")


async def scrape(d: Any, path: str = "/metrics") -> tuple[int, str]:
    """GET ``path`` from a running in-process :class:`~virtwatch.app.Daemon`; (status, body).

    ``/metrics`` is asked once the render of the daemon's state now has finished
    (:func:`rendered`): a scrape answers the latest finished render, so right after a change
    it may be one render behind, and the tests assert what the state is, not which render
    a scrape happened to meet (the lag itself is tested on the exposition)."""
    if path.split("?", 1)[0] == "/metrics" and d.exposition.cached_key is not None:
        await rendered(d)
    host, port = d.listen_address
    async with aiohttp.ClientSession() as s, s.get(f"http://{host}:{port}{path}") as r:
        return r.status, await r.text()


def sample(text: str, name: str, **labels: str) -> float | None:
    """Value of the first sample ``name`` in exposition ``text`` whose labels include ``labels``."""
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


class ReadyConnection:
    """Connection port for a :class:`~virtwatch.virt.stats.StatsPoller`: ``conn``
    (a test-driver connection), always ready."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.ready = asyncio.Event()
        self.ready.set()


class PollerRig:
    """What a :class:`~virtwatch.virt.stats.StatsPoller` test needs on the test driver:
    settings (``test:///default`` plus ``overrides``), a registry with the daemon's
    instruments, and a lane pool whose main connection is ``conn`` (ready).
    Call :meth:`close` after the test (it waits for idle lanes to close)."""

    def __init__(self, conn: Any, **overrides: Any) -> None:
        from prometheus_client import CollectorRegistry

        from virtwatch.config import load_settings
        from virtwatch.metrics.instruments import Instruments
        from virtwatch.virt.lanes import LanePool

        self.settings = load_settings(None, {"libvirt.uri": "test:///default", **overrides})
        self.registry = CollectorRegistry()
        self.instruments = Instruments(self.registry)
        self.lanes = LanePool(self.settings.libvirt, True, self.instruments, self.settings.stats.max_stuck_lanes)
        self.registry.register(self.lanes)
        self.lanes.connection_ready(conn)
        self.connection = ReadyConnection(conn)

    def value(self, name: str, **labels: str) -> float | None:
        """A sample of the rig's registry (None when absent)."""
        return self.registry.get_sample_value(name, labels)

    async def close(self) -> None:
        """Retire every lane and wait (bounded) for the idle ones to close."""
        await self.lanes.stop(timeout=5.0)


def labels_of(text: str, name: str, **labels: str) -> dict[str, str] | None:
    """All labels of the first sample ``name`` in exposition ``text`` whose labels include
    ``labels`` (e.g. the ``device`` of ``libvirt_domain_interface_info{target="vnet3"}``)."""
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return dict(s.labels)
    return None


# -- Grafana dashboards (config/grafana): shared by the unit, integration and e2e checks ----------

GRAFANA_DIR = Path(__file__).resolve().parents[1] / "config" / "grafana"
#: uid → file of every shipped dashboard.
DASHBOARDS = {"virtwatch": GRAFANA_DIR / "virtwatch-dashboard.json",
              "virtwatch-fleet": GRAFANA_DIR / "virtwatch-fleet.json"}
#: Series Prometheus itself makes: rule state and scrape health.
PROMETHEUS_SERIES = frozenset({"ALERTS", "ALERTS_FOR_STATE", "up"})
_PROMQL_WORDS = frozenset({"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                           "offset", "bool", "inf", "nan", "atan2"})


def load_dashboard(uid: str) -> dict[str, Any]:
    """The parsed dashboard JSON of ``uid`` (a key of :data:`DASHBOARDS`)."""
    doc: dict[str, Any] = json.loads(DASHBOARDS[uid].read_text())
    return doc


def dashboard_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every panel, the panels of collapsed rows included, in file order."""
    out: list[dict[str, Any]] = []
    for p in panels:
        out.append(p)
        out.extend(dashboard_panels(p.get("panels", [])))
    return out


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and every annotation query; ``where`` reads
    ``panel 'TITLE' target REFID`` or ``annotation 'NAME'``."""
    out = [(f"panel {p['title']!r} target {t['refId']}", t["expr"])
           for p in dashboard_panels(dashboard["panels"]) for t in p.get("targets", [])]
    out += [(f"annotation {a['name']!r}", a["expr"]) for a in dashboard["annotations"]["list"] if "expr" in a]
    return out


def grafana_regex(value: str) -> str:
    """A multi-value/All variable's value as Grafana puts it into a PromQL regex matcher
    (regex characters escaped with a backslash, itself escaped for the PromQL string)."""
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0), value)


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variable interpolation (``$name`` and ``${name}``); an unknown variable fails."""
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in variables, f"unknown variable ${name} in {expr}"
        return variables[name]

    out = re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)
    assert "$" not in out, out
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (string literals, label matchers, ranges,
    grouping clauses, function names, keywords and numbers are not names)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)      # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)                    # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                   # ranges and subqueries
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\boffset\s+\S+", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(\s*\()?", e):
        if m.group(2) is None and m.group(1) not in _PROMQL_WORDS:
            names.add(m.group(1))
    return names


def until_sync(cond: Callable[[], Any], timeout: float) -> Any:
    """``cond()``'s first truthy value within ``timeout`` seconds, polling every 50 ms from a
    blocking caller (a thread checking an HTTP API). Raises AssertionError after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < end, f"condition not met within {timeout} s"
        time.sleep(0.05)
