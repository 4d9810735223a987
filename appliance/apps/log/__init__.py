"""The secure append-only log (issue 11)."""
