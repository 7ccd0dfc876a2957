"""What a guest's console is made of, and the blocking libvirt calls that reach it.

:func:`parse_console_devices` and :func:`read_file_tail` read the domain XML and
the serial's virtlogd log file; :func:`open_console` and :func:`take_screenshot`
block on libvirt, so they run in the connection's worker thread (``Calls``),
never on the loop.
"""

from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

#: ``recv`` size per call, bytes.
RECV_CHUNK = 64 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class ConsoleDevices:
    """What the domain XML says about consoles: the first serial's virtlogd
    log file (None without ``<log file=...>``) and whether there is graphics."""

    log_file: str | None
    graphics: bool


def parse_console_devices(xml: str) -> ConsoleDevices:
    """Read ``devices/serial/log/@file`` (falling back to ``devices/console/log``)
    and the presence of ``devices/graphics`` from a domain XML (``XMLDesc``)."""
    root = ET.fromstring(xml)
    log_file = None
    for path in ("./devices/serial/log", "./devices/console/log"):
        el = root.find(path)
        if el is not None and el.get("file"):
            log_file = el.get("file")
            break
    return ConsoleDevices(log_file=log_file, graphics=root.find("./devices/graphics") is not None)


def read_file_tail(path: str, max_bytes: int) -> bytes:
    """The last ``max_bytes`` bytes of ``path`` (blocking; raises OSError)."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - max_bytes))
        return fh.read()


def open_console(conn: libvirt.virConnect, name: str, device: str | None,
                 flags: int) -> tuple[libvirt.virStream, ConsoleDevices, str]:
    """Blocking: look the guest up, read its XML, open its console into a new
    NONBLOCK stream (no stream callback: see :mod:`virtwatch.console.capture`).
    Returns (stream, devices, UUID). Raises libvirtError."""
    dom = conn.lookupByName(name)
    devices = parse_console_devices(dom.XMLDesc(0))
    stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
    try:
        dom.openConsole(device, stream, flags)
    except libvirt.libvirtError:
        try:
            stream.abort()
        except libvirt.libvirtError:
            pass
        raise
    return stream, devices, dom.UUIDString()


def take_screenshot(conn: libvirt.virConnect, uuid: str, path: str) -> str:
    """Blocking: ``virDomainScreenshot`` of screen 0 into ``path``; returns the
    MIME type. Uses a blocking stream read in this worker thread (no stream
    callback). Raises libvirtError/OSError."""
    dom = conn.lookupByUUIDString(uuid)
    stream = conn.newStream(0)
    try:
        mime = dom.screenshot(stream, 0, 0)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            while True:
                chunk = stream.recv(RECV_CHUNK)
                if not chunk or isinstance(chunk, int):
                    break
                fh.write(chunk)
        stream.finish()
    except BaseException:
        try:
            stream.abort()
        except libvirt.libvirtError:
            pass
        raise
    return mime
