"""Run the real ``virtwatch`` command as a subprocess and scrape it over HTTP."""

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
from typing import Any

from testkit import sample  # noqa: F401  (re-exported: hostlib.sample)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VirtwatchProcess:
    """``python -m virtwatch run ...`` in the background, logs to a file.

    ``config`` is TOML text written to ``workdir/virtwatch.toml``; ``args``
    are extra command-line flags. :meth:`stop` sends SIGTERM and returns the
    exit code.
    """

    def __init__(self, workdir: Path, config: str = "", args: list[str] | None = None,
                 uri: str = "qemu:///system", poll_interval: float = 1.0) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config_path = self.workdir / "virtwatch.toml"
        self.config_path.write_text(config)
        self.log_path = self.workdir / "virtwatch.log"
        self.cmd = [sys.executable, "-m", "virtwatch", "run", "--config", str(self.config_path), "--uri", uri,
                    "--listen", f"127.0.0.1:{self.port}", "--poll-interval", str(poll_interval), *(args or [])]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        """Base URL of the HTTP endpoint."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 30.0) -> VirtwatchProcess:
        """Start and wait until ``/readyz`` answers 200 (libvirt connected)."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 -- the child's log (kept across restarts); closed in stop()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=dict(os.environ))
        self.wait_until(lambda: self.get("/readyz")[0] == 200, ready_timeout, "virtwatch never became ready")
        return self

    def get(self, path: str) -> tuple[int, str]:
        """HTTP GET; (status, body); (0, "") while the port is closed."""
        status, _headers, body = self._get(path)
        return status, body

    def _get(self, path: str) -> tuple[int, Any, str]:
        """HTTP GET; (status, response headers or None, body); (0, None, "") while the port is closed."""
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as r:
                return r.status, r.headers, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read().decode()
        except (TimeoutError, urllib.error.URLError, ConnectionError):
            return 0, None, ""

    def scrape(self, timeout: float = 5.0) -> str:
        """The ``/metrics`` body of the daemon's state now (raises on non-200).

        A scrape answers the latest finished render: one that says it was a render behind the
        state (``X-Virtwatch-Render-Behind``, a change arrived while its render ran) is asked
        again, for up to ``timeout`` s, so that a test reads the state it just caused."""
        end = time.monotonic() + timeout
        while True:
            status, headers, body = self._get("/metrics")
            assert status == 200, f"/metrics answered {status}"
            # the header is virtwatch.metrics.http.RENDER_BEHIND_HEADER (this harness is black-box)
            if not headers.get("X-Virtwatch-Render-Behind") or time.monotonic() > end:
                return body
            time.sleep(0.02)

    def json(self, path: str) -> dict:
        """GET a JSON document."""
        status, body = self.get(path)
        assert status == 200, f"{path} answered {status}: {body}"
        return json.loads(body)

    def wait_until(self, cond, timeout: float, message: str, interval: float = 0.2) -> None:
        """Poll ``cond()`` until true; fail with ``message`` and the log tail."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"virtwatch exited with {self.proc.returncode}:\n{self.log_tail()}")
            if cond():
                return
            time.sleep(interval)
        raise AssertionError(f"{message} within {timeout} s\n{self.log_tail()}")

    def log_text(self) -> str:
        """Everything the daemon logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self, event: str, **match: Any) -> list[dict[str, Any]]:
        """The JSON log records (``[log] format = "json"``) of ``event`` whose fields equal ``match``."""
        out = []
        for line in self.log_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == event and all(rec.get(k) == v for k, v in match.items()):
                out.append(rec)
        return out

    def log_tail(self, lines: int = 40) -> str:
        """The last log lines."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _dump_stuck(self) -> None:
        """Record why the daemon did not stop: its asyncio tasks (SIGUSR1) and threads (py-spy)."""
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(1)
        spy = Path(sys.executable).with_name("py-spy")
        if spy.exists():
            out = subprocess.run([str(spy), "dump", "--pid", str(self.proc.pid)], capture_output=True, text=True,
                                 timeout=30)
            self._log.write(f"\n=== py-spy dump (stop timed out)\n{out.stdout}{out.stderr}".encode())
            self._log.flush()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait, return the exit code (kills after ``timeout``)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._dump_stuck()
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
