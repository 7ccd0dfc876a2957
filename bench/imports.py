"""What importing each library and each virtwatch module costs in memory: a benchmark.

    .venv/bin/python bench/imports.py

Each line is a fresh interpreter that imports the modules above it first and then the
module named, so the figure is that module's own increment (RSS from
``/proc/self/status`` VmRSS, MiB); "alone" is the module imported first in a fresh
interpreter, with everything it pulls in. Then the RSS of a fresh interpreter that has
imported the stack's libraries alone (:data:`STACK`: the floor under any daemon on this
stack), and of a whole ``virtwatch run`` on the test driver with the default settings, and
which optional libraries it loaded.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: libraries first (the floor), then virtwatch's packages in wiring order
MODULES = [
    "asyncio", "libvirt", "prometheus_client", "structlog", "pydantic", "aiohttp.web", "yaml", "bcrypt",
    "sqlite3", "virtwatch.config", "virtwatch.virt.stats", "virtwatch.virt.connection", "virtwatch.policy.wiring",
    "virtwatch.alerts.alerter", "virtwatch.console.capture", "virtwatch.agent.lane", "virtwatch.metrics.http",
    "virtwatch.web.server", "virtwatch.app", "virtwatch.cli.main",
]
#: the agreed stack's libraries, as the daemon uses them (``pydantic.main``: BaseModel, which any model needs)
STACK = ["asyncio", "libvirt", "prometheus_client", "structlog", "pydantic.main", "aiohttp.web"]
PROBE = """
import sys, importlib
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
before_list, target = sys.argv[1].split(',') if sys.argv[1] else [], sys.argv[2]
for m in before_list:
    importlib.import_module(m)
r0 = rss()
importlib.import_module(target)
print(rss() - r0, rss())
"""


def _probe(before: list[str], target: str) -> tuple[float, float]:
    """(RSS increase of importing ``target`` after ``before``, RSS after it), MiB, in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", PROBE, ",".join(before), target], capture_output=True, text=True,
                         check=True)
    increase, total = out.stdout.split()
    return float(increase), float(total)


def increment(before: list[str], target: str) -> float:
    """RSS increase (MiB) of importing ``target`` after ``before`` in a fresh interpreter."""
    return _probe(before, target)[0]


def stack_rss() -> float:
    """VmRSS (MiB) of a fresh interpreter that has imported :data:`STACK` and nothing of
    virtwatch: the floor under any daemon written on this stack."""
    return _probe(STACK[:-1], STACK[-1])[1]


def daemon_rss() -> tuple[float, list[str]]:
    """(RSS MiB, optional modules loaded) of ``virtwatch run`` on test:///default after two polls."""
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    sys.path.insert(0, str(ROOT / "tests"))
    from hostlib import VirtwatchProcess
    with tempfile.TemporaryDirectory() as tmp:
        proc = VirtwatchProcess(Path(tmp), config="", uri="test:///default", poll_interval=1.0).start()
        try:
            time.sleep(3)
            with urllib.request.urlopen(proc.base + "/metrics") as r:
                r.read()
            assert proc.proc is not None
            pid = proc.proc.pid
            rss = next(int(line.split()[1]) / 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("VmRSS:"))
            maps = Path(f"/proc/{pid}/maps").read_text()
        finally:
            proc.stop()
    # the native parts of pyyaml, bcrypt and sqlite3, by file name (libcrypto's path contains "bcrypt")
    files = {line.rsplit("/", 1)[-1] for line in maps.splitlines() if "/" in line}
    loaded = sorted({m for m in ("_bcrypt", "_yaml", "_sqlite3") for f in files if f.startswith(m + ".")})
    return rss, loaded


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help, nothing else
    print(f"{'module':32s}{'alone MiB':>10s}{'increment MiB':>15s}")
    for i, name in enumerate(MODULES):
        alone = increment([], name)
        inc = increment(MODULES[:i], name)
        print(f"{name:32s}{alone:10.1f}{inc:15.1f}")
    floor = stack_rss()
    print(f"\nthe stack alone ({', '.join(STACK)}), fresh interpreter: RSS {floor:.1f} MiB")
    rss, loaded = daemon_rss()
    print(f"virtwatch run, test:///default, default settings: RSS {rss:.1f} MiB; "
          f"optional native libraries mapped: {', '.join(loaded) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
