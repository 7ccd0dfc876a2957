"""Shared test fixtures: recorded real libvirt data and paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def recorded_domstats() -> dict:
    """One real ``getAllDomainStats(0, NOWAIT)`` over 25 guests (libvirt 9.0, QEMU 7.2)."""
    return json.loads((FIXTURES / "domstats-libvirt9-qemu7.2.json").read_text())


@pytest.fixture(scope="session")
def recorded_events() -> list[dict]:
    """Real lifecycle / I/O-error event sequences in arrival order."""
    return [json.loads(line) for line in (FIXTURES / "events-libvirt9-qemu7.2.jsonl").read_text().splitlines()
            if line.strip()]
