"""Least privilege (issue 13, item 2): when libvirtd refuses the read-write connection that
policy actions and console capture need, the daemon monitors read-only, says once per feature
what cannot work and what to grant, and opens no read-write side connection.

The refusal comes through the daemon's connection port (``opener``): the read-write open
fails with the error Debian's libvirtd gives a user polkit does not allow
(VIR_ERR_AUTH_UNAVAILABLE), the read-only open reaches the real test driver.
(tests/e2e/test_package.py proves the same against a real libvirtd under systemd.)
"""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path
from typing import Any

import libvirt
import pytest
from structlog.testing import capture_logs

from virtwatch.app import Daemon
from virtwatch.config import load_settings
from virtwatch.virt.aio import ThreadSafeAsyncIOImpl
from virtwatch.virt.connection import is_access_denied

TEST_URI = "test:///default"
POLKIT_NO = ("authentication unavailable: no polkit agent available to authenticate action "
             "'org.libvirt.unix.manage'")


def refusal(code: int, message: str) -> libvirt.libvirtError:
    """A libvirtError as libvirt's client raises it (code, domain, message, level...)."""
    err = libvirt.libvirtError(message)
    err.err = (code, libvirt.VIR_FROM_RPC, message, libvirt.VIR_ERR_ERROR, None, None, None, -1, -1)
    return err


class DenyingOpener:
    """libvirtd as the unprivileged virtwatch user sees it: read-only yes, read-write no."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def __call__(self, uri: str, read_only: bool) -> Any:
        self.calls.append(read_only)
        if not read_only:
            raise refusal(libvirt.VIR_ERR_AUTH_UNAVAILABLE, POLKIT_NO)
        return libvirt.openReadOnly(uri)


def test_access_denied_is_told_apart_from_unreachable() -> None:
    assert is_access_denied(refusal(libvirt.VIR_ERR_AUTH_UNAVAILABLE, POLKIT_NO))
    assert is_access_denied(refusal(libvirt.VIR_ERR_AUTH_FAILED, "authentication failed: access denied"))
    assert is_access_denied(refusal(libvirt.VIR_ERR_SYSTEM_ERROR,
                                    "Failed to connect socket to '/run/libvirt/libvirt-sock': Permission denied"))
    # libvirtd down is not a refusal: the manager keeps retrying read-write
    assert not is_access_denied(refusal(libvirt.VIR_ERR_SYSTEM_ERROR, "Failed to connect socket to "
                                        "'/run/libvirt/libvirt-sock': No such file or directory"))


async def test_policy_and_console_degrade_monitoring_goes_on(event_impl: ThreadSafeAsyncIOImpl,
                                                            tmp_path: Path) -> None:
    settings = load_settings(None, {"libvirt.uri": TEST_URI, "http.listen": "127.0.0.1:0",
                                    "stats.poll_interval": 0.3, "log.events": False, "policy.enabled": True,
                                    "console.guests": ["*"], "daemon.state_dir": str(tmp_path),
                                    "daemon.socket": str(tmp_path / "ctl.sock")})
    opener = DenyingOpener()
    with capture_logs() as logs:
        d = Daemon(settings, event_impl, opener=opener)
        await d.start()
        try:
            await asyncio.wait_for(d.connection.ready.wait(), 10)
            while d.poller.latest is None:
                await asyncio.sleep(0.1)
            host, port = d.listen_address or ("", 0)
            body = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode())
            status = d.status()
            # a reconnect tries read-write again (a grant takes effect without a config change) ...
            await d.connection.reconnect()
            while opener.calls.count(False) < 2 or not d.connection.ready.is_set():
                await asyncio.sleep(0.1)
        finally:
            await d.stop()
    assert opener.calls[:2] == [False, True]  # read-write refused, then read-only
    assert "libvirt_up 1.0" in body
    assert "libvirt_domain_cpu_time_seconds_total{domain=\"test\"}" in body  # the test driver's guest, monitored
    assert status["read_only"] is True and POLKIT_NO in status["write_denied"]
    # ... and the read-write side connection of the policy engine is never opened
    assert d.policy_side is not None and d.policy_side.opens == 0
    assert not d.console.wants("test") and d.console.attached() == []  # no console open tried on read-only
    unavailable = [e for e in logs if e["event"] == "feature_unavailable"]
    assert [e["feature"].split(" ")[0] for e in unavailable] == ["policy", "console", "guest"]  # once, not per connect
    for e in unavailable:
        assert e["log_level"] == "warning"
        assert POLKIT_NO in e["reason"] and "monitoring goes on read-only" in e["reason"]
        assert "usermod -aG libvirt virtwatch" in e["what_to_do"]
        assert "/etc/polkit-1/rules.d/" in e["what_to_do"]
    assert not [e for e in logs if e["event"] == "libvirt_side_connect_failed"]


def test_check_config_says_what_to_grant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from virtwatch.cli import main

    cfg = tmp_path / "virtwatch.toml"
    cfg.write_text("[policy]\nenabled = true\n")
    assert main(["check-config", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "note: read-write libvirt access is needed by policy actions ([policy] enabled = true)" in err
    assert "usermod -aG libvirt virtwatch" in err and "50-virtwatch-libvirt.rules" in err
    cfg.write_text("")  # monitoring only: nothing to grant
    assert main(["check-config", str(cfg)]) == 0
    assert "read-write" not in capsys.readouterr().err
