"""A real Alertmanager (Debian ``prometheus-alertmanager``) on a loopback port, per test.

The process helper is shared with the end-to-end tests: ``tests/e2e/hostlib/promstack.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "e2e"))
from hostlib.promstack import AlertmanagerProcess


@pytest.fixture
def alertmanagers(tmp_path: Path) -> Iterator[list[AlertmanagerProcess]]:
    """Two started Alertmanagers (use ``[0]`` when one is enough); stopped after the test."""
    ams = [AlertmanagerProcess(tmp_path / f"am{i}") for i in range(2)]
    try:
        for am in ams:
            am.start()
        yield ams
    finally:
        for am in ams:
            am.stop()
