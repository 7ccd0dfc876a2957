"""Fixtures for the end-to-end tests: a real libvirtd (qemu:///system) and tiny QEMU guests.

Every test under tests/e2e gets the ``e2e`` marker (deselect with ``-m "not e2e"``).
The whole directory is skipped only when the host cannot run it at all (not root, or
libvirtd not installed); otherwise a broken host setup is an error, not a skip.

Fixtures (all sync):
    e2e_host       session: starts virtlogd + libvirtd via .ci/start-libvirtd.sh, removes
                   leftover ``vwe2e-*`` guests of earlier runs; returns the URI.
    guest_image    session: the cached guest kernel + initramfs (hostlib.GuestImage).
    guest_factory  function: a hostlib.GuestFactory; destroys/undefines its guests after.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostlib import (
    URI,
    GuestFactory,
    GuestImage,
    check_guest_net_free,
    ensure_image,
    host_skip_reason,
    open_conn,
    purge_leftovers,
    start_libvirtd,
)

E2E_DIR = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m filtering, so -m "not e2e" deselects them
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test in this directory ``e2e``; skip them all if the host can't run them."""
    reason = host_skip_reason()
    for item in items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def e2e_host() -> str:
    """libvirtd is running and answers on qemu:///system; leftovers of old runs are gone."""
    reason = host_skip_reason()
    if reason:
        pytest.skip(reason)
    start_libvirtd()
    check_guest_net_free()
    # Under pytest-xdist several sessions share the host: only a plain session purges.
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        conn = open_conn()
        try:
            purge_leftovers(conn)
        finally:
            conn.close()
    return URI


@pytest.fixture(scope="session")
def guest_image(e2e_host: str) -> GuestImage:
    """The guest image, built on first use into $VIRTWATCH_E2E_CACHE (or /var/cache/...)."""
    return ensure_image()


@pytest.fixture(scope="module")
def module_guest_factory(guest_image: GuestImage, request: pytest.FixtureRequest) -> Iterator[GuestFactory]:
    """A GuestFactory shared by the tests of one module (guests that outlive a single test);
    every guest it made is destroyed and undefined after the module."""
    factory = GuestFactory(guest_image, test_name=request.module.__name__.rsplit(".", 1)[-1])
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def guest_factory(guest_image: GuestImage, request: pytest.FixtureRequest) -> Iterator[GuestFactory]:
    """A GuestFactory for one test; every guest it made is destroyed and undefined after."""
    factory = GuestFactory(guest_image, test_name=request.node.name)
    try:
        yield factory
    finally:
        factory.cleanup()
