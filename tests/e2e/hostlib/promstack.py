"""Real Prometheus and Alertmanager processes on free loopback ports, for end-to-end tests.

Both are the Debian packages' binaries (``prometheus``, ``prometheus-alertmanager``),
each in its own directory (config, storage, log). Nothing here mocks anything: the
helpers start the servers, wait for ``/-/ready`` and read their HTTP APIs.

- :class:`AlertmanagerProcess`: clustering off, or a member of a gossip cluster on loopback
  ports; :meth:`~AlertmanagerProcess.stop` and :meth:`~AlertmanagerProcess.start` again on the
  same port (an outage).
- :class:`WebhookReceiver`: records the notifications Alertmanager sends.
- :class:`PrometheusProcess`: a generated config scraping given targets with a given
  interval, loading rule files and sending alerts to given Alertmanagers.
- :func:`rules_with_short_for`: a copy of a rules file whose ``for:`` durations are
  shortened (expressions, labels and annotations untouched), so the shipped
  expressions can be seen pending/firing within a test.
- :func:`http_json`: GET a JSON document (stdlib only; usable from sync tests and scripts).

Only the standard library and PyYAML are used, so ``bench/`` scripts can import it.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

#: Alertmanager routing used by the tests: everything goes nowhere (we read the API).
AM_CONFIG = """\
route:
  receiver: blackhole
  group_wait: 1s
receivers:
  - name: blackhole
"""


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary(*names: str) -> str:
    """Path of the first of ``names`` found on PATH (AssertionError if none)."""
    for n in names:
        path = shutil.which(n)
        if path:
            return path
    raise AssertionError(f"none of {names} installed (see .ci/apt-packages.txt)")


def http_json(url: str, params: Mapping[str, str] | None = None, timeout: float = 5.0) -> Any:
    """GET ``url`` (with query ``params``) and decode the JSON body; raises on non-2xx."""
    if params:
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1,
               detail: Callable[[], str] | None = None) -> Any:
    """Poll ``cond()`` until it returns something truthy and return it; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout} s" + (f"\n{detail()}" if detail else ""))
        time.sleep(interval)


