"""Remote copies of checkpoints: when a checkpoint's copy on `checkpoint.remote_url` was verified.

`checkpoints.remote_at` is set once the uploaded copy (manifest last) re-read from the remote
matched the manifest; it is cleared when retention deletes the copy or the row is rewritten.
NULL = no verified remote copy (never uploaded, upload unfinished or failed).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("remote_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("remote_at")
