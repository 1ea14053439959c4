"""The SQL ledger of runs, checkpoints, attempts, exports and run leases."""

from ckptflow.ledger.fencing import Fence, held_fence, holding
from ckptflow.ledger.models import AttemptStatus, CheckpointState, RunStatus
from ckptflow.ledger.store import (
    AttemptRecord,
    CheckpointRecord,
    ExportRecord,
    Ledger,
    RunRecord,
    head_revision,
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
