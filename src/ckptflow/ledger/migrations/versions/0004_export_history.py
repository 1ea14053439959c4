"""Export history for retention and rollback: when an export became champion, when it was pruned.

`exports.promoted_at` orders champions (the previous champion is the one most recently
replaced; a rollback restores it without re-stamping); `exports.pruned_at` / `pruned_reason`
record that export retention deleted an export's files. The champion of an existing ledger
gets its creation time as `promoted_at`.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("exports") as batch:
        batch.add_column(sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("pruned_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("pruned_reason", sa.Text(), nullable=True))
    exports = sa.table("exports", sa.column("promoted", sa.Boolean), sa.column("created_at", sa.DateTime(timezone=True)), sa.column("promoted_at", sa.DateTime(timezone=True)))
    op.get_bind().execute(exports.update().where(exports.c.promoted.is_(True)).values(promoted_at=exports.c.created_at))


def downgrade() -> None:
    with op.batch_alter_table("exports") as batch:
        batch.drop_column("pruned_reason")
        batch.drop_column("pruned_at")
        batch.drop_column("promoted_at")
