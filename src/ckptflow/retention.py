"""Apply the retention policy to a run: decide (policy.py, pure), then act (recovery.prune_checkpoints)."""

from __future__ import annotations

from collections.abc import Collection

from ckptflow.lease import lease_for_write
from ckptflow.ledger import AttemptStatus, CheckpointState, Ledger
from ckptflow.policy import RetentionDecision, decide_retention, retention_policy
from ckptflow.recovery import prune_checkpoints
from ckptflow.settings import CheckpointSettings


def steps_in_use(ledger: Ledger, run_id: int) -> set[int]:
    """Checkpoints that a running attempt resumed from: never deleted under it."""
    return {
        a.resumed_from_step
        for a in ledger.attempts(run_id)
        if a.status == AttemptStatus.RUNNING and a.resumed_from_step is not None
    }


def apply_retention(
    ledger: Ledger, run_id: int, ck: CheckpointSettings, *, dry_run: bool = False, uploading: Collection[int] = ()
) -> RetentionDecision:
    """Decide over the run's committed checkpoints and, unless `dry_run`, prune what the policy drops.

    Pruning happens under the run's lease (the one this process holds, else taken for the
    prune: RunLockedError while another live process trains the run), and the decision is
    made under it too, so it never races a training run's commits or its own retention.
    Steps in `uploading` (a background upload still reads them) are not deleted now; the
    next retention after the uploads drained prunes them. Remote copies of pruned
    checkpoints on `ck.remote_url` are deleted too.
    """
    if dry_run:
        return _decide(ledger, run_id, ck)[0]
    with lease_for_write(ledger, run_id):
        decision, in_use = _decide(ledger, run_id, ck)
        if decision.prune:
            prune_checkpoints(ledger, run_id, decision.prune, never_delete=in_use | set(uploading), remote_url=ck.remote_url)
    return decision


def _decide(ledger: Ledger, run_id: int, ck: CheckpointSettings) -> tuple[RetentionDecision, set[int]]:
    """(the decision, the steps in use it protected)."""
    committed = ledger.checkpoints(run_id, states=[CheckpointState.COMMITTED])
    in_use = steps_in_use(ledger, run_id)
    return decide_retention(retention_policy(ck), committed, protected=in_use), in_use
