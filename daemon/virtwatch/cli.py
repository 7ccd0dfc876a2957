"""Command line: ``virtwatch run | check-config | ...``.

Exit codes: 0 success; 1 runtime failure; 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import faulthandler
import json
import os
import signal
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from . import __version__
from .config import ConfigError, config_warnings, load_settings, write_access_note
from .console.crashstore import CrashStore

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


def check_config(path: str) -> int:
    """Validate ``path`` and the files it names as the service would use them; print ``OK``
    (plus warnings) or every error.

    Beyond the TOML itself: the web config file, its TLS certificate, key and CA files
    (loaded into a TLS context, as at start), its users, ``http.serve_console`` against its
    authentication, and the Alertmanager credential and CA files.
    """
    from .web.server import load_web_parts

    try:
        settings = load_settings(path)
    except ConfigError as err:
        _print_problems(err.source, err.errors)
        return EXIT_CONFIG
    problems = settings.alerts.file_problems()
    try:
        load_web_parts(settings.http.web_config_file, settings.http.serve_console)
    except ConfigError as err:
        where = f"http.web_config_file ({err.source})" if settings.http.web_config_file else "http"
        problems += [line if line.startswith("http.") else f"{where}: {line}" for line in err.errors]
    if problems:
        _print_problems(path, problems)
        return EXIT_CONFIG
    note = write_access_note(settings)  # what to grant when the features configured need libvirt write access
    for line in [f"warning: {w}" for w in config_warnings(settings)] + ([f"note: {note}"] if note else []):
        print(line, file=sys.stderr)
    print(f"{path}: OK")
    return EXIT_OK


def console_log_command(args: argparse.Namespace) -> int:
    """``virtwatch console-log``: load the configuration (for ``daemon.state_dir``
    and ``daemon.socket``), then :func:`console_log_main`. Exit 2 on a bad config."""
    try:
        settings = load_settings(args.config)
    except ConfigError as err:
        print(f"{err.source}: invalid configuration: {'; '.join(err.errors)}", file=sys.stderr)
        return 2
    return console_log_main(args, settings.daemon.state_dir, getattr(args, "socket", None) or settings.daemon.socket)


def console_log_main(args: argparse.Namespace, state_dir: str, socket_path: str) -> int:
    """Run ``console-log``; returns an exit code: 0 found; 1 no crash record, or the daemon
    unreachable; 2 a bad request; 3 the guest's console is not captured (HTTP 404).
    The live tail comes over the operator socket ``socket_path``, or over HTTP from
    ``args.url`` when given."""
    if args.crash is not None or args.list:
        path = Path(args.state_dir or state_dir) / "console.sqlite"
        if not path.exists():
            print(f"no crash records: {path} does not exist", file=sys.stderr)
            return 1
        store = CrashStore(path, read_only=True)
        try:
            if args.list:
                for i, r in enumerate(store.crashes(args.guest)):
                    print(f"{i + 1}\t{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.time))}\t"
                          f"{', '.join(r.events)}")
                return 0
            rec = store.crash(args.guest, args.crash)
        finally:
            store.close()
        if rec is None:
            print(f"no crash {args.crash} recorded for {args.guest}", file=sys.stderr)
            return 1
        print(f"# crash {args.crash} of {rec.guest} at "
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(rec.time))}: {', '.join(rec.events)}")
        print(rec.console_tail)
        if rec.log_tail:
            print(f"# serial log {rec.log_file}:")
            print(rec.log_tail)
        if rec.screenshot:
            print(f"# screenshot: {rec.screenshot}")
        return 0
    route = f"guests/{urllib.parse.quote(args.guest, safe='')}/console?lines={args.lines}"
    if args.url:
        got = _http_get_json(f"{args.url.rstrip('/')}/api/v1/{route}")
    else:
        from .control import DaemonUnreachable, request

        try:
            got = request(socket_path, "GET", f"/v1/{route}")
        except DaemonUnreachable as err:
            got = err
    if isinstance(got, Exception):
        print(f"daemon unreachable at {args.url or socket_path}: {got}", file=sys.stderr)
        return 1
    status, body = got
    if status != 200:  # the daemon says why (not captured, bad lines...)
        print(f"{args.guest}: {body.get('error') or status} (HTTP {status})", file=sys.stderr)
        return 3 if status == 404 else 2
    capture = body.get("capture") or {}
    if capture.get("status") not in (None, "attached") and capture.get("last_error"):
        print(f"# capture {capture['status']}: {capture['last_error']}", file=sys.stderr)
    for line in body.get("lines", []):
        print(line)
    return 0


def _http_get_json(url: str) -> tuple[int, dict[str, Any]] | Exception:
    """GET ``url`` → (status, JSON body), or the error when the daemon cannot be reached."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        try:
            body = json.loads(err.read())
        except (ValueError, OSError):
            body = {}
        return err.code, body if isinstance(body, dict) and body.get("error") else {"error": str(err.reason)}
    except (urllib.error.URLError, OSError, ValueError) as err:  # ValueError: not a URL
        return err


