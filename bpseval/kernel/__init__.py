"""The math on arrays: additive per-cell sufficient statistics and their scores (no I/O)."""
