"""GuestFactory: start uniquely named ``vwe2e-*`` guests on qemu:///system and clean up.

Every guest gets its own directory under ``/var/lib/libvirt/images/virtwatch-e2e/`` with
its qcow2 disk and serial log. Readiness is the init's ``VW READY`` line in the serial log.
Cleanup destroys and undefines (with managed-save images and NVRAM) every guest the
factory made, and :func:`purge_leftovers` removes any ``vwe2e-*`` domain left by a crashed
earlier run.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from .domain import IMAGES_ROOT, TinyFilesystem, create_qcow2, domain_xml, is_mountpoint
from .image import GuestImage

URI = "qemu:///system"
NAME_PREFIX = "vwe2e-"
READY_MARKER = "VW READY"

_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
)


class GuestBootTimeout(TimeoutError):
    """A guest did not print its ready marker in time (message has the serial log tail)."""


@dataclass
class Guest:
    """A guest started by :class:`GuestFactory`."""

    name: str
    dom: libvirt.virDomain
    xml: str
    directory: Path
    serial_log: Path
    disk: Path | None
    persistent: bool
    started_at: float
    boot_seconds: float | None = None
    tinyfs: TinyFilesystem | None = field(default=None, repr=False)

    def serial_text(self) -> str:
        """Everything the guest printed on its serial console so far ('' if nothing)."""
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_serial(self, text: str, timeout: float = 60.0) -> float:
        """Wait until text appears in the serial log; return seconds since start.

        Raises GuestBootTimeout with the log's tail if it does not appear in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            if text in self.serial_text():
                return time.monotonic() - self.started_at
            if time.monotonic() >= deadline:
                tail = self.serial_text()[-2000:]
                raise GuestBootTimeout(
                    f"{self.name}: {text!r} not seen within {timeout}s; serial log tail:\n{tail}"
                )
            time.sleep(0.1)

    def wait_for_state(
        self, state: int, reason: int | None = None, timeout: float = 60.0
    ) -> tuple[int, int]:
        """Poll ``dom.state()`` until it equals (state, reason) (reason None: any).

        Returns the final (state, reason); raises TimeoutError with the last one seen.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                current = tuple(self.dom.state())
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                current = (libvirt.VIR_DOMAIN_NOSTATE, 0)  # transient guest gone
            if current[0] == state and (reason is None or current[1] == reason):
                return current  # type: ignore[return-value]
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name}: state {current}, wanted ({state}, {reason})")
            time.sleep(0.2)


class GuestFactory:
    """Creates e2e guests from the cached image and removes all of them on :meth:`cleanup`.

    ``conn`` is a read-write connection to qemu:///system (the factory opens one if None
    and closes it on cleanup). ``test_name`` goes into guest and directory names.
    """

    def __init__(
        self,
        image: GuestImage,
        conn: libvirt.virConnect | None = None,
        *,
        test_name: str = "test",
        images_root: Path = IMAGES_ROOT,
    ) -> None:
        self.image = image
        self._own_conn = conn is None
        self.conn = conn if conn is not None else open_conn()
        safe = "".join(c if c.isalnum() else "-" for c in test_name)[:24].strip("-") or "test"
        self.run_id = f"{safe}-{os.getpid()}-{uuidlib.uuid4().hex[:6]}"
        self.directory = Path(images_root) / self.run_id
        self.guests: list[Guest] = []
        self._counter = itertools.count(1)
        self._closed = False

    def new_name(self, label: str = "g") -> str:
        """A unique domain name: ``vwe2e-<label>-<random>``."""
        return f"{NAME_PREFIX}{label}-{next(self._counter)}-{uuidlib.uuid4().hex[:8]}"

    def create(
        self,
        label: str = "g",
        *,
        options: Mapping[str, object] | None = None,
        persistent: bool = False,
        disk: bool | Path = True,
        disk_size: str = "64M",
        tiny_fs: bool = False,
        tiny_fs_size: str = "2M",
        wait: bool = True,
        boot_timeout: float = 60.0,
        paused: bool = False,
        **xml_kwargs: object,
    ) -> Guest:
        """Create and start one guest; by default wait for its ``VW READY`` line.

        label      short tag in the name (``vwe2e-LABEL-N-xxxxxxxx``).
        options    ``vw.*`` init options, e.g. ``{"io": 1, "net": 1, "panic": 3}``.
        persistent define + create (needed for managed save) instead of a transient guest.
        disk       True: a fresh qcow2 of disk_size; a Path: that file; False: no disk.
        tiny_fs    put the qcow2 on a tiny tmpfs (tiny_fs_size) and set error_policy='stop':
                   with ``options={"fill": 8}`` the guest pauses with PAUSED/IOERROR.
        wait       wait for the ready marker (a guest that panics on boot: pass False).
        paused     start it paused (``VIR_DOMAIN_START_PAUSED``): QEMU and every device are
                   up, the guest never runs a CPU instruction; implies ``wait=False``.
        xml_kwargs passed to :func:`hostlib.domain.domain_xml` (agent, graphics, ...).
        """
        name = self.new_name(label)
        gdir = self.directory / name
        gdir.mkdir(parents=True, exist_ok=True)
        tinyfs = None
        disk_path: Path | None = None
        if tiny_fs:
            tinyfs = TinyFilesystem(gdir / "tinyfs", tiny_fs_size).mount()
            disk_path = tinyfs.disk("disk.qcow2", disk_size)
            xml_kwargs.setdefault("error_policy", "stop")
        elif isinstance(disk, Path):
            disk_path = disk
        elif disk:
            disk_path = create_qcow2(gdir / "disk.qcow2", disk_size)
        serial_log = gdir / "serial.log"
        xml = domain_xml(
            name,
            kernel=self.image.kernel,
            initrd=self.image.initrd,
            options=options,
            disk=disk_path,
            serial_log=serial_log,
            **xml_kwargs,  # type: ignore[arg-type]
        )
        start_flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        started = time.monotonic()
        try:
            if persistent:
                dom = self.conn.defineXML(xml)
                guest = Guest(name, dom, xml, gdir, serial_log, disk_path, True, started,
                              tinyfs=tinyfs)
                self.guests.append(guest)
                dom.createWithFlags(start_flags)
            else:
                dom = self.conn.createXML(xml, start_flags)
                guest = Guest(name, dom, xml, gdir, serial_log, disk_path, False, started,
                              tinyfs=tinyfs)
                self.guests.append(guest)
        except Exception:
            if tinyfs is not None and not any(g.tinyfs is tinyfs for g in self.guests):
                tinyfs.unmount()
            raise
        if wait and not paused:
            guest.boot_seconds = guest.wait_for_serial(READY_MARKER, boot_timeout)
        return guest

    def create_many(self, count: int, label: str = "g", **kwargs: object) -> list[Guest]:
        """Start count guests at once, then wait for all of them (boots overlap)."""
        wait = bool(kwargs.pop("wait", True)) and not kwargs.get("paused", False)
        timeout = float(kwargs.pop("boot_timeout", 60.0))  # type: ignore[arg-type]
        guests = [self.create(label, wait=False, **kwargs) for _ in range(count)]  # type: ignore[arg-type]
        if wait:
            for g in guests:
                g.boot_seconds = g.wait_for_serial(READY_MARKER, timeout)
        return guests

    def cleanup(self) -> None:
        """Destroy + undefine every guest made here, unmount tiny filesystems, remove files.

        Idempotent; closes the connection if the factory opened it. Survives a
        libvirtd restart during the test: a dead connection is reopened and the
        guests are looked up again by name.
        """
        conn = self.conn
        if self.guests and not _alive(conn):
            conn = open_conn()
        for guest in self.guests:
            dom = guest.dom
            if conn is not self.conn:
                try:
                    dom = conn.lookupByName(guest.name)
                except libvirt.libvirtError:
                    dom = None
            if dom is not None:
                remove_domain(dom)
            if guest.tinyfs is not None:
                guest.tinyfs.unmount()
        self.guests.clear()
        if conn is not self.conn:
            conn.close()
        _remove_tree(self.directory)
        if self._own_conn and not self._closed:
            self._closed = True
            try:
                self.conn.close()
            except libvirt.libvirtError:
                pass


def open_conn(uri: str = URI) -> libvirt.virConnect:
    """A read-write connection that survives idle periods in a test process.

    Once a libvirt event implementation is registered in the process (the
    in-process daemon tests do), new connections run keepalive through that
    event loop, which only turns while an async test runs: an idle connection
    of a sync test would be closed by libvirtd after ~30 s ("Broken pipe").
    Keepalive is switched off before the first ping, so libvirtd never starts it.
    """
    conn = libvirt.open(uri)
    try:
        conn.setKeepAlive(-1, 0)
    except libvirt.libvirtError:
        pass
    return conn


def _alive(conn: libvirt.virConnect) -> bool:
    try:
        return conn.isAlive() == 1 and conn.getLibVersion() > 0
    except libvirt.libvirtError:
        return False


def remove_domain(dom: libvirt.virDomain) -> None:
    """Destroy (if active) and undefine (if persistent, incl. managed save); ignore 'gone'."""
    gone = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)
    try:
        persistent = dom.isPersistent()
        if dom.isActive():
            dom.destroy()
        if persistent:
            dom.undefineFlags(_UNDEFINE_FLAGS)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() not in gone:
            raise


def purge_leftovers(conn: libvirt.virConnect, images_root: Path = IMAGES_ROOT) -> list[str]:
    """Remove every ``vwe2e-*`` domain and the e2e image directory left by earlier runs.

    Only call this when no other e2e session runs on the host. Returns the names removed.
    """
    removed = []
    for dom in conn.listAllDomains(0):
        if dom.name().startswith(NAME_PREFIX):
            remove_domain(dom)
            removed.append(dom.name())
    if Path(images_root).is_dir():
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split()[4] for line in f]
        root = str(Path(images_root).resolve())
        for mnt in sorted((m for m in mounts if m.startswith(root + "/")), reverse=True):
            if is_mountpoint(Path(mnt)):
                subprocess.run(["umount", "-l", mnt], capture_output=True)
        _remove_tree(Path(images_root))
    return removed


def _remove_tree(path: Path) -> None:
    """rm -rf path, but never across a mount point that is still mounted."""
    if not path.exists():
        return
    for sub in sorted(path.rglob("*"), reverse=True):
        if sub.is_dir() and is_mountpoint(sub):
            return  # leave it; an unmount failed and purge_leftovers will retry
    shutil.rmtree(path, ignore_errors=True)
