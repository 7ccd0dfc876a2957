"""``virtwatch guests-save``: the host-shutdown save path, run by its own unit."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import structlog

from ..config import ConfigError, load_settings
from .common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    print_config_error,
)


def guests_save(args: argparse.Namespace) -> int:
    """``virtwatch guests-save``: the host-shutdown save path (see the policy engine)."""
    from ..logs import configure_logging

    try:
        settings = load_settings(args.config, {"libvirt.uri": args.uri})
    except ConfigError as err:
        print_config_error(err)
        return EXIT_CONFIG
    configure_logging(settings.log.format, settings.log.level)
    if not settings.policy.enabled:
        print("virtwatch guests-save: [policy] enabled = false: nothing to do", file=sys.stderr)
        return EXIT_OK
    return asyncio.run(_guests_save(settings))


async def _guests_save(settings: Any) -> int:
    import libvirt

    from ..policy.engine import PolicyEngine
    from ..policy.libvirt_port import LibvirtHypervisor
    from ..policy.store import AsyncStore
    from ..virt.aio import register_event_impl

    log = structlog.get_logger("virtwatch.cli")
    impl = register_event_impl()
    conn = await asyncio.to_thread(libvirt.open, settings.libvirt.uri)
    os.makedirs(settings.daemon.state_dir, mode=0o750, exist_ok=True)
    store = AsyncStore(os.path.join(settings.daemon.state_dir, "virtwatch.sqlite"))
    # conn is deleted on purpose below, once closed: the lambda is not called after that.
    hypervisor = LibvirtHypervisor(lambda: conn, timeout=settings.policy.action_timeout)  # noqa: F821
    engine = PolicyEngine(settings.policy, hypervisor, store, boot_id_path=settings.daemon.boot_id_file,
                          auto_boot_flow=False)
    try:
        await store.open()
        await engine.start()
        report = await engine.save_guests()
    finally:
        await engine.stop()
        await store.close()
        await asyncio.to_thread(conn.close)
        del conn
        try:
            async with asyncio.timeout(5):
                await impl.drain()
        except TimeoutError:
            pass
    if report.refused:
        log.warning("guests_save_refused", why=report.why)
        print(f"virtwatch guests-save: refused: {report.why}", file=sys.stderr)
        return EXIT_OK
    for name, step in sorted(report.results.items()):
        print(f"{name}: {step}")
    return EXIT_FAILURE if any(step == "failed" for step in report.results.values()) else EXIT_OK