EXIT_UNREACHABLE, EXIT_NOT_FOUND, EXIT_UNAVAILABLE = 1, 3, 4
EXIT_USAGE = 2  # as argparse


def _socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    if args.config:
        return load_settings(args.config).daemon.socket
    return "/run/virtwatch/virtwatch.sock"


def operator_command(args: argparse.Namespace) -> int:
    """status / explain / hold / release / reset / override / events over the control socket.

    Exit codes: 0 ok, 1 daemon unreachable, 2 usage/config or input the daemon
    rejected (HTTP 400), 3 unknown guest, 4 feature unavailable (e.g. policy disabled).
    """
    from .control import DaemonUnreachable, request

    try:
        path = _socket_path(args)
    except ConfigError as err:
        _print_config_error(err)
        return EXIT_CONFIG
    cmd, guest = args.command, getattr(args, "guest", None)
    if guest is not None and (not guest or not guest.isprintable() or len(guest) > 1024):
        print(f"virtwatch: not a guest name: {guest!r}", file=sys.stderr)
        return EXIT_USAGE
    if cmd == "status":
        method, url = "GET", f"/v1/guests/{_quote(guest)}" if guest else "/v1/status"
    elif cmd == "explain":
        method, url = "GET", f"/v1/explain/{_quote(guest)}"
    elif cmd == "events":
        method, url = "GET", f"/v1/events?since={args.since}&limit={args.limit}"
    elif cmd == "override":
        try:
            values: dict[str, Any] | None = override_values(args.pairs, args.clear)
        except ValueError as err:
            print(f"virtwatch: {err}", file=sys.stderr)
            return EXIT_USAGE
        method, url = "PUT", f"/v1/guests/{_quote(guest)}/override"
    else:
        method, url = "POST", f"/v1/guests/{_quote(guest)}/{cmd}"
    try:
        status, body = request(path, method, url, values if cmd == "override" else None)
    except DaemonUnreachable as err:
        print(f"virtwatch: cannot reach the daemon: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if status != 200:
        print(f"virtwatch: {body.get('error', status)}", file=sys.stderr)
        return {404: EXIT_NOT_FOUND, 400: EXIT_USAGE}.get(status, EXIT_UNAVAILABLE)
    if args.json:
        print(json.dumps(body, indent=2, sort_keys=True))
        return EXIT_OK
    for line in _render(cmd, guest, body):
        print(line)
    return EXIT_OK


def override_values(pairs: list[str], clear: bool) -> dict[str, Any]:
    """``KEY=VALUE`` words → ``{key: value}`` for ``virtwatch override`` ({} with ``clear``).

    VALUE is read as a TOML value when it is one (``2``, ``2.5``, ``true``,
    ``["managedsave:300"]``), else taken as the word itself (``leave``,
    ``dry-run``, ``managedsave:300,destroy:30``); the daemon validates it.
    Raises ValueError for a malformed or repeated pair, pairs with ``clear``, or neither.
    """
    if clear:
        if pairs:
            raise ValueError("--clear takes no KEY=VALUE pairs")
        return {}
    if not pairs:
        raise ValueError("give KEY=VALUE pairs or --clear")
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        if key in out:
            raise ValueError(f"{key} given twice")
        out[key] = _toml_value(raw.strip())
    return out


def _toml_value(raw: str) -> Any:
    scalar = (bool, int, float, str)
    if "\n" in raw:  # one value, never a second TOML line
        return raw
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    if isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(x, scalar) for x in value)):
        return value
    return raw  # dates, tables: not policy values; the daemon names the key


