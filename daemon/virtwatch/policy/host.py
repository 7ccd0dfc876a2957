"""Host facts the engine needs: the boot id, and whether libvirt-guests owns host shutdown.

Paths are injectable (tests point them at temporary files).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def read_boot_id(path: str | Path = BOOT_ID_PATH) -> str:
    """The current boot id (stripped). Raises OSError when unreadable."""
    return Path(path).read_text().strip()


@dataclasses.dataclass(frozen=True, slots=True)
class LibvirtGuestsPaths:
    """Where to look for libvirt-guests.

    Attributes:
        config_files: shell-variable files read by libvirt-guests, first existing wins.
        unit_dirs: systemd unit directories whose ``*.wants/`` hold enablement symlinks.
        unit: the unit name.
    """

    config_files: tuple[str, ...] = ("/etc/default/libvirt-guests", "/etc/sysconfig/libvirt-guests")
    unit_dirs: tuple[str, ...] = ("/etc/systemd/system",)
    unit: str = "libvirt-guests.service"


@dataclasses.dataclass(frozen=True, slots=True)
class LibvirtGuestsStatus:
    """Result of :func:`libvirt_guests_active`: ``active`` and a human ``why``."""

    active: bool
    enabled: bool
    on_shutdown: str
    why: str


def _read_var(path: Path, var: str) -> str | None:
    value = None
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(rf"\s*(?:export\s+)?{var}=(.*)$", line)
        if m:
            try:
                parts = shlex.split(m.group(1), comments=True)
            except ValueError:
                parts = [m.group(1).strip()]
            value = parts[0] if parts else ""
    return value


def libvirt_guests_active(paths: LibvirtGuestsPaths = LibvirtGuestsPaths()) -> LibvirtGuestsStatus:
    """Whether libvirt-guests will suspend/shut down guests at host shutdown.

    Active when its unit is enabled (a ``*.wants/`` symlink, not masked to
    /dev/null) and ``ON_SHUTDOWN`` is ``suspend`` (its default when unset) or
    ``shutdown``. Never raises: unreadable files count as absent.
    """
    enabled = False
    for d in paths.unit_dirs:
        base = Path(d)
        masked = base / paths.unit
        try:
            if masked.is_symlink() and str(masked.resolve()) == "/dev/null":
                return LibvirtGuestsStatus(False, False, "", f"{paths.unit} is masked")
            if any(base.glob(f"*.wants/{paths.unit}")):
                enabled = True
        except OSError:
            continue
    on_shutdown = "suspend"
    source = "default"
    for f in paths.config_files:
        p = Path(f)
        try:
            if p.is_file():
                v = _read_var(p, "ON_SHUTDOWN")
                if v is not None:
                    on_shutdown, source = v, str(p)
                break
        except OSError:
            continue
    acts = on_shutdown in ("suspend", "shutdown")
    if not enabled:
        return LibvirtGuestsStatus(False, False, on_shutdown, f"{paths.unit} is not enabled")
    if not acts:
        return LibvirtGuestsStatus(
            False, True, on_shutdown, f"{paths.unit} enabled but ON_SHUTDOWN={on_shutdown!r} ({source})"
        )
    return LibvirtGuestsStatus(
        True,
        True,
        on_shutdown,
        f"{paths.unit} is enabled with ON_SHUTDOWN={on_shutdown} ({source}): it owns host shutdown",
    )
