"""Prefect tasks: thin wrappers over ckptflow library functions (retries and caching live here)."""