class _Server:
    """A background server process with a log file and a ``/-/ready`` endpoint."""

    name = "server"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def log_text(self) -> str:
        """Everything the server logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> _Server:
        """Start the process and wait until ``/-/ready`` answers 200."""
        assert not self.running, f"{self.name} already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() >= deadline:
                self.stop()
                raise AssertionError(f"{self.name} on {self.url} not ready in {timeout} s:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and reap (SIGKILL after ``timeout``). Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> _Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class AlertmanagerProcess(_Server):
    """One Alertmanager; can be stopped and started again on the same port (an outage).

    Clustering is off unless ``cluster_port`` is given: then it gossips on 127.0.0.1:cluster_port
    with ``peers`` (``host:port`` of the other members' cluster ports) and ``cluster_args``
    (e.g. shorter ``--cluster.peer-timeout``). Its notification log and silences live in its
    directory, so they survive a stop and start, as in production.
    """

    name = "alertmanager"

    def __init__(self, workdir: Path, config: str = AM_CONFIG, port: int | None = None, *,
                 cluster_port: int | None = None, peers: Sequence[str] = (),
                 cluster_args: Sequence[str] = ()) -> None:
        super().__init__(workdir, port)
        self.config_path = self.dir / "alertmanager.yml"
        self.config_path.write_text(config)
        self.cluster_port = cluster_port
        self.peers = list(peers)
        self.cluster_args = list(cluster_args)

    def command(self) -> list[str]:
        cluster = ["--cluster.listen-address="]
        if self.cluster_port is not None:
            cluster = [f"--cluster.listen-address=127.0.0.1:{self.cluster_port}",
                       f"--cluster.advertise-address=127.0.0.1:{self.cluster_port}",
                       *(f"--cluster.peer={p}" for p in self.peers), *self.cluster_args]
        return [binary("prometheus-alertmanager", "alertmanager"), f"--config.file={self.config_path}",
                f"--storage.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                *cluster, "--log.level=warn"]

    def status(self) -> dict[str, Any]:
        """``GET /api/v2/status`` (cluster peers and status)."""
        return http_json(self.url + "/api/v2/status")

    def alerts(self, **filters: str) -> list[dict[str, Any]]:
        """``GET /api/v2/alerts`` (unexpired alerts), filtered by label equality matchers."""
        params = [("filter", f'{k}="{v}"') for k, v in filters.items()]
        url = self.url + "/api/v2/alerts" + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that records every notification Alertmanager POSTs to it
    (any path), as ``(epoch seconds received, path, decoded JSON body)``."""

    def __init__(self) -> None:
        self.received: list[tuple[float, str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.received.append((time.time(), self.path, json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook", daemon=True)

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def notifications(self) -> list[tuple[float, str, dict[str, Any]]]:
        """Everything received so far (a copy)."""
        with self._lock:
            return list(self.received)


class PrometheusProcess(_Server):
    """Prometheus scraping ``targets`` (job ``job``) with the given rule files and Alertmanagers.

    ``interval`` is both the scrape and the evaluation interval (and the scrape timeout unless
    ``scrape_timeout`` is given). Alerts are re-sent to Alertmanager every ``resend_delay`` while
    firing (Prometheus' default is 1m).
    """

    name = "prometheus"

    def __init__(self, workdir: Path, targets: Sequence[str], *, job: str = "virtwatch",
                 rule_files: Iterable[Path] = (), alertmanagers: Iterable[str] = (), interval: str = "1s",
                 resend_delay: str = "1s", port: int | None = None, scrape_timeout: str | None = None) -> None:
        super().__init__(workdir, port)
        self.resend_delay = resend_delay
        cfg: dict[str, Any] = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval,
                       "scrape_timeout": scrape_timeout or interval},
            "rule_files": [str(Path(p).resolve()) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }
        ams = [urllib.parse.urlsplit(u).netloc for u in alertmanagers]
        if ams:
            cfg["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": ams}]}]}
        self.config_path = self.dir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def command(self) -> list[str]:
        return [binary("prometheus"), f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                f"--rules.alert.resend-delay={self.resend_delay}", "--log.level=warn"]

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/<path>``; returns ``data`` (AssertionError unless status is success)."""
        body = http_json(f"{self.url}/api/v1/{path}", params or None)
        assert body.get("status") == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets."""
        return self.api("targets", state="active")["activeTargets"]

    def rule_groups(self) -> list[dict[str, Any]]:
        """Loaded rule groups with their rules' state, health and last error."""
        return self.api("rules")["groups"]

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts."""
        return self.api("alerts")["alerts"]


def rules_with_short_for(src: Path, dest: Path, for_: str = "1s") -> dict[str, Any]:
    """Write ``src`` to ``dest`` with every non-zero ``for:`` of an alerting rule set to ``for_``.

    Everything else (expressions, labels, annotations, group names) is copied as is.
    Returns the parsed original document.
    """
    doc = yaml.safe_load(Path(src).read_text())
    copy = yaml.safe_load(Path(src).read_text())
    for group in copy["groups"]:
        for rule in group["rules"]:
            if "alert" in rule and str(rule.get("for", "0")).strip() not in ("0", "0s", "0m", "0h"):
                rule["for"] = for_
    Path(dest).write_text(yaml.safe_dump(copy, sort_keys=False))
    return doc


class AlertWatcher:
    """Polls an Alertmanager's ``GET /api/v2/alerts`` every ``interval`` s in a thread and records
    when each alert was first listed, keyed by ``(alertname, domain, startsAt)``.

    Started before the events happen, it measures event-to-Alertmanager latency without
    racing the test's own steps. Failed polls (Alertmanager down) are counted and ignored.
    """

    def __init__(self, am: AlertmanagerProcess, interval: float = 0.01) -> None:
        self.am = am
        self.interval = interval
        self.polls = 0
        self.failed_polls = 0
        self.started_at = 0.0
        self._seen: dict[tuple[str, str, str], tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alert-watcher", daemon=True)

    def start(self) -> AlertWatcher:
        self.started_at = time.time()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                alerts = self.am.alerts()
            except (OSError, ValueError):
                alerts = None
            now = time.time()
            with self._lock:
                self.polls += 1
                if alerts is None:
                    self.failed_polls += 1
                for a in alerts or ():
                    key = (a["labels"].get("alertname", ""), a["labels"].get("domain", ""), a["startsAt"])
                    self._seen.setdefault(key, (now, a))
            self._stop.wait(self.interval)

    def first_seen(self, alertname: str, domain: str = "") -> list[tuple[float, dict[str, Any]]]:
        """``[(epoch seconds first listed, alert as first listed)]`` by time, one per ``startsAt``."""
        with self._lock:
            return sorted((v for k, v in self._seen.items() if k[0] == alertname and k[1] == domain),
                          key=lambda v: v[0])
