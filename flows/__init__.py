"""Prefect flows: short, read top to bottom; all work happens in ckptflow library calls."""
