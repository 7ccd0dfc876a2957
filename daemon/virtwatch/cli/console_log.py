"""``virtwatch console-log``: a guest's console tail and crash records."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ..config import ConfigError, load_settings
from ..console.crashstore import CrashStore


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
        from ..control import DaemonUnreachable, request

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
