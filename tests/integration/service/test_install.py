"""`make install` (mk/install.mk) staged into a DESTDIR: never touches the real system.

Needs make and PyPI access for pip's isolated build backend (setuptools);
dependencies are not installed (--no-deps) to keep it fast.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def make(destdir: Path, *targets: str, **variables: str) -> subprocess.CompletedProcess[str]:
    args = ["make", "--no-print-directory", "-f", str(REPO / "mk" / "install.mk"), *targets, f"DESTDIR={destdir}"]
    args += [f"{k}={v}" for k, v in variables.items()]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=REPO,
                       env={**os.environ, "PIP_NO_INPUT": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_install_into_destdir_is_complete_and_idempotent(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    py = {"INSTALL_PYTHON": sys.executable, "INSTALL_PIP_FLAGS": "--no-deps"}
    build_dir_existed = (REPO / "build").exists()
    first = make(dest, "install", **py)
    assert "not creating the virtwatch user" in first.stdout

    # The venv and its console script.
    script = dest / "opt/virtwatch/bin/virtwatch"
    assert script.is_file() and os.access(script, os.X_OK)
    assert "from virtwatch.cli import main" in script.read_text()
    site = list((dest / "opt/virtwatch/lib").glob("python3.*/site-packages/virtwatch/systemd.py"))
    assert len(site) == 1  # a real (non-editable) install of this tree
    # The symlink names the final location, not the staging one.
    link = dest / "usr/local/bin/virtwatch"
    assert link.is_symlink() and os.readlink(link) == "/opt/virtwatch/bin/virtwatch"

    # Units, sysusers.d, tmpfiles.d, docs.
    for unit in ("virtwatch.service", "virtwatch.socket", "virtwatch-guests-save.service"):
        installed = dest / "etc/systemd/system" / unit
        assert installed.read_text() == (REPO / "systemd" / unit).read_text()
        assert installed.stat().st_mode & 0o777 == 0o644
    for conf in ("sysusers.d/virtwatch.conf", "tmpfiles.d/virtwatch.conf"):
        assert (dest / "etc" / conf).read_text() == (REPO / "systemd" / conf).read_text()
    assert (dest / "usr/local/share/doc/virtwatch/web-config.example.yml").is_file()

    # Config seeded from the example; state directory made.
    conf = dest / "etc/virtwatch/virtwatch.toml"
    assert conf.read_text() == (REPO / "config/virtwatch.example.toml").read_text()
    assert conf.stat().st_mode & 0o777 == 0o640
    assert (dest / "etc/virtwatch").stat().st_mode & 0o777 == 0o750
    assert (dest / "var/lib/virtwatch").is_dir()
    assert (REPO / "build").exists() == build_dir_existed  # pip built from a scratch copy

    # Second run: an upgrade. The operator's config survives; nothing fails.
    conf.write_text("# edited by the operator\n")
    second = make(dest, "install", **py)
    assert "keeping existing" in second.stdout
    assert conf.read_text() == "# edited by the operator\n"
    assert os.readlink(link) == "/opt/virtwatch/bin/virtwatch"


def test_bindir_is_rewritten_into_units(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    make(dest, "install-files", BINDIR="/usr/bin")
    text = (dest / "etc/systemd/system/virtwatch.service").read_text()
    assert "ExecStart=/usr/bin/virtwatch run --config /etc/virtwatch/virtwatch.toml" in text
    assert "/usr/local/bin" not in text
    save = (dest / "etc/systemd/system/virtwatch-guests-save.service").read_text()
    assert "ExecStop=/usr/bin/virtwatch guests-save" in save


def test_runbooks_are_installed_and_the_rules_get_the_operators_runbook_base(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    make(dest, "install-files")
    shipped = sorted(p.name for p in (REPO / "docs" / "runbooks").glob("*.md"))
    assert sorted(p.name for p in (dest / "usr/local/share/doc/virtwatch/runbooks").iterdir()) == shipped

    r = make(dest, "install-prometheus-rules", RUNBOOK_BASE_URL="https://wiki.example.org/ops/runbooks/")
    rules = dest / "etc/prometheus/virtwatch-alerts.yml"
    assert "promtool check rules" in r.stdout
    text = rules.read_text()
    urls = re.findall(r'runbook_url: "([^"]+)"', text)
    assert len(urls) == 24 and "virtwatch.dev/docs/runbooks/" not in text
    for url in urls:
        assert url.startswith("https://wiki.example.org/ops/runbooks/"), url
        assert url.rsplit("/", 1)[1] in shipped
    # Only the runbook base changed.
    shipped_rules = (REPO / "config/prometheus/virtwatch-alerts.yml").read_text()
    assert text == shipped_rules.replace("https://virtwatch.dev/docs/runbooks/", "https://wiki.example.org/ops/runbooks/")
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0 and "SUCCESS: 24 rules found" in check.stdout, check.stdout + check.stderr

    bad = subprocess.run(["make", "--no-print-directory", "-f", str(REPO / "mk" / "install.mk"),
                          "install-prometheus-rules", f"DESTDIR={dest}", "RUNBOOK_BASE_URL=wiki/runbooks"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode != 0 and "RUNBOOK_BASE_URL must be an http" in bad.stderr
