"""Small infrastructure shared by the daemon's features (no feature logic, no virtwatch imports)."""
