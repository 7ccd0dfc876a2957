"""libvirt access: event loop, connection, events, stats."""
