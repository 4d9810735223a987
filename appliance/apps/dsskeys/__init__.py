"""Per-application DSS keys (issue 12 §1): docs/dsskeys.md."""
