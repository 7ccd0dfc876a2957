"""What a reload hands from the stopped daemon to the one built from the new configuration.

:meth:`virtwatch.app.Daemon.handover` makes it; :func:`virtwatch.app.reload` passes it to
the new :class:`~virtwatch.app.Daemon` (README, "Reload").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from prometheus_client import CollectorRegistry

from .agent.lane import AgentInfo
from .alerts.client import AlertMetrics
from .alerts.record import AlertRecord
from .alerts.rules import AlertKey
from .console.capture import GuestConsole
from .eventlog import RecentEvents
from .inventory import Inventory
from .liveness.monitor import GuestLiveness
from .metrics.history import GuestHistory
from .metrics.instruments import Instruments
from .state import GuestRegistry
from .virt.events import EventPump
from .virt.migration import MigrationTracker
from .virt.stats import Snapshot


@dataclasses.dataclass(frozen=True)
class Retained:
    """What a reload hands from the stopped daemon to the one built from the new
    configuration: all state the configuration does not define.

    Attributes:
        registry, instruments, alert_metrics: self-metrics (counters go on, never reset).
        pump: the event pump (sequence numbers and queued events go on).
        guests, recent, inventory: the guest table, the recent-events ring, the
            network/pool overlay.
        migrations: migrations in progress and the counts of ended ones.
        alerts: firing instant alerts (posted again at once, to the new Alertmanagers).
        consoles: each captured guest's console ring and counters.
        agent_info: what each guest agent said last.
        action_counts: policy action counters.
        snapshot: the last statistics poll (dropped when ``libvirt.uri`` changes).
        previous: the poll before it (CPU %).
        history: recent CPU and memory per guest (the status page's sparklines).
        uri: the libvirt URI these figures came from.
        started_at: when the process's first daemon started (epoch seconds).
        liveness: each guest's liveness state (probe results, counters, reboot window).
    """

    registry: CollectorRegistry
    instruments: Instruments
    alert_metrics: AlertMetrics
    pump: EventPump
    guests: GuestRegistry
    recent: RecentEvents
    inventory: Inventory
    migrations: MigrationTracker
    alerts: Mapping[AlertKey, AlertRecord]
    consoles: Mapping[str, GuestConsole]
    agent_info: Mapping[str, AgentInfo]
    action_counts: Mapping[tuple[str, str], int]
    snapshot: Snapshot | None
    previous: Snapshot | None
    history: GuestHistory
    uri: str
    started_at: float
    liveness: Mapping[str, GuestLiveness] = dataclasses.field(default_factory=dict)
