"""ORM models of the ledger (SQLAlchemy 2.0 typed mappings).

The schema is created only by the Alembic migrations in `migrations/versions/`; these
classes must stay identical to them (a unit test compares the two).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Length of the short status/state columns (values are the enums below).
_STATE_LEN = 16
# Length of run names (archived names carry an `@<ISO timestamp>` suffix).
_NAME_LEN = 255


class CheckpointState(StrEnum):
    WRITING = "writing"
    COMMITTED = "committed"
    PRUNED = "pruned"
    CORRUPT = "corrupt"
    PARTIAL = "partial"


class RunStatus(StrEnum):
    RUNNING = "running"
    FAILED = "failed"
    COMPLETED = "completed"


class AttemptStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on the Python side on every backend (SQLite drops the offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the ledger stores timezone-aware UTC only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Key of the one-key object that stands for a non-finite float in a stored JSON document.
NONFINITE_TAG = "$float"
# Python float -> its tagged spelling, and back (the spellings are float()'s own).
_NONFINITE_NAMES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _tag_nonfinite(value: Any) -> Any:
    """`value` with every NaN/±inf float replaced by `{"$float": "nan"|"inf"|"-inf"}` (nested too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return {NONFINITE_TAG: "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, dict):
        return {k: _tag_nonfinite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_tag_nonfinite(v) for v in value]
    return value


def _untag_nonfinite(value: Any) -> Any:
    """Inverse of `_tag_nonfinite`; bare NaN/Infinity tokens (older SQLite rows) already come back as floats."""
    if isinstance(value, dict):
        if len(value) == 1 and value.get(NONFINITE_TAG) in _NONFINITE_NAMES:
            return _NONFINITE_NAMES[value[NONFINITE_TAG]]
        return {k: _untag_nonfinite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untag_nonfinite(v) for v in value]
    return value


class FiniteJSON(TypeDecorator[Any]):
    """JSON that every backend accepts: non-finite floats are stored as tagged objects and read back as floats.

    Python's json writes NaN/Infinity as bare tokens, which are not JSON: PostgreSQL's json type
    rejects them (a diverged run's metrics would fail the commit) and SQLite's JSON functions
    reject the whole document. Finite values are stored exactly as plain JSON, so no migration.
    """

    impl = JSON()
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return _tag_nonfinite(value)

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return _untag_nonfinite(value)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: FiniteJSON()}


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (UniqueConstraint("name", name="uq_runs_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(_NAME_LEN))
    status: Mapped[str] = mapped_column(String(_STATE_LEN))
    fingerprint: Mapped[str] = mapped_column(String(128))
    config: Mapped[dict[str, Any]]
    base_model: Mapped[str] = mapped_column(Text)
    total_steps: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (
        UniqueConstraint("run_id", "step", name="uq_checkpoints_run_step"),
        Index("ix_checkpoints_run_state", "run_id", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float)
    path: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(_STATE_LEN))
    metrics: Mapped[dict[str, Any]]
    bytes: Mapped[int] = mapped_column(BigInteger)
    manifest_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]
    pruned_at: Mapped[datetime | None]
    reason: Mapped[str | None] = mapped_column(Text)
    # When its copy on checkpoint.remote_url verified (NULL: no verified remote copy).
    remote_at: Mapped[datetime | None]


class Attempt(Base):
    __tablename__ = "attempts"
    __table_args__ = (Index("ix_attempts_run_chunk", "run_id", "chunk"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    chunk: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    start_step: Mapped[int] = mapped_column(Integer)
    end_step: Mapped[int] = mapped_column(Integer)
    resumed_from: Mapped[int | None] = mapped_column(ForeignKey("checkpoints.id", ondelete="SET NULL"))
    resumed_from_step: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(_STATE_LEN))
    error: Mapped[str | None] = mapped_column(Text)
    notes: Mapped[str | None] = mapped_column(Text)
    prefect_flow_run_id: Mapped[str | None] = mapped_column(String(64))
    prefect_task_run_id: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]


class Export(Base):
    __tablename__ = "exports"
    __table_args__ = (
        Index("ix_exports_run_id", "run_id"),
        # At most one champion, enforced by the database (partial unique index, SQLite and PostgreSQL).
        Index(
            "uq_exports_one_promoted",
            "promoted",
            unique=True,
            sqlite_where=text("promoted"),
            postgresql_where=text("promoted"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id"))
    path: Mapped[str] = mapped_column(Text)
    merged: Mapped[bool]
    metrics: Mapped[dict[str, Any]]
    promoted: Mapped[bool]
    created_at: Mapped[datetime]
    # When it last became champion by winning a retrain (a rollback does not change it): orders champions.
    promoted_at: Mapped[datetime | None]
    # When export retention deleted its files, and why (the row stays: the history of every decision).
    pruned_at: Mapped[datetime | None]
    pruned_reason: Mapped[str | None] = mapped_column(Text)


class Lease(Base):
    """At most one writer per run: who holds it, where, and when it last proved it is alive.

    `token` grows by one on every acquisition and is never reset (a released lease keeps its
    row, with holder ''): a write fenced by (holder, token) is refused once anyone took over.
    """

    __tablename__ = "leases"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    holder: Mapped[str] = mapped_column(Text)
    host: Mapped[str] = mapped_column(String(_NAME_LEN))
    pid: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    token: Mapped[int] = mapped_column(BigInteger, server_default="0")
