"""Per-batch attention metadata (upstream import path)."""
