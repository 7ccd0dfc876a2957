"""A real Alertmanager (Debian ``prometheus-alertmanager``) on a loopback port, per test."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

AM_CONFIG = """\
route:
  receiver: blackhole
  group_wait: 1s
receivers:
  - name: blackhole
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alertmanager_binary() -> str:
    path = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    assert path, "prometheus-alertmanager not installed (it is listed in .ci/apt-packages.txt)"
    return path


class AlertmanagerProcess:
    """One Alertmanager with clustering disabled; can be stopped and started again on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "alertmanager.yml").write_text(AM_CONFIG)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        """Start and wait until ``/-/ready`` answers."""
        log = open(self.dir / "alertmanager.log", "ab")
        self.proc = subprocess.Popen(
            [alertmanager_binary(), f"--config.file={self.dir / 'alertmanager.yml'}",
             f"--storage.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--cluster.listen-address=", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.dir / "alertmanager.log").read_text()
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"alertmanager on {self.url} not ready: " + (self.dir / "alertmanager.log").read_text())

    def stop(self) -> None:
        """Terminate (and reap) the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


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
