"""``virtwatch run``: the process shell: signals, sd_notify, reload, watchdog, status."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import faulthandler
import os
import signal
import sys
from typing import Any

import structlog

from ..config import ConfigError, config_warnings, load_settings
from .common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    print_config_error,
)

#: Seconds a thread may hold the GIL while another waits for it (``sys.setswitchinterval``).
SWITCH_INTERVAL = 0.001


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"libvirt.uri": args.uri, "http.listen": args.listen, "stats.poll_interval": args.poll_interval,
            "log.format": args.log_format}


def run(args: argparse.Namespace) -> int:
    """``virtwatch run``: load config, then serve until SIGTERM/SIGINT; SIGHUP reloads."""
    from ..logs import configure_logging

    overrides = _overrides(args)
    try:
        settings = load_settings(args.config, overrides)
    except ConfigError as err:
        print_config_error(err)
        return EXIT_CONFIG
    configure_logging(settings.log.format, settings.log.level)
    # A crash inside a C library (libvirt) prints every thread's Python stack to stderr (the journal).
    faulthandler.enable()
    # A worker thread (a render, a libvirt answer being decoded) holds the GIL up to the switch
    # interval before the loop may answer a scrape: 1 ms instead of Python's 5.
    sys.setswitchinterval(SWITCH_INTERVAL)
    log = structlog.get_logger("virtwatch.cli")
    for w in config_warnings(settings):
        log.warning("config_warning", message=w)
    try:
        code = asyncio.run(_serve(settings, args.config, overrides))
    except KeyboardInterrupt:
        code = EXIT_OK
    # Everything is persisted and closed by now. Skip interpreter finalization: it frees
    # libvirt objects, and one still referenced by a C call stuck since a libvirtd died
    # would block on that connection's lock forever (seen after libvirtd restarts).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _serve(settings: Any, config_path: str | None, overrides: dict[str, Any]) -> int:
    """Run the daemon; rebuild it from the re-read file on SIGHUP.

    systemd notify: READY=1 once the config is valid and the HTTP listener
    is bound (libvirtd may still be down), WATCHDOG=1 from a loop task,
    STATUS= every few seconds, RELOADING=1 around a reload, STOPPING=1.
    """
    from ..app import Daemon
    from ..logs import route_libvirt_errors
    from ..systemd import Notifier, listen_fds, watchdog_task
    from ..virt.aio import register_event_impl

    log = structlog.get_logger("virtwatch.cli")
    loop = asyncio.get_running_loop()
    notifier = Notifier.from_environ(os.environ, unset_environment=True)
    passed = listen_fds(os.environ, os.getpid())  # virtwatch.socket: the operator socket, root:virtwatch 0660
    control_fd = passed.get("control")
    if passed and control_fd is None:
        log.warning("systemd_sockets_ignored", names=sorted(passed), hint="FileDescriptorName=control expected")
    impl = register_event_impl(loop)  # before any connection is opened
    # One worker for the daemon's non-libvirt blocking work (rendering /metrics, SQLite, bcrypt):
    # with one thread per lane, the process holds lanes + 2 threads at most (README, "Stuck guests").
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="virtwatch-worker"))
    route_libvirt_errors()
    stop, reload = asyncio.Event(), asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)

    daemon = Daemon(settings, impl, control_fd=control_fd)
    try:
        await daemon.start()
    except (OSError, ConfigError) as err:
        log.error("startup_failed", listen=settings.http.listen, error=str(err))
        await daemon.stop()
        return EXIT_CONFIG if isinstance(err, ConfigError) else EXIT_FAILURE
    notifier.ready(status=daemon.status_line())
    holder = {"daemon": daemon}
    watchdog = loop.create_task(watchdog_task(notifier, lambda: holder["daemon"].healthy()))
    status = loop.create_task(_status_loop(notifier, holder))
    while True:
        waiters = [loop.create_task(stop.wait()), loop.create_task(reload.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        if stop.is_set():
            break
        reload.clear()
        notifier.reloading()
        holder["daemon"] = await _reload(holder["daemon"], config_path, overrides, log, control_fd)
        notifier.ready(status=holder["daemon"].status_line())
    log.info("virtwatch_stopping")
    notifier.stopping()
    for t in (watchdog, status):
        t.cancel()
    await holder["daemon"].stop()
    return EXIT_OK


async def _reload(daemon: Any, config_path: str | None, overrides: dict[str, Any], log: Any,
                  control_fd: int | None = None) -> Any:
    """Re-read the file; if valid, replace the daemon keeping its state (:func:`virtwatch.app.reload`),
    else keep it as it is."""
    from ..app import reload

    try:
        new_settings = load_settings(config_path, overrides)
    except ConfigError as err:
        log.error("reload_rejected", source=err.source, errors=err.errors, kept="running configuration")
        return daemon
    # Rebuilt even when the file is unchanged: files it names (web config, TLS
    # certificates, password files) may have changed.
    for w in config_warnings(new_settings):
        log.warning("config_warning", message=w)
    fresh = await reload(daemon, new_settings, control_fd)
    if fresh.settings is new_settings:
        log.info("reloaded", source=config_path)
    return fresh


def _dump_tasks() -> None:
    """SIGUSR1: write every asyncio task's stack to stderr (debugging a stuck daemon)."""
    for task in asyncio.all_tasks():
        print(f"--- task {task.get_name()}", file=sys.stderr)
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


async def _status_loop(notifier: Any, holder: dict[str, Any]) -> None:
    last = ""
    while True:
        await asyncio.sleep(5.0)
        line = holder["daemon"].status_line()
        if line != last:
            notifier.status(line)
            last = line
