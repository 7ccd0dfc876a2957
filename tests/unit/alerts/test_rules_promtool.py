"""The shipped Prometheus rules and examples pass promtool / amtool (no skipping: the tools are in
.ci/apt-packages.txt)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
RULES = ROOT / "config" / "prometheus" / "virtwatch-alerts.yml"
PROM_EXAMPLE = ROOT / "config" / "prometheus" / "prometheus.example.yml"
AM_EXAMPLE = ROOT / "config" / "alertmanager" / "alertmanager.example.yml"
TESTS = sorted((ROOT / "tests" / "promtool").glob("*.test.yml"))


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    assert path, f"{name} not found: install the Debian package listed in .ci/apt-packages.txt"
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_promtool_check_rules():
    r = run(tool("promtool"), "check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 24 rules found" in r.stdout


def test_promtool_test_rules():
    assert len(TESTS) >= 2
    r = run(tool("promtool"), "test", "rules", *map(str, TESTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("SUCCESS") == len(TESTS)


def test_every_alert_has_for_severity_texts_and_a_firing_promtool_test():
    text = RULES.read_text()
    blocks = re.split(r"\n\s+- alert: ", text)[1:]
    names = []
    for b in blocks:
        name = b.split()[0]
        names.append(name)
        for key in ("for:", "severity: ", "summary:", "description:", "$labels.instance"):
            assert key in b, f"{name} lacks {key}"
        assert re.search(r"severity: (critical|warning)\n", b), name
    tested = "".join(p.read_text() for p in TESTS)
    for name in names:
        # At least one eval that expects it to fire (exp_alerts followed by an entry) and one silent.
        assert re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels", tested), f"{name} never fires"
        assert re.search(rf"alertname: {name}\n\s+exp_alerts: \[\]", tested), f"{name} never proven silent"
    assert len(names) == 24


def test_prometheus_example_config_is_valid_and_loads_the_rules():
    r = run(tool("promtool"), "check", "config", str(PROM_EXAMPLE))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "virtwatch-alerts.yml" in r.stdout and "SUCCESS: 24 rules found" in r.stdout


def test_alertmanager_example_config_is_valid():
    r = run(tool("amtool"), "check-config", str(AM_EXAMPLE))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_alertmanager_example_routes_by_severity():
    for labels, receiver in [(["severity=critical", "alertname=VirtwatchGuestCrashed"], "page"),
                             (["severity=warning", "alertname=LibvirtGuestPausedLong"], "ticket"),
                             (["alertname=Other"], "ticket")]:
        r = run(tool("amtool"), "config", "routes", "test", f"--config.file={AM_EXAMPLE}",
                f"--verify.receivers={receiver}", *labels)
        assert r.returncode == 0, (labels, r.stdout + r.stderr)
        assert r.stdout.strip() == receiver
