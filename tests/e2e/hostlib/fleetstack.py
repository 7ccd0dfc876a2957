"""A fleet's store on loopback ports: VictoriaMetrics and Prometheus replicas built from the
shipped ``config/fleet/`` files, and libvirt test-driver hosts to play more hypervisors.

- :class:`VictoriaMetricsProcess`: the Debian package's ``victoria-metrics``, started with the
  flags of ``config/fleet/victoria-metrics.default`` (only paths, the listen address and the
  overrides given are changed) and the shipped relabeling file.
- :class:`FleetPrometheus`: one replica of the shipped HA pair (``prometheus-a.yml`` /
  ``prometheus-b.yml``): its external labels, scrape job, file_sd and remote_write kept, with
  local targets, intervals, rule files and store URL.
- :func:`host_file_xml`: a ``test:///path`` host file (libvirt's test driver) with running
  guests that have vCPUs, disks and NICs, so their statistics look like a real host's.

Only the standard library and PyYAML are used, so ``bench/`` scripts can import it.
"""

from __future__ import annotations

import shlex
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import yaml

from .promstack import PrometheusProcess, _Server, binary, http_json

REPO_ROOT = Path(__file__).resolve().parents[3]
FLEET = REPO_ROOT / "config" / "fleet"


class VictoriaMetricsProcess(_Server):
    """Single-node VictoriaMetrics with the shipped fleet flags.

    ``overrides`` replace flags of ``victoria-metrics.default`` by name (``{"-search.latencyOffset": "1s"}``).
    """

    name = "victoria-metrics"

    def __init__(self, workdir: Path, overrides: Mapping[str, str] | None = None, port: int | None = None) -> None:
        super().__init__(workdir, port)
        self.flags = shipped_vm_flags()
        self.flags.update({"-storageDataPath": str(self.dir / "data"), "-httpListenAddr": f"127.0.0.1:{self.port}",
                           "-relabelConfig": str(FLEET / "victoria-metrics-relabel.yml"), **(overrides or {})})

    def command(self) -> list[str]:
        return [binary("victoria-metrics"), *(f"{k}={v}" for k, v in self.flags.items())]

    @property
    def write_url(self) -> str:
        """The Prometheus remote_write endpoint."""
        return f"{self.url}/api/v1/write"

    def query(self, expr: str, **params: str) -> list[dict[str, Any]]:
        """Instant query through VictoriaMetrics' Prometheus API; the result vector."""
        body = http_json(f"{self.url}/api/v1/query", {"query": expr, **params})
        assert body.get("status") == "success", body
        return body["data"]["result"]


def shipped_vm_flags() -> dict[str, str]:
    """The flags of ``ARGS`` in ``config/fleet/victoria-metrics.default``, by name."""
    text = (FLEET / "victoria-metrics.default").read_text()
    (line,) = [line for line in text.splitlines() if line.startswith("ARGS=")]
    flags = {}
    for arg in shlex.split(line.removeprefix("ARGS=")):
        name, _, value = arg.partition("=")
        flags[name] = value
    return flags


class FleetPrometheus(PrometheusProcess):
    """One replica (``a`` or ``b``) of the shipped HA pair, scraping ``targets`` (file_sd, with
    ``labels``) every ``interval``, evaluating ``rule_files`` and remote-writing to ``write_url``
    (no Alertmanagers unless ``alertmanagers`` are given)."""

    def __init__(self, workdir: Path, replica: str, targets: Sequence[str], write_url: str, *,
                 labels: Mapping[str, str] | None = None, rule_files: Iterable[Path] = (),
                 alertmanagers: Iterable[str] = (), interval: str = "2s", port: int | None = None) -> None:
        super().__init__(workdir, [], interval=interval, port=port)
        cfg = yaml.safe_load((FLEET / f"prometheus-{replica}.yml").read_text())
        cfg["global"].update({"scrape_interval": interval, "evaluation_interval": interval})
        cfg["rule_files"] = [str(Path(p).resolve()) for p in rule_files]
        ams = [urllib.parse.urlsplit(u).netloc for u in alertmanagers]
        if ams:
            cfg["alerting"]["alertmanagers"] = [{"static_configs": [{"targets": ams}]}]
        else:
            del cfg["alerting"]
        (job,) = cfg["scrape_configs"]
        job.update({"scrape_interval": interval, "scrape_timeout": interval})
        sd_dir = self.dir / "targets"
        sd_dir.mkdir(exist_ok=True)
        self.targets_file = sd_dir / "hosts.yml"
        self.set_targets(targets, labels)
        job["file_sd_configs"] = [{"files": [str(sd_dir / "*.yml")], "refresh_interval": "1s"}]
        (rw,) = cfg["remote_write"]
        rw["url"] = write_url
        rw.setdefault("queue_config", {})["batch_send_deadline"] = "1s"
        self.config = cfg
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def set_targets(self, targets: Sequence[str], labels: Mapping[str, str] | None = None) -> None:
        """Rewrite the file_sd targets file (Prometheus picks it up within its refresh interval)."""
        self.targets_file.write_text(yaml.safe_dump([{"targets": list(targets), "labels": dict(labels or {})}]))


def host_file_xml(guests: Sequence[Mapping[str, Any]], cpus: int = 32,
                  memory_kib: int = 256 * 1024 * 1024) -> str:
    """A host file for libvirt's test driver (``test:///path/host.xml``).

    ``guests``: dicts with ``name`` and ``uuid``, optional ``vcpus`` (2), ``disks`` (1),
    ``nics`` (1), ``memory_kib`` (1 GiB). Every guest starts running.
    """
    doms = []
    for g in guests:
        disks = "".join(f"<disk type='file' device='disk'><source file='/var/lib/libvirt/images/{escape(g['name'])}"
                        f"-{i}.qcow2'/><target dev='vd{chr(ord('a') + i)}' bus='virtio'/></disk>"
                        for i in range(int(g.get("disks", 1))))
        nics = "".join("<interface type='network'><source network='default'/></interface>"
                       for _ in range(int(g.get("nics", 1))))
        mem = int(g.get("memory_kib", 1048576))
        doms.append(f"""  <domain type='test'>
    <name>{escape(g['name'])}</name>
    <uuid>{g['uuid']}</uuid>
    <memory unit='KiB'>{mem}</memory>
    <currentMemory unit='KiB'>{mem}</currentMemory>
    <vcpu>{int(g.get('vcpus', 2))}</vcpu>
    <os><type>hvm</type></os>
    <devices>{disks}{nics}</devices>
  </domain>""")
    return (f"<?xml version='1.0'?>\n<node>\n  <cpu><mhz>2400</mhz><model>x86_64</model><active>{cpus}</active>"
            f"<nodes>1</nodes><sockets>1</sockets><cores>{cpus}</cores><threads>1</threads></cpu>\n"
            f"  <memory>{memory_kib}</memory>\n" + "\n".join(doms) + "\n</node>\n")
