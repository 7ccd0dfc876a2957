"""Every alert has a runbook (docs/runbooks/<alertname>.md) and every runbook_url points at one.

Alert names come from the shipped Prometheus rule files and from the daemon's own source (every
string constant ``Virtwatch<Name>`` in daemon/virtwatch, which is where instant alerts are named),
so a new alert without a runbook fails here.
"""

from __future__ import annotations

import ast
import re
import time
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from virtwatch.alerts import rules as alert_rules
from virtwatch.alerts.alerter import Alerter
from virtwatch.alerts.client import AlertRecord, alert_payload
from virtwatch.alerts.config import DEFAULT_RUNBOOK_BASE_URL, AlertSettings
from virtwatch.model import Event
from virtwatch.policy import wiring

ROOT = Path(__file__).resolve().parents[3]
RUNBOOKS = ROOT / "docs" / "runbooks"
RULE_FILES = sorted({*(ROOT / "config" / "prometheus").glob("*rules*.yml"),
                     *(ROOT / "config" / "prometheus").glob("*alerts*.yml")})
SECTIONS = ("Meaning", "Impact", "Diagnosis", "Mitigation")
ODD = "odd name/ü"


def rule_alerts() -> dict[str, dict[str, str]]:
    """alertname -> annotations, from every shipped rule file."""
    out: dict[str, dict[str, str]] = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    out[rule["alert"]] = rule.get("annotations", {})
    return out


def daemon_alertnames() -> set[str]:
    """Every ``Virtwatch<Name>`` string constant in the daemon's source."""
    names = set()
    for path in (ROOT / "daemon" / "virtwatch").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.fullmatch(r"Virtwatch[A-Z][A-Za-z]+", node.value):
                names.add(node.value)
    return names


def runbook_for(url: str, base: str) -> Path:
    assert url.startswith(base + "/"), url
    name = url[len(base) + 1:]
    assert re.fullmatch(r"[A-Za-z]+\.md", name), url
    return RUNBOOKS / name


def test_the_name_scan_sees_every_instant_alert() -> None:
    names = daemon_alertnames()
    constants = {v for k, v in vars(alert_rules).items() if k.isupper() and isinstance(v, str)}
    assert constants <= names and len(constants) == 7
    assert {n for n, _ in wiring._ALERTS.values()} <= names
    assert len(rule_alerts()) == 24


def test_every_alert_has_a_runbook_with_the_four_sections() -> None:
    names = set(rule_alerts()) | daemon_alertnames()
    assert len(names) == 37
    for name in sorted(names):
        path = RUNBOOKS / f"{name}.md"
        assert path.is_file(), f"{name}: no {path.relative_to(ROOT)}"
        text = path.read_text()
        assert text.startswith(f"# {name}\n"), name
        headings = re.findall(r"^## (.+)$", text, re.M)
        assert headings == list(SECTIONS), (name, headings)
        for section, body in zip(SECTIONS, re.split(r"^## .+$", text, flags=re.M)[1:], strict=True):
            assert len(body.strip()) > 40, f"{name}: section {section} is empty"
        diagnosis = text.split("## Diagnosis", 1)[1].split("## Mitigation", 1)[0]
        assert "```sh" in diagnosis, f"{name}: no commands in Diagnosis"


def test_every_runbook_belongs_to_an_alert_and_is_in_the_index() -> None:
    names = set(rule_alerts()) | daemon_alertnames()
    pages = {p.stem for p in RUNBOOKS.glob("*.md")} - {"README"}
    assert pages == names, pages ^ names
    index = (RUNBOOKS / "README.md").read_text()
    assert set(re.findall(r"\]\(([A-Za-z]+)\.md\)", index)) == names


def test_relative_links_in_the_runbooks_resolve() -> None:
    for page in RUNBOOKS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_every_rule_links_its_own_runbook() -> None:
    for name, ann in rule_alerts().items():
        url = ann.get("runbook_url")
        assert url, f"{name} has no runbook_url"
        assert runbook_for(url, DEFAULT_RUNBOOK_BASE_URL) == RUNBOOKS / f"{name}.md"
        assert runbook_for(url, DEFAULT_RUNBOOK_BASE_URL).is_file()


def test_the_daemon_links_every_instant_alert_to_its_runbook() -> None:
    for base in (DEFAULT_RUNBOOK_BASE_URL, "https://wiki.example.org/ops/virtwatch/"):
        s = AlertSettings(instance="hv1", runbook_base_url=base)
        for name in sorted(daemon_alertnames()):
            al = Alerter(s, CollectorRegistry())
            al.fire(name, domain="web1", severity="critical", summary="s", description="d")
            [rec] = al.active.values()
            url = alert_payload(rec, time.time(), s)["annotations"]["runbook_url"]
            assert runbook_for(url, base.rstrip("/")) == RUNBOOKS / f"{name}.md"
            assert (RUNBOOKS / f"{name}.md").is_file()
    s = AlertSettings(instance="hv1", runbook_base_url="")
    al = Alerter(s, CollectorRegistry())
    al.connection_lost("qemu:///system")
    [rec] = al.active.values()
    assert "runbook_url" not in alert_payload(rec, time.time(), s)["annotations"]


def crash(name: str) -> Event:
    return Event(time=1_800_000_000.0, seq=7, source="domain", kind="lifecycle", name=name, uuid="u-1",
                 event="CRASHED", detail="PANICKED", payload={})


def test_an_odd_guest_name_gives_a_working_link_and_its_runbook() -> None:
    s = AlertSettings(instance="hv1", external_url="https://hv1.example.org:9177/")
    al = Alerter(s, CollectorRegistry())
    al.on_event(crash(ODD))
    al.given_up(ODD, "u-1", "5 failures in 10m")
    al.connection_lost("qemu:///system", "keepalive timeout")
    payloads = {(p["labels"]["alertname"], p["labels"].get("domain", "")): p
                for p in (alert_payload(r, 1_800_000_001.0, s) for r in al.active.values())}
    guest_url = "https://hv1.example.org:9177/api/v1/guests/odd%20name%2F%C3%BC"
    crashed = payloads[("VirtwatchGuestCrashed", ODD)]
    assert crashed["generatorURL"] == guest_url
    assert crashed["annotations"]["runbook_url"] == DEFAULT_RUNBOOK_BASE_URL + "/VirtwatchGuestCrashed.md"
    assert payloads[("VirtwatchGivenUp", ODD)]["generatorURL"] == guest_url
    assert payloads[("VirtwatchGivenUp", ODD)]["annotations"]["runbook_url"].endswith("/VirtwatchGivenUp.md")
    lost = payloads[("VirtwatchLibvirtConnectionLost", "")]
    assert lost["generatorURL"] == "https://hv1.example.org:9177/"  # host alert: the landing page
    assert lost["annotations"]["runbook_url"] == DEFAULT_RUNBOOK_BASE_URL + "/VirtwatchLibvirtConnectionLost.md"
    # The resolved state (what the Alerter queues on resolve) keeps both links.
    rec = al.active[("VirtwatchGuestCrashed", ODD)]
    resolved = alert_payload(AlertRecord(rec.labels, rec.annotations, rec.starts_at, 1_800_000_010.0),
                             1_800_000_011.0, s)
    assert resolved["generatorURL"] == guest_url
    assert resolved["annotations"]["runbook_url"] == crashed["annotations"]["runbook_url"]
