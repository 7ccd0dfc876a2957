"""Instant alerts: libvirt events and daemon conditions posted to Alertmanager.

- :mod:`.config`: the ``[alerts]`` settings (:class:`AlertSettings`).
- :mod:`.rules`: pure event → alert action mapping.
- :mod:`.client`: Alertmanager v2 delivery (queues, retries, self-metrics).
- :mod:`.alerter`: the :class:`Alerter` facade the daemon wires in.
"""

from .alerter import Alerter
from .client import AlertmanagerClient, AlertRecord
from .config import AlertSettings
from .rules import AlertAction, RuleContext, actions_for_event

__all__ = [
    "AlertAction",
    "AlertRecord",
    "AlertSettings",
    "Alerter",
    "AlertmanagerClient",
    "RuleContext",
    "actions_for_event",
]
