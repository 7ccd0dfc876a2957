"""Static checks of config/grafana/virtwatch-dashboard.json (every query runs against a real
Prometheus in tests/e2e/test_dashboard_e2e.py)."""

from __future__ import annotations

import json
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "config" / "grafana" / "virtwatch-dashboard.json"


def _panels(panels):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def test_structure_datasource_variable_and_layout() -> None:
    d = json.loads(DASHBOARD.read_text())
    assert d["schemaVersion"] >= 36 and d["uid"] == "virtwatch"
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "instance", "domain"]
    panels = list(_panels(d["panels"]))
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]

