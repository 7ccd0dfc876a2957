"""The status page served at ``/``: one HTML document, inline CSS and SVG, no JavaScript.

Pure functions: :func:`render_page` takes what the HTTP layer read from memory (daemon
status, one :class:`GuestRow` per guest) and the current wall time, and returns the page.
Sparklines are inline ``<svg>`` polylines drawn from a guest's recent
:class:`~virtwatch.metrics.history.Point` list (no front-end dependency).
"""

from __future__ import annotations

import dataclasses
import html
import shlex
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from .history import Point

SPARK_WIDTH, SPARK_HEIGHT = 120, 24
CPU_COLOR, MEMORY_COLOR = "#0969da", "#8250df"
SPARK_BACKGROUND = "#f6f8fa"  # the whole history's width, so a short history shows as short


@dataclasses.dataclass(frozen=True)
class GuestRow:
    """What the page shows of one guest.

    Attributes:
        guest: the guest as the JSON API returns it (:func:`~virtwatch.metrics.http.guest_json`).
        extra: the daemon's per-guest extras (``cpu_percent``, ``console``, ``policy``).
        history: the guest's recent points, oldest first.
        capacity: points a full history holds (the sparkline's width in polls).
        console_served: the HTTP API serves console contents (``http.serve_console``); else
            the page names the operator command instead of linking.
    """

    guest: dict[str, Any]
    extra: dict[str, Any]
    history: Sequence[Point]
    capacity: int
    console_served: bool = False


def guest_path(name: str) -> str:
    """``/api/v1/guests/NAME``, the name percent-encoded (``/``, ``?``, ``#``, spaces...)."""
    return f"/api/v1/guests/{quote(name, safe='')}"


def sparkline(values: Sequence[float | None], capacity: int, top: float, label: str, color: str) -> str:
    """An inline SVG line of ``values`` (oldest first, None = gap), the newest at the right edge,
    one of ``capacity`` steps per value, 0 at the bottom and ``top`` at the top (values above
    are clipped to it). ``label`` is the accessible name and tooltip. Empty string without a value."""
    if not any(v is not None for v in values):
        return ""
    step = SPARK_WIDTH / max(1, capacity - 1)
    n = len(values)
    segments: list[list[tuple[float, int]]] = [[]]
    for i, v in enumerate(values):
        if v is None:
            if segments[-1]:
                segments.append([])
            continue
        x = SPARK_WIDTH - (n - 1 - i) * step
        # Whole pixels: a flat line at y.0 with a 2 px stroke covers two rows fully (crisp, no blending).
        y = round(SPARK_HEIGHT - 1 - min(max(v, 0.0), top) / top * (SPARK_HEIGHT - 2)) if top > 0 else SPARK_HEIGHT - 1
        segments[-1].append((x, y))
    shapes = []
    for seg in segments:
        if len(seg) > 1:
            pts = " ".join(f"{x:.1f},{y:.0f}" for x, y in seg)
            shapes.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        elif seg:
            x, y = seg[0]
            shapes.append(f'<circle cx="{x:.1f}" cy="{y:.0f}" r="1.5" fill="{color}"/>')
    text = html.escape(label)
    return (f'<svg class="spark" width="{SPARK_WIDTH}" height="{SPARK_HEIGHT}" viewBox="0 0 {SPARK_WIDTH} '
            f'{SPARK_HEIGHT}" role="img" aria-label="{text}"><title>{text}</title>'
            f'<rect width="{SPARK_WIDTH}" height="{SPARK_HEIGHT}" fill="{SPARK_BACKGROUND}"/>{"".join(shapes)}</svg>')


def cpu_sparkline(points: Sequence[Point], capacity: int) -> str:
    """CPU % of the last polls; the scale tops at 100 % (one host CPU) or the highest value."""
    values = [p.cpu_percent for p in points]
    known = [v for v in values if v is not None]
    if not known:
        return ""
    top = max(100.0, *known)
    label = f"CPU % over the last {len(values)} polls: now {_fmt_cpu(values[-1]) or 'unknown'}, " \
            f"max {max(known):.1f}, scale 0 to {top:.0f}"
    return sparkline(values, capacity, top, label, CPU_COLOR)


def memory_sparkline(points: Sequence[Point], capacity: int) -> str:
    """Memory of the last polls (see :func:`~virtwatch.metrics.history.memory_figure`),
    the scale from 0 to the highest value."""
    values: list[float | None] = [float(p.memory_bytes) if p.memory_bytes is not None else None for p in points]
    known = [v for v in values if v is not None]
    if not known:
        return ""
    source = next((p.memory_source for p in reversed(points) if p.memory_source), "")
    what = {"rss": "QEMU resident memory", "current": "balloon memory"}.get(source, "memory")
    label = f"{what} over the last {len(values)} polls: now {_fmt_bytes(values[-1]) or 'unknown'}, " \
            f"min {_fmt_bytes(min(known))}, max {_fmt_bytes(max(known))}"
    return sparkline(values, capacity, max(known), label, MEMORY_COLOR)


