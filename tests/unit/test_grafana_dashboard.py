"""Static checks of the Grafana dashboards in config/grafana: the host dashboard
(``virtwatch-dashboard.json``, uid ``virtwatch``) and the fleet dashboard
(``virtwatch-fleet.json``, uid ``virtwatch-fleet``).

Every query is parsed by the real ``promtool``; every metric it names is exported by a
real daemon (tests/integration/test_dashboard_metrics.py); every query returns data from a
real Prometheus (tests/e2e/test_dashboard_e2e.py). No Grafana server can be installed
from this project's package sources (Debian has none), so the dashboard model is checked
here against what Grafana needs: a datasource variable on every panel and target, unique
ids, panels that fit the 24-column grid without overlapping, and links that name an
existing dashboard and its variables.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from testkit import DASHBOARDS, dashboard_panels, dashboard_queries, load_dashboard, metric_names, substitute

VARIABLES = {"virtwatch": ["datasource", "instance", "domain"], "virtwatch-fleet": ["datasource", "instance"]}
#: Grafana's own variables the queries may use, with values like the ones Grafana puts in.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "3h"}
DS = {"type": "prometheus", "uid": "${datasource}"}


def links(d: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, url) of the dashboard links and every panel's field data links."""
    out = [("dashboard link", str(link["url"])) for link in d.get("links", [])]
    for p in dashboard_panels(d["panels"]):
        for link in p.get("fieldConfig", {}).get("defaults", {}).get("links", []):
            out.append((f"panel {p['title']!r}", str(link["url"])))
    return out


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_structure_datasource_variable_and_layout(uid: str) -> None:
    d = load_dashboard(uid)
    assert d["schemaVersion"] >= 36 and d["uid"] == uid
    tvars = d["templating"]["list"]
    assert [v["name"] for v in tvars] == VARIABLES[uid]
    assert tvars[0]["type"] == "datasource" and tvars[0]["query"] == "prometheus"
    for v in tvars[1:]:
        assert v["datasource"] == DS, v["name"]
    panels = dashboard_panels(d["panels"])
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == DS, p["title"]
        assert p["targets"], p["title"]
        assert p.get("description"), f"{p['title']}: say what the panel shows and from which metric"
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS, p["title"]
    for a in d["annotations"]["list"]:
        if "expr" in a:
            assert a["datasource"] == DS, a["name"]


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_queries_use_only_known_variables_and_parse_with_promtool(uid: str, tmp_path: Path) -> None:
    d = load_dashboard(uid)
    values = {name: ".+" for name in VARIABLES[uid]} | BUILTINS
    queries = dashboard_queries(d)
    rules = [{"record": f"dashboard:query{i}", "expr": substitute(expr, values)} for i, (_w, expr) in
             enumerate(queries)]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": uid, "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(queries)} rules found" in r.stdout


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_links_name_a_shipped_dashboard_and_its_variables(uid: str) -> None:
    found = links(load_dashboard(uid))
    assert found
    for where, url in found:
        if url.startswith("https://"):
            assert re.fullmatch(r"https://virtwatch\.dev/docs/runbooks/\$\{__data\.fields\.alertname\}\.md", url), url
            continue
        m = re.match(r"/d/([\w-]+)/[\w-]+\?", url)
        assert m, f"{where}: {url}"
        target = m.group(1)
        assert target in DASHBOARDS, f"{where}: no dashboard {target}"
        names = re.findall(r"[?&]var-(\w+)=", url)
        assert set(names) <= set(VARIABLES[target]), f"{where}: {url}"
        assert "${datasource:queryparam}" in url, f"{where}: keep the datasource"
        for ref in re.findall(r"\$\{__(?:data\.fields|field\.labels)\.(\w+)\}", url):
            assert ref in ("instance", "domain"), f"{where}: {url}"


def test_metric_names_of_a_query() -> None:
    assert metric_names('rate(libvirt_domain_cpu_time_seconds_total{instance=~"$instance",domain=~"a|b"}'
                        '[$__rate_interval])') == {"libvirt_domain_cpu_time_seconds_total"}
    assert metric_names('sum by (instance) (libvirt_domains{state="running"}) / on (instance) libvirt_node_cpus'
                        ' and on (instance, domain) (x_y:z != 5) or vector(0)') == \
        {"libvirt_domains", "libvirt_node_cpus", "x_y:z"}
    assert metric_names("topk(5, avg by (instance, domain) (rate(a_total[5m] offset 1h))) > 0.5e3") == {"a_total"}
    assert metric_names('ALERTS{alertstate="firing"} unless count without (le) (h_bucket)') == {"ALERTS", "h_bucket"}


def _has(d: dict[str, Any], metric: str, fn: str = "") -> list[str]:
    """Titles of the panels with a query naming ``metric`` (and using ``fn(`` when given)."""
    return [p["title"] for p in dashboard_panels(d["panels"]) for t in p.get("targets", [])
            if metric in metric_names(t["expr"]) and (not fn or f"{fn}(" in t["expr"])]


def test_host_dashboard_has_the_panels_of_issue_14() -> None:
    d = load_dashboard("virtwatch")
    assert _has(d, "libvirt_domain_vcpu_delay_seconds_total")                    # vCPU steal
    for m in ("block_read_requests_total", "block_write_requests_total",        # IOPS and latency
              "block_read_time_seconds_total", "block_write_time_seconds_total",
              "interface_receive_errors_total", "interface_transmit_errors_total",  # NIC errors, drops
              "interface_receive_drops_total", "interface_transmit_drops_total"):
        assert _has(d, f"libvirt_domain_{m}"), m
    assert len({t for m in ("libvirt_domain_cpu_time_seconds_total", "libvirt_domain_memory_rss_bytes",
                            "libvirt_domain_block_read_requests_total", "libvirt_domain_vcpu_delay_seconds_total",
                            "libvirt_domain_interface_receive_bytes_total") for t in _has(d, m, "topk")}) == 5
    assert set(_has(d, "libvirt_node_cpus")) & set(_has(d, "libvirt_domain_vcpu_current"))       # overcommit
    assert set(_has(d, "libvirt_node_memory_bytes")) & set(_has(d, "libvirt_domain_memory_maximum_bytes"))
    alerts = _has(d, "ALERTS")
    assert alerts
    by_title = {p["title"]: p for p in dashboard_panels(d["panels"])}
    urls = [link["url"] for link in by_title[alerts[0]]["fieldConfig"]["defaults"]["links"]]
    assert any("var-domain=${__data.fields.domain}" in u and u.startswith("/d/virtwatch/") for u in urls), urls


def test_fleet_dashboard_has_the_panels_of_issue_14() -> None:
    d = load_dashboard("virtwatch-fleet")
    assert _has(d, "libvirt_domains", "sort_desc")                                # hosts by guest count
    assert set(_has(d, "libvirt_node_cpus")) & set(_has(d, "libvirt_domain_vcpu_current"))
    assert set(_has(d, "libvirt_node_memory_bytes")) & set(_has(d, "libvirt_domain_memory_maximum_bytes"))
    assert _has(d, "libvirt_events_total") and _has(d, "libvirt_domain_restarts_total")  # crashes, restarts
    assert _has(d, "libvirt_domain_stats_stale") and _has(d, "virtwatch_policy_given_up")
    assert _has(d, "ALERTS")
    hosts = next(p for p in dashboard_panels(d["panels"]) if p["title"] == "Hosts")
    assert any(link["url"].startswith("/d/virtwatch/virtwatch?") and "var-instance=${__data.fields.instance}"
               in link["url"] for link in hosts["fieldConfig"]["defaults"]["links"])
