"""``virtwatch run`` as systemd runs it: notify socket, SIGHUP reload, SIGTERM.

The daemon runs as a real subprocess on the test driver with NOTIFY_SOCKET
pointing at a real AF_UNIX datagram socket owned by the test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Notify:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self.seen: list[str] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 20.0) -> dict[str, str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for m in self.messages:
                if key in m and (value is None or m[key] == value):
                    self.messages.remove(m)
                    return m
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.splitlines() if "=" in line))
            self.seen.append(f"{time.monotonic():.3f} {data}")
        raise AssertionError(f"no {key}={value} notification; got {self.seen}")


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


@pytest.fixture
def service(tmp_path: Path):
    notify = Notify(tmp_path / "notify.sock")
    port = free_port()
    cfg = tmp_path / "virtwatch.toml"
    cfg.write_text(f'[libvirt]\nuri = "test:///default"\n[http]\nlisten = "127.0.0.1:{port}"\n'
                   '[stats]\npoll_interval = 1.0\n')
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    log = open(tmp_path / "out.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "virtwatch", "run", "--config", str(cfg)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    yield proc, notify, cfg, port, tmp_path / "out.log"
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def test_ready_reload_and_stop(service) -> None:
    proc, notify, cfg, port, log_path = service
    ready = notify.wait_for("READY", "1")
    assert "STATUS" in ready
    assert get(port, "/healthz")[0] == 200  # READY=1 comes after the listener is bound

    # a broken file is rejected: the running configuration stays
    good = cfg.read_text()
    cfg.write_text(good.replace("poll_interval = 1.0", "poll_intervall = 3"))
    proc.send_signal(signal.SIGHUP)
    notify.wait_for("RELOADING", "1")
    notify.wait_for("READY", "1")
    assert get(port, "/healthz")[0] == 200
    status = json.loads(get(port, "/api/v1/status")[1])
    assert status["uri"] == "test:///default"

    # a valid change is applied: the daemon now listens on the new port
    new_port = free_port()
    cfg.write_text(good.replace(f"127.0.0.1:{port}", f"127.0.0.1:{new_port}"))
    proc.send_signal(signal.SIGHUP)
    notify.wait_for("RELOADING", "1")
    notify.wait_for("READY", "1")
    assert get(new_port, "/readyz")[0] in (200, 503)
    assert get(port, "/healthz")[0] == 0

    proc.send_signal(signal.SIGTERM)
    notify.wait_for("STOPPING", "1")
    assert proc.wait(30) == 0
    out = log_path.read_text()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    rejected = [entry for entry in lines if entry.get("event") == "reload_rejected"]
    assert rejected and any("stats.poll_intervall: unknown key" in e for e in rejected[0]["errors"])
    assert any(entry.get("event") == "reloaded" for entry in lines)
    assert "Traceback" not in out and "Event loop is closed" not in out
