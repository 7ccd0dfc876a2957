"""Which libvirt events raise or clear which instant alerts: pure functions.

:func:`actions_for_event` maps one :class:`~virtwatch.model.Event` plus a
:class:`RuleContext` (host name, the alerts already active, optional policy
decision and console text) to a list of :class:`AlertAction` (fire or resolve).
The builders :func:`given_up`, :func:`restore_failed`, :func:`connection_lost`
and :func:`connection_restored` make the alerts the daemon raises itself.

No I/O, no clock: the event carries its own time. An alert is identified by
``(alertname, domain)``; ``domain`` is ``""`` for host-level alerts.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Collection, Mapping
from typing import Literal

from ..model import Event, Kind, Lifecycle, Source

GUEST_CRASHED = "VirtwatchGuestCrashed"
QEMU_FAILED = "VirtwatchQemuFailed"
WATCHDOG_FIRED = "VirtwatchWatchdogFired"
GUEST_IO_ERROR = "VirtwatchGuestIOError"
GIVEN_UP = "VirtwatchGivenUp"
RESTORE_FAILED = "VirtwatchRestoreFailed"
CONNECTION_LOST = "VirtwatchLibvirtConnectionLost"

#: Alerts the shipped Prometheus rules raise too, with the same labels (Alertmanager merges them).
RULE_TWINS = frozenset({GUEST_CRASHED, QEMU_FAILED})

#: Alerts a running guest clears (lifecycle STARTED/* or RESUMED/*).
CLEARED_BY_RUNNING = (GUEST_CRASHED, QEMU_FAILED, WATCHDOG_FIRED, GUEST_IO_ERROR, RESTORE_FAILED)

#: Watchdog actions after which the guest is no longer running.
_WATCHDOG_STOPPING = frozenset({"PAUSE", "SHUTDOWN", "POWEROFF"})

AlertKey = tuple[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class AlertAction:
    """Fire or resolve one alert.

    Attributes:
        op: ``"fire"`` or ``"resolve"``.
        alertname: the ``alertname`` label.
        domain: guest name (``domain`` label); ``""`` for host-level alerts.
        uuid: guest UUID (``uuid`` label), ``""`` if unknown.
        severity: ``critical`` or ``warning`` (fire only).
        summary: one-line ``summary`` annotation (fire only).
        description: ``description`` annotation (fire only).
        annotations: further annotations (``event``, ``device``, ``reason``,
            ``decision``, ``console``...).
        at: when the condition started (fire) or cleared (resolve), epoch
            seconds; ``None`` means "now" for whoever applies the action.
    """

    op: Literal["fire", "resolve"]
    alertname: str
    domain: str = ""
    uuid: str = ""
    severity: str = ""
    summary: str = ""
    description: str = ""
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    at: float | None = None

    @property
    def key(self) -> AlertKey:
        """``(alertname, domain)``, the identity of the alert."""
        return (self.alertname, self.domain)


@dataclasses.dataclass(frozen=True, slots=True)
class RuleContext:
    """What the rules need besides the event.

    Attributes:
        instance: host name (``instance`` label), used in texts.
        active: keys ``(alertname, domain)`` of alerts currently firing.
        decision: the policy decision taken on this event, as text, if any.
        console: last console lines of the guest, if captured.
        migrating_in: the guest is the incoming copy of a live migration (between
            ``STARTED/MIGRATED`` and ``RESUMED/MIGRATED``): its stop is a failed migration,
            the guest still runs on the source.
    """

    instance: str
    active: Collection[AlertKey] = frozenset()
    decision: str | None = None
    console: str | None = None
    migrating_in: bool = False


def _ts(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="milliseconds")


def _extra(ctx: RuleContext, **more: str) -> dict[str, str]:
    out = {k: v for k, v in more.items() if v}
    if ctx.decision:
        out["decision"] = ctx.decision
    if ctx.console:
        out["console"] = ctx.console
    return out


def _fire(ev: Event, ctx: RuleContext, name: str, severity: str, summary: str, what: str, **more: str) -> AlertAction:
    detail = f"{ev.event}/{ev.detail}" if ev.detail else ev.event
    desc = f"Guest {ev.name} (uuid {ev.uuid or '?'}) on {ctx.instance} {what} at {_ts(ev.time)} ({ev.kind} {detail})."
    if ctx.decision:
        desc += f" Policy: {ctx.decision}."
    return AlertAction(
        op="fire",
        alertname=name,
        domain=ev.name,
        uuid=ev.uuid,
        severity=severity,
        summary=summary.format(domain=ev.name, instance=ctx.instance),
        description=desc,
        annotations=_extra(ctx, event=f"{ev.kind} {detail}", **more),
        at=ev.time,
    )


def _resolve_all(ev: Event, ctx: RuleContext, names: Collection[str]) -> list[AlertAction]:
    return [
        AlertAction(op="resolve", alertname=n, domain=ev.name, uuid=ev.uuid, at=ev.time)
        for n in names
        if (n, ev.name) in ctx.active
    ]


def actions_for_event(ev: Event, ctx: RuleContext) -> list[AlertAction]:
    """Alert actions one event causes (often none).

    - lifecycle ``CRASHED/*`` or ``STOPPED/CRASHED`` fires ``VirtwatchGuestCrashed``;
    - lifecycle ``STOPPED/FAILED`` fires ``VirtwatchQemuFailed``;
    - kind ``watchdog`` fires ``VirtwatchWatchdogFired``; when the watchdog
      action leaves the guest running (reset, none, dump, inject-nmi) the alert
      is resolved at once (Alertmanager still shows it for the minimum firing
      duration the client applies);
    - kind ``io_error`` fires ``VirtwatchGuestIOError`` with ``device``,
      ``source`` and ``reason``; lifecycle ``SUSPENDED/IOERROR`` fires it too
      unless it is already active (the I/O error event carries more detail);
    - lifecycle ``STARTED/*`` or ``RESUMED/*`` resolves the active ones of
      ``CLEARED_BY_RUNNING`` for that guest;
    - a stop of the incoming copy of a migration (``ctx.migrating_in``: libvirt reports
      ``STOPPED/FAILED`` when a migration is aborted or refused) fires nothing: the guest
      still runs on the source.
    """
    if ev.source != Source.DOMAIN:
        return []
    if ev.kind == Kind.LIFECYCLE:
        if ctx.migrating_in and ev.event == Lifecycle.STOPPED:
            return []
        if ev.event == Lifecycle.CRASHED or (ev.event == Lifecycle.STOPPED and ev.detail == "CRASHED"):
            return [_fire(ev, ctx, GUEST_CRASHED, "critical", "Guest {domain} crashed on {instance}", "crashed")]
        if ev.event == Lifecycle.STOPPED and ev.detail == "FAILED":
            return [
                _fire(ev, ctx, QEMU_FAILED, "critical", "QEMU of guest {domain} failed on {instance}",
                      "stopped because its QEMU process failed")
            ]
        if ev.event == Lifecycle.SUSPENDED and ev.detail == "IOERROR":
            if (GUEST_IO_ERROR, ev.name) in ctx.active:
                return []
            return [
                _fire(ev, ctx, GUEST_IO_ERROR, "critical", "Guest {domain} paused on an I/O error on {instance}",
                      "was paused after a disk I/O error")
            ]
        if ev.event in (Lifecycle.STARTED, Lifecycle.RESUMED):
            return _resolve_all(ev, ctx, CLEARED_BY_RUNNING)
        return []
    if ev.kind == Kind.WATCHDOG:
        action = (ev.detail or str(ev.payload.get("action", ""))).upper()
        fire = _fire(ev, ctx, WATCHDOG_FIRED, "critical", "Watchdog fired in guest {domain} on {instance}",
                     f"had its watchdog fire (action {action or 'unknown'})", watchdog_action=action)
        if action in _WATCHDOG_STOPPING:
            return [fire]
        return [fire, AlertAction(op="resolve", alertname=WATCHDOG_FIRED, domain=ev.name, uuid=ev.uuid, at=ev.time)]
    if ev.kind == Kind.IO_ERROR:
        device = str(ev.payload.get("dev", "") or "")
        source = str(ev.payload.get("src", "") or "")
        reason = ev.detail or str(ev.payload.get("reason", "") or "")
        io_action = str(ev.payload.get("action", "") or "")
        return [
            _fire(ev, ctx, GUEST_IO_ERROR, "critical", "Guest {domain} hit a disk I/O error on {instance}",
                  f"hit an I/O error on device {device or '?'} ({source or 'unknown source'}), reason {reason or '?'}",
                  device=device, source=source, reason=reason, io_action=io_action)
        ]
    return []


def given_up(domain: str, uuid: str, instance: str, reason: str, decision: str | None = None,
             at: float | None = None) -> AlertAction:
    """``VirtwatchGivenUp``: the policy stopped restarting ``domain`` (needs an operator reset)."""
    desc = f"virtwatch on {instance} gave up keeping guest {domain} (uuid {uuid or '?'}) running: {reason}."
    desc += " Run 'virtwatch reset' after fixing the cause."
    return AlertAction(op="fire", alertname=GIVEN_UP, domain=domain, uuid=uuid, severity="critical",
                       summary=f"virtwatch gave up on guest {domain} on {instance}", description=desc,
                       annotations=_extra(RuleContext(instance, decision=decision), reason=reason), at=at)


def restore_failed(domain: str, uuid: str, instance: str, error: str, decision: str | None = None,
                   at: float | None = None) -> AlertAction:
    """``VirtwatchRestoreFailed``: restoring the managed-save image of ``domain`` failed."""
    desc = f"Restoring the saved state of guest {domain} (uuid {uuid or '?'}) on {instance} failed: {error}."
    if decision:
        desc += f" Policy: {decision}."
    return AlertAction(op="fire", alertname=RESTORE_FAILED, domain=domain, uuid=uuid, severity="critical",
                       summary=f"Restore of guest {domain} failed on {instance}", description=desc,
                       annotations=_extra(RuleContext(instance, decision=decision), error=error), at=at)


def connection_lost(uri: str, instance: str, reason: str, at: float | None = None) -> AlertAction:
    """``VirtwatchLibvirtConnectionLost``: the connection to libvirtd at ``uri`` died."""
    return AlertAction(op="fire", alertname=CONNECTION_LOST, severity="critical",
                       summary=f"virtwatch lost its libvirt connection on {instance}",
                       description=f"The connection to {uri} on {instance} was lost ({reason}); virtwatch is"
                                   " reconnecting. Guest events during the outage are not seen.",
                       annotations={"uri": uri, "reason": reason} if reason else {"uri": uri}, at=at)


def connection_restored(at: float | None = None) -> AlertAction:
    """Resolve ``VirtwatchLibvirtConnectionLost``."""
    return AlertAction(op="resolve", alertname=CONNECTION_LOST, at=at)
