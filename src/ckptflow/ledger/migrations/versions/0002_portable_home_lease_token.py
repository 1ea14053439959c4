"""Portable home and fenced leases: paths relative to CKPTFLOW_HOME, a lease token.

1. `checkpoints.path` and `exports.path` become relative to the home when they lie inside
   it (an export to an explicit `--out` elsewhere stays absolute). The home of a row is
   the one its run recorded in `runs.config` (right even if the home was moved before this
   upgrade), else the directory of the SQLite file.
2. `runs.config["settings"]` no longer records `home` / `ledger_url`: the current settings
   say where files are, never the recorded ones.
3. `leases.token`: grows on every acquisition; writes are fenced by (holder, token).
4. At most one promoted export (a partial unique index). Should an interrupted two-step
   promotion of older versions have left two, the newest stays promoted (as it already won).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import PurePosixPath

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Keys of runs.config and of its recorded settings (see ckptflow.runs / ckptflow.settings).
_SETTINGS_KEY = "settings"
_PINNING_KEYS = ("home", "ledger_url")

# Lightweight tables: the migration must not depend on today's ORM models.
_runs = sa.table("runs", sa.column("id", sa.Integer), sa.column("config", sa.JSON))
_checkpoints = sa.table(
    "checkpoints", sa.column("id", sa.Integer), sa.column("run_id", sa.Integer), sa.column("path", sa.Text)
)
_exports = sa.table(
    "exports",
    sa.column("id", sa.Integer),
    sa.column("run_id", sa.Integer),
    sa.column("path", sa.Text),
    sa.column("promoted", sa.Boolean),
)
# The partial unique index that allows one promoted export.
_ONE_PROMOTED = "uq_exports_one_promoted"


def _sqlite_dir(bind: sa.Connection) -> str | None:
    """Directory of the SQLite database file, if this is one."""
    url = bind.engine.url
    db = url.database
    if url.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        return None
    return os.path.dirname(os.path.abspath(db))


def _relative(path: str, homes: list[str]) -> str:
    """`path` relative to the first of `homes` that contains it (POSIX separators); else unchanged."""
    if not os.path.isabs(path):
        return path
    norm = os.path.normpath(path)
    for home in homes:
        root = os.path.normpath(home)
        if norm == root or norm.startswith(root.rstrip(os.sep) + os.sep):
            return PurePosixPath(*os.path.relpath(norm, root).split(os.sep)).as_posix()
    return path


def _recorded_homes(bind: sa.Connection) -> dict[int, str]:
    """{run id: the absolute home its settings recorded}."""
    out = {}
    for run_id, config in bind.execute(sa.select(_runs.c.id, _runs.c.config)):
        home = ((config or {}).get(_SETTINGS_KEY) or {}).get("home")
        if isinstance(home, str) and os.path.isabs(home):
            out[run_id] = home
    return out


def _rewrite_paths(bind: sa.Connection, table: sa.TableClause, homes_of: dict[int, list[str]]) -> None:
    for row_id, run_id, path in bind.execute(sa.select(table.c.id, table.c.run_id, table.c.path)).all():
        new = _relative(path, homes_of.get(run_id, []))
        if new != path:
            bind.execute(sa.update(table).where(table.c.id == row_id).values(path=new))


def _unpin_settings(bind: sa.Connection) -> None:
    for run_id, config in bind.execute(sa.select(_runs.c.id, _runs.c.config)).all():
        settings = (config or {}).get(_SETTINGS_KEY)
        if isinstance(settings, dict) and any(k in settings for k in _PINNING_KEYS):
            unpinned = {k: v for k, v in settings.items() if k not in _PINNING_KEYS}
            bind.execute(sa.update(_runs).where(_runs.c.id == run_id).values(config={**config, _SETTINGS_KEY: unpinned}))


def upgrade() -> None:
    bind = op.get_bind()
    fallback = _sqlite_dir(bind)
    recorded = _recorded_homes(bind)
    run_ids = [r for (r,) in bind.execute(sa.select(_runs.c.id))]
    homes_of = {r: [h for h in (recorded.get(r), fallback) if h] for r in run_ids}
    _rewrite_paths(bind, _checkpoints, homes_of)  # (1)
    _rewrite_paths(bind, _exports, homes_of)
    _unpin_settings(bind)  # (2)
    with op.batch_alter_table("leases") as batch:  # (3)
        batch.add_column(sa.Column("token", sa.BigInteger(), nullable=False, server_default="0"))
    _one_champion(bind)  # (4)
    op.create_index(
        _ONE_PROMOTED, "exports", ["promoted"], unique=True,
        sqlite_where=sa.text("promoted"), postgresql_where=sa.text("promoted"),
    )


def _one_champion(bind: sa.Connection) -> None:
    promoted = _exports.c.promoted
    newest = bind.execute(sa.select(sa.func.max(_exports.c.id)).where(promoted.is_(True))).scalar()
    if newest is not None:
        bind.execute(sa.update(_exports).where(promoted.is_(True), _exports.c.id != newest).values(promoted=False))


def downgrade() -> None:
    """Back to absolute paths, against the SQLite file's directory (the only home known here)."""
    op.drop_index(_ONE_PROMOTED, table_name="exports")
    with op.batch_alter_table("leases") as batch:
        batch.drop_column("token")
    bind = op.get_bind()
    home = _sqlite_dir(bind)
    if home is None:
        return
    for table in (_checkpoints, _exports):
        for row_id, path in bind.execute(sa.select(table.c.id, table.c.path)).all():
            if not os.path.isabs(path):
                absolute = os.path.join(home, *PurePosixPath(path).parts)
                bind.execute(sa.update(table).where(table.c.id == row_id).values(path=absolute))
