"""The ``virtwatch`` command: the argument parser and the dispatch to each subcommand."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import __version__
from .check_config import check_config
from .common import EXIT_CONFIG
from .console_log import console_log_command
from .guests_save import guests_save
from .operator import operator_command
from .run import run


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

    def operator(name: str, help_text: str, guest: str | None = "GUEST") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text + " Talks to the running daemon over its "
                           "Unix socket (daemon.socket); the socket's permissions are the access control.")
        p.add_argument("--socket", help="control socket (default: daemon.socket of --config, else "
                       "/run/virtwatch/virtwatch.sock)")
        p.add_argument("--config", metavar="FILE", help="read daemon.socket from this configuration")
        p.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
        if guest == "GUEST":
            p.add_argument("guest", metavar="GUEST")
        elif guest == "OPTIONAL":
            p.add_argument("guest", metavar="GUEST", nargs="?")
        return p

    operator("status", "Show the daemon's state, or one guest's state and policy state.", "OPTIONAL")
    operator("explain", "Show a guest's merged policy, where each key came from and the decision it would take "
             "now.")
    operator("hold", "Hold a guest: virtwatch takes no action on it until released.")
    operator("release", "Release a held guest (intent follows its current state).")
    operator("reset", "Clear a guest's restart budget and given-up state.")
    ov = operator("override", "Set a guest's runtime policy override: the KEY=VALUE pairs (per-guest policy "
                  "keys, profile, mode) replace the override in force; --clear removes it. It outranks domain "
                  "metadata and [[policy.match]] rules, makes the guest managed and is kept across restarts.")
    ov.add_argument("pairs", nargs="*", metavar="KEY=VALUE", help="VALUE as in the TOML file (2.5, true, "
                    "[\"managedsave:300\"]); other words are strings: on_crash=leave mode=dry-run")
    ov.add_argument("--clear", action="store_true", help="remove the guest's override")
    ev = operator("events", "Show recent libvirt events.", None)
    ev.add_argument("--since", type=int, default=0, help="only events after this sequence number")
    ev.add_argument("--limit", type=int, default=50)

    save = sub.add_parser("guests-save", help="host shutdown: save/shut down managed guests",
                          description="Managed-save, shut down or destroy running managed guests by their "
                          "on_host_shutdown fallbacks, recording which were running (for the boot flow). For a "
                          "systemd ExecStop ordered before libvirtd stops. Refuses when libvirt-guests owns "
                          "host shutdown.")
    save.add_argument("--config", metavar="FILE", help="TOML configuration file")
    save.add_argument("--uri", help="libvirt URI (libvirt.uri)")

    check = sub.add_parser("check-config", help="validate a configuration file",
                           description="Validate FILE; print every problem. Exit 0 when valid, 2 otherwise.")
    check.add_argument("file", metavar="FILE")

    console_log = sub.add_parser("console-log", help="show a guest's captured console",
                         description="Print a guest's captured console. Without --crash: the live tail from the "
                         "running daemon, over its operator socket (daemon.socket), or over HTTP with --url when "
                         "the daemon serves consoles there (http.serve_console). With --crash N: the N-th most "
                         "recent crash record (1 = latest), read from console.sqlite in the state directory.")
    console_log.add_argument("guest", metavar="GUEST")
    console_log.add_argument("--crash", type=int, metavar="N", help="the N-th most recent crash (1 = latest)")
    console_log.add_argument("--list", action="store_true", help="list recorded crashes")
    console_log.add_argument("--lines", type=int, default=200, help="lines of the live tail (default 200)")
    console_log.add_argument("--config", metavar="FILE",
                             help="configuration file (for daemon.state_dir and daemon.socket)")
    console_log.add_argument("--state-dir", metavar="DIR", help="state directory (overrides the configuration)")
    console_log.add_argument("--socket", help="operator socket (default: daemon.socket of --config, else "
                             "/run/virtwatch/virtwatch.sock)")
    console_log.add_argument("--url", metavar="URL", help="read the live tail over HTTP from this daemon base URL "
                             "instead (only when it sets http.serve_console)")
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
    if args.command == "guests-save":
        return guests_save(args)
    if args.command in ("status", "explain", "hold", "release", "reset", "override", "events"):
        return operator_command(args)
    if args.command == "console-log":
        return console_log_command(args)
    parser.error(f"unknown command {args.command}")
    return EXIT_CONFIG
