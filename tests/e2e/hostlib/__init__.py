"""Host-side helpers for virtwatch's end-to-end tests: a real libvirtd with tiny QEMU guests.

- :mod:`hostlib.image`   builds and caches the guest kernel + busybox initramfs.
- :mod:`hostlib.domain`  domain XML, qcow2 disks, the tiny-tmpfs disk-full trick.
- :mod:`hostlib.guests`  GuestFactory: start ``vwe2e-*`` guests, wait for boot, clean up.
- :mod:`hostlib.daemon`  run the real ``virtwatch`` command and scrape it.
- :mod:`hostlib.host`    start libvirtd (``.ci/start-libvirtd.sh``) and check prerequisites.
- :mod:`hostlib.twohosts` two more libvirtds (host A, host B) in their own mount + UTS
  namespaces, for live-migration tests (import it from there: it is not re-exported).
"""

from .daemon import VirtwatchProcess, free_port, sample
from .domain import GUEST_IP, HOST_TAP_IP, IMAGES_ROOT, TinyFilesystem, create_qcow2, domain_xml, kernel_cmdline
from .guests import (
    NAME_PREFIX,
    READY_MARKER,
    URI,
    Guest,
    GuestBootTimeout,
    GuestFactory,
    open_conn,
    purge_leftovers,
    remove_domain,
)
from .host import REPO_ROOT, START_SCRIPT, check_guest_net_free, host_skip_reason, libvirtd_pid, start_libvirtd, thaw
from .image import GuestImage, ImageBuildError, cache_dir, cached_image, ensure_image

__all__ = [
    "GUEST_IP",
    "HOST_TAP_IP",
    "IMAGES_ROOT",
    "NAME_PREFIX",
    "READY_MARKER",
    "REPO_ROOT",
    "START_SCRIPT",
    "URI",
    "Guest",
    "GuestBootTimeout",
    "GuestFactory",
    "GuestImage",
    "ImageBuildError",
    "TinyFilesystem",
    "VirtwatchProcess",
    "cache_dir",
    "cached_image",
    "check_guest_net_free",
    "create_qcow2",
    "domain_xml",
    "ensure_image",
    "free_port",
    "host_skip_reason",
    "kernel_cmdline",
    "libvirtd_pid",
    "open_conn",
    "purge_leftovers",
    "remove_domain",
    "sample",
    "start_libvirtd",
    "thaw",
]
