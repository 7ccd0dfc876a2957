"""The QEMU guest agent: ``settings`` (the ``[agent]`` section, imported by the config) and
``lane`` (:class:`~virtwatch.agent.lane.GuestAgent`, what the guest says about itself)."""
