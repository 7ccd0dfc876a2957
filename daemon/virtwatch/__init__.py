"""virtwatch: event-driven monitoring and guest-keeping daemon for libvirt hosts."""

__version__ = "0.2.0"