def _quote(name: str | None) -> str:
    from urllib.parse import quote

    return quote(name or "", safe="")


def _render(cmd: str, guest: str | None, body: dict[str, Any]) -> list[str]:
    if cmd == "explain":
        return list(body.get("lines", []))
    if cmd == "events":
        return [f"{e['seq']:>7} {e['time']:.3f} {e['source']}/{e['kind']} {e['name']} {e['event']}/{e['detail']}"
                for e in body.get("events", [])]
    if cmd == "status" and guest is None:
        lines = [f"libvirt {body['uri']}: {'connected' if body['connected'] else 'NOT connected'}"
                 f"{' (read-only)' if body.get('read_only') else ''}; {body['guests']} guests; "
                 f"policy {'on' if body.get('policy_enabled') else 'off'}"]
        for g in body.get("guest_list", []):
            pol = g.get("policy") or {}
            extra = ""
            if pol:
                extra = f" intent={pol['intent']}{' GIVEN UP' if pol['given_up'] else ''}"
                if pol.get("next_retry"):
                    extra += f" next_retry={pol['next_retry']:.0f}"
            lines.append(f"  {g['name']:<24} {g['state']:<10} {g['reason']:<14}{extra}")
        return lines
    pol = body.get("policy")
    if cmd == "override":
        ov = (pol or {}).get("override") or {}
        return [f"{body['name']}: override set: {_fmt_override(ov)}" if ov else f"{body['name']}: override cleared"]
    if cmd in ("hold", "release", "reset"):
        return [f"{body['name']}: {cmd} done; intent={pol['intent'] if pol else '?'}"
                f"{' GIVEN UP' if pol and pol['given_up'] else ''}"]
    lines = [f"{body['name']} ({body['uuid']}): {body['state']} ({body['reason']})"]
    if body.get("last_event"):
        lines.append(f"  last event: {body['last_event']['event']}/{body['last_event']['detail']}")
    if pol:
        lines.append(f"  policy: intent={pol['intent']} managed={pol['managed']} mode={pol['mode']} "
                     f"given_up={pol['given_up']} attempt={pol['attempt']} restarts={pol['restarts']}")
        if pol.get("override"):
            lines.append(f"  override: {_fmt_override(pol['override'])}")
    for key in ("agent_connected", "cpu_percent"):
        if body.get(key) is not None:
            lines.append(f"  {key}: {body[key]}")
    agent = body.get("agent")
    if agent:
        for key, value in agent.items():
            if value not in (None, "", [], {}):
                lines.append(f"  agent {key}: {value}")
    console = body.get("console")
    if console:
        lines.append(f"  console: {console}")
    return lines


def _fmt_override(ov: dict[str, Any]) -> str:
    return " ".join(f"{k}={v!r}" for k, v in sorted(ov.items()))


def guests_save(args: argparse.Namespace) -> int:
    """``virtwatch guests-save``: the host-shutdown save path (see the policy engine)."""
    from .logs import configure_logging

    try:
        settings = load_settings(args.config, {"libvirt.uri": args.uri})
    except ConfigError as err:
        _print_config_error(err)
        return EXIT_CONFIG
    configure_logging(settings.log.format, settings.log.level)
    if not settings.policy.enabled:
        print("virtwatch guests-save: [policy] enabled = false: nothing to do", file=sys.stderr)
        return EXIT_OK
    return asyncio.run(_guests_save(settings))


async def _guests_save(settings: Any) -> int:
    import libvirt

    from .policy.engine import PolicyEngine
    from .policy.libvirt_port import LibvirtHypervisor
    from .policy.store import AsyncStore
    from .virt.aio import register_event_impl

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
    # A crash inside a C library (libvirt) prints every thread's Python stack to stderr (the journal).
    faulthandler.enable()
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


def _print_problems(source: str, problems: list[str]) -> None:
    count = len(problems)
    print(f"{source}: invalid configuration ({count} problem{'s' if count != 1 else ''}):", file=sys.stderr)
    for line in problems:
        print(f"  {line}", file=sys.stderr)


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
    from .systemd import Notifier, listen_fds, watchdog_task
    from .virt.aio import register_event_impl

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
    from .app import reload

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
