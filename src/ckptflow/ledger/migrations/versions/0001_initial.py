"""Initial ledger schema: runs, checkpoints, attempts, exports, leases.

Revision ID: 0001
Revises:
Create Date: 2026-05-01

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("fingerprint", sa.String(128), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("base_model", sa.Text(), nullable=False),
        sa.Column("total_steps", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.UniqueConstraint("name", name="uq_runs_name"),
    )
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Float(), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=True),
        _ts("created_at"),
        _ts("pruned_at", nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.UniqueConstraint("run_id", "step", name="uq_checkpoints_run_step"),
    )
    op.create_index("ix_checkpoints_run_state", "checkpoints", ["run_id", "state"])
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("start_step", sa.Integer(), nullable=False),
        sa.Column("end_step", sa.Integer(), nullable=False),
        sa.Column(
            "resumed_from", sa.Integer(), sa.ForeignKey("checkpoints.id", ondelete="SET NULL"), nullable=True
        ),
        sa.Column("resumed_from_step", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("notes", sa.Text(), nullable=True),
        sa.Column("prefect_flow_run_id", sa.String(64), nullable=True),
        sa.Column("prefect_task_run_id", sa.String(64), nullable=True),
        _ts("started_at"),
        _ts("finished_at", nullable=True),
    )
    op.create_index("ix_attempts_run_chunk", "attempts", ["run_id", "chunk"])
    op.create_table(
        "exports",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("checkpoint_id", sa.Integer(), sa.ForeignKey("checkpoints.id"), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("merged", sa.Boolean(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("promoted", sa.Boolean(), nullable=False),
        _ts("created_at"),
    )
    op.create_index("ix_exports_run_id", "exports", ["run_id"])
    op.create_table(
        "leases",
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        _ts("acquired_at"),
        _ts("heartbeat_at"),
    )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_index("ix_exports_run_id", table_name="exports")
    op.drop_table("exports")
    op.drop_index("ix_attempts_run_chunk", table_name="attempts")
    op.drop_table("attempts")
    op.drop_index("ix_checkpoints_run_state", table_name="checkpoints")
    op.drop_table("checkpoints")
    op.drop_table("runs")
