"""config/fleet/: the HA pair's Prometheus configs and the fleet rules pass promtool, the pair
differs only in its replica, and every sender lists every Alertmanager of the cluster."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
FLEET = ROOT / "config" / "fleet"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path, "promtool not found: install the Debian package listed in .ci/apt-packages.txt"
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_the_pair_and_its_rules_pass_promtool() -> None:
    for name in ("prometheus-a.yml", "prometheus-b.yml"):
        r = promtool("check", "config", str(FLEET / name))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "SUCCESS: 2 rule files found" in r.stdout
    r = promtool("check", "rules", str(FLEET / "fleet-rules.yml"))
    assert r.returncode == 0 and "SUCCESS: 4 rules found" in r.stdout, r.stdout + r.stderr
    r = promtool("test", "rules", str(ROOT / "tests" / "promtool" / "fleet.test.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_replicas_differ_only_in_replica_and_agree_on_what_matters() -> None:
    a, b = (yaml.safe_load((FLEET / n).read_text()) for n in ("prometheus-a.yml", "prometheus-b.yml"))
    assert a["global"]["external_labels"] == {"cluster": "fleet1", "replica": "a"}
    assert b["global"]["external_labels"] == {"cluster": "fleet1", "replica": "b"}
    b["global"]["external_labels"]["replica"] = "a"
    assert a == b
    # alerts lose `replica` so Alertmanager sees the pair's alerts as one; all three peers listed
    assert a["alerting"]["alert_relabel_configs"] == [{"action": "labeldrop", "regex": "replica"}]
    (am,) = a["alerting"]["alertmanagers"]
    assert am["static_configs"][0]["targets"] == [f"am{i}.example.org:9093" for i in (1, 2, 3)]
    assert a["scrape_configs"][0]["file_sd_configs"][0]["files"] == ["targets/*.yml"]
    assert a["remote_write"][0]["url"].endswith("/api/v1/write")


def test_targets_carry_a_site_and_the_store_drops_replica_and_deduplicates() -> None:
    for path in (FLEET / "targets").glob("*.yml"):
        for group in yaml.safe_load(path.read_text()):
            assert group["labels"]["site"] and all(t.endswith(":9177") for t in group["targets"])
            assert not {"instance", "job"} & group["labels"].keys()
    assert yaml.safe_load((FLEET / "victoria-metrics-relabel.yml").read_text()) == [
        {"action": "labeldrop", "regex": "replica"}]
    args = (FLEET / "victoria-metrics.default").read_text()
    assert "-dedup.minScrapeInterval=15s" in args and "-relabelConfig=" in args


def test_each_alertmanager_gossips_with_the_two_others() -> None:
    text = (FLEET / "alertmanager-cluster.default").read_text()
    (args,) = re.findall(r'^ARGS="(.*)"$', text, re.M)
    assert "--cluster.listen-address=0.0.0.0:9094" in args
    assert re.findall(r"--cluster\.peer=(\S+)", args) == ["am2.example.org:9094", "am3.example.org:9094"]
