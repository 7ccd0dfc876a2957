"""Policy engine: keep guests running by policy (restart, autostart, restore)."""
