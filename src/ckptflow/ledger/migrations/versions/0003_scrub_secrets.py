"""No credentials at rest: mask passwords that older versions recorded in clear.

Before ckptflow typed the ledger URL as a secret, a run's recorded settings held it
(`runs.config["settings"]["ledger_url"]`, removed by 0002), and error texts could quote a
URL with its password (`attempts.error`, `attempts.notes`, `checkpoints.reason`). Every
`scheme://user:password@host` in those columns, and in any string inside `runs.config`,
becomes `scheme://user:***@host`. Not reversible: a downgrade keeps the masked text.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# `scheme://user:password@` → `scheme://user:***@` (the same rule as ckptflow.secrets.redact, frozen here).
_URL_PASSWORD = re.compile(r"(\w[\w+.-]*://[^:/@\s]*:)([^@\s]+)(@)")
_MASK = "***"
# (table, its primary key, free-text columns that may quote a URL).
_TEXT_COLUMNS = (("attempts", "id", ("error", "notes")), ("checkpoints", "id", ("reason",)))


def _mask(text: str) -> str:
    return _URL_PASSWORD.sub(rf"\g<1>{_MASK}\g<3>", text)


def _mask_json(value: Any) -> Any:
    if isinstance(value, str):
        return _mask(value)
    if isinstance(value, dict):
        return {k: _mask_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_json(v) for v in value]
    return value


def upgrade() -> None:
    bind = op.get_bind()
    runs = sa.table("runs", sa.column("id", sa.Integer), sa.column("config", sa.JSON))
    for run_id, config in bind.execute(sa.select(runs.c.id, runs.c.config)).all():
        masked = _mask_json(config)
        if masked != config:
            bind.execute(runs.update().where(runs.c.id == run_id).values(config=masked))
    for table_name, key, columns in _TEXT_COLUMNS:
        table = sa.table(table_name, sa.column(key, sa.Integer), *(sa.column(c, sa.Text) for c in columns))
        for row in bind.execute(sa.select(table.c[key], *(table.c[c] for c in columns))).all():
            values = {c: _mask(v) for c, v in zip(columns, row[1:]) if isinstance(v, str) and _mask(v) != v}
            if values:
                bind.execute(table.update().where(table.c[key] == row[0]).values(**values))


def downgrade() -> None:
    """Nothing to undo: masked text stays masked."""
