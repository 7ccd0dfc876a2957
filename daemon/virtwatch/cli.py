"""Command line: ``virtwatch run | check-config | ...``.

Exit codes: 0 success; 1 runtime failure; 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any, Sequence

import structlog

from . import __version__
from .config import ConfigError, config_warnings, load_settings

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="virtwatch", description="Event-driven monitoring and guest-keeping "
                                     "daemon for libvirt hosts.")
    parser.add_argument("--version", action="version", version=f"virtwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon", description="Run the daemon in the foreground. Flags "
                         "override the configuration file.")
    run.add_argument("--config", metavar="FILE", help="TOML configuration file (default: built-in defaults)")
    run.add_argument("--uri", help="libvirt URI (libvirt.uri), e.g. qemu:///system or test:///default")
    run.add_argument("--listen", metavar="HOST:PORT", help="HTTP listen address (http.listen), default :9177")
    run.add_argument("--poll-interval", type=float, metavar="SECONDS", help="statistics poll interval "
                     "(stats.poll_interval), default 15")
    run.add_argument("--log-format", choices=("json", "console"), help="log line format (log.format)")

    check = sub.add_parser("check-config", help="validate a configuration file",
                           description="Validate FILE; print every problem. Exit 0 when valid, 2 otherwise.")
    check.add_argument("file", metavar="FILE")
    from .virt.console import add_console_log_parser
    add_console_log_parser(sub)  # console-log GUEST [--crash N]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``virtwatch`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "run":
        return run(args)
    if args.command == "console-log":
        from .virt.console import console_log_command
        return console_log_command(args)
    parser.error(f"unknown command {args.command}")
    return EXIT_CONFIG


def check_config(path: str) -> int:
    """Validate ``path``; print ``OK`` (plus warnings) or every error."""
    try:
        settings = load_settings(path)
    except ConfigError as err:
        print(f"{path}: invalid configuration ({len(err.errors)} problem{'s' if len(err.errors) != 1 else ''}):",
              file=sys.stderr)
        for line in err.errors:
            print(f"  {line}", file=sys.stderr)
        return EXIT_CONFIG
    for w in config_warnings(settings):
        print(f"warning: {w}", file=sys.stderr)
    print(f"{path}: OK")
    return EXIT_OK


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"libvirt.uri": args.uri, "http.listen": args.listen, "stats.poll_interval": args.poll_interval,
            "log.format": args.log_format}


def run(args: argparse.Namespace) -> int:
    """``virtwatch run``: load config, then serve until SIGTERM/SIGINT; SIGHUP reloads."""
    from .logs import configure_logging

    overrides = _overrides(args)
    try:
        settings = load_settings(args.config, overrides)
    except ConfigError as err:
        _print_config_error(err)
        return EXIT_CONFIG
    configure_logging(settings.log.format, settings.log.level)
    log = structlog.get_logger("virtwatch.cli")
    for w in config_warnings(settings):
        log.warning("config_warning", message=w)
    try:
        return asyncio.run(_serve(settings, args.config, overrides))
    except KeyboardInterrupt:
        return EXIT_OK


def _print_config_error(err: ConfigError) -> None:
    print(f"{err.source}: invalid configuration:", file=sys.stderr)
    for line in err.errors:
        print(f"  {line}", file=sys.stderr)


async def _serve(settings: Any, config_path: str | None, overrides: dict[str, Any]) -> int:
    """Run the daemon; rebuild it from the re-read file on SIGHUP.

    systemd notify: READY=1 once the config is valid and the HTTP listener
    is bound (libvirtd may still be down), WATCHDOG=1 from a loop task,
    STATUS= every few seconds, RELOADING=1 around a reload, STOPPING=1.
    """
    from .app import Daemon
    from .logs import route_libvirt_errors
    from .systemd import Notifier, watchdog_task
    from .virt.aio import register_event_impl

    log = structlog.get_logger("virtwatch.cli")
    loop = asyncio.get_running_loop()
    notifier = Notifier.from_environ(os.environ, unset_environment=True)
    impl = register_event_impl(loop)  # before any connection is opened
    route_libvirt_errors()
    stop, reload = asyncio.Event(), asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)

    daemon = Daemon(settings, impl)
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
        holder["daemon"] = await _reload(holder["daemon"], impl, config_path, overrides, log)
        notifier.ready(status=holder["daemon"].status_line())
    log.info("virtwatch_stopping")
    notifier.stopping()
    for t in (watchdog, status):
        t.cancel()
    await holder["daemon"].stop()
    return EXIT_OK


async def _reload(daemon: Any, impl: Any, config_path: str | None, overrides: dict[str, Any], log: Any) -> Any:
    """Re-read the file; on success rebuild the daemon with it, else keep the old one."""
    from .app import Daemon

    try:
        new_settings = load_settings(config_path, overrides)
    except ConfigError as err:
        log.error("reload_rejected", source=err.source, errors=err.errors, kept="running configuration")
        return daemon
    if new_settings == daemon.settings:
        log.info("reload_unchanged")
        return daemon
    for w in config_warnings(new_settings):
        log.warning("config_warning", message=w)
    old_settings = daemon.settings
    await daemon.stop()
    fresh = Daemon(new_settings, impl)
    try:
        await fresh.start()
    except (OSError, ConfigError) as err:
        log.error("reload_failed", error=str(err), kept="previous configuration")
        await fresh.stop()
        fresh = Daemon(old_settings, impl)
        await fresh.start()
        return fresh
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
