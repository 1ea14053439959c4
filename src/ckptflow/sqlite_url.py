"""Which file a SQLite ledger URL names — one rule for the ledger, preflight and export's target checks.

Light on purpose (SQLAlchemy's URL parser only, no engine, no Alembic): preflight and
`export --out` refusals use it before anything heavy is imported.
"""

from __future__ import annotations

import re
from pathlib import Path

# `sqlite:///path` with nothing SQLAlchemy would decode or interpret (no query, %-escape, @ or #):
# read without importing SQLAlchemy (~0.15 s), so `ckptflow run` of a finished run answers fast.
_PLAIN_SQLITE = re.compile(r"sqlite(?:\+pysqlite)?:///([^?%@#]*)")


def plain_sqlite_url(url: str) -> bool:
    """Whether `url` is a plain SQLite file URL (stdlib sqlite3; `sqlite_file` reads it without SQLAlchemy)."""
    return _PLAIN_SQLITE.fullmatch(url) is not None


def sqlite_file(url: str) -> Path | None:
    """The database file of a file-based SQLite URL; None for a server database or an in-memory one.

    Raises sqlalchemy.exc.ArgumentError for a string that is not a URL at all.
    """
    plain = _PLAIN_SQLITE.fullmatch(url)
    if plain is not None:
        db = plain.group(1)
        return None if not db or db == ":memory:" or db.startswith("file:") else Path(db)
    from sqlalchemy.engine import make_url

    u = make_url(url)
    db = u.database
    if u.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:") or u.query.get("mode") == "memory":
        return None
    return Path(db)


__all__ = ["plain_sqlite_url", "sqlite_file"]
