"""Build (once) and cache the tiny e2e guest: a Debian cloud kernel plus a busybox initramfs.

The image is built from Debian packages only (``apt-get download``, never installed):

- ``linux-image-cloud-amd64`` → its versioned ``linux-image-6.1.0-*-cloud-amd64`` dependency
  gives ``vmlinuz`` and the virtio / pvpanic modules (``depmod -b`` on the extracted tree
  resolves their dependencies; the package ships no ``modules.dep``).
- ``busybox-static`` (installed on the host) is the whole userland.
- ``qemu-guest-agent`` gives ``/usr/sbin/qemu-ga``; the shared libraries ``ldd`` lists for
  it are copied from the host (qemu-system-x86 already pulls them in).

``guest-init.sh`` (next to this file) is ``/init``; it reads ``vw.*`` options from the
kernel command line, so one image serves every scenario. The cache directory holds
``vmlinuz``, ``initrd.img`` and a stamp; a stamp that matches :data:`IMAGE_VERSION` and the
init script's hash means the image is complete and is reused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: Bump when the image layout changes; the init script's hash is added automatically.
IMAGE_VERSION = "1"

#: Default cache directory; override with the ``VIRTWATCH_E2E_CACHE`` environment variable.
DEFAULT_CACHE_DIR = Path("/var/cache/virtwatch-e2e")

#: Kernel modules the guest loads (plus their dependencies, from modules.dep).
GUEST_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_balloon",
    "virtio_console",
    "pvpanic-mmio",  # binds the ISA/ACPI pvpanic device (<panic model='isa'/>)
    "pvpanic-pci",
)

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
AGENT_PACKAGE = "qemu-guest-agent"
BUSYBOX = Path("/bin/busybox")
INIT_SCRIPT = Path(__file__).with_name("guest-init.sh")
STAMP_NAME = "STAMP.json"


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: paths for ``<kernel>``/``<initrd>`` and what they contain."""

    kernel: Path
    initrd: Path
    kernel_release: str
    version: str


class ImageBuildError(RuntimeError):
    """Building the guest image failed (message says which step)."""


def cache_dir() -> Path:
    """The image cache directory: ``$VIRTWATCH_E2E_CACHE`` or ``/var/cache/virtwatch-e2e``."""
    return Path(os.environ.get("VIRTWATCH_E2E_CACHE") or DEFAULT_CACHE_DIR)


def image_version() -> str:
    """Version string recorded in the stamp: IMAGE_VERSION plus a hash of the init script."""
    digest = hashlib.sha256(INIT_SCRIPT.read_bytes()).hexdigest()[:12]
    return f"{IMAGE_VERSION}-{digest}"


def cached_image(directory: Path | None = None) -> GuestImage | None:
    """Return the cached image if it is complete and current, else None."""
    directory = directory or cache_dir()
    try:
        stamp = json.loads((directory / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    image = GuestImage(
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        kernel_release=stamp.get("kernel_release", ""),
        version=stamp.get("version", ""),
    )
    if image.version != image_version() or not (image.kernel.is_file() and image.initrd.is_file()):
        return None
    return image


def ensure_image(directory: Path | None = None, *, force: bool = False) -> GuestImage:
    """Return the guest image, building it first unless a complete current one is cached.

    Safe against concurrent callers (an flock on ``DIR/.lock``). Raises ImageBuildError.
    """
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)  # QEMU runs as libvirt-qemu and must read the files
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force:
            image = cached_image(directory)
            if image is not None:
                return image
        return _build(directory)


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command, raising ImageBuildError with its stderr on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise ImageBuildError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _apt_download(packages: list[str], dest: Path) -> list[Path]:
    """``apt-get download`` packages into dest (one ``apt-get update`` retry if lists are stale)."""
    cmd = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *packages]
    proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    if proc.returncode != 0:
        _run(["apt-get", "update", "-q"])
        _run(cmd, cwd=dest)
    return sorted(dest.glob("*.deb"))


def _kernel_package() -> str:
    """The versioned kernel package the cloud meta-package depends on."""
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE]).stdout
    if not re.search(r"Depends:", out):
        _run(["apt-get", "update", "-q"])
        out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE]).stdout
    match = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)", out)
    if not match:
        raise ImageBuildError(f"no versioned kernel dependency in: {out!r}")
    return match.group(1)


def _module_load_order(moddir: Path, wanted: tuple[str, ...]) -> list[str]:
    """Relative paths of the wanted modules and their dependencies, dependencies first.

    Modules built into the kernel (modules.builtin) are skipped.
    """
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
    by_name = {Path(p).name.split(".ko")[0].replace("-", "_"): p for p in deps}
    builtin_text = (moddir / "modules.builtin").read_text()
    builtin = {Path(p).name.split(".ko")[0].replace("-", "_") for p in builtin_text.split()}

    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in builtin:
            continue
        if key not in by_name:
            raise ImageBuildError(f"kernel module {name} is neither a module nor built in")
        visit(by_name[key])
    return order


