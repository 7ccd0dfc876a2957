"""The shipped systemd units, sysusers.d and tmpfiles.d files, checked by systemd's own tools.

``systemd-analyze verify`` refuses a unit whose ExecStart= binary does not
exist, and /usr/local/bin/virtwatch is not installed in the test
environment. So the units are verified as temporary copies whose
/usr/local/bin/virtwatch is rewritten to a stub executable; nothing else
in them changes.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
UNITS = REPO / "systemd"
MAIN = "virtwatch.service"
SAVE = "virtwatch-guests-save.service"
SOCKET = "virtwatch.socket"
INSTALLED_BINARY = "/usr/local/bin/virtwatch"

# Overall exposure x10 (systemd-analyze's --threshold scale is 0..100).
MAIN_THRESHOLD = 20  # "OK" band; the unit scores 1.3
SAVE_THRESHOLD = 15  # the unit scores 0.6

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="needs systemd-analyze (Debian: systemd)")


def _env() -> dict[str, str]:
    # Plain, non-colour, non-paged output at the default log level.
    return {**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """Copies of the units with the virtwatch binary pointing at a stub."""
    stub = tmp_path / "bin" / "virtwatch"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    out = tmp_path / "units"
    out.mkdir()
    for name in (MAIN, SAVE):
        text = (UNITS / name).read_text()
        assert INSTALLED_BINARY in text
        (out / name).write_text(text.replace(INSTALLED_BINARY, str(stub)))
    shutil.copy(UNITS / SOCKET, out / SOCKET)
    return out


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, env=_env(), timeout=120, cwd="/"
    )


def _problems(output: str, names: tuple[str, ...]) -> list[str]:
    """Lines of verify output about our units (warnings do not change the exit code)."""
    return [line for line in output.splitlines() if any(n in line for n in names)]


def test_verify_passes(unit_dir: Path) -> None:
    r = analyze("verify", "--man=no", "--recursive-errors=no", str(unit_dir / MAIN), str(unit_dir / SAVE),
                str(unit_dir / SOCKET))
    assert r.returncode == 0, r.stderr
    assert _problems(r.stdout + r.stderr, (MAIN, SAVE, SOCKET)) == []


def test_verify_harness_catches_a_broken_unit(unit_dir: Path) -> None:
    # Guards the test above: a typo'd key must show up as a problem.
    broken = unit_dir / MAIN
    broken.write_text(broken.read_text().replace("[Service]\n", "[Service]\nProtectSystm=strict\n", 1))
    r = analyze("verify", "--man=no", "--recursive-errors=no", str(broken))
    problems = _problems(r.stdout + r.stderr, (MAIN,))
    assert any("Unknown key 'ProtectSystm'" in line for line in problems), r.stderr


def test_verify_without_stub_reports_missing_binary() -> None:
    # Documents why the stub is needed (and that verify checks ExecStart=).
    r = analyze("verify", "--man=no", "--recursive-errors=no", str(UNITS / MAIN))
    if Path(INSTALLED_BINARY).exists():
        pytest.skip("virtwatch is installed on this machine")
    assert r.returncode != 0
    assert f"Command {INSTALLED_BINARY} is not executable" in r.stderr


@pytest.mark.parametrize(("name", "threshold"), [(MAIN, MAIN_THRESHOLD), (SAVE, SAVE_THRESHOLD)])
def test_security_exposure_below_threshold(unit_dir: Path, name: str, threshold: int) -> None:
    r = analyze("security", "--offline=yes", f"--threshold={threshold}", "--no-pager", str(unit_dir / name))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", r.stdout)
    assert m, r.stdout[-500:]
    assert float(m.group(1)) * 10 <= threshold
    assert m.group(2) in ("SAFE", "OK")


def _unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((UNITS / name).read_text())
    return cp


def test_main_unit_contract() -> None:
    s = _unit(MAIN)["Service"]
    assert s["Type"] == "notify"
    assert s["NotifyAccess"] == "main"
    assert s["ExecStart"] == "/usr/local/bin/virtwatch run --config /etc/virtwatch/virtwatch.toml"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert (s["WatchdogSec"], s["Restart"], s["RestartSec"], s["TimeoutStopSec"]) == ("30", "on-failure", "5", "30")
    assert (s["User"], s["Group"]) == ("virtwatch", "virtwatch")
    # least privilege (issue 13): monitoring uses libvirt's read-only socket, no libvirt group
    assert "SupplementaryGroups" not in s and "SupplementaryGroups" not in _unit(SAVE)["Service"]
    assert s["CapabilityBoundingSet"] == "" and s["AmbientCapabilities"] == ""
    assert s["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    # /run/virtwatch belongs to virtwatch.socket: a RuntimeDirectory= would delete it on every stop
    assert "RuntimeDirectory" not in s
    u = _unit(MAIN)["Unit"]
    # configparser keeps the last of repeated keys; check the raw text for all After= lines.
    text = (UNITS / MAIN).read_text()
    after = " ".join(re.findall(r"^After=(.*)$", text, re.M)).split()
    assert {"libvirtd.service", "virtqemud.service", "network-online.target"} <= set(after)
    assert u["Wants"] == "network-online.target"


def test_socket_unit_is_root_virtwatch_0660_at_the_configured_path() -> None:
    from virtwatch.config import Settings

    text = (UNITS / MAIN).read_text()
    assert re.search(r"^Requires=virtwatch\.socket$", text, re.M)
    assert re.search(r"^After=virtwatch\.socket$", text, re.M)
    sock = _unit(SOCKET)["Socket"]
    assert (sock["SocketUser"], sock["SocketGroup"], sock["SocketMode"]) == ("root", "virtwatch", "0660")
    assert sock["FileDescriptorName"] == "control"  # what `virtwatch run` looks for in LISTEN_FDNAMES
    assert sock["ListenStream"] == Settings().daemon.socket  # where the CLI connects by default
    assert sock["Service"] == MAIN


def test_guests_save_unit_stops_before_libvirt() -> None:
    text = (UNITS / SAVE).read_text()
    s = _unit(SAVE)["Service"]
    assert (s["Type"], s["RemainAfterExit"]) == ("oneshot", "yes")
    assert s["ExecStop"].startswith("/usr/local/bin/virtwatch guests-save")
    after = " ".join(re.findall(r"^After=(.*)$", text, re.M)).split()
    # Stop order is the reverse of start order: After= libvirt => stopped first.
    assert {"libvirtd.service", "virtqemud.service", "virt-guest-shutdown.target"} <= set(after)
    assert re.search(r"^Before=virtwatch\.service$", text, re.M)


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="needs systemd-sysusers")
def test_sysusers_and_tmpfiles_into_a_scratch_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    r = subprocess.run(
        ["systemd-sysusers", f"--root={root}", str(UNITS / "sysusers.d" / "virtwatch.conf")],
        capture_output=True, text=True, env=_env(), timeout=60,
    )
    assert r.returncode == 0, r.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    group = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    user = passwd["virtwatch"]
    assert user[5] == "/var/lib/virtwatch"
    assert user[6].endswith("nologin")
    assert int(user[2]) < 1000  # a system user
    assert "libvirt" not in group  # not made, and virtwatch is in no other group (issue 13: least privilege)
    assert [g for g, fields in group.items() if "virtwatch" in fields[3].split(",")] == []
    assert user[3] == group["virtwatch"][2]

    r = subprocess.run(
        ["systemd-tmpfiles", f"--root={root}", "--create", str(UNITS / "tmpfiles.d" / "virtwatch.conf")],
        capture_output=True, text=True, env=_env(), timeout=60,
    )
    assert r.returncode == 0, r.stderr
    state = (root / "var/lib/virtwatch").stat()
    etc = (root / "etc/virtwatch").stat()
    assert (state.st_mode & 0o777, state.st_uid, state.st_gid) == (0o750, int(user[2]), int(user[3]))
    assert (etc.st_mode & 0o777, etc.st_uid, etc.st_gid) == (0o750, 0, int(user[3]))
