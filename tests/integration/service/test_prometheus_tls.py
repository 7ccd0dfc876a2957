"""TLS and basic auth on the real ``virtwatch run``, scraped by a real Prometheus and curl.

The daemon (the CLI, as a subprocess) watches libvirt's test driver loaded from
``config/demo-host.xml`` and serves HTTPS with basic auth from ``[http] web_config_file``
(a bcrypt hash, certificates from the test PKI in conftest). Prometheus (Debian's binary)
scrapes it with its own scrape config: ``scheme: https``, ``tls_config.ca_file``,
``basic_auth`` with a ``password_file``. A job with a wrong password and a job trusting
the wrong CA must be down with the matching error; the good job must be up and its
samples must carry the demo host's real values.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest

REPO = Path(__file__).resolve().parents[3]
DEMO_URI = f"test://{REPO / 'config' / 'demo-host.xml'}"
USER, PASSWORD = "prometheus", "scrape-me-if-you-can"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Any, timeout: float, what: str, logs: tuple[Path, ...] = ()) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"{what} within {timeout} s\n{tails}")


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def curl(*args: str) -> tuple[int, str]:
    """(HTTP status, body) of a curl request; 0 if curl failed (TLS error, refused...)."""
    p = subprocess.run(["curl", "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", *args],
                       capture_output=True, text=True, timeout=30)
    body, _, code = p.stdout.rpartition("\n")
    return (int(code) if p.returncode == 0 else 0), body


@pytest.fixture
def secured_daemon(pki: Any, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """``virtwatch run`` on the demo host with TLS + basic auth; yields (port, log path)."""
    pw_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"""tls_server_config:
  cert_file: {pki.server_crt}
  key_file: {pki.server_key}
http_server_config:
  headers:
    X-Content-Type-Options: nosniff
basic_auth_users:
  {USER}: '{pw_hash}'
""")
    port = free_port()
    config = tmp_path / "virtwatch.toml"
    config.write_text(f"""[http]
web_config_file = "{web}"
[daemon]
state_dir = "{tmp_path / 'state'}"
socket = "{tmp_path / 'virtwatch.sock'}"
[log]
format = "json"
""")
    log = tmp_path / "virtwatch.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "virtwatch", "run", "--config", str(config), "--uri", DEMO_URI,
                                 "--listen", f"127.0.0.1:{port}", "--poll-interval", "1"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        # /healthz is exempt from auth (liveness probes), still over TLS.
        wait_until(lambda: proc.poll() is None and curl("--cacert", str(pki.ca_crt),
                                                        f"https://127.0.0.1:{port}/healthz")[0] == 200,
                   30, "virtwatch never answered /healthz over TLS", (log,))
        yield port, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, log.read_text()
        assert "Traceback" not in log.read_text()


@pytest.fixture
def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus missing: it is in .ci/apt-packages.txt")
    return path


def test_prometheus_scrapes_over_tls_with_basic_auth(secured_daemon: tuple[int, Path], pki: Any, tmp_path: Path,
                                                     prometheus_bin: str) -> None:
    port, daemon_log = secured_daemon
    base = f"https://127.0.0.1:{port}"
    ca = str(pki.ca_crt)

    # curl first: the secured endpoint itself.
    status, body = curl("--cacert", ca, "-u", f"{USER}:{PASSWORD}", f"{base}/metrics")
    assert status == 200 and 'libvirt_domains{state="running"} 5.0' in body
    assert curl("--cacert", ca, "-u", f"{USER}:wrong", f"{base}/metrics")[0] == 401
    assert curl("--cacert", ca, f"{base}/api/v1/guests")[0] == 401
    assert curl("--cacert", str(pki.other_ca_crt), "-u", f"{USER}:{PASSWORD}", f"{base}/metrics")[0] == 0
    assert curl("-u", f"{USER}:{PASSWORD}", f"http://127.0.0.1:{port}/metrics")[0] != 200  # no plain HTTP

    (tmp_path / "good.pw").write_text(PASSWORD + "\n")
    (tmp_path / "bad.pw").write_text("not-the-password\n")
    target = {"static_configs": [{"targets": [f"127.0.0.1:{port}"]}], "scheme": "https"}
    scrape_configs = [
        {"job_name": "good", **target, "tls_config": {"ca_file": ca},
         "basic_auth": {"username": USER, "password_file": str(tmp_path / "good.pw")}},
        {"job_name": "wrong-password", **target, "tls_config": {"ca_file": ca},
         "basic_auth": {"username": USER, "password_file": str(tmp_path / "bad.pw")}},
        {"job_name": "wrong-ca", **target, "tls_config": {"ca_file": str(pki.other_ca_crt)},
         "basic_auth": {"username": USER, "password_file": str(tmp_path / "good.pw")}},
        {"job_name": "plain-http", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
         "basic_auth": {"username": USER, "password_file": str(tmp_path / "good.pw")}},
    ]
    prom_cfg = tmp_path / "prometheus.yml"
    prom_cfg.write_text(json.dumps({"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                                    "scrape_configs": scrape_configs}))
    check = subprocess.run([shutil.which("promtool") or "promtool", "check", "config", str(prom_cfg)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    prom_port = free_port()
    prom_log = tmp_path / "prometheus.log"
    with open(prom_log, "wb") as out:
        prom = subprocess.Popen([prometheus_bin, f"--config.file={prom_cfg}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                                stdout=out, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    try:
        def targets() -> dict[str, dict[str, Any]]:
            try:
                active = http_json(f"{api}/targets")["data"]["activeTargets"]
            except (urllib.error.URLError, ConnectionError, OSError):
                return {}
            return {t["labels"]["job"]: t for t in active}

        wait_until(lambda: len(targets()) == 4 and all(t["health"] != "unknown" for t in targets().values()),
                   30, "prometheus did not scrape every job", (prom_log, daemon_log))
        t = targets()
        assert t["good"]["health"] == "up", t["good"]
        assert t["good"]["scrapeUrl"] == f"{base}/metrics"
        assert t["wrong-password"]["health"] == "down"
        assert "401" in t["wrong-password"]["lastError"], t["wrong-password"]["lastError"]
        assert t["wrong-ca"]["health"] == "down"
        assert "certificate" in t["wrong-ca"]["lastError"], t["wrong-ca"]["lastError"]
        assert t["plain-http"]["health"] == "down", t["plain-http"]

        def query(expr: str) -> list[dict[str, Any]]:
            return http_json(f"{api}/query?{urllib.parse.urlencode({'query': expr})}")["data"]["result"]

        wait_until(lambda: query('up{job="good"}') and query('libvirt_up{job="good"}'), 15,
                   "samples of the good job never stored", (prom_log,))
        assert float(query('up{job="good"}')[0]["value"][1]) == 1
        assert [float(s["value"][1]) for s in query('up{job!="good"}')] == [0, 0, 0]
        assert float(query('libvirt_up{job="good"}')[0]["value"][1]) == 1
        assert float(query('libvirt_domains{job="good",state="running"}')[0]["value"][1]) == 5
        assert float(query('libvirt_node_cpus{job="good"}')[0]["value"][1]) == 8  # demo-host.xml: 8 CPUs
        assert {s["metric"]["domain"] for s in query('libvirt_domain_info{job="good"}')} == \
            {"web1", "web2", "db1", "batch1", "build-runner"}
    finally:
        prom.send_signal(signal.SIGTERM)
        try:
            prom.wait(20)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
    assert PASSWORD not in daemon_log.read_text()  # neither the password nor failed attempts' secrets
