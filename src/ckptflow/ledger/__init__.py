"""The SQL ledger of runs, checkpoints, attempts, exports and run leases."""

from ckptflow.ledger.models import AttemptStatus, CheckpointState, RunStatus
from ckptflow.ledger.store import (
    AttemptRecord,
    CheckpointRecord,
    ExportRecord,
    Fence,
    Ledger,
    RunRecord,
    head_revision,
    held_fence,
    holding,
)

__all__ = [
    "AttemptRecord",
    "AttemptStatus",
    "CheckpointRecord",
    "CheckpointState",
    "ExportRecord",
    "Fence",
    "Ledger",
    "RunRecord",
    "RunStatus",
    "head_revision",
    "held_fence",
    "holding",
]