def _row(r: GuestRow, now: float) -> str:
    j, extra = r.guest, r.extra
    name = j["name"]
    last = j["last_event"]
    policy = extra.get("policy") or {}
    reason = html.escape(str(policy.get("given_up_reason") or ""))
    given_up = f'<td class="bad" title="{reason}">yes</td>' if policy.get("given_up") else "<td></td>"
    event = ""
    if last:
        event = html.escape(f"{last['event']}/{last['detail']}" if last["detail"] else last["event"])
        if last.get("time"):
            event += f' <span class="age">{html.escape(_fmt_age(last["time"], now))}</span>'
    path = guest_path(name)
    links = f'<a href="{html.escape(path)}">JSON</a>'
    if extra.get("console") is not None and r.console_served:
        links += f' · <a href="{html.escape(path + "/console")}">console</a>'
    elif extra.get("console") is not None:  # captured, but its text stays off this port (issue 13)
        links += (' · <span class="muted" title="console contents are served on the operator socket only">'
                  f'console: virtwatch console-log {html.escape(shlex.quote(name))}</span>')
    else:
        links += ' · <span class="muted" title="capture_console is off for this guest">no console</span>'
    state = j["state"]
    state_text = f"{state} ({j['reason']})"
    return (f'<tr><td><a href="{html.escape(path)}">{html.escape(name)}</a></td>'
            f'<td class="st-{html.escape(state)}" title="state {j["state_code"]}, reason {j["reason_code"]}">'
            f"{html.escape(state_text)}</td>"
            f'<td class="num">{_fmt_cpu(extra.get("cpu_percent"))}</td>'
            f"<td>{cpu_sparkline(r.history, r.capacity)}</td>"
            f'<td class="num">{_fmt_bytes(j["memory_balloon_current_bytes"])}</td>'
            f"<td>{memory_sparkline(r.history, r.capacity)}</td>"
            f"<td>{event}</td><td>{html.escape(_fmt_policy(policy))}</td>{given_up}<td>{links}</td></tr>")


def render_page(status: dict[str, Any], rows: Sequence[GuestRow], now: float, version: str) -> str:
    """The status page: daemon status (``uri``, ``connected``, ``last_poll_time``) and one
    table row per guest. ``now`` is the wall time (s) ages are measured from."""
    connected = "connected" if status.get("connected") else "NOT connected"
    capacity = max((r.capacity for r in rows), default=0)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>virtwatch</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:middle}}th{{background:#eee}}
td.num{{text-align:right;font-variant-numeric:tabular-nums}}.st-running{{color:#1a7f37}}
.st-paused,.st-shutdown{{color:#9a6700}}.st-crashed,.bad{{color:#cf222e;font-weight:bold}}.st-shutoff{{color:#57606a}}
.age,.muted{{color:#57606a;font-size:smaller}}svg.spark{{display:block}}</style></head>
<body><h1>virtwatch {html.escape(version)}</h1>
<p>libvirt <code>{html.escape(str(status.get('uri', '')))}</code>: <b>{connected}</b>;
{len(rows)} guests; last poll {html.escape(_fmt_age(status.get('last_poll_time'), now))}.</p>
<p><a href="/metrics">/metrics</a> · <a href="/api/v1/guests">/api/v1/guests</a> ·
<a href="/api/v1/events">/api/v1/events</a> · <a href="/healthz">/healthz</a></p>
<table><tr><th>Guest</th><th>State</th><th>CPU %</th><th>CPU history</th><th>Memory</th><th>Memory history</th>
<th>Last event</th><th>Policy</th><th>Given up</th><th>Links</th></tr>
{''.join(_row(r, now) for r in rows)}
</table>
<p class="muted">History: the last {capacity} polls per guest, newest on the right. CPU % is of one host CPU;
memory is what the guest costs the host (QEMU resident memory, or the balloon's size where the driver
reports no RSS).</p></body></html>
"""


def _fmt_bytes(v: float | None) -> str:
    if v is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return ""


def _fmt_policy(p: dict[str, Any]) -> str:
    """Policy column: "observed" for unmanaged guests, else mode and intent (and a pending action)."""
    if not p.get("managed"):
        return "observed"
    out = f"{p.get('mode', '')}, intent {p.get('intent', '')}"
    if p.get("pending_action"):
        out += f", {p['pending_action']} pending"
    return out


def _fmt_cpu(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def _fmt_age(t: float | None, now: float) -> str:
    if not t:
        return "never"
    return f"{max(0.0, now - t):.0f} s ago"
