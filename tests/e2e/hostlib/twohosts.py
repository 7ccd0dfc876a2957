"""Two more libvirt hosts on this machine, for live-migration tests: host A and host B.

Each :class:`NamespacedHost` is a libvirtd + virtlogd pair in its own mount and UTS
namespace (``unshare --mount --uts --propagation private``), following the recipe in
the design notes (§3 "Two hosts on one machine"):

- its own hostname (``vwe2e-migration-a``) and its own ``host_uuid`` in libvirtd.conf:
  libvirt refuses to migrate to a host whose UUID equals its own;
- a tmpfs on ``/run`` (virtlogd's and libvirtd's runtime files), and private
  directories bound onto ``/run/libvirt``, ``/var/lib/libvirt``, ``/var/log/libvirt``,
  ``/var/cache/libvirt`` and ``/etc/libvirt`` (a copy of the host's, with a clean
  ``qemu/`` directory so it defines none of the system daemon's guests);
- qemu.conf with ``cgroup_controllers = [ ]`` (no cgroup names to collide with the system
  daemon's), QEMU run as root with no security driver and no ownership changes (two
  daemons relabelling one shared disk would undo each other's labels);
- the daemons run under the names ``vwhost-libvirtd`` / ``vwhost-virtlogd`` (symlinks), so
  ``ps -C libvirtd``, ``pgrep`` and :func:`hostlib.libvirtd_pid` (which the other e2e
  tests use to freeze or restart the system daemon) never pick one of them.

The network namespace is shared: migration streams go over 127.0.0.1 (a ``tcp://``
migrate URI with a free port), and guest taps are made by each daemon in the one network
namespace (libvirt picks a free ``vnetN`` name).

The system libvirtd at ``qemu:///system`` is never touched. Reach a host at
:attr:`NamespacedHost.uri`. Each test process keeps its two hosts under ``BASE/<pid>`` (two
sessions on one machine never meet); guests made here have their disks and serial logs under
``<that>/shared``, which every namespace sees. :func:`cleanup_leftovers` stops the daemons
and guests of earlier runs whose process is gone (from their pid files; the namespaces, and
with them the mounts, go away with their last process) and removes their directories.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from .domain import create_qcow2, domain_xml
from .guests import NAME_PREFIX, READY_MARKER, open_conn, remove_domain
from .image import GuestImage

#: Every run's two hosts live under here (outside every directory the namespaces hide).
BASE = Path("/var/tmp/vwe2e-twohosts")
#: This process's hosts.
ROOT = BASE / str(os.getpid())
#: Disks and serial logs: the same path on every host.
SHARED_ROOT = ROOT / "shared"
#: Process names of the namespaced daemons (15 characters: the kernel's comm limit).
LIBVIRTD_COMM = "vwhost-libvirtd"
VIRTLOGD_COMM = "vwhost-virtlogd"

_BINDS = {"run": "/run/libvirt", "lib": "/var/lib/libvirt", "log": "/var/log/libvirt",
          "cache": "/var/cache/libvirt", "etc": "/etc/libvirt"}

_QEMU_CONF = """\
# virtwatch e2e: a second QEMU driver on this machine (tests/e2e/hostlib/twohosts.py)
cgroup_controllers = [ ]
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
"""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in ("Z", "X")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _kill(pid: int, comm_prefix: str, timeout: float = 10.0) -> None:
    """SIGTERM then SIGKILL ``pid`` if it is alive and its name starts with ``comm_prefix``."""
    if not _alive(pid) or not _comm(pid).startswith(comm_prefix):
        return
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < end:
            time.sleep(0.1)


@dataclass
class NamespacedHost:
    """One extra libvirt host: ``name`` is a short tag (``a``, ``b``)."""

    name: str
    root: Path = ROOT
    host_uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))

    @property
    def directory(self) -> Path:
        return self.root / self.name

    @property
    def hostname(self) -> str:
        return f"vwe2e-migration-{self.name}"

    def path(self, key: str) -> Path:
        """The outside path of a bound directory: ``run``, ``lib``, ``log``, ``cache``, ``etc``."""
        return self.directory / key

    @property
    def socket(self) -> Path:
        return self.path("run") / "libvirt-sock"

    @property
    def uri(self) -> str:
        """The URI that reaches this host's libvirtd from outside its namespace."""
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def libvirtd_pid(self) -> int | None:
        return _read_pid(self.path("run") / "libvirtd.pid")

    # -------------------------------------------------------------- start / stop

    def start(self, timeout: float = 60.0) -> NamespacedHost:
        """Prepare the directories, start virtlogd + libvirtd in fresh namespaces, wait until
        libvirtd answers. Raises RuntimeError (with the daemon log) when it does not."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
        for key in _BINDS:
            self.path(key).mkdir(parents=True, exist_ok=True)
        etc = self.path("etc")
        shutil.rmtree(etc)
        shutil.copytree("/etc/libvirt", etc, symlinks=True)
        shutil.rmtree(etc / "qemu", ignore_errors=True)
        (etc / "qemu" / "networks" / "autostart").mkdir(parents=True)
        (etc / "qemu.conf").write_text(_QEMU_CONF)
        (etc / "libvirtd.conf").write_text(
            f'host_uuid = "{self.host_uuid}"\n'
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
        )
        for sub in ("qemu",):
            (self.path("log") / sub).mkdir(exist_ok=True)
            (self.path("lib") / sub).mkdir(exist_ok=True)
            (self.path("cache") / sub).mkdir(exist_ok=True)
        bindir = self.root / "bin"
        bindir.mkdir(parents=True, exist_ok=True)
        for comm, target in ((LIBVIRTD_COMM, "/usr/sbin/libvirtd"), (VIRTLOGD_COMM, "/usr/sbin/virtlogd")):
            link = bindir / comm
            if not link.is_symlink():
                link.symlink_to(target)
        mounts = "\n".join(f"mkdir -p {dst}\nmount --bind {self.path(key)} {dst}" for key, dst in _BINDS.items())
        script = textwrap.dedent(f"""\
            set -e
            hostname {self.hostname}
            mount -t tmpfs -o mode=0755 tmpfs /run
            {{mounts}}
            {bindir / VIRTLOGD_COMM} -d -p /run/libvirt/virtlogd.pid
            for i in $(seq 100); do [ -S /run/libvirt/virtlogd-sock ] && break; sleep 0.05; done
            {bindir / LIBVIRTD_COMM} -d -p /run/libvirt/libvirtd.pid
            """).replace("{mounts}", mounts)
        proc = subprocess.run(["unshare", "--mount", "--uts", "--propagation", "private", "--", "sh", "-c", script],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"host {self.name}: namespace setup failed ({proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}")
        end = time.monotonic() + timeout
        while True:
            try:
                conn = libvirt.open(self.uri)
                try:
                    if conn.getHostname() == self.hostname:
                        return self
                finally:
                    conn.close()
            except libvirt.libvirtError:
                pass
            if time.monotonic() > end:
                log = self.path("log") / "libvirtd.log"
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
                raise RuntimeError(f"host {self.name}: libvirtd at {self.uri} never answered:\n{tail}")
            time.sleep(0.2)

    def open(self) -> libvirt.virConnect:
        """A read-write connection (keepalive off, see :func:`hostlib.open_conn`)."""
        return open_conn(self.uri)

    def qemu_pids(self) -> list[int]:
        """PIDs of the QEMU processes this host's libvirtd started (from its pid files)."""
        pids = []
        for f in (self.path("run") / "qemu").glob("*.pid"):
            pid = _read_pid(f)
            if pid and _alive(pid) and _comm(pid).startswith("qemu"):
                pids.append(pid)
        return pids

    def stop(self) -> None:
        """Destroy this host's guests, stop its daemons (whatever run started them). Idempotent."""
        if self.socket.exists() and _alive(self.libvirtd_pid or 0):
            try:
                conn = libvirt.open(self.uri)
                try:
                    for dom in conn.listAllDomains(0):
                        remove_domain(dom)
                finally:
                    conn.close()
            except libvirt.libvirtError:
                pass
        for pid in self.qemu_pids():
            _kill(pid, "qemu")
        _kill(self.libvirtd_pid or 0, LIBVIRTD_COMM)
        _kill(_read_pid(self.path("run") / "virtlogd.pid") or 0, VIRTLOGD_COMM)


