"""Operator commands over the control socket: status, explain, hold, release, reset, override, events."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from typing import Any

from ..config import ConfigError, load_settings
from .common import (
    EXIT_CONFIG,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    print_config_error,
)


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
    from ..control import DaemonUnreachable, request

    try:
        path = _socket_path(args)
    except ConfigError as err:
        print_config_error(err)
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
