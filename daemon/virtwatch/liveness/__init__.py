"""Guest liveness (issue 12): failures libvirt reports no event for.

A feature package: ``detect.py`` (pure detectors: probe streaks, console patterns, reboot
windows, busy-but-silent), ``probes.py`` (the agent commands of a probe and how their answers
read), ``monitor.py`` (:class:`~virtwatch.liveness.monitor.LivenessMonitor`: schedules probes
on the agent's lane, feeds the detectors from events, console and statistics, raises the
instant alerts and hands each failure to the policy engine, and its metrics collector).
"""
