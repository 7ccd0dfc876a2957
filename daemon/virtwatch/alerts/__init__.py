"""Instant alerts: libvirt events and daemon conditions posted to Alertmanager.

- :mod:`.config`: the ``[alerts]`` settings (:class:`~.config.AlertSettings`).
- :mod:`.rules`: pure event → alert action mapping.
- :mod:`.client`: Alertmanager v2 delivery (queues, retries, self-metrics).
- :mod:`.record`: :class:`~.record.AlertRecord`, one state of one alert.
- :mod:`.spool`: undelivered alerts kept in the state directory across restarts.
- :mod:`.alerter`: the :class:`~.alerter.Alerter` facade the daemon wires in.

Nothing is imported here, so that reading the configuration (which imports ``.config``)
does not load aiohttp's client.
"""
