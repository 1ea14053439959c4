"""Which file a SQLite ledger URL names — one rule for the ledger, preflight and export's target checks.

Light on purpose (SQLAlchemy's URL parser only, no engine, no Alembic): preflight and
`export --out` refusals use it before anything heavy is imported.
"""

from __future__ import annotations

from pathlib import Path


def sqlite_file(url: str) -> Path | None:
    """The database file of a file-based SQLite URL; None for a server database or an in-memory one.

    Raises sqlalchemy.exc.ArgumentError for a string that is not a URL at all.
    """
    from sqlalchemy.engine import make_url

    u = make_url(url)
    db = u.database
    if u.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:") or u.query.get("mode") == "memory":
        return None
    return Path(db)


__all__ = ["sqlite_file"]