def _stop_all(root: Path) -> None:
    """Stop every host under ``root`` and remove it."""
    if root.is_dir():
        for d in root.iterdir():
            if (d / "run").is_dir():
                NamespacedHost(d.name, root).stop()
    shutil.rmtree(root, ignore_errors=True)


def cleanup_leftovers(base: Path = BASE) -> list[Path]:
    """Stop the daemons and guests that runs whose process is gone (killed) left under
    ``base``, and this process's own; remove their directories. Returns the roots removed.
    Another live process's hosts are left alone."""
    removed = []
    if base.is_dir():
        for root in base.iterdir():
            if root.name.isdigit() and (int(root.name) == os.getpid() or not _alive(int(root.name))):
                _stop_all(root)
                removed.append(root)
    return removed


class TwoHosts:
    """Host A and host B, started together; :meth:`close` stops both and removes everything."""

    def __init__(self, root: Path = ROOT) -> None:
        self.root = root
        self.a = NamespacedHost("a", root)
        self.b = NamespacedHost("b", root)

    def start(self) -> TwoHosts:
        cleanup_leftovers(self.root.parent)
        (self.root / "shared").mkdir(parents=True, exist_ok=True)
        self.a.start()
        self.b.start()
        return self

    def close(self) -> None:
        _stop_all(self.root)


