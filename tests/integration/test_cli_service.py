"""``virtwatch run`` as systemd runs it: notify socket, SIGHUP reload, SIGTERM.

The daemon runs as a real subprocess on the test driver with NOTIFY_SOCKET
pointing at a real AF_UNIX datagram socket owned by the test.
"""

from __future__ import annotations

import json
import os
import shutil
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
            except TimeoutError:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.splitlines() if "=" in line))
            self.seen.append(f"{time.monotonic():.3f} {data}")
        raise AssertionError(f"no {key}={value} notification; got {self.seen}")

    def close(self) -> None:
        self.sock.close()


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
    log = open(tmp_path / "out.log", "wb")  # noqa: SIM115 -- the child's log; closed after it ends
    proc = subprocess.Popen([sys.executable, "-m", "virtwatch", "run", "--config", str(cfg)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    yield proc, notify, cfg, port, tmp_path / "out.log"
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()
    notify.close()


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


def virtwatch_cli(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "virtwatch", *args, "--socket", str(sock)],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="needs systemd-socket-activate (Debian: systemd)")
def test_operator_socket_from_socket_activation(tmp_path: Path) -> None:
    # What virtwatch.socket does in production: systemd binds the socket (root:virtwatch 0660),
    # the daemon only serves it. systemd-socket-activate passes it the same way
    # (LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES=control, fd 3).
    notify = Notify(tmp_path / "notify.sock")
    sock = tmp_path / "ctl.sock"
    cfg = tmp_path / "virtwatch.toml"
    port = free_port()
    # daemon.socket names the same path, as the README asks (else a warning is logged)
    cfg.write_text(f'[libvirt]\nuri = "test:///default"\n[http]\nlisten = "127.0.0.1:{port}"\n'
                   f'[daemon]\nsocket = "{sock}"\nstate_dir = "{tmp_path / "state"}"\n')
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    log_path = tmp_path / "out.log"
    with open(log_path, "wb") as log:
        # the activator passes on only the variables named with -E
        proc = subprocess.Popen(["systemd-socket-activate", "-l", str(sock), "--fdname=control",
                                 "-E", "NOTIFY_SOCKET", "-E", "PATH",
                                 sys.executable, "-m", "virtwatch", "run", "--config", str(cfg)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            end = time.monotonic() + 20
            while not sock.exists():
                assert time.monotonic() < end and proc.poll() is None, "the activator made no socket"
                time.sleep(0.05)
            # the activator bound it; set the mode as SocketMode=0640 would, to see the daemon leaves it alone
            os.chmod(sock, 0o640)
            before = sock.stat()
            # like systemd, the activator starts the daemon on the first connection: this one
            r = virtwatch_cli(sock, "status", "--json")
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["uri"] == "test:///default"
            notify.wait_for("READY", "1")
            # a SIGHUP rebuild serves the same socket again (a dup of fd 3; fd 3 itself stays open)
            proc.send_signal(signal.SIGHUP)
            notify.wait_for("RELOADING", "1")
            notify.wait_for("READY", "1")
            r = virtwatch_cli(sock, "events", "--limit", "3")
            assert r.returncode == 0, r.stderr
            after = sock.stat()
            assert (after.st_ino, after.st_mode & 0o777, after.st_uid, after.st_gid) == \
                (before.st_ino, 0o640, before.st_uid, before.st_gid)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            notify.close()
    # the file is systemd's (RemoveOnStop=): the daemon did not unlink it
    assert sock.exists() and sock.stat().st_ino == before.st_ino
    out = log_path.read_text()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    events = {entry.get("event") for entry in lines}
    assert "control_socket_unavailable" not in events and "control_socket_path_differs" not in events
    assert "Traceback" not in out