def _host_libraries(binary: Path) -> list[Path]:
    """Absolute paths of the shared libraries ``ldd`` resolves for binary (incl. the loader)."""
    out = _run(["ldd", str(binary)]).stdout
    libs: list[Path] = []
    for line in out.splitlines():
        if "not found" in line:
            raise ImageBuildError(f"{binary}: missing host library: {line.strip()}")
        match = re.search(r"(/\S+)\s+\(0x", line)
        if match:
            libs.append(Path(match.group(1)))
    return libs


def _copy_into(root: Path, src: Path, dest: str | None = None, mode: int | None = None) -> None:
    """Copy src (following symlinks) into the initramfs tree at dest (default: same path)."""
    target = root / (dest or str(src)).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    os.chmod(target, mode if mode is not None else 0o755)


def _build(directory: Path) -> GuestImage:
    """Download, extract and assemble the image into directory; write the stamp last."""
    started = time.monotonic()
    (directory / STAMP_NAME).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="vw-image-") as tmp_name:
        tmp = Path(tmp_name)
        debs, kernel_tree, agent_tree, root = (tmp / d for d in ("debs", "k", "ga", "root"))
        for d in (debs, kernel_tree, agent_tree, root):
            d.mkdir()

        kernel_pkg = _kernel_package()
        _apt_download([kernel_pkg, AGENT_PACKAGE], debs)
        for deb in debs.glob("linux-image-*.deb"):
            _run(["dpkg-deb", "-x", str(deb), str(kernel_tree)])
        for deb in debs.glob(f"{AGENT_PACKAGE}_*.deb"):
            _run(["dpkg-deb", "-x", str(deb), str(agent_tree)])

        vmlinuz = sorted((kernel_tree / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise ImageBuildError(f"no vmlinuz in {kernel_pkg}")
        release = vmlinuz[0].name.removeprefix("vmlinuz-")
        moddir_parent = kernel_tree / "lib" / "modules"
        if not (moddir_parent / release).is_dir():
            moddir_parent = kernel_tree / "usr" / "lib" / "modules"
        _run(["depmod", "-b", str(moddir_parent.parent.parent), release])
        moddir = moddir_parent / release

        # Userland: busybox + init.
        _copy_into(root, BUSYBOX, "/bin/busybox")
        _copy_into(root, INIT_SCRIPT, "/init")

        # Modules, flat, with their load order.
        order = _module_load_order(moddir, GUEST_MODULES)
        (root / "lib" / "modules").mkdir(parents=True)
        for rel in order:
            _copy_into(root, moddir / rel, f"/lib/modules/{Path(rel).name}", 0o644)
        (root / "lib" / "modules" / "load-order").write_text(
            "".join(f"{Path(rel).name}\n" for rel in order)
        )

        # Guest agent + its libraries (from the host, at the paths ldd reports).
        qemu_ga = agent_tree / "usr" / "sbin" / "qemu-ga"
        if not qemu_ga.is_file():
            raise ImageBuildError("qemu-ga not found in the qemu-guest-agent package")
        _copy_into(root, qemu_ga, "/usr/sbin/qemu-ga")
        for lib in _host_libraries(qemu_ga):
            _copy_into(root, lib)

        # cpio newc, gzip.
        initrd_tmp = directory / "initrd.img.tmp"
        files = subprocess.run(
            ["find", ".", "-mindepth", "1"], cwd=root, capture_output=True, check=True
        ).stdout
        with open(initrd_tmp, "wb") as out:
            cpio = subprocess.Popen(
                ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
                cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )
            gzip = subprocess.Popen(["gzip", "-6", "-n"], stdin=cpio.stdout, stdout=out)
            assert cpio.stdin is not None and cpio.stdout is not None
            cpio.stdout.close()
            cpio.stdin.write(files)
            cpio.stdin.close()
            if cpio.wait() != 0 or gzip.wait() != 0:
                raise ImageBuildError("cpio | gzip failed")

        kernel_tmp = directory / "vmlinuz.tmp"
        shutil.copyfile(vmlinuz[0], kernel_tmp)
        for path in (kernel_tmp, initrd_tmp):
            os.chmod(path, 0o644)
        os.replace(kernel_tmp, directory / "vmlinuz")
        os.replace(initrd_tmp, directory / "initrd.img")

    version = image_version()
    stamp = {
        "version": version,
        "kernel_release": release,
        "kernel_package": kernel_pkg,
        "modules": [Path(rel).name for rel in order],
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (directory / f"{STAMP_NAME}.tmp").write_text(json.dumps(stamp, indent=2) + "\n")
    os.replace(directory / f"{STAMP_NAME}.tmp", directory / STAMP_NAME)
    return GuestImage(directory / "vmlinuz", directory / "initrd.img", release, version)
