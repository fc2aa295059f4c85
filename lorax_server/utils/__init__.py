"""Weight loading, process groups and per-batch attention metadata."""
