"""Choose the checkpoint to evaluate or export: the best verified one (or a given step)."""

from __future__ import annotations

import logging
from pathlib import Path

from ckptflow.errors import BadInputError, NoCheckpointError
from ckptflow.integrity import quarantine, verify_checkpoint
from ckptflow.ledger import CheckpointRecord, CheckpointState, Ledger, RunRecord
from ckptflow.policy import rank_best
from ckptflow.settings import Settings

log = logging.getLogger(__name__)


def choose_checkpoint(
    ledger: Ledger, run: RunRecord, settings: Settings, *, step: int | None = None
) -> tuple[CheckpointRecord, list[str]]:
    """The best committed checkpoint that verifies (or exactly `step`), with warnings for skipped ones.

    A candidate that fails verification is marked corrupt and quarantined; the next one is used.
    Raises BadInputError for an unknown `step`, NoCheckpointError when nothing verifies.
    """
    committed = ledger.checkpoints(run.id, states=[CheckpointState.COMMITTED])
    if step is not None:
        committed = [c for c in committed if c.step == step]
        if not committed:
            raise BadInputError(f"run {run.name!r} has no committed checkpoint at step {step}; see `ckptflow checkpoints {run.name}`")
    notes: list[str] = []
    ck = settings.checkpoint
    # Best first by the metric; with evaluation off no checkpoint has one, so the newest comes first.
    for candidate in rank_best(committed, ck.metric_key, ck.greater_is_better):
        problems = verify_checkpoint(Path(candidate.path), candidate.manifest_sha256)
        if not problems:
            return candidate, notes
        reason = "; ".join(problems)
        ledger.mark_checkpoint(run.id, candidate.step, CheckpointState.CORRUPT, reason)
        if Path(candidate.path).exists():
            quarantine(Path(candidate.path), settings.quarantine_dir(run.name), reason)
        notes.append(f"checkpoint-{candidate.step} failed verification ({reason}); using the next best")
        log.warning(notes[-1])
    raise NoCheckpointError(f"run {run.name!r} has no committed checkpoint that verifies" + (f" at step {step}" if step else ""))