@dataclass
class MigratableGuest:
    """A guest (its XML, not yet defined anywhere) whose disk and serial log are on :data:`SHARED_ROOT`."""

    name: str
    uuid: str
    xml: str
    directory: Path
    serial_log: Path
    disk: Path

    def serial_text(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_serial(self, text: str, timeout: float = 90.0) -> None:
        end = time.monotonic() + timeout
        while text not in self.serial_text():
            if time.monotonic() > end:
                raise TimeoutError(f"{self.name}: {text!r} not seen in {timeout} s:\n{self.serial_text()[-2000:]}")
            time.sleep(0.2)


def make_guest(image: GuestImage, label: str, *, options: dict[str, object] | None = None,
               metadata: str = "", **xml_kwargs: object) -> MigratableGuest:
    """Domain XML + a fresh qcow2 for a guest that can live on either host (not started).

    ``metadata`` is raw XML put inside ``<metadata>`` (a ``<virtwatch:policy>`` element, say).
    The disk keeps ``cache='none'``; migrating it needs ``VIR_MIGRATE_UNSAFE`` since the
    path is not on storage libvirt knows is shared.
    """
    name = f"{NAME_PREFIX}{label}-{uuidlib.uuid4().hex[:8]}"
    uuid = str(uuidlib.uuid4())
    gdir = SHARED_ROOT / name
    gdir.mkdir(parents=True, exist_ok=True)
    disk = create_qcow2(gdir / "disk.qcow2", "64M")
    serial = gdir / "serial.log"
    xml = domain_xml(name, kernel=image.kernel, initrd=image.initrd, options=options, disk=disk,
                     serial_log=serial, uuid=uuid, **xml_kwargs)  # type: ignore[arg-type]
    if metadata:
        xml = xml.replace("</name>", f"</name><metadata>{metadata}</metadata>", 1)
    return MigratableGuest(name, uuid, xml, gdir, serial, disk)


#: Flags of every live migration in these tests: managed (the client talks to both
#: daemons), live, disk on a path both see (not known shared: UNSAFE).
MIGRATE_FLAGS = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_UNSAFE


__all__ = [
    "BASE",
    "MIGRATE_FLAGS",
    "READY_MARKER",
    "ROOT",
    "SHARED_ROOT",
    "MigratableGuest",
    "NamespacedHost",
    "TwoHosts",
    "cleanup_leftovers",
    "make_guest",
]
